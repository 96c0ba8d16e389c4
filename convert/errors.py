"""Errors a user can act on. The CLI prints their message on one line and exits 2."""


class MMConvertError(Exception):
    """Base class: bad input or usage. The message says what to do next."""

    exit_code = 2


class CheckpointError(MMConvertError):
    """The checkpoint is missing, unreadable or inconsistent with its config."""


class UnsupportedError(MMConvertError):
    """The checkpoint is well formed but uses something mmconvert cannot convert."""


class OutputError(MMConvertError):
    """The output location cannot be written (exists without --force, ...)."""
