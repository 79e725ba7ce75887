"""Training phases and the loop they share."""
