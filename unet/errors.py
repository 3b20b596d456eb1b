"""The one exception type that the command-line tools turn into a one-line message."""


class UserError(Exception):
    """A problem with the user's input (a file, a flag, a checkpoint) that they can fix.

    The message must name the file or flag and say what is wrong; the CLI prints
    ``error: <message>`` on one line and exits with status 2, no traceback.
    """
