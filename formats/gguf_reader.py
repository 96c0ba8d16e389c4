"""Reading a GGUF file: the key-value section and tensor infos, parsed once, typed access.

One reader for every consumer (the bundle summary, ``verify``, the projector runtime, the
llama.cpp runner). Opening a file scans its key-value section and tensor infos once and decodes
nothing: each value is decoded when asked for. gguf-py's ``GGUFReader`` builds a numpy view for
every item of every array, which takes ~9 s on a text GGUF with Qwen's 151 k tokens and merges;
here a string array is skipped by its lengths alone, so the same file opens in a fraction of a
second. Tensor data is mapped, not read, until a tensor is asked for.

    >>> r = GGUFReader("model-F16.gguf")
    >>> r.string(Keys.General.ARCHITECTURE), r.uint32(Keys.General.FILE_TYPE, default=None)
    >>> r.array(Keys.Tokenizer.EOS_IDS, "UINT32", default=[])
    >>> r.tensors["token_embd.weight"].shape  # numpy order: [vocab, hidden]

Damaged files raise ``ValueError`` (truncated sections, unknown value or tensor types,
duplicate keys or tensors, data past the end of the file); a wrong or missing key raises
``ValueError`` from the typed getters, naming the key and both types.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmconvert.formats.gguf_constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    VALUE_FORMATS,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

VERSIONS = (2, GGUF_VERSION)  # the versions read
DECODE_CHUNK_BYTES = 64 << 20  # float32 output decoded per step by tensor_array
# GGUF value type id -> (its GGUFValueType name, struct format of a scalar; "" for the others)
VALUE_TYPES: dict[int, tuple[str, str]] = {int(t): (t.name, VALUE_FORMATS.get(t.name, ""))
                                           for t in GGUFValueType}
_STRING, _ARRAY = int(GGUFValueType.STRING), int(GGUFValueType.ARRAY)
_U64 = struct.Struct("<Q")
_MISSING: Any = object()


@dataclass(frozen=True)
class Field:
    """Where one key's value lies: ``types`` as gguf-py names them (``("UINT32",)``,
    ``("ARRAY", "STRING")``); ``offset`` is the first byte of the value."""

    key: str
    types: tuple[str, ...]
    offset: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy (row-major) order: GGUF stores ggml's ne, reversed here
    type_name: str  # gguf-py's GGMLQuantizationType name: F32, F16, Q8_0, ...
    type_id: int
    offset: int  # absolute file offset of the first byte
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise struct.error(f"a string of {n} bytes at byte {self.pos} runs past the end")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip(self, vtype: int) -> None:
        """Move past one value of ``vtype`` without decoding it."""
        if vtype == _STRING:
            self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
        elif vtype == _ARRAY:
            item = self.unpack("<I")
            n = self.unpack("<Q")
            if item not in VALUE_TYPES:
                raise ValueError(f"unknown GGUF value type {item} at byte {self.pos}")
            if VALUE_TYPES[item][1]:
                self.pos += n * struct.calcsize(VALUE_TYPES[item][1])
            elif item == _STRING:
                self.pos = self._skip_strings(n)
            else:
                for _ in range(n):
                    self.skip(item)
        elif vtype in VALUE_TYPES:
            self.pos += struct.calcsize(VALUE_TYPES[vtype][1])
        else:
            raise ValueError(f"unknown GGUF value type {vtype} at byte {self.pos}")
        if self.pos > len(self.buf):
            raise struct.error(f"a value runs past the end of the file (byte {self.pos})")

    def _skip_strings(self, n: int) -> int:
        """The position after ``n`` strings: one tight loop over their lengths, as the
        vocabulary's 150 k tokens and merges are skipped whenever a text GGUF is opened (a call
        of :meth:`skip` per string took 0.4 s a file). A length past the end raises
        ``struct.error`` at the next read, or at the check in :meth:`skip`."""
        length = _U64.unpack_from
        buf, pos = self.buf, self.pos
        for _ in range(n):
            pos += 8 + length(buf, pos)[0]
        return pos

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item = self.unpack("<I")
            n = self.unpack("<Q")
            fmt = VALUE_TYPES[item][1]
            if fmt:
                size = struct.calcsize(fmt)
                if self.pos + n * size > len(self.buf):
                    raise struct.error(f"an array of {n} values runs past the end of the file")
                values = np.frombuffer(self.buf, np.dtype(fmt), n, self.pos).tolist()
                self.pos += n * size
                return values
            return [self.value(item) for _ in range(n)]
        return self.unpack(VALUE_TYPES[vtype][1])


class GGUFReader:
    """A GGUF v2/v3 file: ``fields`` (key -> :class:`Field`) and ``tensors`` (name ->
    :class:`TensorInfo`), in file order. ``OSError`` when the file cannot be opened,
    ``ValueError`` when it is not a sound GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) \
                if self.path.stat().st_size else b""
        self._values: dict[str, Any] = {}
        cur = _Cursor(self._buf)
        try:
            self._read_header(cur)
        except struct.error as exc:
            raise ValueError(f"truncated GGUF file ({exc})") from exc

    def _read_header(self, cur: _Cursor) -> None:
        if self._buf[:4] != struct.pack("<I", GGUF_MAGIC):
            raise ValueError("no GGUF magic")
        cur.pos = 4
        self.version = cur.unpack("<I")
        if self.version not in VERSIONS:
            raise ValueError(f"GGUF version {self.version} (2 and 3 are read)")
        n_tensors = cur.unpack("<Q")
        n_kv = cur.unpack("<Q")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key = cur.string()
            vtype = cur.unpack("<I")
            if vtype not in VALUE_TYPES:
                raise ValueError(f"key {key}: unknown GGUF value type {vtype}")
            types = (VALUE_TYPES[vtype][0],)
            start = cur.pos
            if vtype == _ARRAY:
                item = struct.unpack_from("<I", self._buf, cur.pos)[0]
                types += (VALUE_TYPES.get(item, (str(item), ""))[0],)
            cur.skip(vtype)
            if key in self.fields:
                raise ValueError(f"key {key} appears twice")
            self.fields[key] = Field(key, types, start)
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if n_dims > 8:
                raise ValueError(f"tensor {name}: {n_dims} dimensions")
            ne = [cur.unpack("<Q") for _ in range(n_dims)]
            infos.append((name, ne, cur.unpack("<I"), cur.unpack("<Q")))
        alignment = self.value(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"{Keys.General.ALIGNMENT} {alignment!r} is not a power of two")
        self.data_offset = -(-cur.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, ne, type_id, offset in infos:
            if name in self.tensors:
                raise ValueError(f"tensor {name} appears twice")
            self.tensors[name] = self._tensor_info(name, ne, type_id, offset)

    def _tensor_info(self, name: str, ne: list[int], type_id: int, offset: int) -> TensorInfo:
        try:
            qtype = GGMLQuantizationType(type_id)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name}: unknown GGML type {type_id}") from None
        count = math.prod(ne)
        if ne and ne[0] % block:
            raise ValueError(f"tensor {name}: rows of {ne[0]} values are not whole "
                             f"{qtype.name} blocks of {block}")
        nbytes = count // block * type_size
        start = self.data_offset + offset
        if start + nbytes > len(self._buf):
            raise ValueError(f"tensor {name}: its data ({nbytes} bytes at byte {start}) runs "
                             f"past the end of the file ({len(self._buf)} bytes)")
        return TensorInfo(name, tuple(int(d) for d in reversed(ne)), qtype.name, type_id,
                          start, nbytes)

    # -- keys -------------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def types(self, key: str) -> tuple[str, ...] | None:
        """``("UINT32",)``, ``("ARRAY", "STRING")``, ...; None when the file lacks ``key``."""
        field = self.fields.get(key)
        return None if field is None else field.types

    def value(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` whatever its type (arrays as lists), or ``default``."""
        if key not in self._values:
            field = self.fields.get(key)
            if field is None:
                return default
            cur = _Cursor(self._buf)
            cur.pos = field.offset
            vtype = next(t for t, (n, _) in VALUE_TYPES.items() if n == field.types[0])
            try:
                self._values[key] = cur.value(vtype)
            except struct.error as exc:  # checked while scanning: only a changed file gets here
                raise ValueError(f"key {key}: truncated value ({exc})") from exc
        return self._values[key]

    def get(self, key: str, *types: str, default: Any = _MISSING) -> Any:
        """The value of ``key``, whose GGUF type must be ``types`` (``"UINT32"``, or
        ``"ARRAY", "STRING"`` for an array of strings); ``ValueError`` when it is missing
        (without ``default``) or of another type."""
        have = self.types(key)
        if have is None:
            if default is not _MISSING:
                return default
            raise ValueError(f"key {key} is missing")
        if have != types:
            raise ValueError(f"key {key} is {'/'.join(have)}, the spec says {'/'.join(types)}")
        return self.value(key)

    def string(self, key: str, default: Any = _MISSING) -> str:
        return self.get(key, "STRING", default=default)

    def uint32(self, key: str, default: Any = _MISSING) -> int:
        return self.get(key, "UINT32", default=default)

    def int32(self, key: str, default: Any = _MISSING) -> int:
        return self.get(key, "INT32", default=default)

    def float32(self, key: str, default: Any = _MISSING) -> float:
        return self.get(key, "FLOAT32", default=default)

    def array(self, key: str, item_type: str, default: Any = _MISSING) -> list:
        return self.get(key, "ARRAY", item_type, default=default)

    def values(self, keys: Collection[str]) -> dict[str, Any]:
        """Those of ``keys`` the file holds, with their values."""
        return {k: self.value(k) for k in keys if k in self.fields}

    # -- tensors ----------------------------------------------------------------------------

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The tensor's stored bytes (``uint8``, a view of the mapped file)."""
        t = self.tensors[name]
        return np.frombuffer(self._buf, np.uint8, t.nbytes, t.offset)

    def tensor_array(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy shape (dequantised by gguf-py's kernels).

        Decoded :data:`DECODE_CHUNK_BYTES` of output at a time into the result: gguf-py's
        kernels make float32 temporaries of their whole input, which for a 14B model's
        output matrix would be 6 GB on top of the 3 GB result."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        qtype = GGMLQuantizationType(t.type_id)
        raw = self.tensor_bytes(name)
        if not t.shape:
            return np.asarray(dequantize(raw, qtype), dtype=np.float32)
        rows = t.n_elements // max(t.shape[-1], 1)
        raw = raw.reshape(rows, -1)
        out = np.empty((rows, t.shape[-1]), np.float32)
        step = max(1, DECODE_CHUNK_BYTES // max(4 * t.shape[-1], 1))
        for start in range(0, rows, step):
            out[start:start + step] = dequantize(raw[start:start + step], qtype)
        return out.reshape(t.shape)


def read_gguf_keys(path: str | Path, keys: Collection[str]) -> dict[str, Any]:
    """The values of those of ``keys`` that ``path`` holds (arrays as lists).

    Raises ``ValueError`` when the file is not GGUF v2/v3 or its sections are damaged.
    """
    return GGUFReader(path).values(keys)
