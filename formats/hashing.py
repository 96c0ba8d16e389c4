"""sha256 for manifests without paying for it twice.

- Source files: hashed once and remembered in a small cache keyed by the file's identity,
  so converting one checkpoint to GGUF, HF and safetensors and verifying it hashes its
  gigabytes once. ``MMCONVERT_CACHE_DIR`` moves the cache; ``MMCONVERT_NO_HASH_CACHE=1``
  turns it off.

  What the cache trusts: the identity is the resolved path, size, mtime, ctime, inode and
  device, plus the sha256 of the first and last MiB (two 1 MiB reads). A rewrite in place
  moves ctime, which no user-level call (``os.utime``, ``touch -r``, ``cp -p``) can set back,
  and an edit near either end changes the edge hashes whatever stat says. What it cannot see:
  a change strictly between the first and last MiB of a file over 2 MiB made with ctime
  faked or frozen (root changing the clock, a filesystem without ctime). Only files untouched
  for ``RACY_SECONDS`` are remembered, and only when their identity did not change while they
  were being hashed.
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
EDGE_BYTES = 1 << 20  # hashed at each end of a file as part of its cache identity
RACY_SECONDS = 2.0
_lock = threading.Lock()


def cache_path() -> Path:
    root = os.environ.get("MMCONVERT_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mmconvert"
    return Path(root) / "sha256-cache.json"


def _stat_key(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"


def _edges_sha256(path: Path) -> str:
    """sha256 of the first and last EDGE_BYTES (the whole file when it is smaller)."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        h.update(f.read(EDGE_BYTES))
        size = os.fstat(f.fileno()).st_size
        if size > EDGE_BYTES:
            h.update(os.pread(f.fileno(), EDGE_BYTES, max(EDGE_BYTES, size - EDGE_BYTES)))
    return h.hexdigest()


def _identity(path: Path) -> str:
    """The cache key of one version of a file (see the module docstring)."""
    return f"{_stat_key(path)}:{_edges_sha256(path)}"


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


def sha256_files(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of several files (str(path) -> hex), hashed in parallel on a few threads
    (hashlib releases the GIL)."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        return dict(zip((str(p) for p in paths), pool.map(sha256_file, paths)))


def sha256_sources(paths: Iterable[Path]) -> dict[str, str]:
    """sha256 of each path (str(path) -> hex), from the cache when the file is unchanged."""
    paths = [Path(p) for p in paths]
    use_cache = os.environ.get("MMCONVERT_NO_HASH_CACHE") != "1"
    with _lock:
        cache = _load_cache() if use_cache else {}
    result: dict[str, str] = {}
    todo: dict[Path, str | None] = {}  # path -> its identity before hashing (None: no cache)
    for p in paths:
        identity = _identity(p) if use_cache else None
        entry = cache.get(str(p.resolve()))
        if entry and identity is not None and entry.get("id") == identity:
            result[str(p)] = entry["sha256"]
        else:
            todo[p] = identity
    if todo:
        result.update(sha256_files(todo))
        if use_cache:
            with _lock:
                cache = _load_cache()
                for p, identity in todo.items():
                    # a file that changed while it was read keeps no entry
                    if _settled(p) and _identity(p) == identity:
                        cache[str(p.resolve())] = {"id": identity, "sha256": result[str(p)]}
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
