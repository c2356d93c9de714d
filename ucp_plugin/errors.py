"""Exceptions raised to users. Every message names the file or parameter and says what to do."""


class UCPError(Exception):
    """Base class of every error this package raises on purpose."""


class FormatError(UCPError):
    """A checkpoint folder or file is not a valid universal checkpoint (missing, corrupt, too new)."""


class SpecError(UCPError):
    """A model's parameters do not match the declared checkpoint language (unmatched, ambiguous)."""


class LayoutError(UCPError):
    """A parallel layout cannot hold the model (divisibility, sizes); the message lists valid choices."""


class StateMismatchError(UCPError):
    """A checkpoint's parameters do not match the model being loaded (missing, extra, shape, dtype)."""


class UnsupportedError(UCPError):
    """A configuration that is visibly not supported (the message names the setting)."""
