"""The one base class of errors that mean bad input or a broken setup.

``cli.main`` catches it once: the message is printed on one line and the command exits with 2,
no traceback. Everything else is a bug or an outside failure and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input (a flag, a file, a layout, a checkpoint, a server) named in the message."""
