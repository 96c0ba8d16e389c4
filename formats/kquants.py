"""Q4_K, Q5_K and Q6_K: ggml's 256-value super-block types, bit-identical with libggml.

Without importance weights the bytes are ``quantize_row_q{4,5,6}_K_ref``'s; with them (an
imatrix row, tiled per block by :func:`mmconvert.formats.quants._encode`) they are
``quantize_row_q{4,5,6}_K_impl``'s, the two paths ``quantize_q*_K`` (and so ``llama-quantize``)
choose between. The per-block loops are numba kernels (``nogil``: conversion threads run them
in parallel) built on the scale searches of :mod:`mmconvert.formats.kquant_search`.

Block layouts (ggml-common.h; d, dmin are float16):

- Q4_K (144 bytes): d, dmin, scales[12] (8 six-bit scales and mins, packed as
  ``get_scale_min_k4`` reads them), qs[128] (sub-blocks 2j and 2j+1 share 32 bytes: low, high
  nibble). value = d * sc * q - dmin * m.
- Q5_K (176 bytes): as Q4_K plus qh[32] (bit 2j / 2j+1 of qh[l]: the fifth bit of value l of
  sub-block 2j / 2j+1) before qs.
- Q6_K (210 bytes): ql[128] (low nibbles), qh[64] (top two bits), scales[16] (int8, one per 16
  values), d. value = d * scale * (q - 32).
"""

from __future__ import annotations

import functools
import importlib

import numpy as np

from mmconvert.formats.gguf_constants import GGMLQuantizationType
from mmconvert.formats.quants import GGMLType

QK_K = 256
_jit = functools.cache(lambda: importlib.import_module("mmconvert.formats.kquants_jit"))

_NO_BLOCK_WEIGHTS = np.empty((0, QK_K), np.float32)


def _weights_or_empty(weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        return _NO_BLOCK_WEIGHTS
    return np.ascontiguousarray(weights, dtype=np.float32)


class _SuperBlockType(GGMLType):
    """A K-quant: numba encoder ``_encoder(x, weights_or_empty, out)`` and decoder."""

    @classmethod
    def _run_encoder(cls, x: np.ndarray, out: np.ndarray, weights: np.ndarray | None) -> None:
        raise NotImplementedError

    @classmethod
    def encode_blocks(cls, x: np.ndarray, out: np.ndarray,
                      weights: np.ndarray | None = None) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        cls._run_encoder(x, out, _weights_or_empty(weights))


class Q4_K(_SuperBlockType, qtype=GGMLQuantizationType.Q4_K):
    @classmethod
    def _run_encoder(cls, x, out, weights):
        _jit()._encode_q4_k(x, weights, out)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        out = np.empty((len(data), QK_K), np.float32)
        _jit()._decode_affine_k(np.ascontiguousarray(data), False, out)
        return out


class Q5_K(_SuperBlockType, qtype=GGMLQuantizationType.Q5_K):
    @classmethod
    def _run_encoder(cls, x, out, weights):
        _jit()._encode_q5_k(x, weights, out)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        out = np.empty((len(data), QK_K), np.float32)
        _jit()._decode_affine_k(np.ascontiguousarray(data), True, out)
        return out


class Q6_K(_SuperBlockType, qtype=GGMLQuantizationType.Q6_K):
    @classmethod
    def _run_encoder(cls, x, out, weights):
        _jit()._encode_q6_k(x, weights, out)

    @classmethod
    def decode_blocks(cls, data: np.ndarray) -> np.ndarray:
        out = np.empty((len(data), QK_K), np.float32)
        _jit()._decode_q6_k(np.ascontiguousarray(data), out)
        return out
