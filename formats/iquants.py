"""IQ4_NL and IQ4_XS: 4-bit indices into ggml's non-linear table ``kvalues_iq4nl``.

IQ4_NL: blocks of 32 values, ``d`` (f16) then 16 bytes of nibbles (value j low, j + 16 high).
IQ4_XS: super-blocks of 256 = 8 sub-blocks of 32: ``d`` (f16), ``scales_h`` (uint16, 2 bits per
sub-block), ``scales_l`` (4 bytes, 4 bits per sub-block), 128 bytes of nibbles; sub-block ``ib``
decodes as ``d * (scale_ib - 32) * kvalues_iq4nl[q]``.

The encoders repeat ``quantize_row_iq4_nl_impl`` of the pinned ggml-quants.c as
``ggml_quantize_chunk`` calls it (``quantize_iq4_nl`` / ``quantize_iq4_xs``, ntry = 7, with or
without importance weights): the same float32 operations in the same order, one numba loop per
(super-)block, so the bytes equal libggml's. Every float constant is a float32 (a Python float
would promote numba's arithmetic to float64), and ``error_model="numpy"`` keeps IEEE division
(inf/NaN, never an exception), as in C.
"""

from __future__ import annotations

import functools
import importlib

import numpy as np

from mmconvert.formats.gguf_constants import GGMLQuantizationType
from mmconvert.formats.quants import GGMLType, _f16_column, run_block_kernel

_F32 = np.float32
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10,
                          1, 13, 25, 38, 53, 69, 89, 113], np.int8)
_VALUES = KVALUES_IQ4NL.astype(_F32)  # multiplied as floats, as in C
_jit = functools.cache(lambda: importlib.import_module("mmconvert.formats.iquants_jit"))

def _unpack_values(qs: np.ndarray) -> np.ndarray:
    """(k, 16 * m) nibble bytes -> (k, 32 * m) table values (float32), ggml's order."""
    k, m = qs.shape[0], qs.shape[1] // 16
    q = qs.reshape(k, m, 16)
    nibbles = np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(k, 32 * m)
    return _VALUES[nibbles]


class IQ4_NL(GGMLType, qtype=GGMLQuantizationType.IQ4_NL):
    """32 values: f16 ``d``, 16 bytes of kvalues_iq4nl indices; value = d * kvalues[q]."""

    @classmethod
    def encode_blocks(cls, x: np.ndarray, out: np.ndarray, weights: np.ndarray | None = None) -> None:
        run_block_kernel(_jit()._iq4_nl_blocks, x, out, weights)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        return _f16_column(data, 0) * _unpack_values(data[:, 2:])


class IQ4_XS(GGMLType, qtype=GGMLQuantizationType.IQ4_XS):
    """256 values: f16 ``d``, 6-bit sub-block scales (2 high bits in ``scales_h``, 4 low in
    ``scales_l``), 128 bytes of indices; value = d * (scale - 32) * kvalues[q]."""

    @classmethod
    def encode_blocks(cls, x: np.ndarray, out: np.ndarray, weights: np.ndarray | None = None) -> None:
        run_block_kernel(_jit()._iq4_xs_blocks, x, out, weights)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        d = _f16_column(data, 0)  # (k, 1)
        low = data[:, 4:8]
        low = np.stack([low & 0x0F, low >> 4], axis=2).reshape(-1, 8).astype(np.int32)
        high = data[:, 2:4].copy().view(np.uint16).astype(np.int32)  # (k, 1)
        high = (high >> (2 * np.arange(8))) & 3
        dl = d * ((low | (high << 4)) - 32).astype(_F32)  # (k, 8): float32 d * int, as in C
        values = _unpack_values(data[:, 8:]).reshape(-1, 8, 32)
        return (dl[:, :, None] * values).reshape(-1, 256)
