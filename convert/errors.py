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


class BundleError(MMConvertError):
    """The folder is not an mmconvert bundle (no readable ``mmconvert.json``) or is incomplete."""


class HubError(MMConvertError):
    """The Hugging Face Hub refused a request for a reason not covered by a subclass."""


class HubLoginError(HubError):
    """No token: neither ``--token``, ``HF_TOKEN`` nor a saved ``hf auth login``."""


class HubAuthError(HubError):
    """The Hub rejected the token (HTTP 401): invalid, expired or revoked."""


class HubPermissionError(HubError):
    """The token is valid but may not write there (HTTP 403, or a read-only token)."""


class HubRepoNotFoundError(HubError):
    """The repository does not exist and will not be created (``--revision`` was given)."""


class HubConnectionError(HubError):
    """The Hub endpoint cannot be reached (network down, wrong ``HF_ENDPOINT``, offline mode)."""


class ChatTemplateError(MMConvertError):
    """A chat template (code from the checkpoint or GGUF) failed or hit a render limit:
    ``chat template: <cause>``, then where the template came from."""

    def __init__(self, cause: str, source: str | None = None):
        self.cause = cause
        self.source = source
        super().__init__(f"chat template: {cause}" + (f"\nin {source}" if source else ""))


class UnsafePathError(CheckpointError):
    """A file the checkpoint names (index entry, symlink) resolves outside its folder."""


class TamperedBundleError(BundleError):
    """A file verify would read differs from what the bundle's ``mmconvert.json`` records."""


class UntrustedCodeError(BundleError):
    """A bundle carries code mmconvert did not write (refused without ``--trust-bundle-code``)."""


class NonFiniteWeightsError(CheckpointError):
    """``--strict``: a weight holds NaN or Inf values (the message lists them per tensor)."""
