"""A sharded safetensors writer that streams: layout first, then tensor data in parallel.

Files are named as ``transformers`` does (``model.safetensors``, or
``model-00001-of-00003.safetensors`` plus ``model.safetensors.index.json``), and readable by
the ``safetensors`` library and ``from_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from mmconvert.formats.dtypes import STORAGE_DTYPES, convert
from mmconvert.formats.streaming import (
    Progress,
    Target,
    TensorWrite,
    create_file,
    write_tensors,
)
from mmconvert.formats.tensor_source import TargetTensor

ALIGN = 8  # data section starts 8-byte aligned, like the safetensors library


def parse_size(text: str | int) -> int:
    """``"5GB"``, ``"500MB"``, ``"2GiB"`` or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6,
             "G": 10**9, "B": 1}
    unit = next((u for u in units if s.endswith(u)), "")
    number, factor = (s[: -len(unit)], units[unit]) if unit else (s, 1)
    try:
        value = float(number)
    except ValueError as exc:
        raise ValueError(f"cannot read size {text!r} (use e.g. 5GB, 500MB, 2GiB)") from exc
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return int(value * factor)


def _nbytes(t: TargetTensor) -> int:
    return math.prod(t.shape) * STORAGE_DTYPES[t.dtype].itemsize


def shard_groups(tensors: Sequence[TargetTensor], max_shard_bytes: int
                 ) -> list[list[TargetTensor]]:
    """Greedy, order-preserving split into shards of at most ``max_shard_bytes`` (a tensor larger
    than that gets a shard of its own)."""
    groups: list[list[TargetTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = _nbytes(t)
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += nbytes
    return groups


def _header(group: list[TargetTensor], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offsets = []
    pos = 0
    for t in group:
        nbytes = _nbytes(t)
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    return raw, offsets


def _encoder(src: str, dst: str):
    def encode(data):
        return convert(data, src, dst)
    return encode


def data_bytes(tensors: Sequence[TargetTensor]) -> int:
    """Tensor bytes :func:`write_safetensors` writes for ``tensors`` (its progress total)."""
    return sum(_nbytes(t) for t in tensors)


def write_safetensors(folder: Path, tensors: Sequence[TargetTensor], *, max_shard_bytes: int,
                      metadata: dict[str, str] | None = None, stem: str = "model",
                      progress: Progress | None = None,
                      digests: dict[str, str] | None = None) -> list[str]:
    """Write ``tensors`` into ``folder``; return the file names written (index included).

    When ``digests`` is given, each shard's sha256 (computed while writing) is stored in it.
    ``progress`` gets the bytes written slice by slice, adding up to :func:`data_bytes`.
    """
    metadata = {"format": "pt", **(metadata or {})}
    groups = shard_groups(tensors, max_shard_bytes)
    if len(groups) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups):
        raw, offsets = _header(group, metadata)
        data_start = 8 + len(raw)
        size = data_start + sum(_nbytes(t) for t in group)
        fd = create_file(folder / name, size, len(raw).to_bytes(8, "little") + raw)
        try:
            jobs = [TensorWrite(t.source, (Target(fd, data_start + off, _nbytes(t),
                                                  _encoder(t.source.dtype, t.dtype),
                                                  f"{name}:{t.name}"),))
                    for t, off in zip(group, offsets)]
            hashed = write_tensors(jobs, progress=progress,
                                   hash_files=[(fd, size)] if digests is not None else ())
            if digests is not None:
                digests[name] = hashed[0]
        finally:
            os.close(fd)
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in tensors)},
                 "weight_map": {t.name: n for n, g in zip(names, groups) for t in g}}
        (folder / f"{stem}.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n", encoding="utf-8")
        names.append(f"{stem}.safetensors.index.json")
    return names
