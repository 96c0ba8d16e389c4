"""A GGUF v3 writer in explicit phases: metadata and tensor infos first, then streamed data.

File layout (all integers little-endian)::

    "GGUF"  u32 version=3  u64 n_tensors  u64 n_kv
    n_kv x      key:string  u32 value_type  value
    n_tensors x name:string  u32 n_dims  u64 ne[n_dims]  u32 ggml_type  u64 offset
    zero padding to ``alignment``
    data section: each tensor at ``offset`` (relative to the section, a multiple of
    ``alignment``), zero padded between tensors

``string`` is ``u64 length + UTF-8 bytes``; an array is ``u32 item_type, u64 count, items``.
``ne`` is ggml's dimension order, the reverse of numpy's shape (``ne[0]`` is the row length).

:func:`layout_gguf` computes every byte of the header and every tensor's absolute offset before
any data exists, optionally split into llama.cpp-style shards; :func:`write_gguf` then streams
all tensors of all files in parallel (:mod:`mmconvert.formats.streaming`). Several files that
share a source tensor (one text GGUF per ``--outtype``) are fed from a single read of each
slice of source rows: the slice is encoded once per file and ``pwrite``-n into each. Nothing here depends on wall-clock time,
dict iteration of unordered input or thread scheduling, so the bytes are deterministic.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmconvert.formats.gguf_constants import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_VERSION,
    VALUE_FORMATS,
    GGMLQuantizationType,
    Keys,
)
from mmconvert.formats.gguf_constants import GGUFValueType as ValueType  # Metadata's name
from mmconvert.formats.streaming import (
    CHUNK_BYTES,
    Encoder,
    Progress,
    Target,
    TensorWrite,
    create_file,
    write_tensors,
)
from mmconvert.formats.tensor_source import TensorSource

MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL
MAX_DIMS = 4


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _strings(items: Sequence[str]) -> bytes:
    """Each item as a GGUF string, one comprehension (the vocabulary has 150 k of each)."""
    pack = struct.Struct("<Q").pack
    return b"".join([pack(len(raw)) + raw for raw in [item.encode("utf-8") for item in items]])


def _scalars(vtype: ValueType, values: Any) -> bytes:
    """Numbers as ``vtype``, refusing values the type cannot hold (no silent wrap-around)."""
    if vtype == ValueType.BOOL:
        return np.asarray(values, dtype=bool).astype("<u1").tobytes()
    dtype = np.dtype(VALUE_FORMATS[ValueType(vtype).name])
    if dtype.kind in "iu":
        wide = np.asarray(values, dtype=object if dtype == np.dtype("<u8") else np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise ValueError(f"value out of range for {vtype.name}")
        return np.asarray(values).astype(dtype).tobytes()
    return np.asarray(values, dtype=np.float64).astype(dtype).tobytes()


@dataclass(frozen=True)
class Value:
    """A typed metadata value; ``item_type`` is set for arrays."""

    vtype: ValueType
    value: Any
    item_type: ValueType | None = None

    def encode(self) -> bytes:
        """The value's bytes, computed once: the vocabulary arrays (150k strings) are shared by
        every text GGUF of a run."""
        cached = self.__dict__.get("_encoded")
        if cached is None:
            cached = self._encode()
            object.__setattr__(self, "_encoded", cached)
        return cached

    def _encode(self) -> bytes:
        head = struct.pack("<I", self.vtype)
        if self.vtype == ValueType.STRING:
            return head + _string(self.value)
        if self.vtype == ValueType.ARRAY:
            assert self.item_type is not None
            items = list(self.value) if not isinstance(self.value, np.ndarray) else self.value
            head += struct.pack("<IQ", self.item_type, len(items))
            if self.item_type == ValueType.STRING:
                return head + _strings(items)
            if self.item_type == ValueType.ARRAY:
                raise ValueError("arrays of arrays are not supported")
            return head + _scalars(self.item_type, items)
        return head + _scalars(self.vtype, [self.value])


class Metadata:
    """Ordered, typed key-value metadata: the types are explicit because llama.cpp checks them
    (``block_count`` must be UINT32, ``top_k`` INT32, ...). Keys can be added once."""

    def __init__(self) -> None:
        self._kv: dict[str, Value] = {}

    def add(self, key: str, vtype: ValueType, value: Any, item_type: ValueType | None = None
            ) -> None:
        if key in self._kv:
            raise KeyError(f"duplicate GGUF key {key}")
        if (vtype == ValueType.ARRAY) != (item_type is not None):
            raise ValueError(f"{key}: item_type is required for arrays and only for arrays")
        self._kv[key] = Value(vtype, value, item_type)

    def string(self, key: str, value: str) -> None:
        self.add(key, ValueType.STRING, str(value))

    def uint32(self, key: str, value: int) -> None:
        self.add(key, ValueType.UINT32, int(value))

    def uint16(self, key: str, value: int) -> None:
        self.add(key, ValueType.UINT16, int(value))

    def int32(self, key: str, value: int) -> None:
        self.add(key, ValueType.INT32, int(value))

    def float32(self, key: str, value: float) -> None:
        self.add(key, ValueType.FLOAT32, float(value))

    def boolean(self, key: str, value: bool) -> None:
        self.add(key, ValueType.BOOL, bool(value))

    def array(self, key: str, item_type: ValueType, values: Sequence[Any] | np.ndarray) -> None:
        self.add(key, ValueType.ARRAY, values, item_type)

    def __contains__(self, key: object) -> bool:
        return key in self._kv

    def __getitem__(self, key: str) -> Value:
        return self._kv[key]

    def __len__(self) -> int:
        return len(self._kv)

    def keys(self) -> list[str]:
        return list(self._kv)

    def items(self) -> list[tuple[str, Value]]:
        return list(self._kv.items())

    def update(self, other: Metadata) -> None:
        """Add every key of ``other``, sharing its values (and their encoded bytes)."""
        for key, value in other._kv.items():
            if key in self._kv:
                raise KeyError(f"duplicate GGUF key {key}")
            self._kv[key] = value

    def copy(self) -> Metadata:
        other = Metadata()
        other._kv = dict(self._kv)
        return other

    def encode(self) -> bytes:
        return b"".join(_string(k) + v.encode() for k, v in self._kv.items())


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor to store: numpy-order ``shape``, ggml type name, encoded size and how to get
    its bytes (``encode`` maps a slice of ``source`` rows to the encoded bytes of those rows)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: str
    nbytes: int
    source: TensorSource
    encode: Encoder = field(repr=False, compare=False)
    # what ``encode`` depends on besides the source (GGML type, importance weights): tensors of
    # one source with equal ``encoding`` are encoded once for all the files storing them
    encoding: object = field(default=None, compare=False)

    def info(self, offset: int) -> bytes:
        """The tensor-info record (``ne`` reversed from the numpy shape)."""
        ne = tuple(reversed(self.shape)) or (1,)
        return (_string(self.name) + struct.pack("<I", len(ne))
                + struct.pack(f"<{len(ne)}Q", *ne)
                + struct.pack("<IQ", GGMLQuantizationType[self.ggml_type], offset))


@dataclass
class GGUFFile:
    """One output file, fully laid out: its header bytes and each tensor's absolute offset."""

    name: str
    header: bytes
    tensors: list[tuple[GGUFTensor, int]]  # (tensor, absolute offset in the file)
    size: int

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t, _ in self.tensors)


def _pad(n: int, alignment: int) -> int:
    return -n % alignment


def check_tensor(t: GGUFTensor) -> None:
    if len(t.name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"tensor name {t.name!r} is longer than {MAX_NAME_BYTES} bytes")
    if len(t.shape) > MAX_DIMS:
        raise ValueError(f"tensor {t.name}: {len(t.shape)} dimensions (ggml allows {MAX_DIMS})")
    if t.ggml_type not in GGMLQuantizationType.__members__:
        raise ValueError(f"tensor {t.name}: unknown ggml type {t.ggml_type}")


def _one_file(name: str, metadata: Metadata, tensors: Sequence[GGUFTensor], alignment: int
              ) -> GGUFFile:
    relative = []
    pos = 0
    for t in tensors:
        relative.append(pos)
        pos += t.nbytes + _pad(t.nbytes, alignment)
    header = bytearray(struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(metadata)))
    header += metadata.encode()
    for t, off in zip(tensors, relative):
        header += t.info(off)
    header += b"\0" * _pad(len(header), alignment)
    data_start = len(header)
    size = data_start + (relative[-1] + tensors[-1].nbytes if tensors else 0)
    placed = [(t, data_start + off) for t, off in zip(tensors, relative)]
    return GGUFFile(name, bytes(header), placed, size)


def split_groups(tensors: Sequence[GGUFTensor], max_bytes: int | None) -> list[list[GGUFTensor]]:
    """Greedy, order-preserving shards of at most ``max_bytes`` tensor data each (a larger
    tensor gets a shard of its own): the rule llama.cpp's ``gguf-split`` applies."""
    groups: list[list[GGUFTensor]] = [[]]
    size = 0
    for t in tensors:
        if max_bytes and groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    return groups


def split_name(stem: str, index: int, count: int) -> str:
    """llama.cpp's shard naming: ``<stem>-00001-of-00003.gguf`` (``index`` from 0)."""
    return f"{stem}-{index + 1:05d}-of-{count:05d}.gguf"


def layout_gguf(stem: str, metadata: Metadata, tensors: Sequence[GGUFTensor], *,
                alignment: int = GGUF_DEFAULT_ALIGNMENT, split_max_bytes: int | None = None
                ) -> list[GGUFFile]:
    """Lay out ``<stem>.gguf`` or, when the data exceeds ``split_max_bytes``, its shards.

    Shards follow llama.cpp: every shard carries ``split.no`` (from 0), ``split.count`` (UINT16)
    and ``split.tensors.count`` (INT32); the first carries all other metadata too, the rest
    only ``general.alignment`` when it is not the default.
    """
    if alignment <= 0 or alignment % 8:
        raise ValueError("alignment must be a positive multiple of 8")
    for t in tensors:
        check_tensor(t)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names")
    metadata = metadata.copy()
    if alignment != GGUF_DEFAULT_ALIGNMENT and Keys.General.ALIGNMENT not in metadata:
        metadata.uint32(Keys.General.ALIGNMENT, alignment)
    groups = split_groups(tensors, split_max_bytes)
    if len(groups) == 1:
        return [_one_file(f"{stem}.gguf", metadata, tensors, alignment)]
    files = []
    for index, group in enumerate(groups):
        kv = metadata.copy() if index == 0 else Metadata()
        if index and alignment != GGUF_DEFAULT_ALIGNMENT:
            kv.uint32(Keys.General.ALIGNMENT, alignment)
        kv.uint16(Keys.Split.LLM_KV_SPLIT_NO, index)
        kv.uint16(Keys.Split.LLM_KV_SPLIT_COUNT, len(groups))
        kv.int32(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, len(tensors))
        files.append(_one_file(split_name(stem, index, len(groups)), kv, group, alignment))
    return files


# ---------------------------------------------------------------------------------------------
# phase 2: data


def write_gguf(folder: Path, files: Iterable[GGUFFile], *, progress: Progress | None = None,
               workers: int | None = None, chunk_bytes: int = CHUNK_BYTES,
               digests: dict[str, str] | None = None) -> list[str]:
    """Create every laid-out file under ``folder`` and stream all tensor data; return names.

    Files are pre-sized (so gaps are zero padding) and their headers written first; then one
    job per distinct source tensor runs on a thread pool, in file order, writing into every
    file that stores it. With ``digests``, the calling thread hashes each file region by region
    as the jobs finish (sha256 per file name), overlapping the conversion. ``progress`` gets
    the bytes written slice by slice, adding up to the files' ``data_bytes``
    (:func:`~mmconvert.formats.streaming.write_tensors`).
    """
    files = list(files)
    fds: list[int] = []
    try:
        # one job per distinct source (equal sources hold equal bytes), in the order the first
        # file stores them: the hasher follows that order
        jobs: dict[TensorSource, list[Target]] = {}
        for f in files:
            fds.append(create_file(Path(folder) / f.name, f.size, f.header))
            for t, offset in f.tensors:
                jobs.setdefault(t.source, []).append(
                    Target(fds[-1], offset, t.nbytes, t.encode, f"{f.name}:{t.name}",
                           t.encoding))
        hashed = write_tensors(
            [TensorWrite(source, tuple(targets)) for source, targets in jobs.items()],
            progress=progress, workers=workers, chunk_bytes=chunk_bytes,
            hash_files=[(fd, f.size) for fd, f in zip(fds, files)] if digests is not None
            else ())
        if digests is not None:
            digests.update({f.name: digest for f, digest in zip(files, hashed)})
    finally:
        for fd in fds:
            os.close(fd)
    return [f.name for f in files]
