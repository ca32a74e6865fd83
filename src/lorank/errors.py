"""The one exception type users see as a one-line message instead of a traceback."""


class LorankError(Exception):
    """A problem with the user's input (config, data, checkpoint, option) that they can fix.

    The CLI prints ``lorank: error: <message>`` and exits with status 2; the message must name
    what is wrong and how to fix it.
    """
