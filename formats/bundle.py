"""Writing a bundle folder atomically, and its ``mmconvert.json`` manifest.

Everything is written into a hidden sibling folder and renamed into place at the end, so an
error or Ctrl-C leaves nothing under the final name. A non-empty output folder is refused
unless ``force`` is set.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmconvert import __version__
from mmconvert.convert.errors import OutputError
from mmconvert.formats.hashing import sha256_file, sha256_sources

MANIFEST = "mmconvert.json"


def sha256_files(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of several files, hashed in parallel (hashlib releases the GIL)."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return dict(zip((str(p) for p in paths), pool.map(sha256_file, paths)))


class BundleDir:
    """``with BundleDir(out, force) as tmp:`` write files under ``tmp``; renamed to ``out`` on success."""

    def __init__(self, out: Path, force: bool = False):
        self.out = Path(out)
        self.force = force
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.out}: exists and is not a folder")
        if self.out.is_dir() and any(self.out.iterdir()) and not self.force:
            raise OutputError(f"{self.out}: folder is not empty; pass --force to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def manifest_sources(model) -> list[Path]:
    """The files a bundle is made from: weights, config, tokenizer, generation config."""
    sources = [Path(p) for p in model.source_files]
    sources += [Path(p) for role, p in model.source_files_from.items()
                if role in ("config", "tokenizer", "generation_config", "adapter")
                and Path(p).is_file()]
    return list(dict.fromkeys(sources))


def write_manifest(folder: Path, *, kind: str, model, options: dict[str, Any],
                   transforms: list[str], extra: dict[str, Any] | None = None,
                   source_hashes: dict[str, str] | None = None,
                   output_hashes: dict[str, str] | None = None,
                   checksums: bool = True) -> dict[str, Any]:
    """Write ``mmconvert.json``: tool version, sources with sha256, transforms, outputs with sha256.

    ``model`` is the :class:`CanonicalModel` converted. Output paths are relative to ``folder``.
    ``source_hashes`` / ``output_hashes`` (relative name -> sha256) are hashes already known,
    e.g. computed while writing (see :mod:`mmconvert.formats.hashing`); the rest are computed,
    sources through the hash cache.
    ``checksums=False`` records sizes with ``"sha256": null`` (hashing re-reads every byte of
    input and output, which costs more than a whole GGUF conversion).
    """
    seen = manifest_sources(model)
    outputs = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    if checksums:
        hashes = dict(source_hashes or {})
        hashes.update(sha256_sources(p for p in seen if str(p) not in hashes))
        known = {str(folder / k): v for k, v in (output_hashes or {}).items()}
        out_hashes = {**known, **sha256_files(p for p in outputs if str(p) not in known)}
    else:
        hashes = dict.fromkeys(map(str, seen))
        out_hashes = dict.fromkeys(map(str, outputs))
    manifest = {
        "tool": "mmconvert",
        "version": __version__,
        "kind": kind,
        "dialect": model.dialect,
        "base_model": model.base_model_name,
        "options": options,
        "sources": [{"path": str(p), "sha256": hashes[str(p)], "bytes": p.stat().st_size}
                    for p in seen],
        "transforms": transforms,
        "outputs": [{"path": str(p.relative_to(folder)), "sha256": out_hashes[str(p)],
                     "bytes": p.stat().st_size} for p in outputs],
        "special_ids": {"bos": model.special.bos, "eos": model.special.eos,
                        "pad": model.special.pad},
        "multimodal_token": model.multimodal_token,
        "multimodal_token_id": model.multimodal_token_id,
    }
    if extra:
        manifest.update(extra)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
