"""Streaming tensor data into files at precomputed offsets, in parallel, a slice at a time.

Writers compute their whole layout first (headers, offsets), create the files with
:func:`create_file`, then call :func:`write_tensors` with one :class:`TensorWrite` per distinct
source tensor: the source is read a few rows at a time, scanned for NaN/Inf once per slice
(:mod:`mmconvert.formats.nonfinite`), and each slice is encoded (cast or quantized) and
``pwrite``-n into every :class:`Target` that stores it (one GGUF per ``--outtype`` shares a
single read of the checkpoint). Slices go in parallel on a thread pool (numpy and the
syscalls release the GIL), in the order they lie in the source files; memory stays near
``workers x CHUNK_BYTES`` times the encoders' expansion.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmconvert.formats import heap
from mmconvert.formats.hashing import observing_reads, sha256_following
from mmconvert.formats.nonfinite import SCAN
from mmconvert.formats.tensor_source import TensorSource

# Source bytes read per slice. Kept well under the mmap threshold of heap.STREAMING (32 MiB),
# counting the encoders' float32 temporaries (2x a 16-bit slice): a freed slice buffer is then
# reused from the heap instead of being unmapped and page-faulted in afresh for the next
# slice, which measured 15x fewer page faults and ~1 s less system time per GB written.
CHUNK_BYTES = 8 << 20

Encoder = Callable[[np.ndarray], np.ndarray]  # storage rows in -> output bytes (any dtype) out


@dataclass(frozen=True)
class Target:
    """One place an encoded source goes: ``nbytes`` at absolute ``offset`` of file ``fd``.
    ``encode`` must work row-slice by row-slice (casts and GGUF block quantization do)."""

    fd: int
    offset: int
    nbytes: int
    encode: Encoder
    label: str  # for errors, e.g. "model.safetensors:lm_head.weight"
    # targets of one job with equal non-None ``encoding`` get the same bytes (e.g. the same
    # GGML type and importance weights in two files): each slice is encoded once for them
    encoding: object = None


@dataclass(frozen=True)
class TensorWrite:
    """One source tensor and every target its bytes are written to."""

    source: TensorSource
    targets: tuple[Target, ...]


Progress = Callable[[int], None]  # bytes just written (a slice's, all its targets together)
ProgressFactory = Callable[[int], Progress]  # total bytes the run will write -> its callback


def locked(progress: Progress | None) -> Progress | None:
    """``progress`` made safe to call from the pool's threads (one call at a time)."""
    if not progress:  # None (or False, the old "no bar")
        return None
    lock = threading.Lock()

    def report(n: int) -> None:
        with lock:
            progress(n)

    return report


def data_bytes(jobs: Sequence[TensorWrite]) -> int:
    """Bytes :func:`write_tensors` writes for ``jobs``: what its ``progress`` adds up to."""
    return sum(t.nbytes for job in jobs for t in job.targets)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``pwrite`` until every byte is written (a write may be short)."""
    data = memoryview(data)
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def create_file(path: Path, size: int, header: bytes) -> int:
    """Create ``path`` pre-sized to ``size`` (gaps read as zeros) with ``header`` at offset 0;
    return its descriptor, open for :func:`write_tensors`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        pwrite_all(fd, header, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class _Slice:
    """Rows ``start:stop`` of one job: the unit of work of the pool. Jobs are cut into slices
    so that the workers read neighbouring bytes (one sequential pass over each source, which
    :mod:`~mmconvert.formats.hashing` hashes as it goes) and each output fills nearly in order
    (its hash follows closely)."""

    job: TensorWrite
    start: int
    stop: int
    whole: bool  # read the source whole (one slice covering every row)


def _slices(job: TensorWrite, chunk_bytes: int) -> list[_Slice]:
    ref = job.source
    rows = ref.shape[0] if ref.shape else 1
    row_bytes = ref.nbytes // rows if rows else 0
    whole = (not ref.shape or row_bytes == 0 or not ref.row_streamable
             or any(t.nbytes % rows for t in job.targets))  # output rows of unequal size
    if whole:
        return [_Slice(job, 0, rows, True)]
    step = max(1, chunk_bytes // row_bytes)
    return [_Slice(job, a, min(rows, a + step), False) for a in range(0, rows, step)]


def _write_slice(piece: _Slice, progress: Progress | None) -> None:
    """Read one slice; encode and write it into every target at its rows' offset."""
    ref, job = piece.job.source, piece.job
    rows = ref.shape[0] if ref.shape else 1
    data = ref.read() if piece.whole or (piece.start == 0 and piece.stop == rows) \
        else ref.read_rows(piece.start, piece.stop)
    SCAN.scan(ref.source_name or ref.name, data, ref.dtype)  # once per slice, not per file
    done = 0
    encoded: dict[object, memoryview] = {}
    for target in job.targets:
        view = encoded.get(target.encoding) if target.encoding is not None else None
        if view is None:
            view = memoryview(np.ascontiguousarray(target.encode(data))).cast("B")
            if target.encoding is not None:
                encoded[target.encoding] = view
        first, expected = ((0, target.nbytes) if piece.whole else
                           (piece.start * (target.nbytes // rows),
                            (piece.stop - piece.start) * (target.nbytes // rows)))
        if len(view) != expected:
            raise AssertionError(f"{target.label}: rows {piece.start}:{piece.stop} encoded to "
                                 f"{len(view)} bytes, layout reserved {expected}")
        pwrite_all(target.fd, view, target.offset + first)
        done += len(view)
    del data, encoded
    if progress is not None:
        progress(done)


def write_source(job: TensorWrite, progress: Progress | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
    """Read ``job.source`` a slice of rows at a time; encode and write each slice into every
    target, then call ``progress`` (if any) with the bytes just written."""
    for piece in _slices(job, chunk_bytes):
        _write_slice(piece, progress)


def _source_order(jobs: Sequence[TensorWrite]) -> list[TensorWrite]:
    """``jobs`` sorted by where their source lies (file, then offset), so that one sequential
    pass over each source file feeds both the conversion and its hash. A source whose place is
    unknown (computed, from a pickle) keeps its place after the job before it."""
    from mmconvert.formats.safetensors_io import read_safetensors_header

    offsets: dict[str, dict[str, int]] = {}

    def place(source: TensorSource) -> tuple[str, int] | None:
        path = getattr(source, "source_file", None)
        if path is None or not str(path).endswith(".safetensors"):
            return None
        key = str(path)
        if key not in offsets:
            try:
                entries, _ = read_safetensors_header(Path(path))
            except (ValueError, OSError):
                entries = {}
            offsets[key] = {name: e.offset for name, e in entries.items()}
        names = (*getattr(getattr(source, "origin", None), "names", ()), source.source_name)
        found = [offsets[key][n] for n in names if n in offsets[key]]
        return (key, min(found)) if found else None

    keyed, last = [], ("", -1)
    for index, job in enumerate(jobs):
        last = place(job.source) or last
        keyed.append((last, index, job))
    return [job for _, _, job in sorted(keyed, key=lambda k: (k[0], k[1]))]


def _slice_end(piece: _Slice, target: Target) -> int:
    """The offset in ``target``'s file up to which ``piece`` fills it."""
    if piece.whole:
        return target.offset + target.nbytes
    rows = piece.job.source.shape[0]
    return target.offset + piece.stop * (target.nbytes // rows)


def write_tensors(jobs: Sequence[TensorWrite], *, progress: Progress | None = None,
                  workers: int | None = None, chunk_bytes: int = CHUNK_BYTES,
                  hash_files: Sequence[tuple[int, int]] = ()) -> list[str]:
    """Run every job (the files' headers must already be in place); return sha256 digests.

    Jobs run a slice of rows at a time (:class:`_Slice`). While a source is hashed from the
    conversion's reads (:class:`~mmconvert.formats.hashing.SourceTap`), they run in the order
    their sources lie in the source files, so each source is read in one sequential pass that
    also feeds its hash. Otherwise (sources hashed by a child, cached, or not hashed) they run
    in the order given, the output files' own: each output then fills from its start and its
    hash never waits. (safetensors stores layer 10 before layer 2, and the output hash waited
    ~1 s of 2.5 on a 0.6B model in source order.) For each ``(fd, size)`` in ``hash_files``
    the calling thread hashes the output region by region as the slices filling it finish
    (:func:`~mmconvert.formats.hashing.sha256_following`), overlapping the conversion; the
    digests come back in ``hash_files`` order.

    ``progress`` is called (from the pool's threads, one call at a time) with the bytes each
    slice wrote into its targets; the calls add up to :func:`data_bytes` of ``jobs``. It does
    not touch the bytes written.
    """
    progress = locked(progress)
    heap.use(heap.STREAMING)  # slice buffers reused from the heap, whatever ran before
    workers = workers or max(1, os.cpu_count() or 1)
    digests = []
    ordered = _source_order(jobs) if observing_reads() else jobs
    pieces = [p for job in ordered for p in _slices(job, chunk_bytes)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_write_slice, piece, progress) for piece in pieces]
        try:
            for fd, size in hash_files:
                regions = sorted(((_slice_end(piece, t), future)
                                  for piece, future in zip(pieces, futures)
                                  for t in piece.job.targets if t.fd == fd), key=lambda r: r[0])
                digests.append(sha256_following(fd, size, regions))
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:  # a failed slice: do not write the rest
                future.cancel()
            raise
    SCAN.finish()  # NaN/Inf seen in these tensors: warn, or refuse under --strict
    return digests
