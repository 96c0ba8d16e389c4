"""GGML tensor encodings (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) in vectorised numpy;
the K-quants register from :mod:`mmconvert.formats.kquants` (imported at the bottom).

One small class per type, registered by the GGML type it encodes (``class Q8_0(GGMLType,
qtype=GGMLQuantizationType.Q8_0)``, as gguf-py's ``quants.py``); ids and sizes are gguf-py's
(:mod:`mmconvert.formats.gguf_constants`). Every kernel repeats the float32
operations of the reference (ggml's ``quantize_row_*_ref``, as gguf-py's ``quants.py`` does) in
the same order, so the bytes are identical to ``gguf.quants.quantize``; what differs is only the
parts where order cannot change a result: block maxima by pairwise trees, rounding by an exact
identity, and bit packing. Work goes a cache-sized chunk of blocks at a time.

Importance weights (an imatrix row, float32 ``(n_per_row,)``) select ggml's weighted
quantizers (``quantize_row_*_impl``, what ``ggml_quantize_chunk`` runs when given one); types
that ignore them in ggml (F32, F16, BF16, Q8_0) ignore them here.

Quantized GGUF rows are bytes: a tensor of shape ``(..., n)`` is stored as ``(..., n // block
* type_size)`` uint8 (gguf-py's ``quant_shape_to_byte_shape``); every encoder here returns that.

Example::

    encode = encoder_for("BF16", "Q8_0")
    data = encode(bf16_rows)            # uint8, shape byte_shape(bf16_rows.shape, "Q8_0")
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np

from mmconvert.formats.gguf_constants import GGML_QUANT_SIZES, GGMLQuantizationType

# numba kernels load on first use: its import (~1.5 s) is paid only by K-quant or imatrix runs
_quants_jit = functools.cache(lambda: importlib.import_module("mmconvert.formats.quants_jit"))
_CHUNK = 1 << 16  # elements per kernel step: the float32 temporaries stay in L2
_HALF_MINUS_ULP = np.float32(0.49999997)  # nextafter(0.5, 0)
_F32, _U8, _U16, _U32 = np.float32, np.uint8, np.uint16, np.uint32


def _tree(x: np.ndarray, op: np.ufunc) -> np.ndarray:
    """``op``-reduce each row of ``x`` (k, 2**j) by pairing neighbours: exact for max/min and
    several times faster than ``reduce(axis=1)`` on rows this short."""
    v = x.reshape(-1)
    for _ in range(x.shape[1].bit_length() - 1):
        v = op(v[0::2], v[1::2])
    return v


def _widen_bf16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns -> float32, exact, in one pass."""
    return np.left_shift(bits, 16, dtype=_U32).view(_F32)


def _to_f32(blocks: np.ndarray, src: str) -> np.ndarray:
    """Storage values (safetensors dtype ``src``) as float32, exactly as gguf-py would see them."""
    if src == "BF16":
        return _widen_bf16(blocks)
    return blocks.astype(_F32, copy=False)


def _inverse(d: np.ndarray) -> np.ndarray:
    """``1/d``, 0 where d == 0 (the reference's ``id``); inf where d is subnormal, as there."""
    return np.where(d == 0, _F32(0), _F32(1) / d)


def _per_value(per_block: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(k,) -> (k, bs), each repeated over its block (faster than a broadcast operand)."""
    return np.repeat(per_block, shape[1]).reshape(shape)


def _scale(x: np.ndarray, per_block: np.ndarray) -> np.ndarray:
    """x (k, bs) * per_block (k,), in place (one float32 rounding, as the reference)."""
    return np.multiply(x, _per_value(per_block, x.shape), out=x)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per block, the first value of largest magnitude, sign kept (ggml's ``max`` in Q4_0/Q5_0).

    max/min trees decide every block whose extremes differ in magnitude; the rest (+a and -a
    both present, or all zeros) take the first index of largest ``|x|``, as the reference does;
    a block of zeros (of either sign) gets the reference's starting value, +0.
    """
    hi, lo = _tree(x, np.maximum), _tree(x, np.minimum)
    out = np.where(hi > -lo, hi, lo)
    tie = np.flatnonzero(hi == -lo)
    if len(tie):
        first = np.abs(x[tie]).argmax(axis=1)
        out[tie] = x[tie, first] + _F32(0)  # -0 + 0 = +0; nonzero values unchanged
    return out


def _put_f16(out: np.ndarray, col: int, values: np.ndarray) -> None:
    """Store float16(values) at byte ``col`` of each block (block sizes are all even)."""
    out.view(_U16)[:, col // 2] = values.astype(np.float16).view(_U16)


def _f16_column(data: np.ndarray, col: int) -> np.ndarray:
    """The float16 at byte ``col`` of each block, as float32 (k, 1)."""
    return data.view(_U16)[:, col // 2:col // 2 + 1].view(np.float16).astype(_F32)


_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)


def run_block_kernel(kernel: Callable, x: np.ndarray, out: np.ndarray,
                     weights: np.ndarray | None) -> None:
    """Call a numba block kernel ``kernel(x, out, weights, use_weights)``: one compiled
    signature for both paths (without importance weights, ``x`` stands in for them)."""
    x = np.ascontiguousarray(x, dtype=_F32)
    if weights is None:
        kernel(x, out, x, False)
    else:
        kernel(x, out, np.ascontiguousarray(weights, dtype=_F32).reshape(x.shape), True)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(k, 32) uint8 -> (k, 16): byte j holds q[j] low and q[j + 16] high (ggml's layout).
    Eight bytes at a time as uint64 columns: per-block (k, 16) ufunc calls are several times
    slower."""
    words = q.view(np.uint64)  # (k, 4): bytes 0-7, 8-15, 16-23, 24-31
    packed = np.empty((len(q), 2), np.uint64)
    for j in range(2):
        np.bitwise_and(words[:, j + 2], _LOW_NIBBLES, out=packed[:, j])
        packed[:, j] <<= np.uint64(4)
        packed[:, j] |= words[:, j] & _LOW_NIBBLES
    return packed.view(_U8)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """(k, 32) uint8 5-bit values -> (k, 4): bit j of the little-endian uint32 is q[j] >> 4."""
    return np.packbits(q >> 4, axis=1, bitorder="little")


def _clip_top(q: np.ndarray, levels: int) -> np.ndarray:
    """The reference's ``clip(q, 0, levels - 1)`` for q <= levels (|x * id| never exceeds the
    block's scale by more than rounding; inf/NaN cast to 0): maps levels to levels - 1.
    np.minimum against a uint8 scalar has no SIMD loop and is 5x slower."""
    q -= q >> (levels.bit_length() - 1)
    return q


class GGMLType:
    """A GGML tensor type, registered by the type it encodes (``qtype``): ``block_size``
    values are stored in ``type_size`` bytes (both gguf-py's :data:`GGML_QUANT_SIZES`)."""

    name: ClassVar[str]
    qtype: ClassVar[GGMLQuantizationType]
    type_id: ClassVar[int]  # ggml.h's enum ggml_type
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    bits_per_weight: ClassVar[float]
    quantized: ClassVar[bool] = True
    uses_imatrix: ClassVar[bool] = True  # False: ggml ignores importance weights for this type
    # True: the weighted kernel needs whole rows (ggml's per-row sigma2); encode_blocks then
    # gets ``row_blocks`` (blocks per row) and chunks of whole rows
    imatrix_needs_rows: ClassVar[bool] = False

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kw) -> None:
        super().__init_subclass__(**kw)
        if qtype is not None:  # None: a shared base, not a type
            cls.qtype, cls.name, cls.type_id = qtype, qtype.name, int(qtype)
            cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
            cls.bits_per_weight = 8 * cls.type_size / cls.block_size
            TYPES[cls.name] = cls

    # kernels: float32 blocks (k, block_size) -> out (k, type_size) uint8, and back.
    # weights: None, or float32 (k, block_size), the imatrix values of each block's positions.
    @classmethod
    def encode_blocks(cls, x: np.ndarray, out: np.ndarray,
                      weights: np.ndarray | None = None) -> None:
        raise NotImplementedError

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def encode_storage_blocks(cls, blocks: np.ndarray, src: str, out: np.ndarray,
                              **weights) -> None:
        """Blocks in storage dtype ``src``; types with a faster path from BF16 override this.
        ``weights`` (and ``row_blocks``) pass through to encode_blocks when an imatrix is used."""
        cls.encode_blocks(_to_f32(blocks, src), out, **weights)

    @classmethod
    def quantize_rows(cls, values: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """float values (..., n) -> uint8 (..., n // block_size * type_size); ``imatrix``:
        float32 (n,) importance weights, or None."""
        return _encode(cls, np.asarray(values, dtype=_F32), "F32", imatrix)

    @classmethod
    def dequantize_rows(cls, data: np.ndarray) -> np.ndarray:
        """uint8 (..., m) as written by ``quantize_rows`` -> float32 (..., m // type_size * block)."""
        data = np.ascontiguousarray(data).view(_U8)
        if data.shape[-1] % cls.type_size:
            raise ValueError(f"{data.shape[-1]} bytes per row is not a multiple of {cls.type_size}")
        with np.errstate(all="ignore"):  # inf scales give NaN, as in the reference
            values = cls.decode_blocks(data.reshape(-1, cls.type_size))
        return values.reshape(*data.shape[:-1], data.shape[-1] // cls.type_size * cls.block_size)


TYPES: dict[str, type[GGMLType]] = {}


class F32(GGMLType, qtype=GGMLQuantizationType.F32):
    quantized = False
    uses_imatrix = False

    @classmethod
    def encode_blocks(cls, x: np.ndarray, out: np.ndarray) -> None:
        out.view(_F32)[...] = x

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data.view(_F32).copy()


class F16(GGMLType, qtype=GGMLQuantizationType.F16):
    quantized = False
    uses_imatrix = False

    @classmethod
    def encode_blocks(cls, x: np.ndarray, out: np.ndarray) -> None:
        out.view(np.float16)[...] = x  # numpy's cast: round to nearest even, inf past 65504

    @classmethod
    def encode_storage_blocks(cls, blocks: np.ndarray, src: str, out: np.ndarray) -> None:
        if src == "BF16":
            _bf16_to_f16(blocks.reshape(-1), out.view(_U16).reshape(-1))
        else:
            super().encode_storage_blocks(blocks, src, out)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data.view(np.float16).astype(_F32)


class BF16(GGMLType, qtype=GGMLQuantizationType.BF16):
    quantized = False
    uses_imatrix = False

    @classmethod
    def encode_blocks(cls, x: np.ndarray, out: np.ndarray) -> None:
        # ggml_compute_fp32_to_bf16: round to nearest even on bit 16; NaN keeps its top half
        # and is made quiet. uint32 cannot overflow: a non-NaN adds at most 0x8000 to <= 0xff800000.
        n = x.reshape(-1).view(_U32)
        r = (n >> 16) & 1
        r += 0x7FFF
        r += n
        r >>= 16
        nan = np.flatnonzero((n & 0x7FFFFFFF) > 0x7F800000)
        r[nan] = (n[nan] >> 16) | 0x40
        out.view(_U16).reshape(-1)[:] = r

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        return _widen_bf16(data.view(_U16))


class Q8_0(GGMLType, qtype=GGMLQuantizationType.Q8_0):
    """d (f16) = amax / 127, then 32 x int8 ``roundf(x * (1 / d))``. Bit-exact with
    ``quantize_row_q8_0_ref``: for float32 ``v``, roundf (half away from zero) is exactly
    ``trunc(v + copysign(nextafter(0.5, 0), v))`` (no sum can round across an integer), and
    the float -> int8 cast truncates; the sign of ``x * id`` is the sign of ``x``."""

    uses_imatrix = False  # quantize_q8_0 ignores quant_weights

    @classmethod
    def _finish(cls, x: np.ndarray, amax: np.ndarray, out: np.ndarray) -> None:
        d = amax / _F32(127)
        offset = np.bitwise_and(x.view(_U32), 0x80000000)
        offset |= 0x3EFFFFFF  # nextafter(0.5, 0) with x's sign
        y = np.multiply(x, _per_value(_inverse(d), x.shape))
        y += offset.view(_F32)
        out[:, 2:] = y.astype(np.int8).view(_U8)  # inf/NaN (subnormal d) -> 0, as there
        _put_f16(out, 0, d)

    @classmethod
    def encode_blocks(cls, x: np.ndarray, out: np.ndarray) -> None:
        cls._finish(x, _tree(np.abs(x), np.maximum), out)

    @classmethod
    def encode_storage_blocks(cls, blocks: np.ndarray, src: str, out: np.ndarray) -> None:
        if src != "BF16":
            return super().encode_storage_blocks(blocks, src, out)
        # the block maximum of |x| is a uint16 max of the magnitude bits, before widening
        amax = _widen_bf16(_tree(blocks & 0x7FFF, np.maximum))
        cls._finish(_widen_bf16(blocks), amax, out)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        return data[:, 2:].view(np.int8).astype(_F32) * _f16_column(data, 0)


class _Nibbles(GGMLType):
    """Q4_0 / Q4_1 / Q5_0 / Q5_1: 32-value blocks of 4- or 5-bit levels."""

    levels: ClassVar[int]
    affine: ClassVar[bool]
    imatrix_needs_rows = True

    @classmethod
    def _quants(cls, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    @classmethod
    def _pack(cls, q: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    @classmethod
    def _weighted_quants(cls, x: np.ndarray, out: np.ndarray, weights: np.ndarray,
                         row_blocks: int) -> np.ndarray:
        d_bits = np.empty(len(x), _U16)
        m_bits = np.empty(len(x), _U16)
        q = np.empty(x.shape, _U8)
        _quants_jit()._weighted_nibble_rows(np.ascontiguousarray(x, dtype=_F32),
                              np.ascontiguousarray(weights, dtype=_F32), row_blocks,
                              cls.levels - 1, cls.affine, d_bits, m_bits, q)
        out.view(_U16)[:, 0] = d_bits
        if cls.affine:
            out.view(_U16)[:, 1] = m_bits
        return q

    @classmethod
    def encode_blocks(cls, x: np.ndarray, out: np.ndarray, weights: np.ndarray | None = None,
                      row_blocks: int | None = None) -> None:
        if weights is None:
            q = cls._quants(x, out)
        else:
            if row_blocks is None or len(x) % row_blocks:
                raise ValueError(f"{cls.name} with importance weights needs whole rows")
            q = cls._weighted_quants(x, out, weights, row_blocks)
        cls._pack(q, out)


class _SymmetricNibbles(_Nibbles):
    """Q4_0 / Q5_0 (bytes equal libggml's ``quantize_row_q4_0_ref``/``q5_0``): d = max /
    -2**(bits-1) with ``max`` the first value of largest magnitude (+0 for a block of zeros, so
    d = -0), id = 1/d, and q = min(trunc(x * id + (2**(bits-1) + 0.5)), 2**bits - 1)."""

    affine = False

    @classmethod
    def _quants(cls, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        half = cls.levels // 2
        d = _signed_absmax(x) / _F32(-half)
        y = _scale(x.copy(), _inverse(d))
        y += _F32(half + 0.5)
        q = y.astype(_U8)  # float->uint8 truncates; y >= 0 except where the reference gets 0 too
        _put_f16(out, 0, d)
        return _clip_top(q, cls.levels)

    @classmethod
    def _decode(cls, d: np.ndarray, q: np.ndarray) -> np.ndarray:
        return d * (q.astype(np.int8) - np.int8(cls.levels // 2)).astype(_F32)


def _first_zero_min(x: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """The reference's running ``if (v < min) min = v`` keeps the FIRST zero when the block's
    minimum is a zero, so its sign is that zero's; the min tree may have picked either."""
    zero = np.flatnonzero(lo == 0)
    if len(zero):
        rows = x[zero]
        lo[zero] = rows[np.arange(len(zero)), (rows == 0).argmax(axis=1)]
    return lo


class _AffineNibbles(_Nibbles):
    """Q4_1 / Q5_1 (bytes equal libggml's ``quantize_row_q4_1_ref``/``q5_1``):
    d = (max - min) / (2**bits - 1) (+0 when max == min), m = min, id = 1/d,
    q = min(trunc((x - min) * id + 0.5), 2**bits - 1)."""

    affine = True

    @classmethod
    def _quants(cls, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        hi, lo = _tree(x, np.maximum), _first_zero_min(x, _tree(x, np.minimum))
        d = (hi - lo) / _F32(cls.levels - 1)
        d[hi == lo] = 0  # +0: hi - lo of two zeros of different signs would give -0
        y = np.subtract(x, lo[:, None])
        _scale(y, _inverse(d))
        y += _F32(0.5)
        q = y.astype(_U8)
        _put_f16(out, 0, d)
        _put_f16(out, 2, lo)
        return _clip_top(q, cls.levels)

    @classmethod
    def _decode(cls, d: np.ndarray, q: np.ndarray, m: np.ndarray) -> np.ndarray:
        return d * q.astype(_F32) + m


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


class Q4_0(_SymmetricNibbles, qtype=GGMLQuantizationType.Q4_0):
    levels = 16

    @classmethod
    def _pack(cls, q: np.ndarray, out: np.ndarray) -> None:
        out[:, 2:] = _pack_nibbles(q)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        return cls._decode(_f16_column(data, 0), _unpack_nibbles(data[:, 2:]))


class Q5_0(_SymmetricNibbles, qtype=GGMLQuantizationType.Q5_0):
    levels = 32

    @classmethod
    def _pack(cls, q: np.ndarray, out: np.ndarray) -> None:
        out[:, 2:6] = _pack_high_bits(q)
        out[:, 6:] = _pack_nibbles(q)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        q = _unpack_nibbles(data[:, 6:]) | _unpack_high_bits(data[:, 2:6])
        return cls._decode(_f16_column(data, 0), q)


class Q4_1(_AffineNibbles, qtype=GGMLQuantizationType.Q4_1):
    levels = 16

    @classmethod
    def _pack(cls, q: np.ndarray, out: np.ndarray) -> None:
        out[:, 4:] = _pack_nibbles(q)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        q = _unpack_nibbles(data[:, 4:])
        return cls._decode(_f16_column(data, 0), q, _f16_column(data, 2))


class Q5_1(_AffineNibbles, qtype=GGMLQuantizationType.Q5_1):
    levels = 32

    @classmethod
    def _pack(cls, q: np.ndarray, out: np.ndarray) -> None:
        out[:, 4:8] = _pack_high_bits(q)
        out[:, 8:] = _pack_nibbles(q)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        q = _unpack_nibbles(data[:, 8:]) | _unpack_high_bits(data[:, 4:8])
        return cls._decode(_f16_column(data, 0), q, _f16_column(data, 2))

# --- storage rows -> GGUF bytes -----------------------------------------------------------

def _encode(qt: type[GGMLType], rows: np.ndarray, src: str,
            imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode storage rows a chunk of whole blocks at a time (rows never split a block). With
    an ``imatrix`` (float32 (n_per_row,)), block j of every row gets imatrix[j*bs:(j+1)*bs] as
    its weights; types that need whole rows get chunks of whole rows."""
    rows = np.ascontiguousarray(rows)
    shape = byte_shape(rows.shape, qt.name)
    blocks = rows.reshape(-1, qt.block_size)
    out = np.empty((len(blocks), qt.type_size), _U8)
    step = max(1, _CHUNK // qt.block_size)
    tiled = None
    if imatrix is not None and qt.uses_imatrix:
        n_per_row = rows.shape[-1]
        imatrix = np.ascontiguousarray(imatrix, dtype=_F32).reshape(-1)
        if imatrix.shape != (n_per_row,):
            raise ValueError(f"imatrix of {imatrix.size} values for rows of {n_per_row}")
        row_blocks = n_per_row // qt.block_size
        step = max(1, step // row_blocks) * row_blocks  # whole rows, so the tiling lines up
        tiled = np.tile(imatrix.reshape(row_blocks, qt.block_size), (step // row_blocks, 1))
    with np.errstate(all="ignore"):  # the reference's inf/NaN intermediates, silently, as there
        for start in range(0, len(blocks), step):
            chunk, dest = blocks[start:start + step], out[start:start + step]
            if tiled is None:
                qt.encode_storage_blocks(chunk, src, dest)
            elif qt.imatrix_needs_rows:
                qt.encode_storage_blocks(chunk, src, dest, weights=tiled[:len(chunk)],
                                         row_blocks=row_blocks)
            else:
                qt.encode_storage_blocks(chunk, src, dest, weights=tiled[:len(chunk)])
    return out.reshape(shape)


@functools.cache
def _bf16_f16_table() -> np.ndarray:
    """F16 bits for every BF16 pattern, by numpy's float32 -> float16 cast (the reference's)."""
    with np.errstate(over="ignore"):
        return _widen_bf16(np.arange(1 << 16).astype(_U16)).astype(np.float16).view(_U16)


def _bf16_to_f16(bits: np.ndarray, out: np.ndarray) -> None:
    """BF16 -> F16 bits. Magnitudes in F16's normal range [2**-14, 2**16) convert exactly by
    re-biasing the exponent (127 -> 15) and widening the mantissa (7 -> 10 bits); zeros,
    subnormals, overflow and NaN (a small minority in weights) are looked up in the table."""
    u = np.left_shift(bits, 1)  # magnitude << 1 (sign shifted out)
    u -= 0x7100  # (0x3880 << 1): values in range become 0 .. 0x1DFF, the rest wrap above
    np.left_shift(u, 2, out=out)
    out += 0x0400  # == (magnitude - (112 << 7)) << 3, mod 2**16
    out |= bits & 0x8000
    rest = np.flatnonzero(u >= 0x1E00)
    if len(rest):
        out[rest] = _bf16_f16_table()[bits[rest]]


def _same_bytes(rows: np.ndarray) -> np.ndarray:
    # F32 -> F32 and F16 -> F16: the reference's float32 round trip is the identity (tested)
    return np.ascontiguousarray(rows).view(_U8)


def _bf16_same(rows: np.ndarray) -> np.ndarray:
    """BF16 -> BF16 unchanged unless a NaN is present (the reference makes NaNs quiet)."""
    bits = np.ascontiguousarray(rows)
    flat = bits.reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        if (flat[start:start + _CHUNK] << 1).max() > 0xFF00:
            return _encode(BF16, bits, "BF16")
    return bits.view(_U8)


def _bf16_to_f32(rows: np.ndarray) -> np.ndarray:
    return _widen_bf16(np.ascontiguousarray(rows)).view(_U8)


def _f16_to_f32(rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rows).astype(_F32).view(_U8)


SOURCE_DTYPES = ("F32", "F16", "BF16")  # safetensors names the encoders accept


def encoder_for(src_dtype: str, ggml_type: str,
                imatrix: np.ndarray | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """``encode(rows) -> uint8`` turning storage rows of ``src_dtype`` (BF16 as uint16 bits) into
    the GGUF bytes of ``ggml_type``: exactly ``gguf.quants.quantize(to_float32(rows), type)``'s,
    and libggml's ``ggml_quantize_chunk``'s (with ``imatrix``, float32 (n_per_row,), as its
    importance weights). Works on any slice of whole rows, so a tensor can be encoded a slice
    at a time.

    >>> encoder_for("BF16", "F16")(np.array([[0x3F80, 0xC000]], np.uint16)).view(np.float16)
    array([[ 1., -2.]], dtype=float16)
    """
    qt = ggml_type_info(ggml_type)
    if src_dtype not in SOURCE_DTYPES:
        raise ValueError(f"cannot encode {src_dtype} tensors; expected one of {SOURCE_DTYPES}")
    if src_dtype == ggml_type:
        return _bf16_same if src_dtype == "BF16" else _same_bytes
    if ggml_type == "F32":
        return _bf16_to_f32 if src_dtype == "BF16" else _f16_to_f32
    return functools.partial(_encode, qt, src=src_dtype,
                             imatrix=imatrix if qt.uses_imatrix else None)


# --- shapes, sizes and the type policy ---------------------------------------------------

def ggml_type_info(ggml_type: str) -> type[GGMLType]:
    try:
        return TYPES[ggml_type]
    except KeyError:
        raise ValueError(f"unsupported GGML type {ggml_type!r}; expected one of "
                         f"{', '.join(TYPES)}") from None


def can_quantize(shape: Sequence[int], ggml_type: str) -> bool:
    """Whether rows of ``shape`` (its last axis) split into whole blocks of ``ggml_type``."""
    return len(shape) > 0 and shape[-1] % ggml_type_info(ggml_type).block_size == 0


def fallback_type(ggml_type: str, row_length: int) -> str:
    """``ggml_type``, or F16 when ``row_length`` is not a multiple of its block size (only block
    types can hit this; llama.cpp's converter falls back to F16 the same way)."""
    return ggml_type if row_length % ggml_type_info(ggml_type).block_size == 0 else "F16"


def tensor_type(name: str, shape: Sequence[int], requested: str) -> str:
    """The GGML type a tensor is written in: F32 for 1-D tensors, norms and biases (small, and
    where precision matters most), else ``requested`` with the block-size fallback."""
    parts = name.split(".")
    module = parts[-2] if len(parts) > 1 else parts[0]
    if len(shape) <= 1 or parts[-1] == "bias" or "norm" in module:
        return "F32"
    return fallback_type(requested, shape[-1])


def byte_shape(shape: Sequence[int], ggml_type: str) -> tuple[int, ...]:
    """Shape of the uint8 array a tensor of ``shape`` encodes to (gguf-py's convention)."""
    qt = ggml_type_info(ggml_type)
    if not can_quantize(shape, ggml_type):
        raise ValueError(f"row length of {tuple(shape)} is not a multiple of the {qt.name} "
                         f"block size {qt.block_size}; use fallback_type()")
    return (*shape[:-1], shape[-1] // qt.block_size * qt.type_size)


def encoded_nbytes(shape: Sequence[int], ggml_type: str) -> int:
    """Bytes a tensor of ``shape`` occupies in ``ggml_type``."""
    return int(np.prod(byte_shape(shape, ggml_type), dtype=np.int64))


def quantize(values: np.ndarray, ggml_type: str,
             imatrix: np.ndarray | None = None) -> np.ndarray:
    """float values -> GGUF bytes (uint8, ``byte_shape``); same bytes as gguf-py's quantize and
    libggml's ``ggml_quantize_chunk`` (``imatrix``: float32 (n_per_row,) importance weights)."""
    return ggml_type_info(ggml_type).quantize_rows(values, imatrix)


def dequantize(data: np.ndarray, ggml_type: str) -> np.ndarray:
    """GGUF bytes -> float32 values; same values as gguf-py's dequantize."""
    return ggml_type_info(ggml_type).dequantize_rows(data)


# the K-quants subclass GGMLType and register into TYPES on import (they import this module)
from mmconvert.formats import iquants as _iquants  # noqa: E402, F401
from mmconvert.formats import kquants as _kquants  # noqa: E402, F401
from mmconvert.formats import kquants_low as _kquants_low  # noqa: E402, F401
