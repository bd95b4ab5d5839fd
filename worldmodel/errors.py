"""Errors that the CLI turns into one clear line and a non-zero exit, instead of a traceback."""


class UserError(Exception):
    """Bad input from the user (a flag, a file, a path): the message says what and where."""
