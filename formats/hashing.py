"""sha256 for manifests without paying for it twice.

- Source files: hashed once and remembered in a small cache keyed by the file's identity
  (path, size, mtime, inode), so converting one checkpoint to GGUF, HF and safetensors and
  verifying it hashes its gigabytes once. ``MMCONVERT_CACHE_DIR`` moves the cache;
  ``MMCONVERT_NO_HASH_CACHE=1`` turns it off.
- Output files: hashed while they are written. Writers submit tensor jobs in file order and
  :func:`sha256_following` reads each region back (from the page cache) as soon as the job that
  fills it is done, so hashing overlaps the conversion instead of re-reading everything at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

READ_BYTES = 8 << 20
RACY_SECONDS = 2.0
_lock = threading.Lock()


def cache_path() -> Path:
    root = os.environ.get("MMCONVERT_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmconvert"
    return Path(root) / "sha256-cache.json"


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"


def _settled(path: Path) -> bool:
    """Only files untouched for a while are remembered: a rewrite within the filesystem's
    timestamp granularity could otherwise keep size, mtime and inode (git's "racy" files)."""
    return time.time() - path.stat().st_mtime > RACY_SECONDS


def _load_cache() -> dict[str, dict[str, str]]:
    try:
        data = json.loads(cache_path().read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(entries: dict[str, dict[str, str]]) -> None:
    path = cache_path()
    entries = {k: v for k, v in entries.items() if os.path.exists(k)}  # forget deleted files
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(READ_BYTES):
            h.update(block)
    return h.hexdigest()


def sha256_sources(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of each path (str(path) -> hex), from the cache when the file is unchanged."""
    paths = [Path(p) for p in paths]
    use_cache = os.environ.get("MMCONVERT_NO_HASH_CACHE") != "1"
    with _lock:
        cache = _load_cache() if use_cache else {}
    result: dict[str, str] = {}
    todo: list[Path] = []
    for p in paths:
        entry = cache.get(str(p.resolve()))
        if entry and entry.get("id") == _identity(p):
            result[str(p)] = entry["sha256"]
        else:
            todo.append(p)
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            for p, digest in zip(todo, pool.map(sha256_file, todo)):
                result[str(p)] = digest
        if use_cache:
            with _lock:
                cache = _load_cache()
                for p in todo:
                    if _settled(p):
                        cache[str(p.resolve())] = {"id": _identity(p), "sha256": result[str(p)]}
                _save_cache(cache)
    return result


class SourceHashes:
    """Hash the sources in the background while a conversion runs; :meth:`result` joins."""

    def __init__(self, paths: Sequence[Path]):
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._future = self._pool.submit(sha256_sources, list(paths))

    def result(self) -> dict[str, str]:
        try:
            return self._future.result()
        finally:
            self._pool.shutdown(wait=False)


def sha256_following(fd: int, size: int, regions: Sequence[tuple[int, Future]]) -> str:
    """sha256 of a file being written: ``regions`` are ``(end_offset, future)`` in increasing
    offset order; bytes up to ``end_offset`` are final once ``future`` is done (everything
    before the first region — the header — must already be written)."""
    h = hashlib.sha256()
    pos = 0

    def take(upto: int) -> None:
        nonlocal pos
        while pos < upto:
            block = os.pread(fd, min(READ_BYTES, upto - pos), pos)
            if not block:
                raise OSError(f"short read while hashing at byte {pos}")
            h.update(block)
            pos += len(block)

    for end, future in regions:
        future.result()
        take(end)
    take(size)
    return h.hexdigest()
