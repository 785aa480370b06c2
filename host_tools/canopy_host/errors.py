"""User-facing errors: raised for mistakes and environmental faults, printed without a traceback."""


class CanopyError(Exception):
    """A problem the user can act on. The message says what happened and what to try."""

    exit_code = 2
