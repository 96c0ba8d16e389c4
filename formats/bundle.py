"""Writing a bundle folder atomically, and its ``mmconvert.json`` manifest.

Everything is written into a hidden sibling folder and renamed into place at the end, so an
error or Ctrl-C leaves nothing under the final name. A non-empty output folder is refused
unless ``force`` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mmconvert import __version__
from mmconvert.convert.errors import OutputError

MANIFEST = "mmconvert.json"


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def write_manifest(folder: Path, *, kind: str, model, options: dict[str, Any],
                   transforms: list[str], extra: dict[str, Any] | None = None,
                   source_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    """Write ``mmconvert.json``: tool version, sources with sha256, transforms, outputs with sha256.

    ``model`` is the :class:`CanonicalModel` converted. Output paths are relative to ``folder``.
    """
    sources = [Path(p) for p in model.source_files]
    sources += [Path(p) for role, p in model.source_files_from.items()
                if role in ("config", "tokenizer", "generation_config") and Path(p).is_file()]
    seen: list[Path] = []
    for p in sources:
        if p not in seen:
            seen.append(p)
    hashes = source_hashes or sha256_files(seen)
    outputs = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    out_hashes = sha256_files(outputs)
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
