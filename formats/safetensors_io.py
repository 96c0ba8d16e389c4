"""safetensors reading without loading: a validated header, then bytes on demand.

Only the header is parsed when a file is opened; a tensor's bytes are read with ``pread`` when
asked for (whole, or a contiguous range of rows), so converting a model keeps about one tensor
in memory. Writing lives in :mod:`mmconvert.formats.safetensors_writer`.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmconvert.convert.errors import CheckpointError
from mmconvert.formats.dtypes import STORAGE_DTYPES

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the same limit the safetensors library applies


@dataclass(frozen=True)
class SafetensorsEntry:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute file offset of the first byte
    nbytes: int


def read_safetensors_header(path: Path) -> tuple[dict[str, SafetensorsEntry], dict[str, str]]:
    """Parse and validate the header of ``path``: (entries by name, ``__metadata__``).

    Raises :class:`CheckpointError` naming the file when it is truncated, its header is not
    JSON, a dtype is unknown, a tensor's size disagrees with its shape, or data ranges fall
    outside the file or overlap.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes "
                    f"in a {size}-byte file)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    data_size = size - data_start
    entries: dict[str, SafetensorsEntry] = {}
    spans = []
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for {name!r}") from exc
        if dtype not in STORAGE_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        expected = math.prod(shape) * STORAGE_DTYPES[dtype].itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} spans {end - begin} bytes but shape {list(shape)} "
                f"{dtype} needs {expected}"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: truncated safetensors file (tensor {name!r} ends at byte {end} of a "
                f"{data_size}-byte data section)"
            )
        spans.append((begin, end, name))
        entries[name] = SafetensorsEntry(path, name, dtype, shape, data_start + begin, expected)
    spans.sort()
    for (_, end_a, name_a), (begin_b, _, name_b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {name_a!r} and {name_b!r} overlap")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def read_bytes(path: Path, offset: int, nbytes: int) -> bytearray:
    """Read exactly ``nbytes`` at ``offset`` (pread: no shared file position, thread safe)."""
    buf = bytearray(nbytes)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done}")
            done += n
    finally:
        os.close(fd)
    return buf


def read_entry(entry: SafetensorsEntry, rows: tuple[int, int] | None = None) -> np.ndarray:
    """The tensor's storage array; with ``rows=(start, stop)`` only those leading-axis rows."""
    dtype = STORAGE_DTYPES[entry.dtype]
    shape = entry.shape
    offset, nbytes = entry.offset, entry.nbytes
    if rows is not None:
        start, stop = rows
        row_bytes = entry.nbytes // shape[0] if shape and shape[0] else 0
        offset += start * row_bytes
        nbytes = (stop - start) * row_bytes
        shape = (stop - start, *shape[1:])
    return np.frombuffer(read_bytes(entry.path, offset, nbytes), dtype=dtype).reshape(shape)
