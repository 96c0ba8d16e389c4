"""What verify checks before it opens a bundle: its files are the ones mmconvert wrote.

A bundle is input from anywhere (a Hub download, a colleague's folder), so before any backend
reads it:

- every file listed in ``mmconvert.json`` that verify (or transformers, for an HF bundle) will
  read must have the recorded size and sha256 (``null`` sha256, from ``--no-checksums``: size
  only, and a warning says the content was not checked); a file of a kind verify reads that is
  not listed, or a listed one that is gone, is refused too. The report would otherwise compare
  files nobody wrote, and call the result a parity verdict;
- an HF bundle's code: transformers imports ``modeling_mmqwen3.py`` (``auto_map``) and any
  ``*.py`` it reaches, with the user's permissions. The file must be byte-identical to the
  template this version of mmconvert writes (the manifest alone proves nothing: whoever edits
  the code can edit the manifest), ``auto_map`` must name only our class, and no other ``*.py``
  may be in the folder; else refused unless the user passes ``--trust-bundle-code``.

Weights are hashed through :func:`mmconvert.formats.hashing.sha256_sources` (cached per file
version, so a bundle verified again is not re-read); code files are always hashed afresh.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from mmconvert import __version__
from mmconvert.errors import BundleError, TamperedBundleError, UntrustedCodeError
from mmconvert.formats.bundle import MANIFEST
from mmconvert.formats.hashing import sha256_file, sha256_sources
from mmconvert.formats.hf_folder import MODEL_CLASS, MODELING_FILE, MOE_MODEL_CLASS, TEMPLATE_DIR
from mmconvert.formats.safe_json import loads_limited
from mmconvert.formats.safe_paths import resolve_inside
from mmconvert.publish.bundle_summary import VERIFY_JSON

Warn = Callable[[str], None]
TRUST_HINT = "pass --trust-bundle-code to import it anyway (it runs with your permissions)"
REFETCH_HINT = "convert the checkpoint again, or fetch the bundle again from where it came from"
# files of each kind that verify opens when present, listed or not (weights are globbed)
READ_SUFFIXES = {"hf": (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5",
                        ".msgpack"),
                 "safetensors": (".safetensors",), "gguf": (".gguf",)}
READ_NAMES = {"hf": ("config.json", "generation_config.json", "adapter_config.json",
                     "model.safetensors.index.json", "pytorch_model.bin.index.json"),
              "safetensors": ("config.json",), "gguf": ()}
# listed files nothing reads (the model card); absent listed GGUF files are quant types the
# user chose not to keep: each text GGUF is verified on its own
UNREAD_SUFFIXES = (".md",)


@dataclass
class Listed:
    """One ``outputs`` entry of the manifest."""

    path: Path
    sha256: str | None
    size: int


def shown(folder: Path, rel: str) -> str:
    """``folder/rel`` for messages, shortened so that the first line stays short."""
    full = f"{folder}/{rel}"
    return full if len(full) <= 100 else f".../{folder.name}/{rel}"


@cache
def template_sha256() -> dict[str, str]:
    """sha256 of each code file an HF bundle carries, as this mmconvert writes it (a copy of
    the template: see :func:`mmconvert.formats.hf_folder.write_hf_files`)."""
    return {MODELING_FILE: sha256_file(TEMPLATE_DIR / MODELING_FILE)}


def listed_outputs(folder: Path, manifest: dict[str, Any]) -> dict[str, Listed]:
    """The manifest's outputs by relative path; an entry that is malformed or points outside
    the folder is refused (verify would hash whatever it names)."""
    out: dict[str, Listed] = {}
    for entry in manifest.get("outputs") or []:
        try:
            rel, sha, size = entry["path"], entry.get("sha256"), entry["bytes"]
            if not isinstance(rel, str) or not isinstance(size, int) or \
                    not (sha is None or isinstance(sha, str)):
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            raise BundleError(f"{folder}/{MANIFEST}: malformed outputs entry "
                              f"{str(entry)[:80]}") from None
        resolve_inside(folder, rel)  # no file outside the bundle (a Hub cache's blobs aside)
        out[Path(rel).as_posix()] = Listed(folder / rel, sha, size)
    return out


def _read_set(folder: Path, kind: str, listed: dict[str, Listed]) -> list[str]:
    """Relative paths of the files verify will read: listed ones (not the docs) and any
    unlisted file of a kind it reads."""
    names = [rel for rel in listed if not rel.endswith(UNREAD_SUFFIXES)]
    # subfolders too: the HF bundle's projector lives in multimodal_projector/
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel in listed or rel in (MANIFEST, VERIFY_JSON) or not path.is_file():
            continue
        if path.suffix in READ_SUFFIXES.get(kind, ()) or rel in READ_NAMES.get(kind, ()):
            raise TamperedBundleError(
                f"tampered bundle: {shown(folder, rel)} is not listed in {MANIFEST}\n"
                f"verify would read it; {REFETCH_HINT}, or remove the file", path=path)
    return names


def check_files(folder: Path, kind: str, manifest: dict[str, Any], warn: Warn) -> None:
    """Sizes and sha256 of the files verify will read, against the manifest (an HF bundle's
    code is :func:`code_problems`' business)."""
    listed = listed_outputs(folder, manifest)
    code = set(template_sha256()) if kind == "hf" else set()  # held to the template instead
    present = []
    for rel in _read_set(folder, kind, listed):
        entry = listed[rel]
        if rel in code and entry.path.is_file():
            continue
        if not entry.path.is_file():
            if kind == "gguf":
                continue
            raise TamperedBundleError(f"tampered bundle: {shown(folder, rel)} is listed in "
                                      f"{MANIFEST} but missing\n{REFETCH_HINT}",
                                      path=entry.path)
        size = entry.path.stat().st_size
        if size != entry.size:
            raise TamperedBundleError(
                f"tampered bundle: {shown(folder, rel)} does not match {MANIFEST}\n"
                f"{size} bytes, {MANIFEST} records {entry.size}; {REFETCH_HINT}",
                path=entry.path)
        present.append(rel)
    hashed = [rel for rel in present if listed[rel].sha256 is not None]
    digests = sha256_sources(listed[rel].path for rel in hashed)
    for rel in hashed:
        actual = digests[str(listed[rel].path)]
        if actual != listed[rel].sha256:
            raise TamperedBundleError(
                f"tampered bundle: {shown(folder, rel)} does not match {MANIFEST}\n"
                f"sha256 {actual}, {MANIFEST} records {listed[rel].sha256}; {REFETCH_HINT}",
                path=listed[rel].path)
    unhashed = [rel for rel in present if listed[rel].sha256 is None]
    if unhashed:
        warn(f"warning: {folder}: {MANIFEST} records no sha256 for {len(unhashed)} files "
             "(written with --no-checksums): sizes checked, content not checked")


def _expected_auto_map(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    from mmconvert.convert.readers.common import text_spec_from_config

    moe = text_spec_from_config(config, str(folder / "config.json")).is_moe
    return {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{MOE_MODEL_CLASS if moe else MODEL_CLASS}"}


def code_problems(folder: Path, manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """Why the code transformers would import from this HF bundle is not mmconvert's own, as
    (short cause, detail) pairs; empty when it is."""
    problems = []
    config_path = folder / "config.json"
    try:
        config = loads_limited(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONTooDeep is a ValueError
        raise BundleError(f"{config_path}: cannot be read as JSON ({exc})") from None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if auto_map is not None:
        want = _expected_auto_map(folder, config)
        if auto_map != want:
            problems.append((f"{shown(folder, 'config.json')}: auto_map names code mmconvert "
                             "does not write", f"auto_map is {str(auto_map)[:200]}; mmconvert "
                             f"writes {want}"))
    listed = listed_outputs(folder, manifest)
    expected = template_sha256()
    for path in sorted(folder.rglob("*.py")):
        rel = path.relative_to(folder).as_posix()
        if rel not in expected:
            problems.append((f"{shown(folder, rel)} is Python that mmconvert does not write",
                             "transformers may import any .py of the folder"))
            continue
        actual = sha256_file(path)
        if rel not in listed:
            problems.append((f"{shown(folder, rel)} is not listed in {MANIFEST}",
                             "mmconvert lists every file it writes"))
        elif actual != expected[rel]:
            problems.append((f"{shown(folder, rel)} is not the remote code mmconvert "
                             f"{__version__} writes", f"sha256 {actual}, mmconvert writes "
                             f"{expected[rel]} (a bundle of another mmconvert version: convert "
                             "it again)"))
        elif listed[rel].sha256 not in (None, actual):
            problems.append((f"{shown(folder, rel)} does not match {MANIFEST}",
                             f"sha256 {actual}, {MANIFEST} records {listed[rel].sha256}"))
    return problems


def check_bundle(folder: Path, kind: str, manifest: dict[str, Any], *, trust_code: bool,
                 warn: Warn) -> None:
    """Refuse a bundle whose files verify would read are not the ones mmconvert wrote."""
    if kind == "hf":
        problems = code_problems(folder, manifest)
        if problems and not trust_code:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            details = [d for _, d in problems[:1]] + [c for c, _ in problems[1:]]
            raise UntrustedCodeError(f"untrusted bundle code: {problems[0][0]}{more}\n"
                                     + "\n".join([*details, TRUST_HINT]), path=folder)
        if trust_code and problems:
            warn("warning: --trust-bundle-code: importing code mmconvert did not write: "
                 + "; ".join(c for c, _ in problems))
        elif trust_code:
            warn(f"warning: --trust-bundle-code: not needed for {folder}, its code is "
                 "mmconvert's own")
    check_files(folder, kind, manifest, warn)
