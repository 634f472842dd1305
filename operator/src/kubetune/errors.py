"""Errors that reach the user as one clear line instead of a traceback."""


class UsageError(Exception):
    """A bad flag, file or input: the CLI prints it as one line and exits 2."""
