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
- Who hashes a conversion's sources (:class:`SourceHashes`): when they fit in half the
  available memory, a child process started before the checkpoint is read
  (:func:`hashing_ahead`), on the core the conversion leaves idle while it parses the
  tokenizer and lays out the files (a thread would wait for the GIL then); the child's read
  is a second one, from the page cache, so a source rewritten between the two fails the
  export. Larger sources are hashed from the conversion's own reads (:class:`SourceTap`):
  one pass over each file for both.
- Output files: hashed while they are written. Writers submit tensor jobs in file order and
  :func:`sha256_following` reads each region back (from the page cache) as soon as the job that
  fills it is done, so hashing overlaps the conversion instead of re-reading everything at the end.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mmconvert.errors import CheckpointError

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
    use_cache = os.environ.get("MMCONVERT_NO_HASH_CACHE") != "1"
    result, todo = _uncached(paths, use_cache)  # todo: path -> its identity before hashing
    if todo:
        result.update(sha256_files(todo))
        if use_cache:
            _remember(todo, result)
    return result


def _remember(identities: dict[Path, str | None], hashes: dict[str, str]) -> None:
    """Cache the digest of each path whose identity (taken before it was read) still holds:
    a file that changed while it was read keeps no entry."""
    with _lock:
        cache = _load_cache()
        for p, identity in identities.items():
            if identity is not None and _settled(p) and _identity(p) == identity:
                cache[str(p.resolve())] = {"id": identity, "sha256": hashes[str(p)]}
        _save_cache(cache)


def _planned_entries(reads: Iterable[object]) -> dict[str, set[str]]:
    """resolved source file -> names of its tensors the conversion will read. ``reads`` are
    tensor sources (``TensorRef``-like: ``source_file``, ``source_name``, and the part names
    of a stack in ``origin.names``); duck-typed, as ``formats`` never imports ``convert``."""
    planned: dict[str, set[str]] = {}
    for ref in reads:
        path = getattr(ref, "source_file", None)
        if path is None:
            continue
        origin = getattr(ref, "origin", None)
        names = set(getattr(origin, "names", ()) or ()) | {getattr(ref, "source_name", "")}
        planned.setdefault(os.path.realpath(path), set()).update(names)
    return planned


def _holes(path: Path, planned: set[str] | None) -> list[tuple[int, int]] | None:
    """Byte ranges of a safetensors file the conversion will not read: the header and every
    tensor not in ``planned`` (``None``: every tensor is read). ``None`` when ``path`` is not a
    readable safetensors file (it is then hashed by a plain read)."""
    from mmconvert.formats.safetensors_io import read_safetensors_header

    try:
        entries, _ = read_safetensors_header(path)
    except (ValueError, OSError):  # CheckpointError is a ValueError
        return None
    if not entries:
        return None
    start = min(e.offset for e in entries.values())
    holes = [(0, start)]
    if planned is not None:
        holes += [(e.offset, e.offset + e.nbytes) for e in entries.values()
                  if e.name not in planned and e.nbytes]
    if planned is not None and len(holes) == len(entries) + 1:
        return None  # nothing of it is read by the conversion: hash it in the background
    return sorted(holes)


class SourceTap:
    """sha256 of one source file fed by the reads the conversion makes anyway.

    :func:`observe_read` hands every ``pread`` of a registered file to :meth:`observe` (from
    the writers' threads). Bytes at the hashed position go into the hash at once; bytes ahead
    of it are copied aside up to ``PENDING_BYTES`` (the writers read in file order, so little
    waits there); what would not fit is read again later. The tap reads by itself only what the
    conversion never reads (``holes``: the header, tensors no target uses), when the hashed
    position reaches it, and, in :meth:`finish`, whatever is left. A tensor read twice is
    hashed once; bytes no read covers are hashed all the same: the digest is the whole file's.
    """

    def __init__(self, path: Path, holes: list[tuple[int, int]]):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        st = os.fstat(self._fd)
        self.key = (st.st_dev, st.st_ino)
        self.size = st.st_size
        self._h = hashlib.sha256()
        self._pos = 0
        self._holes = sorted(holes)  # [start, end) ranges the tap reads itself
        self._pending: dict[int, bytes] = {}  # offset -> bytes read ahead of the position
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self.bytes_read = 0  # what the tap read itself (the rest came from the conversion)
        with self._lock:
            self._advance()  # the header, now

    def observe(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        with self._lock:
            if end <= self._pos or self._h is None:
                return  # hashed already (a tensor read twice)
            if offset <= self._pos:
                self._h.update(data[self._pos - offset:])
                self._pos = end
                self._advance()
            elif self._pending_bytes + len(data) <= PENDING_BYTES:
                self._pending[offset] = bytes(data)  # a copy: the caller may modify its buffer
                self._pending_bytes += len(data)
            else:  # too far ahead to keep: read it again when the position gets there
                bisect.insort(self._holes, (offset, end))

    def _take_pending(self) -> bool:
        """Hash the pending bytes that start at or before the position; False if none do."""
        data = self._pending.pop(self._pos, None)
        start = self._pos
        if data is None:
            for offset in sorted(self._pending):
                if offset > self._pos:
                    break
                chunk = self._pending.pop(offset)
                self._pending_bytes -= len(chunk)
                if offset + len(chunk) > self._pos:
                    data, start = chunk, offset
                    break
            if data is None:
                return False
        else:
            self._pending_bytes -= len(data)
        self._h.update(memoryview(data)[self._pos - start:])
        self._pos = start + len(data)
        return True

    def _read_hole(self) -> bool:
        """Read and hash (up to READ_BYTES of) a hole at the position; False if none is there."""
        while self._holes and self._holes[0][1] <= self._pos:
            self._holes.pop(0)
        if not self._holes or self._holes[0][0] > self._pos:
            return False
        n = min(self._holes[0][1], self.size) - self._pos
        if n <= 0:
            self._holes.pop(0)
            return True
        block = _pread(self._fd, min(READ_BYTES, n), self._pos)
        self.bytes_read += len(block)
        self._h.update(block)
        self._pos += len(block)
        return True

    def _advance(self) -> None:
        while self._pos < self.size and (self._take_pending() or self._read_hole()):
            pass

    def finish(self) -> str:
        """Hash whatever the conversion did not deliver; the file's sha256."""
        with self._lock:
            self._holes = [(self._pos, self.size)]
            self._advance()
            if self._pos != self.size or os.fstat(self._fd).st_size != self.size:
                raise OSError(f"{self.path}: changed size while it was being hashed")
            digest, self._h = self._h.hexdigest(), None
            self._pending.clear()
            return digest

    def close(self) -> None:
        with self._lock:
            self._h = None
            self._pending.clear()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# bytes a tap keeps aside per file (reads ahead of its position): the writers read in file
# order, so a few slices suffice; a fixed cap keeps memory the same on any machine (with
# many workers or sources read out of order, what does not fit is read again instead)
PENDING_BYTES = 32 << 20
_TAPS: dict[tuple[int, int], tuple[SourceTap, ...]] = {}  # (device, inode) -> its taps


def _pread(fd: int, n: int, offset: int) -> bytes:
    block = os.pread(fd, n, offset)
    if not block:
        raise OSError(f"short read while hashing at byte {offset}")
    return block


def observe_read(fd: int, offset: int, data: bytes | bytearray | memoryview) -> None:
    """Called by the safetensors reader after each read: feeds the taps of that file, if any
    (one dictionary test when none are registered)."""
    if not _TAPS:
        return
    st = os.fstat(fd)
    for tap in _TAPS.get((st.st_dev, st.st_ino), ()):
        tap.observe(offset, memoryview(data))


def observing_reads() -> bool:
    """True while some :class:`SourceTap` hashes a source from the conversion's reads: the
    writers then read each source in file order (one pass for both)."""
    return bool(_TAPS)


def _register(tap: SourceTap, add: bool) -> None:
    with _lock:
        taps = [t for t in _TAPS.get(tap.key, ()) if t is not tap] + ([tap] if add else [])
        if taps:
            _TAPS[tap.key] = tuple(taps)
        else:
            _TAPS.pop(tap.key, None)


# The hashing child: one sha256 per line for the paths in argv; it imports nothing but
# hashlib, mmap, os and sys (Python starts in ~20 ms). It hashes through 16 MiB mapped
# windows, not read(): hashing the page cache in place skips a copy of every byte (1.2 GB:
# 1.05 s instead of 1.35-1.5 s of CPU here, and the copy competes with the conversion for
# memory bandwidth), while its RSS stays ~30 MB. A file cut short meanwhile raises SIGBUS in
# the child, which then exits non-zero: the parent hashes again itself
# (:meth:`_ChildHashes.result`), so a digest is never wrong.
_CHILD_SCRIPT = """
import hashlib, mmap, os, sys
WINDOW = 16 << 20
for path in sys.argv[1:]:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        for start in range(0, size, WINDOW):
            with mmap.mmap(f.fileno(), min(WINDOW, size - start), access=mmap.ACCESS_READ,
                           offset=start) as window:
                h.update(window)
    print(h.hexdigest(), flush=True)
"""


def child_hash_room() -> int:
    """Bytes of sources hashed by a child process: half the available memory, so the files
    stay in the page cache for whichever of the child and the conversion reads second."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return (int(line.split()[1]) << 10) // 2
    except (OSError, ValueError, IndexError):
        pass
    return 0  # unknown: one pass through the taps is never wrong


class _ChildHashes:
    """sha256 of ``paths`` computed by a child Python process, on a core of its own: hashing
    in a thread of this process would wait for the GIL whenever the conversion runs Python
    (parsing the tokenizer, laying out the vocabulary), which is exactly when a core idles."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)
        self._digests: dict[str, str] | None = None
        self._stats = [_stat_key(p) for p in self.paths]  # the versions the child reads
        self._proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD_SCRIPT, *map(str, self.paths)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)

    def result(self) -> dict[str, str]:
        """str(path) -> sha256 for every path (waits for the child)."""
        if self._digests is None:
            out, _ = self._proc.communicate()
            digests = out.split()
            if self._proc.returncode != 0 or len(digests) != len(self.paths):
                # the child could not read a file: hash here, which raises the error (a
                # vanished or unreadable file) in this process's words, or gets it right
                self._digests = sha256_files(self.paths)
            else:
                self._digests = dict(zip((str(p) for p in self.paths), digests))
        for path, before in zip(self.paths, self._stats):
            # the child and the conversion read the file at different times: a rewrite in
            # between would leave a manifest whose sha256 is not of the bytes converted
            if _stat_key(path) != before:
                raise CheckpointError(f"{path}: changed while it was being converted; "
                                      "convert again once nothing writes to it")
        return self._digests

    def close(self) -> None:
        if self._proc.returncode is None:  # result() not asked for: a refused conversion
            self._proc.kill()
            self._proc.communicate()


def _child_for(paths: Sequence[Path]) -> _ChildHashes | None:
    """A child hashing ``paths``, or None when they do not fit :func:`child_hash_room` (or no
    interpreter can be started, as in an embedded Python): the caller then hashes them."""
    if not paths or sum(p.stat().st_size for p in paths) > child_hash_room():
        return None
    try:
        return _ChildHashes(paths)
    except OSError:
        return None


def _uncached(paths: Iterable[Path], use_cache: bool) -> tuple[dict[str, str],
                                                                 dict[Path, str | None]]:
    """(str(path) -> sha256 from the cache, path -> identity for the rest; None: no cache)."""
    with _lock:
        cache = _load_cache() if use_cache else {}
    known: dict[str, str] = {}
    todo: dict[Path, str | None] = {}
    for p in map(Path, paths):
        identity = _identity(p) if use_cache else None
        entry = cache.get(str(p.resolve()))
        if entry and identity is not None and entry.get("id") == identity:
            known[str(p)] = entry["sha256"]
        else:
            todo[p] = identity
    return known, todo


# resolved path -> (the child hashing it, the path as the child was given it, the file's
# identity when it started; None: no cache), for the SourceHashes of the conversion that
# :func:`hashing_ahead` runs before
_AHEAD: dict[str, tuple[_ChildHashes, Path, str | None]] = {}


@contextlib.contextmanager
def hashing_ahead(paths: Iterable[Path]) -> Iterator[None]:
    """Start hashing ``paths`` now, in a child process, while the checkpoint is still being
    read; a :class:`SourceHashes` created inside the block takes over what it needs. Paths
    that are cached, too large for :func:`child_hash_room`, or not among the conversion's
    sources after all cost nothing but (for the last) their hashing; the child is stopped at
    the end of the block."""
    try:
        _, todo = _uncached(dict.fromkeys(map(Path, paths)),
                            os.environ.get("MMCONVERT_NO_HASH_CACHE") != "1")
        child = _child_for(list(todo))
    except OSError:  # a file that cannot be read: the reader will say so
        todo, child = {}, None
    keys = [os.path.realpath(p) for p in todo] if child is not None else []
    with _lock:
        for key, (path, identity) in zip(keys, todo.items()):
            _AHEAD[key] = (child, path, identity)
    try:
        yield
    finally:
        with _lock:
            for key in keys:
                if _AHEAD.get(key, (None,))[0] is child:
                    del _AHEAD[key]
        if child is not None:
            child.close()


class SourceHashes:
    """sha256 of a conversion's sources, hashed beside the conversion.

    Used as a context manager around the preparation and the writing, :meth:`result` after
    it. Cached files (see :func:`sha256_sources`) are not read at all. When the rest fits in
    half the available memory (:func:`child_hash_room`) a child process hashes them on the
    other core from the moment this object exists (a second read, from the page cache).
    Larger sources get one pass for both: safetensors files a :class:`SourceTap`, fed by the
    writers' reads; ``reads``, the tensor sources the conversion will read (default: all of
    them), tells the taps which tensors to read themselves. Other files (configs, the
    tokenizer, pickles) are then hashed in the background.
    """

    def __init__(self, paths: Sequence[Path], reads: Iterable[object] | None = None):
        self._use_cache = os.environ.get("MMCONVERT_NO_HASH_CACHE") != "1"
        planned = _planned_entries(reads) if reads is not None else None
        self._taps: dict[Path, SourceTap] = {}
        self._adopted: dict[Path, tuple[_ChildHashes, Path]] = {}  # hashed by hashing_ahead
        self._identities: dict[Path, str | None] = {}
        rest = []
        for p in map(Path, paths):
            with _lock:
                ahead = _AHEAD.get(os.path.realpath(p))
            if ahead is None:
                rest.append(p)
                continue
            child, as_named, self._identities[p] = ahead  # identity when the child started
            self._adopted[p] = (child, as_named)
        self._known, todo = _uncached(rest, self._use_cache)
        self._identities.update(todo)
        self._child = _child_for(list(todo))
        background: list[Path] = []
        for p in todo if self._child is None else ():
            holes = _holes(p, None if planned is None
                           else planned.get(os.path.realpath(p), set()))
            if holes is None:
                background.append(p)
            else:
                self._taps[p] = tap = SourceTap(p, holes)
                _register(tap, True)
        self._pool = ThreadPoolExecutor(max_workers=1) if background else None
        self._future = self._pool.submit(sha256_files, background) if self._pool else None

    def result(self) -> dict[str, str]:
        try:
            hashes = dict(self._known)
            for p, tap in self._taps.items():
                hashes[str(p)] = tap.finish()
            if self._future is not None:
                hashes.update(self._future.result())
            if self._child is not None:
                hashes.update(self._child.result())
            for p, (child, as_named) in self._adopted.items():
                hashes[str(p)] = child.result()[str(as_named)]
        finally:
            self.close()
        if self._use_cache and self._identities:
            _remember(self._identities, hashes)
        return hashes

    def close(self) -> None:
        """Stop observing reads and close the files (:meth:`result` does it; leaving the
        ``with`` block does it too, for a conversion that fails before asking for the result).

        Never from ``__del__``: the garbage collector can run a finalizer on any thread at any
        allocation, including inside ``with _lock`` in :func:`sha256_sources`, and
        :func:`_register` taking that lock again there deadlocked a test run."""
        for tap in self._taps.values():
            _register(tap, False)
            tap.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        if self._child is not None:
            self._child.close()  # a refused conversion: stop hashing for it

    def __enter__(self) -> SourceHashes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
