"""The one exception type users see as a one-line message instead of a traceback, the warning
category for surprising-but-legal outcomes, and the library's logger.

Library messages go to the ``lorank`` logger (silent unless the application configures
logging; ``lorank -v`` does); behaviour a user may not expect, such as a conversion that left
every layer dense, is a :class:`LowRankWarning` through :mod:`warnings`.
"""

import logging

logger = logging.getLogger("lorank")
logger.addHandler(logging.NullHandler())


class LowRankWarning(UserWarning):
    """Legal but probably not what was meant (e.g. no layer became low-rank)."""


class LorankError(Exception):
    """A problem with the user's input (config, data, checkpoint, option) that they can fix.

    The CLI prints ``lorank: error: <message>`` and exits with :attr:`exit_code`; the message
    must name what is wrong and how to fix it.
    """

    #: 2 for bad input (config, files, options); 1 for a run that failed while running.
    exit_code = 2


class TrainingDiverged(LorankError):
    """The loss or a parameter became NaN/inf; the run is marked ``diverged``."""

    exit_code = 1
