"""User-facing errors.

A `SaelabError` is a mistake in what the user asked for or gave us (an unknown
site, a truncated file, mismatched widths). Its message says what was given,
what was expected and what to do; the command line prints it without a
traceback and exits with `exit_code`. Asserts remain for internal invariants.
"""


class SaelabError(Exception):
    """Base class of errors meant for the user, not for a traceback."""

    exit_code = 2


class UnknownModelError(SaelabError):
    pass


class SiteError(SaelabError):
    pass


class ShapeMismatchError(SaelabError):
    pass


class CorruptFileError(SaelabError):
    """A file that is truncated, fails its checksum or holds the wrong tensors."""

    exit_code = 3


class UnsafeFileError(SaelabError):
    """A file that could run code when read (a pickle) and is refused."""

    exit_code = 3


class OfflineError(SaelabError):
    pass


class BadValueError(SaelabError, ValueError):
    """A value out of its type or range (a count <= 0, a NaN rate, an unknown choice).

    Also a ValueError, so library callers that catch ValueError keep working.
    """
