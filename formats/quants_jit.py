"""The numba kernel of :mod:`mmconvert.formats.quants`: the importance-weighted rows of Q4_0,
Q4_1, Q5_0 and Q5_1 (ggml's ``quantize_row_q{4,5}_{0,1}_impl``), imported on first use so that
runs without an imatrix never import numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmconvert.formats import kquant_search as _ks

_F32 = np.float32
_WEIGHTED_RMIN, _WEIGHTED_RDELTA = _F32(-0.9), _F32(0.05)  # quantize_row_q{4,5}_1_impl


@njit(cache=True, nogil=True, error_model="numpy")
def _weighted_nibble_rows(x, qw, row_blocks, nmax, affine, d_bits, m_bits, levels):
    """ggml's quantize_row_q{4,5}_{0,1}_impl over chunks of whole rows: x, qw (k, 32), k a
    multiple of ``row_blocks``. Per block: f16 bits of d (and of m = -min when ``affine``)
    and the levels (k, 32) uint8. sigma2 is the row's mean of x**2, summed in row order."""
    weight = np.empty(32, np.float32)
    signed = np.empty(32, np.int8)
    aux = np.empty(32, np.uint8)
    n_per_row = _F32(row_blocks * 32)
    for row in range(x.shape[0] // row_blocks):
        sum_x2 = _F32(0)
        for ib in range(row * row_blocks, (row + 1) * row_blocks):
            for j in range(32):
                sum_x2 += x[ib, j] * x[ib, j]
        sigma2 = sum_x2 / n_per_row
        for ib in range(row * row_blocks, (row + 1) * row_blocks):
            xb = x[ib]
            for j in range(32):
                weight[j] = qw[ib, j] * _F32(np.sqrt(sigma2 + xb[j] * xb[j]))
            if affine:
                d, the_min = _ks.make_qkx3_quants(32, nmax, xb, weight, levels[ib], aux,
                                                  _WEIGHTED_RMIN, _WEIGHTED_RDELTA, 36, False)
                m_bits[ib] = _ks.fp32_to_fp16_bits(-the_min)
            else:
                d = _ks.make_qx_quants(32, (nmax + 1) // 2, xb, signed, 1, weight)
                for j in range(32):
                    levels[ib, j] = signed[j]
            d_bits[ib] = _ks.fp32_to_fp16_bits(d)
