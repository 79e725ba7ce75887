"""Data: action spaces, episode folders, the sequence dataset, Crafter recording, MineRL conversion."""
