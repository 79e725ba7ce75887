"""`dreamerv4 play`: the browser page to play in the real game, the dream and with the agent (server.py)."""
