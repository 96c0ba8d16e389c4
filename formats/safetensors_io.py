"""safetensors reading without loading: a validated header, then bytes on demand.

Only the header is parsed when a file is opened; a tensor's bytes are read with ``pread`` when
asked for (whole, or a contiguous range of rows), so converting a model keeps about one tensor
in memory. Writing lives in :mod:`mmconvert.formats.safetensors_writer`.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmconvert.errors import CheckpointError, UnsupportedError
from mmconvert.formats.dtypes import STORAGE_DTYPES
from mmconvert.formats.hashing import observe_read
from mmconvert.formats.safe_json import JSONObject, JSONTooDeep, loads_like_serde

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit (decimal, not MiB)
U64_MAX = 2**64 - 1
# every dtype the safetensors library (0.8) knows, with its size in bits; the ones outside
# STORAGE_DTYPES are well formed but not convertible (UnsupportedError)
LIBRARY_DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8,
    "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
    "U64": 64,
}
TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


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

    Refuses (:class:`CheckpointError`, naming the file) exactly what the safetensors library
    refuses: a header over 100,000,000 bytes or past the end of the file, text that is not
    UTF-8 JSON as serde_json reads it (nesting over 127 levels included), entries that are not
    ``{dtype, shape, data_offsets}`` with unsigned integers, sizes that overflow 64 bits or
    disagree with the shape, and data ranges that do not tile the data section from its first
    byte to the end of the file (no gap, overlap or trailing byte). A well-formed file with a
    dtype mmconvert cannot convert raises :class:`UnsupportedError`.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: safetensors header of {header_len} bytes; the "
                                      f"format allows at most {MAX_HEADER_BYTES}")
            if 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file (header of {header_len} bytes "
                    f"in a {size}-byte file)"
                )
            raw = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        header = loads_like_serde(raw.decode("utf-8"))
    except JSONTooDeep as exc:
        raise CheckpointError(f"{path}: safetensors header is {exc}") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    metadata = _metadata(header, path)
    infos = [(name, _tensor_info(name, value, path))
             for name, value in header.pairs if name != "__metadata__"]
    infos = list({name: info for name, info in infos}.items())  # the last duplicate wins
    data_start = 8 + header_len
    entries = _layout(infos, data_start, size, path)
    return entries, metadata


def _metadata(header: JSONObject, path: Path) -> dict[str, str]:
    """``__metadata__``: absent, null, or an object of strings (each duplicate checked)."""
    if header.duplicated("__metadata__"):
        raise CheckpointError(f"{path}: safetensors header has __metadata__ twice")
    value = header.get("__metadata__")
    if value is None:
        return {}
    if not isinstance(value, JSONObject):
        raise CheckpointError(f"{path}: safetensors __metadata__ is a {type(value).__name__}, "
                              "not an object of strings")
    bad = next((k for k, v in value.pairs if not isinstance(v, str)), None)
    if bad is not None:
        raise CheckpointError(f"{path}: safetensors __metadata__ value {bad!r} is not a string")
    return dict(value)


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value <= U64_MAX


def _tensor_info(name: str, value: object, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one entry, typed as the library's ``TensorInfo``."""
    if type(value) is JSONObject and len(value) == 3 and len(value.pairs) == 3:
        dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
    elif isinstance(value, list):  # serde reads a struct from a sequence of its fields too
        if len(value) != 3:
            raise _entry_error(path, name, f"is a list of {len(value)}, not 3 fields")
        dtype, shape, offsets = value
    elif isinstance(value, JSONObject):
        twice = value.duplicates & set(TENSOR_FIELDS)
        missing = [f for f in TENSOR_FIELDS if f not in value]
        if twice or missing:
            raise _entry_error(path, name, f"has {sorted(twice)[0]} twice" if twice else
                               f"has no {missing[0]}")
        dtype, shape, offsets = (value[f] for f in TENSOR_FIELDS)
    else:
        raise _entry_error(path, name, f"is a {type(value).__name__}, not an object")
    if type(dtype) is not str or dtype not in LIBRARY_DTYPE_BITS:
        raise _entry_error(path, name, f"has dtype {repr(dtype)[:40]}, not a safetensors dtype")
    if type(shape) is not list or not all(_is_u64(d) for d in shape):
        raise _entry_error(path, name, f"has shape {repr(shape)[:60]}, not a list of "
                           "non-negative integers")
    if type(offsets) is not list or len(offsets) != 2 or not all(map(_is_u64, offsets)):
        raise _entry_error(path, name, f"has data_offsets {repr(offsets)[:60]}, not two "
                           "non-negative integers")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _entry_error(path: Path, name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: tensor {name[:80]!r} {problem}")


def _layout(infos: list, data_start: int, file_size: int, path: Path
            ) -> dict[str, SafetensorsEntry]:
    """The library's ``Metadata::validate``: tensors sorted by offsets tile the data section."""
    entries: dict[str, SafetensorsEntry] = {}
    covered = 0
    for name, (dtype, shape, begin, end) in sorted(infos, key=lambda item: item[1][2:]):
        where = f"{path}: tensor {name[:80]!r}"
        if begin != covered or end < begin:
            problem = "overlaps the tensor before it" if begin < covered else \
                ("has its offsets reversed" if end < begin else f"starts at {begin}, after a gap "
                 f"(the previous data ends at {covered})")
            raise CheckpointError(f"{where} {problem}")
        covered = end
        elements = 1
        for dim in shape:  # checked like the library: every partial product fits in 64 bits
            elements *= dim
            if elements > U64_MAX:
                raise CheckpointError(f"{where}: shape {list(shape)} overflows 64 bits")
        bits = elements * LIBRARY_DTYPE_BITS[dtype]
        if bits > U64_MAX:
            raise CheckpointError(f"{where}: shape {list(shape)} overflows 64 bits")
        if bits % 8 or end - begin != bits // 8:
            raise CheckpointError(f"{where} spans {end - begin} bytes but shape {list(shape)} "
                                  f"{dtype} needs {bits / 8:g}")
        entries[name] = SafetensorsEntry(path, name, dtype, shape, data_start + begin, end - begin)
    data_size = file_size - data_start
    if covered > data_size:
        raise CheckpointError(f"{path}: truncated safetensors file (tensor data ends at byte "
                              f"{covered} of a {data_size}-byte data section)")
    if covered < data_size:
        raise CheckpointError(f"{path}: {data_size - covered} trailing bytes after the tensor "
                              "data (the safetensors library refuses such a file)")
    unsupported = next((e for e in entries.values() if e.dtype not in STORAGE_DTYPES), None)
    if unsupported is not None:
        raise UnsupportedError(f"{path}: tensor {unsupported.name!r} has dtype "
                               f"{unsupported.dtype}, which mmconvert does not convert")
    return entries


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
        observe_read(fd, offset, buf)  # sources are hashed from these bytes (formats/hashing)
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
