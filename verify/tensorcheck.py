"""Tensor-level comparison of a bundle with its source, after undoing the plan's transforms.

Every bundle tensor, read back in the canonical layout (names mapped back, rope permutation
undone, blocks dequantised), is compared with the source tensor it was made from:

- stored as F32 / F16 / BF16: it must equal the source value cast to that type, bit for bit
  (round-to-nearest-even, as numpy and torch cast);
- stored as Q8_0, Q4_0, Q5_0, Q4_1 or Q5_1: every element must lie within that type's
  worst-case rounding error of its block, ``bound = factor * R`` with ``R`` the block's max |x|
  (Q8_0, Q4_0, Q5_0) or max - min (Q4_1, Q5_1); :data:`QUANT_BOUNDS` documents the factors. A
  wrong block scale, a corrupted row or a stray tensor misses that bound by orders of magnitude;
- stored as a K-quant or IQ4 type (:func:`requantized_type`): their scale searches trade error
  between values and sub-blocks, so no closed-form bound holds. The source is quantized again
  with mmconvert's kernels (byte-identical to libggml's, with the same importance weights when
  given) and the bundle must dequantize to the very same values: any changed level, sub-block
  scale or super-block scale shows. A mixture file is checked tensor by tensor, each by the
  type it stores.

The checks need no logits, so they also catch bugs too small to move a tiny model's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mmconvert.formats import quants
from mmconvert.formats.dtypes import bf16_to_f32, f32_to_bf16

# GGML type -> (block size, factor, range kind). Factors from the quantizers (gguf-py and
# ggml's reference ones): Q8_0 rounds to d = amax/127 (error ≤ d/2) and stores d as f16
# (a further ≤ 127·d·2^-11); Q4_0/Q5_0 clip the side opposite the max to 7 or 15 steps (error
# ≤ d = amax/8 or amax/16); Q4_1/Q5_1 round to (max-min)/15 or /31 steps and store the min as
# f16 (plus 2^-10 of the block's max |x| for that rounding). Each factor carries ~5 % slack
# over the bound it states.
QUANT_BOUNDS: dict[str, tuple[int, float, str]] = {
    "Q8_0": (32, 0.60 / 127, "amax"),
    "Q4_0": (32, 1.05 / 8, "amax"),
    "Q5_0": (32, 1.05 / 16, "amax"),
    "Q4_1": (32, 0.60 / 15, "range"),
    "Q5_1": (32, 0.60 / 31, "range"),
}
EXACT_TYPES = ("F32", "F16", "BF16", "F64")
MAX_LISTED = 5
# a recomputed source (derived) one float32 step off may move a K-quant's levels or scales:
# each value may then be off by this many times the block's own largest quantization error
DERIVED_SLACK = 1.5


def requantized_type(dtype: str) -> int | None:
    """The block size of a type checked by quantizing the source again (every quantized type
    of formats.quants without a closed-form bound); None for the others."""
    qt = quants.TYPES.get(dtype)
    return qt.block_size if qt is not None and qt.quantized and dtype not in QUANT_BOUNDS \
        else None


def check_block(dtype: str) -> int | None:
    """Values per block of a block type the check reports by block; None for exact types."""
    return QUANT_BOUNDS[dtype][0] if dtype in QUANT_BOUNDS else requantized_type(dtype)


@dataclass
class TensorDiff:
    """How one bundle tensor compares with its source tensor."""

    name: str  # canonical name
    stored_as: str  # the bundle's name for it
    dtype: str  # storage type in the bundle
    status: str  # ok | mismatch | missing | unexpected | shape | unchecked
    numel: int = 0
    bad: int = 0  # elements outside the tolerance
    max_abs: float = 0.0
    rel: float = 0.0  # max_abs / max |source|
    bad_rows: list[int] = field(default_factory=list)  # first rows with a bad element
    bad_row_count: int = 0
    bad_blocks: list[tuple[int, int]] = field(default_factory=list)  # (row, first column)
    bad_block_count: int = 0
    bad_spans: list[tuple[int, int]] = field(default_factory=list)  # per listed block: the
    # first and last bad column (a K-quant's wrong sub-block scale moves one sub-block)
    hint: str = ""
    derivation: str = ""  # for a tensor stored computed from the source: the step
    covers: tuple[str, ...] = ()  # ... and the canonical tensors it stands for

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "unchecked")

    def describe(self) -> str:
        where = f"{self.stored_as}" + (f" ({self.name})" if self.name != self.stored_as else "")
        if self.status == "missing":
            text = f"{where}: missing from the bundle"
        elif self.status == "unexpected":
            text = f"{where}: in the bundle but not in the checkpoint"
        elif self.status == "shape":
            text = f"{where}: {self.hint or 'shape differs'}"
            return text
        elif self.status == "unchecked":
            text = f"{where}: {self.dtype} " + ("not compared" if self.hint else
                                                "has no error bound here; not compared")
        else:
            text = (f"{where} [{self.dtype}]: {self.bad} of {self.numel} values off "
                    f"(max |Δ| {self.max_abs:.3g}, {relative_text(self.rel)})")
            if self.bad_block_count and self.dtype in QUANT_BOUNDS:
                blocks = ", ".join(f"row {r} col {c}" for r, c in self.bad_blocks)
                text += f"; {self.bad_block_count} block(s) out of bound: {blocks}"
            elif self.bad_block_count and requantized_type(self.dtype):
                blocks = ", ".join(f"row {r} col {c} (values {a}-{b})" for (r, c), (a, b)
                                   in zip(self.bad_blocks, self.bad_spans))
                text += (f"; {self.bad_block_count} {self.dtype} block(s) of "
                         f"{requantized_type(self.dtype)} differ from the source quantized "
                         f"again: {blocks}")
            elif self.bad_row_count:
                text += (f"; {self.bad_row_count} row(s) differ, first "
                         f"{', '.join(map(str, self.bad_rows))}")
        return text + (f" -> {self.hint}" if self.hint else "")


def relative_text(rel: float) -> str:
    """``rel`` (max |Δ| over the tensor's max |x|) for a person: a percentage up to 1000 %,
    a factor above (``8.2e+38× the tensor's max |x|``, not ``8.2e40 %``)."""
    if math.isnan(rel):
        return "no relative error (not a number)"
    if math.isinf(rel):
        return "∞× the tensor's max |x|"
    if rel <= 10:
        return f"{rel:.2%} of the tensor's max |x|"
    factor = f"{rel:.0f}" if rel < 1e4 else f"{rel:.1e}"
    return f"{factor}× the tensor's max |x|"


def expected_exact(source: np.ndarray, dtype: str) -> np.ndarray:
    """The source (float32) as it reads back after a cast to ``dtype``."""
    if dtype == "F16":
        return source.astype(np.float16).astype(np.float32)
    if dtype == "BF16":
        return bf16_to_f32(f32_to_bf16(source))
    return source


# one rounding step of each exact type, relative, and its smallest step (subnormals)
ROUNDING_STEP = {"F32": (2.0**-23, 2.0**-149), "F16": (2.0**-10, 2.0**-24),
                 "BF16": (2.0**-7, 2.0**-133), "F64": (2.0**-52, 0.0)}


def requantize(source: np.ndarray, dtype: str,
               imatrix: np.ndarray | None = None) -> np.ndarray:
    """``source`` (float32, rows on the last axis) quantized to ``dtype`` and dequantized:
    the values a correct bundle stores. ``imatrix``: the importance weights the bundle was
    quantized with, ``(n_per_row,)`` or one row per expert ``(n_expert, n_per_row)`` for a 3-D
    expert tensor."""
    rows = np.ascontiguousarray(source, dtype=np.float32)
    if imatrix is not None and np.ndim(imatrix) == 2:  # llama-quantize: each expert its own
        return np.stack([requantize(e, dtype, w) for e, w in zip(rows, imatrix)])
    data = quants.quantize(rows.reshape(-1, rows.shape[-1]), dtype, imatrix)
    return quants.dequantize(data, dtype).reshape(source.shape)


def _requantized_mask(bundle: np.ndarray, source: np.ndarray, dtype: str, derived: bool,
                      imatrix: np.ndarray | None) -> np.ndarray | None:
    block = quants.TYPES[dtype].block_size
    cols = source.shape[-1] if source.ndim else 0
    if not cols or cols % block:
        return None
    want = requantize(source, dtype, imatrix)
    same = (bundle == want) | (np.isnan(bundle) & np.isnan(want))
    if derived:
        # per block, the error our own quantization makes, as the yardstick
        s = source.reshape(-1, cols // block, block).astype(np.float64)
        own = np.abs(want.reshape(s.shape) - s).max(axis=-1, keepdims=True)
        off = np.abs(bundle.reshape(s.shape) - s)
        same |= (off <= DERIVED_SLACK * own + 2.0**-24).reshape(source.shape)
    return ~same


def _bad_mask(bundle: np.ndarray, source: np.ndarray, dtype: str,
              derived: bool = False, imatrix: np.ndarray | None = None) -> np.ndarray | None:
    """Elements outside the tolerance for ``dtype``; None when no bound is known.

    ``derived``: ``source`` was recomputed here (e.g. a fold's matrix product), and another
    machine's BLAS may sum in another order, so the stored value may sit one rounding step of
    ``dtype`` away from our correctly rounded one; anything further off is a bug.
    ``imatrix``: the importance weights the bundle used; the type is then quantized again.
    """
    if requantized_type(dtype) or (imatrix is not None and dtype in QUANT_BOUNDS):
        # a weighted 32-value type searched its scale: the closed-form bound does not hold
        return _requantized_mask(bundle, source, dtype, derived, imatrix)
    if dtype in EXACT_TYPES:
        want = expected_exact(source, dtype)
        same = (bundle == want) | (np.isnan(bundle) & np.isnan(want))
        if derived:
            rel, floor = ROUNDING_STEP[dtype]
            same |= np.abs(bundle.astype(np.float64) - want) <= rel * np.abs(want) + floor
        return ~same
    if dtype not in QUANT_BOUNDS:
        return None
    block, factor, kind = QUANT_BOUNDS[dtype]
    cols = source.shape[-1]
    if cols % block:
        return None
    s = source.reshape(-1, cols // block, block)
    b = bundle.reshape(-1, cols // block, block)
    amax = np.abs(s).max(axis=-1, keepdims=True)
    if kind == "amax":
        bound = factor * amax
    else:
        # plus the f16 rounding of the stored minimum (2^-11 relative, doubled for slack)
        span = s.max(axis=-1, keepdims=True) - s.min(axis=-1, keepdims=True)
        bound = factor * span + 2.0**-10 * amax
    # an f16 scale has an absolute floor near zero: 2^-24 per step, 127 steps at most
    bound = bound + 127 * 2.0**-24
    return ~(np.abs(b - s) <= bound).reshape(source.shape)


def compare_tensor(name: str, stored_as: str, dtype: str, bundle: np.ndarray,
                   source: np.ndarray, derived: bool = False,
                   imatrix: np.ndarray | None = None) -> TensorDiff:
    """Compare one bundle tensor (float32, canonical layout) with its source (float32);
    ``derived``: the source value was recomputed, ``imatrix``: the importance weights a
    K-quant tensor was quantized with (see :func:`_bad_mask`)."""
    diff = TensorDiff(name, stored_as, dtype, "ok", numel=int(source.size))
    if tuple(bundle.shape) != tuple(source.shape):
        diff.status = "shape"
        diff.hint = (f"shape {list(bundle.shape)} in the bundle, {list(source.shape)} in the "
                     "checkpoint" + (" (transposed)" if tuple(bundle.shape[::-1]) ==
                                     tuple(source.shape) else ""))
        return diff
    mask = _bad_mask(bundle, source, dtype, derived, imatrix)
    if mask is None:
        diff.status = "unchecked"
        return diff
    delta = np.abs(bundle.astype(np.float64) - source.astype(np.float64))
    finite = np.isfinite(delta)
    diff.max_abs = float(delta[finite].max()) if finite.any() else 0.0
    if not finite.all():
        diff.max_abs = float("inf")
    top = float(np.abs(source).max()) if source.size else 0.0
    diff.rel = diff.max_abs / top if top else (0.0 if diff.max_abs == 0 else float("inf"))
    diff.bad = int(mask.sum())
    if diff.bad:
        diff.status = "mismatch"
        rows_mask = mask.reshape(source.shape[0], -1).any(axis=1) if source.ndim > 1 else mask
        rows = np.flatnonzero(rows_mask)
        diff.bad_row_count = int(rows.size)
        diff.bad_rows = [int(r) for r in rows[:MAX_LISTED]]
        block = check_block(dtype)
        if block and source.ndim > 1:
            per_block = mask.reshape(-1, source.shape[-1] // block, block)
            where = np.argwhere(per_block.any(axis=-1))
            diff.bad_block_count = int(where.shape[0])
            diff.bad_blocks = [(int(r), int(c) * block) for r, c in where[:MAX_LISTED]]
            for r, c in where[:MAX_LISTED]:
                cols = np.flatnonzero(per_block[r, c]) + int(c) * block
                diff.bad_spans.append((int(cols[0]), int(cols[-1])))
    return diff
