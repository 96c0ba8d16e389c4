"""The canonical tensor table: canonical name -> a lazy reference to the bytes.

Readers fill it; the plan and every writer and the verifier read from it. Nothing is loaded
until :meth:`TensorRef.read` is called, and file-backed tensors can be read a few rows at a
time (:meth:`TensorRef.read_rows`) so that even the embedding matrix streams in slices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from mmconvert.formats.dtypes import itemsize
from mmconvert.formats.safetensors_io import SafetensorsEntry, read_entry

Loader = Callable[[tuple[int, int] | None], np.ndarray]


@dataclass(frozen=True)
class Origin:
    """Where a canonical tensor sits in the source tensor(s) it was cut from or stacked of.

    Readers set it when a canonical tensor is not one source tensor, so that a target in the
    source's own layout (``to-safetensors --naming source``) can rebuild the source tensors bit
    for bit. ``kind``: ``"slice"`` (this tensor is ``source[start:stop]`` along ``axis`` of the
    tensor named ``source_name``, e.g. one half of a fused gate/up) or ``"stack"`` (item ``i``
    of the leading axis is the source tensor ``names[i]``, e.g. stacked experts).
    """

    kind: str
    axis: int = 0
    start: int = 0
    stop: int = 0
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorRef:
    """One tensor of the canonical model, not yet read.

    ``source_name`` and ``source_file`` say where it came from (for ``--naming source``,
    ``inspect`` and error messages); ``derivation`` lists what was done to the source tensor to
    obtain the canonical one (empty for a plain file-backed tensor).

    It is the :class:`~mmconvert.formats.tensor_source.TensorSource` the writers stream from;
    two refs that compare equal (every field but the loader) read the same bytes.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    source_name: str
    source_file: Path | None
    loader: Loader = field(repr=False, compare=False)
    derivation: tuple[str, ...] = ()
    # True when read_rows() reads only the rows asked for; derived tensors compute the whole
    # tensor, so writers read them once instead of slice by slice
    row_streamable: bool = True
    origin: Origin | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self) -> np.ndarray:
        """The whole tensor as a numpy storage array (BF16 as uint16 bit patterns)."""
        return self.loader(None)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the leading axis, reading only those bytes when file-backed."""
        return self.loader((start, stop))

    def derive(self, name: str, step: str, fn: Callable[[np.ndarray], np.ndarray],
               shape: tuple[int, ...], dtype: str | None = None,
               row_separable: bool = False) -> TensorRef:
        """A new lazy tensor computed from this one by the pure function ``fn``.

        ``row_separable``: ``fn`` maps any leading-axis slice of the input to the same slice
        of the output (a cast, a split along a later axis, ...), so the result still streams.
        """
        parent = self

        def load(rows: tuple[int, int] | None) -> np.ndarray:
            if row_separable:
                return fn(parent.read() if rows is None else parent.read_rows(*rows))
            out = fn(parent.read())
            return out if rows is None else out[rows[0]:rows[1]]

        return replace(self, name=name, shape=tuple(shape), dtype=dtype or self.dtype,
                       loader=load, derivation=(*self.derivation, step),
                       row_streamable=self.row_streamable and row_separable)

    def row_slice(self, name: str, step: str, start: int, stop: int) -> TensorRef:
        """Rows ``start:stop`` as a tensor of its own, still read lazily by row ranges."""
        parent = self

        def load(rows: tuple[int, int] | None) -> np.ndarray:
            lo, hi = (start, stop) if rows is None else (start + rows[0], start + rows[1])
            return parent.read_rows(lo, hi)

        return replace(self, name=name, shape=(stop - start, *self.shape[1:]), loader=load,
                       derivation=(*self.derivation, step))

    def renamed(self, name: str) -> TensorRef:
        return replace(self, name=name)

    def item(self, index: int, step: str) -> TensorRef:
        """Item ``index`` of the leading axis as a tensor of its own (one expert of stacked
        experts). Reading it reads only that item; it is read whole, not by rows."""
        parent = self

        def load(rows: tuple[int, int] | None) -> np.ndarray:
            whole = parent.read_rows(index, index + 1)[0]
            return whole if rows is None else whole[rows[0]:rows[1]]

        return replace(self, shape=self.shape[1:], loader=load, row_streamable=False,
                       derivation=(*self.derivation, step), origin=None)


def concat_tensors(name: str, parts: list[TensorRef], axis: int, step: str) -> TensorRef:
    """``parts`` concatenated along ``axis`` (the inverse of a split, e.g. gate and up fused
    again). Still read by row ranges: along axis 0 a range maps onto the parts it covers,
    along a later axis every part contributes the same rows."""
    first = parts[0]
    if any(p.dtype != first.dtype or len(p.shape) != len(first.shape) for p in parts):
        raise ValueError(f"{name}: cannot concatenate tensors of different dtypes or ranks")
    shape = list(first.shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    starts = np.cumsum([0] + [p.shape[0] for p in parts])

    def load(rows: tuple[int, int] | None) -> np.ndarray:
        if rows is None:
            return np.concatenate([p.read() for p in parts], axis=axis)
        if axis > 0:
            return np.concatenate([p.read_rows(*rows) for p in parts], axis=axis)
        lo, hi = rows
        pieces = [p.read_rows(max(lo, s) - s, min(hi, s + p.shape[0]) - s)
                  for p, s in zip(parts, starts[:-1]) if lo < s + p.shape[0] and hi > s]
        return np.concatenate(pieces, axis=0)

    return TensorRef(name, first.dtype, tuple(shape), first.source_name, first.source_file,
                     load, (*first.derivation, step),
                     row_streamable=all(p.row_streamable for p in parts))


def computed_tensor(name: str, inputs: list[TensorRef], fn: Callable[..., np.ndarray],
                    shape: tuple[int, ...], dtype: str, step: str) -> TensorRef:
    """A tensor computed from several canonical tensors by the pure function
    ``fn(*arrays)`` (each input read whole as its storage array), e.g. two linear maps folded
    into one. Read whole: it is small enough to compute at once (a projector matrix)."""

    def load(rows: tuple[int, int] | None) -> np.ndarray:
        out = fn(*(ref.read() for ref in inputs))
        return out if rows is None else out[rows[0]:rows[1]]

    first = inputs[0]
    return TensorRef(name, dtype, tuple(shape), "+".join(r.source_name for r in inputs),
                     first.source_file, load, (step,), row_streamable=False)


def stack_tensors(name: str, parts: list[TensorRef], step: str, source_name: str) -> TensorRef:
    """``parts`` (same shape and dtype) stacked along a new leading axis, e.g. per-expert
    weights into ``[E, ...]``; reading rows ``a:b`` reads only parts ``a..b-1``."""
    first = parts[0]
    if any(p.shape != first.shape or p.dtype != first.dtype for p in parts):
        raise ValueError(f"{name}: cannot stack tensors of different shapes or dtypes")

    def load(rows: tuple[int, int] | None) -> np.ndarray:
        lo, hi = rows if rows is not None else (0, len(parts))
        return np.stack([p.read() for p in parts[lo:hi]])

    return TensorRef(name, first.dtype, (len(parts), *first.shape), source_name,
                     first.source_file, load, (step,),
                     origin=Origin("stack", names=tuple(p.source_name for p in parts)))


def file_tensor(name: str, entry: SafetensorsEntry) -> TensorRef:
    """A canonical tensor backed by a safetensors entry (row-range reads supported)."""

    def load(rows: tuple[int, int] | None) -> np.ndarray:
        return read_entry(entry, rows)

    return TensorRef(name, entry.dtype, entry.shape, entry.name, entry.path, load)


def array_tensor(name: str, source_name: str, source_file: Path | None,
                 get: Callable[[], tuple[np.ndarray, str]], shape: tuple[int, ...],
                 dtype: str) -> TensorRef:
    """A canonical tensor whose bytes come from ``get()`` (e.g. an mmap'd torch pickle)."""

    def load(rows: tuple[int, int] | None) -> np.ndarray:
        data, _ = get()
        return data if rows is None else data[rows[0]:rows[1]]

    return TensorRef(name, dtype, tuple(shape), source_name, source_file, load)


class TensorTable:
    """An ordered mapping of canonical name -> :class:`TensorRef`."""

    def __init__(self, refs: dict[str, TensorRef] | None = None):
        self._refs: dict[str, TensorRef] = dict(refs or {})

    def __getitem__(self, name: str) -> TensorRef:
        return self._refs[name]

    def __contains__(self, name: object) -> bool:
        return name in self._refs

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def get(self, name: str) -> TensorRef | None:
        return self._refs.get(name)

    def add(self, ref: TensorRef) -> None:
        if ref.name in self._refs:
            raise KeyError(f"duplicate canonical tensor {ref.name}")
        self._refs[ref.name] = ref

    def replace(self, ref: TensorRef) -> None:
        self._refs[ref.name] = ref

    def remove(self, name: str) -> TensorRef:
        return self._refs.pop(name)

    def refs(self) -> list[TensorRef]:
        return list(self._refs.values())

    def names(self) -> list[str]:
        return list(self._refs)

    def with_prefix(self, prefix: str) -> list[TensorRef]:
        return [r for n, r in self._refs.items() if n.startswith(prefix)]

    def total_bytes(self) -> int:
        return sum(r.nbytes for r in self._refs.values())

    def total_params(self) -> int:
        return sum(r.numel for r in self._refs.values())
