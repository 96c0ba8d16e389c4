"""Every error a user can act on, in one module that imports nothing (every layer may raise
them). The CLI prints the first line of the message as ``error: ...`` and further lines
indented below it, and exits 2. Input errors are also ``ValueError``s and Hub errors
``RuntimeError``s, so library callers can catch them by the stdlib base too (never ``OSError``:
code that handles the operating system's errors must not swallow ours). Each carries what it is about as attributes: ``path`` (the file or folder) and ``name`` (a tensor,
key, option or id), ``None`` where there is none.
"""

from __future__ import annotations

import os


class MMConvertError(Exception):
    """Base class: bad input or usage. The message says what to do next."""

    exit_code = 2

    def __init__(self, message: str = "", *, path: str | os.PathLike | None = None,
                 name: str | None = None):
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)
        self.name = name


class CheckpointError(MMConvertError, ValueError):
    """The checkpoint is missing, unreadable or inconsistent with its config."""


class UnsupportedError(MMConvertError, ValueError):
    """The checkpoint is well formed but uses something mmconvert cannot convert."""


class OutputError(MMConvertError):
    """The output location cannot be written (exists without --force, ...)."""


class BundleError(MMConvertError, ValueError):
    """The folder is not an mmconvert bundle (no readable ``mmconvert.json``) or is incomplete."""


class HubError(MMConvertError, RuntimeError):
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


class ChatTemplateError(MMConvertError, ValueError):
    """A chat template (code from the checkpoint or GGUF) failed or hit a render limit:
    ``chat template: <cause>``, then where the template came from."""

    def __init__(self, cause: str, source: str | None = None):
        self.cause = cause
        self.source = source
        super().__init__(f"chat template: {cause}" + (f"\nin {source}" if source else ""),
                         path=source)


class UnsafePathError(CheckpointError):
    """A file the checkpoint names (index entry, symlink) resolves outside its folder."""


class TamperedBundleError(BundleError):
    """A file verify would read differs from what the bundle's ``mmconvert.json`` records."""


class UntrustedCodeError(BundleError):
    """A bundle carries code mmconvert did not write (refused without ``--trust-bundle-code``)."""


class NonFiniteWeightsError(CheckpointError):
    """``--strict``: a weight holds NaN or Inf values (the message lists them per tensor)."""


class RunInputError(MMConvertError, ValueError):
    """A run's inputs do not fit the bundle: embeddings, placeholders, template, options."""


class ProjectorFileError(MMConvertError, ValueError):
    """The projector GGUF is missing, unreadable, or breaks docs/gguf-projector.md."""


class ProjectorInputError(MMConvertError, ValueError):
    """Embeddings that do not fit the projector (unknown modality, wrong width, ...)."""


class LlamaRuntimeError(MMConvertError, RuntimeError):
    """llama.cpp is not installed, cannot load the file, or the prompt does not fit."""


class ReferenceFileError(MMConvertError, ValueError):
    """A reference file that cannot be used with this checkpoint (exit 2)."""


class ThresholdError(MMConvertError, ValueError):
    """A malformed ``--threshold`` (exit 2)."""


class CasesError(MMConvertError, ValueError):
    """A cases file that cannot be used (exit 2)."""


class UsageError(MMConvertError, ValueError):
    """Options that do not go together (exit 2)."""


# pyproject.toml's optional extras: what each adds to the base install. The one place that maps
# a job to the extra it needs; every "not installed" message is built from it.
EXTRAS: dict[str, tuple[str, ...]] = {
    "hf": ("torch", "transformers", "accelerate"),
    "verify": ("torch", "transformers", "accelerate"),
    "llama": ("llama-cpp-python",),
}


def install_hint(extra: str) -> str:
    """The command that installs ``extra`` today (mmconvert is not on PyPI: from a checkout)."""
    return f"pip install -e '.[{extra}]' in the mmconvert checkout"


class MissingExtraError(MMConvertError, RuntimeError):
    """A job needs an optional extra (``[hf]``, ``[verify]``, ``[llama]``) that is not
    installed; the message names the extra and the command that installs it."""

    def __init__(self, job: str, extra: str):
        self.job = job
        self.extra = extra
        super().__init__(f"{job} needs the [{extra}] extra ({', '.join(EXTRAS[extra])}): "
                         f"{install_hint(extra)}", name=extra)


def import_extra(module: str, *, extra: str, job: str):
    """``module`` imported, or :class:`MissingExtraError` naming ``extra`` for ``job``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(job, extra) from exc


class ImatrixError(MMConvertError, ValueError):
    """An importance-matrix file (``--imatrix``) that is unreadable, damaged, or does not fit
    the model (names, sizes), or calibration input ``mmconvert imatrix`` cannot use."""
