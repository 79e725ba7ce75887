"""Error types the command line turns into one clear message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: a file, a config key, a command-line value. Message names the culprit."""


class DataError(UserError):
    """An episode file or folder is missing, truncated, or has the wrong shape, dtype or values."""


class ConfigError(UserError):
    """An unknown config key, a value of the wrong type, or an unreadable config file."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, or does not match the model it is loaded into."""
