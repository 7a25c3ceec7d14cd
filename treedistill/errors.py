"""Errors the CLI turns into one clear line instead of a traceback."""


class UsageError(ValueError):
    """Bad input from the user (flag, config, data file, model path): exit code 2, one line."""
