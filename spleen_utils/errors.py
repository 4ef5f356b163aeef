"""One exception type for everything a user can cause (bad input, no network, wrong arguments).

The command line prints its message as one sentence and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class SpleenError(Exception):
    """An error the user can fix; its message is one clear sentence."""


class DataError(SpleenError):
    """Missing, corrupt or unsuitable data (download, NIfTI, dataset layout)."""


class NotAnImageError(DataError):
    """A file that is readable but is not a CT image (a mask or label map given as input)."""
