"""Streaming tensor data into a file at precomputed offsets, in parallel, a slice at a time.

Writers compute their whole layout first (header, offsets), then call :func:`write_tensors`:
each tensor is read from its source a few rows at a time, scanned for NaN/Inf
(:mod:`mmconvert.formats.nonfinite`), encoded (cast or quantized) and written with ``pwrite``
at its offset. Tensors go in parallel on a thread pool (numpy and the
syscalls release the GIL); memory stays near ``workers x CHUNK_BYTES``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mmconvert.convert.tensors import TensorRef
from mmconvert.formats.hashing import sha256_following
from mmconvert.formats.nonfinite import SCAN

CHUNK_BYTES = 32 << 20  # source bytes read per slice

Encoder = Callable[[np.ndarray], np.ndarray]  # storage rows in -> output bytes (any dtype) out


@dataclass(frozen=True)
class TensorWrite:
    source: TensorRef
    offset: int  # absolute offset in the output file
    nbytes: int  # bytes the encoded tensor occupies
    encode: Encoder


class Progress:
    """A thread-safe byte counter behind a tqdm bar (silent when not a terminal or disabled)."""

    def __init__(self, total: int, desc: str, enabled: bool | None = None):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         disable=(None if enabled is None else not enabled), leave=False)
        self._lock = threading.Lock()

    def update(self, n: int) -> None:
        with self._lock:
            self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data = data[n:]
        offset += n


def write_one(fd: int, job: TensorWrite, progress: Progress | None = None) -> None:
    ref = job.source
    rows = ref.shape[0] if ref.shape else 1
    row_bytes = ref.nbytes // rows if rows else 0
    whole = not ref.shape or row_bytes == 0 or not ref.row_streamable
    step = rows if whole else max(1, CHUNK_BYTES // row_bytes)
    offset = job.offset
    written = 0
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        data = ref.read() if (start == 0 and stop == rows) else ref.read_rows(start, stop)
        SCAN.scan(ref.source_name or ref.name, data, ref.dtype)
        out = np.ascontiguousarray(job.encode(data))
        view = memoryview(out).cast("B")
        _pwrite_all(fd, view, offset)
        offset += len(view)
        written += len(view)
        if progress is not None:
            progress.update((stop - start) * row_bytes)
    if written != job.nbytes:
        raise AssertionError(f"{ref.name}: wrote {written} bytes, layout reserved {job.nbytes}")


def write_tensors(fd: int, jobs: Sequence[TensorWrite], progress: Progress | None = None,
                  workers: int | None = None, digest_size: int | None = None) -> str | None:
    """Write every job (the header must already be in place).

    Jobs run in file order on a thread pool; with ``digest_size`` (the final file size) the
    calling thread hashes each region as soon as it is written and the sha256 is returned.
    """
    workers = workers or max(1, os.cpu_count() or 1)
    ordered = sorted(jobs, key=lambda j: j.offset)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(write_one, fd, job, progress) for job in ordered]
        if digest_size is not None:
            regions = [(job.offset + job.nbytes, f) for job, f in zip(ordered, futures)]
            digest = sha256_following(fd, digest_size, regions)
            SCAN.finish()
            return digest
        for future in futures:
            future.result()
    SCAN.finish()  # NaN/Inf seen in these tensors: warn, or refuse under --strict
    return None
