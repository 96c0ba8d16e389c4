"""Q2_K and Q3_K: 256-value super-blocks of 16 sub-blocks of 16 values.

Q2_K (84 bytes): ``scales[16]`` (low nibble: the sub-block's 4-bit scale, high: its 4-bit min),
``qs[64]`` (2-bit levels), f16 ``d`` and ``dmin``; value = d * sc * q - dmin * m.
Q3_K (110 bytes): ``hmask[32]`` (the levels' third bit), ``qs[64]`` (their low 2 bits),
``scales[12]`` (16 6-bit sub-block scales: low nibbles in bytes 0-7, high 2-bit pairs in 8-11),
f16 ``d``; value = d * (sc - 32) * (q - 4), q in [0, 8).
Both store level i of the super-block in ``qs[32 * (i // 128) + i % 32]`` at bit
``2 * (i % 128 // 32)``; Q3_K's third bit of level i is bit ``i // 32`` of ``hmask[i % 32]``.

The encoders repeat ggml's (pinned ggml-quants.c) ``quantize_row_q2_K_ref`` /
``quantize_row_q3_K_ref`` without importance weights and ``quantize_row_q2_K_impl`` /
``quantize_row_q3_K_impl`` with them (what ``ggml_quantize_chunk`` picks), one numba loop per
super-block with C's float32 operations in C's order, so the bytes equal libggml's. The scale
searches are :mod:`mmconvert.formats.kquant_search`'s.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np

from mmconvert.formats.gguf_constants import GGMLQuantizationType
from mmconvert.formats.quants import GGMLType, _f16_column, run_block_kernel

_F32 = np.float32
_QK = 256
_jit = functools.cache(lambda: importlib.import_module("mmconvert.formats.kquants_low_jit"))

# --- classes --------------------------------------------------------------------------------

_VALUE = np.arange(_QK)
_QS_BYTE = 32 * (_VALUE // 128) + _VALUE % 32  # where level i's low 2 bits live
_QS_SHIFT = (2 * (_VALUE % 128 // 32)).astype(np.uint8)


def _low_levels(qs: np.ndarray) -> np.ndarray:
    """(k, 64) -> (k, 256) 2-bit levels in value order."""
    return (qs[:, _QS_BYTE] >> _QS_SHIFT) & 3


def _per_sub_block(v: np.ndarray) -> np.ndarray:
    """(k, 16) -> (k, 256), each repeated over its 16 values."""
    return np.repeat(v, 16, axis=1)


class Q2_K(GGMLType, qtype=GGMLQuantizationType.Q2_K):
    """value = (d * (sc & 15)) * q - dmin * (sc >> 4), q in [0, 4), per 16-value sub-block."""

    @classmethod
    def encode_blocks(cls, x: np.ndarray, out: np.ndarray, weights: np.ndarray | None = None) -> None:
        run_block_kernel(_jit()._q2_k_blocks, x, out, weights)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        sc = data[:, :16]
        dl = _f16_column(data, 80) * (sc & 0xF).astype(_F32)
        ml = _f16_column(data, 82) * (sc >> 4).astype(_F32)
        q = _low_levels(data[:, 16:80]).astype(_F32)
        return _per_sub_block(dl) * q - _per_sub_block(ml)


_Q3_LOW_BYTE = np.arange(16) % 8
_Q3_LOW_SHIFT = (4 * (np.arange(16) // 8)).astype(np.uint8)
_Q3_HIGH_BYTE = 8 + np.arange(16) % 4
_Q3_HIGH_SHIFT = (2 * (np.arange(16) // 4)).astype(np.uint8)
_HMASK_SHIFT = (_VALUE // 32).astype(np.uint8)


class Q3_K(GGMLType, qtype=GGMLQuantizationType.Q3_K):
    """value = (d * (sc - 32)) * (q - 4), q in [0, 8) (third bit in ``hmask``), per 16 values."""

    @classmethod
    def encode_blocks(cls, x: np.ndarray, out: np.ndarray, weights: np.ndarray | None = None) -> None:
        run_block_kernel(_jit()._q3_k_blocks, x, out, weights)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        scale_bytes = data[:, 96:108]
        low = (scale_bytes[:, _Q3_LOW_BYTE] >> _Q3_LOW_SHIFT) & 0xF
        high = (scale_bytes[:, _Q3_HIGH_BYTE] >> _Q3_HIGH_SHIFT) & 3
        sc = (low | (high << 4)).astype(np.int16) - 32
        dl = _f16_column(data, 108) * sc.astype(_F32)
        high_bit = (data[:, _VALUE % 32] >> _HMASK_SHIFT) & 1
        q = _low_levels(data[:, 32:96]).astype(np.int16) - 4 * (1 - high_bit.astype(np.int16))
        return _per_sub_block(dl) * q.astype(_F32)
