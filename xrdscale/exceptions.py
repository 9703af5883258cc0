"""The exceptions of xrdscale: every user-facing error derives from :class:`XrdscaleError`.

The CLI prints the message of an :class:`XrdscaleError` on one line and exits with a
non-zero status; any other exception is a bug and keeps its traceback. Messages say what
was given, what was expected, and what to do.
"""


class XrdscaleError(Exception):
    """Base class of the errors a user can cause and fix."""


class ConfigError(XrdscaleError, ValueError):
    """A configuration value, a spec or a phase library is invalid."""


class InputError(XrdscaleError, ValueError):
    """Input data (a raw file, a store, a CIF) is missing, malformed or inconsistent."""


class StorageError(XrdscaleError, OSError):
    """A URL cannot be read or written (missing, unreachable, no permission, bad credentials)."""


class IncompleteStoreError(InputError):
    """A store exists but was never marked complete (an interrupted or failed stage wrote it)."""


class StageFailed(XrdscaleError):
    """A stage of a campaign failed after all its attempts."""


class XrdscaleWarning(UserWarning):
    """Warnings of xrdscale (turned into errors in the test suite)."""
