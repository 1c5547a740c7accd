"""User-facing errors.

Raise :class:`MLCDError` for anything the user can fix (bad input, bad config, missing file).
The ``mlcd`` command prints its message without a traceback and exits with status 2.
The message must name the file, shard or key at fault.
"""


class MLCDError(Exception):
    """An error caused by the user's input, reported without a traceback."""
