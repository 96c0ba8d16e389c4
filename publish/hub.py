"""Push a bundle folder to the Hugging Face Hub: one commit with every file and the model card.

Everything goes through ``huggingface_hub`` (``HfApi.create_commit``), which picks the transport
per file after asking the Hub (``preupload``): small text files travel inline in the commit,
large ones through Xet when ``hf_xet`` is installed, else through Git LFS (a single PUT, or
multipart parts for large files, as the Hub's LFS batch answer says). ``create_commit`` rather
than ``upload_folder`` because the card is generated in memory (not written into the bundle,
whose files ``mmconvert.json`` hashes), and because it can open a pull request against any
branch. Re-running an interrupted push is cheap: files whose remote oid equals the local one are
dropped from the commit, LFS objects the Hub already holds are not sent again, and Xet
deduplicates chunks already uploaded.

The token is only ever handed to ``huggingface_hub`` (which sends it as a header and never logs
it); error messages are built here, and any text that could carry it is scrubbed.

    >>> push_bundle(Path("out/gguf"), "me/my-model-GGUF", private=True)
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from mmconvert import __version__
from mmconvert.errors import (
    HubAuthError,
    HubConnectionError,
    HubError,
    HubLoginError,
    HubPermissionError,
    HubRepoNotFoundError,
    MMConvertError,
    UsageError,
)
from mmconvert.publish.bundle_summary import CARD, BundleSummary, bundle_files, summarize_bundle
from mmconvert.publish.model_card import CardError, merge_card

if TYPE_CHECKING:  # imported lazily: huggingface_hub costs CLI start-up time
    from huggingface_hub import CommitOperationAdd, HfApi

TOKEN_HELP = ("log in with `hf auth login`, set HF_TOKEN, or pass --token "
              "(tokens: https://huggingface.co/settings/tokens)")
_TOKEN_CHARS = re.compile(r"^[\x21-\x7e]+$")  # what an HTTP header value can carry verbatim


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    created_repo: bool
    changed: bool  # False: every file was already there, byte for byte (no commit, no PR)
    files: int  # files pushed, the card included


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` when it is a Hub repo id ``OWNER/NAME`` (huggingface_hub's rules: letters,
    digits, ``-_.``, at most 96 characters, ...); :class:`UsageError` saying why otherwise.
    The one check of a repo id, for ``push --repo``, ``--push-to`` and :func:`push_bundle`."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(str(exc).splitlines()[0], name=repo_id) from None
    if repo_id.count("/") != 1:
        raise UsageError(f"{repo_id!r}: expected OWNER/NAME", name=repo_id)
    return repo_id


def hub_endpoint() -> str:
    """``HF_ENDPOINT`` read now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def resolve_token(token: str | None = None) -> tuple[str, str]:
    """``(token, where it came from)``: ``--token``, else ``HF_TOKEN``, else the saved login."""
    from huggingface_hub import get_token

    source = "--token"
    if token is None:
        source = "HF_TOKEN" if os.environ.get("HF_TOKEN") else "the saved login"
        token = get_token()
    token = (token or "").strip()
    if not token:
        raise HubLoginError(f"not logged in to the Hugging Face Hub: {TOKEN_HELP}")
    if not _TOKEN_CHARS.match(token):
        # never echo it: a pasted token with a stray character would otherwise end up in
        # httpx's "illegal header value" message
        raise HubAuthError(f"the token from {source} contains spaces or non-ASCII characters; "
                           "copy it again")
    return token, source


def push_bundle(folder: Path, repo_id: str, *, token: str | None = None, private: bool = False,
                revision: str | None = None, create_pr: bool = False,
                commit_message: str | None = None,
                log: Callable[[str], None] | None = None) -> PushResult:
    """Create ``repo_id`` when missing and commit the bundle at ``folder`` with a refreshed card.

    ``revision`` is a branch of an existing repo (created from the default branch when missing,
    unless ``create_pr``); with ``create_pr`` the commit opens a pull request against it (or
    against the default branch). Raises an :class:`HubError` subclass for each failure a user can
    act on, and :class:`BundleError` before any network call when ``folder`` is not a bundle.
    """
    from huggingface_hub import HfApi

    log = log or (lambda _msg: None)
    summary = summarize_bundle(Path(folder))
    check_repo_id(repo_id)  # a UsageError (a ValueError) on a malformed id
    token, source = resolve_token(token)
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token, library_name="mmconvert",
                library_version=__version__)
    with _hub_errors(token, source, endpoint, repo_id, revision):
        _check_token(api, repo_id)
        head = _ensure_repo(api, repo_id, private, revision, log)
        if revision and not create_pr:
            head = _ensure_branch(api, repo_id, revision, log)
        remote_card = None if head is None else _read_card(api, repo_id, revision or "main")
        card = merge_card(_card_base(remote_card, summary), summary, repo_id)
        info = api.create_commit(
            repo_id, _operations(summary, card), revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {summary.kind} bundle with mmconvert",
            commit_description=f"Files and model card written by mmconvert {__version__}.")
    # huggingface_hub skips a commit that changes nothing and returns the current head
    changed = info.pr_url is not None if create_pr else info.oid != head
    return PushResult(repo_id, info.commit_url, info.oid, info.pr_url, head is None, changed,
                      len(summary.files) + 1)


def _operations(summary: BundleSummary, card: str) -> list[CommitOperationAdd]:
    from huggingface_hub import CommitOperationAdd

    ops = [CommitOperationAdd(path_in_repo=rel.as_posix(),
                              path_or_fileobj=str(summary.folder / rel))
           for rel in bundle_files(summary.folder)]
    return ops + [CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode("utf-8"))]


def _check_token(api: HfApi, repo_id: str) -> None:
    """Fail before any upload when the token is rejected or can only read."""
    me = api.whoami()
    role = (((me.get("auth") or {}).get("accessToken") or {}).get("role"))
    if role == "read":
        raise HubPermissionError(f"the token is read-only and cannot push to {repo_id}; create "
                                 "a token with write access (https://huggingface.co/settings/tokens)")


def _ensure_repo(api: HfApi, repo_id: str, private: bool, revision: str | None,
                 log: Callable[[str], None]) -> str | None:
    """The head commit of the default branch, or None after creating the missing repo."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(repo_id)
    except RepositoryNotFoundError:
        if revision:
            raise HubRepoNotFoundError(
                f"{repo_id} does not exist on {api.endpoint}, and --revision only pushes to an "
                "existing repo; check the name, or drop --revision to create the repo") from None
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        log(f"created {'private ' if private else ''}repo {repo_id}")
        return None
    if private and info.private is False:
        log(f"note: {repo_id} already exists and is public; --private does not change it")
    return info.sha


def _ensure_branch(api: HfApi, repo_id: str, branch: str, log: Callable[[str], None]) -> str:
    """The head commit of ``branch``, created from the default branch when missing."""
    from huggingface_hub.errors import RevisionNotFoundError

    try:
        return api.repo_info(repo_id, revision=branch).sha
    except RevisionNotFoundError:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
        log(f"created branch {branch} from the default branch")
        return api.repo_info(repo_id, revision=branch).sha


def _read_card(api: HfApi, repo_id: str, revision: str) -> str | None:
    """The repo's README.md at ``revision``, or None. A plain GET of the small file (through
    huggingface_hub's session and error mapping) instead of hf_hub_download, which would put a
    copy in the user's cache and turn HTTP errors into cache misses."""
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    # built here rather than with hf_hub_url, whose endpoint swap assumes HF_ENDPOINT did not
    # change since huggingface_hub was imported
    url = f"{api.endpoint}/{repo_id}/resolve/{quote(revision, safe='')}/{CARD}"
    headers = build_hf_headers(token=api.token, library_name=api.library_name,
                               library_version=api.library_version)
    response = get_session().get(url, headers=headers)
    try:
        hf_raise_for_status(response)
    except RemoteEntryNotFoundError:
        return None
    return response.content.decode("utf-8", errors="replace")


def _card_base(remote: str | None, summary: BundleSummary) -> str | None:
    """The text our section is merged into: the repo's card, else a card the user edited in
    the bundle. A card exactly as a bundle writer generated it (its sha256 is the manifest's;
    :func:`~mmconvert.publish.model_card.write_bundle_card`) is not user text: it is
    regenerated whole, so its title becomes the repo's name."""
    generated = {o.get("sha256") for o in summary.manifest.get("outputs", [])
                 if o.get("path") == CARD} - {None}

    def is_user_text(text: str) -> bool:
        return hashlib.sha256(text.encode("utf-8")).hexdigest() not in generated

    if remote is not None:
        return remote if is_user_text(remote) else None
    local = summary.folder / CARD
    if local.is_file():
        text = local.read_text(encoding="utf-8")
        return text if is_user_text(text) else None
    return None


@contextmanager
def _hub_errors(token: str, source: str, endpoint: str, repo_id: str,
                revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub / httpx errors into one-line :class:`HubError` subclasses."""
    try:
        yield
    except MMConvertError:
        raise
    except Exception as exc:
        translated = _translate(exc, source, endpoint, repo_id, revision)
        if translated is None:
            raise
        cls, message = translated
        message = " ".join(message.replace(token, "***").split())  # one line, always
        raise cls(message) from _chain_without(exc, token)


def _translate(exc: Exception, source: str, endpoint: str, repo_id: str,
               revision: str | None) -> tuple[type[HubError], str] | None:
    """The error class and message a user can act on, or None for an unexpected error."""
    import httpx2
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, CardError):
        return HubError, f"{repo_id}: {exc}; fix it on the Hub, then push again"
    if isinstance(exc, OfflineModeIsEnabled):
        return HubConnectionError, "HF_HUB_OFFLINE is set: unset it to push"
    http = _find(exc, HfHubHTTPError)
    if http is not None and http.response is not None:
        status = http.response.status_code
        said = _server_says(http)
        if status == 401:
            return HubAuthError, (f"the Hub rejected the token from {source} (401 Unauthorized): "
                                  f"it is invalid, expired or revoked\n{TOKEN_HELP}")
        if status == 403:
            return HubPermissionError, (f"the token from {source} may not write to {repo_id} "
                                        f"(403 Forbidden); use a token with write access to "
                                        f"'{repo_id.split('/')[0]}'\nthe Hub said{said or ': -'}")
        if isinstance(http, RevisionNotFoundError):
            return HubError, (f"{repo_id} has no branch {revision!r}; push without --create-pr "
                              "to create it")
        if isinstance(http, RepositoryNotFoundError):
            return HubRepoNotFoundError, f"{repo_id} not found on {endpoint}"
        return HubError, (f"the Hub answered {status} to {http.request.method} "
                          f"{http.request.url.path}{said}")
    transport = _find(exc, httpx2.TransportError)
    if transport is not None:
        return HubConnectionError, (f"cannot reach {endpoint} ({type(transport).__name__}: "
                                    f"{transport or 'no detail'}); check the network connection "
                                    "and HF_ENDPOINT")
    if isinstance(exc, (ValueError, OSError)):  # e.g. the Hub refusing the card's metadata
        detail = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        return HubError, f"push to {repo_id} failed: {detail or type(exc).__name__}"
    return None


def _find(exc: BaseException | None, cls: type) -> BaseException | None:
    """``exc`` or the first exception of its cause/context chain that is a ``cls``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, cls):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _chain_without(exc: BaseException, token: str) -> BaseException | None:
    """Keep the original exception as the cause for debugging unless its text carries the
    token (then it is dropped rather than printed in a traceback)."""
    probe: BaseException | None = exc
    while probe is not None:
        if token in str(probe) or token in repr(probe.args):
            return None
        probe = probe.__cause__ or probe.__context__
    return exc


def _server_says(http) -> str:
    message = (getattr(http, "server_message", None) or "").strip().splitlines()
    return f": {message[0]}" if message else ""
