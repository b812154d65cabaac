"""The error classes: every error hf_epr raises on purpose derives from :class:`EPRError`."""


class EPRError(Exception):
    """Base class of every error hf_epr raises on purpose."""


class EPRFormatError(EPRError, ValueError):
    """A compressed file or folder is missing, corrupt, or not in a format this version reads."""
