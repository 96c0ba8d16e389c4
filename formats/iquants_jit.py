"""The numba kernels of :mod:`mmconvert.formats.iquants` (IQ4_NL, IQ4_XS encoders), imported
on first use so that runs without IQ types never import numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmconvert.formats.iquants import _VALUES  # the table, compared and multiplied as floats
from mmconvert.formats.kquant_search import fp32_to_fp16_bits, nearest_int

_F32 = np.float32
_GROUP_MAX_EPS = _F32(1e-15)
_NTRY = 7  # what quantize_iq4_nl / quantize_iq4_xs pass (the _ref path's -1 is not used)
_ZERO, _ONE, _THIRTY_TWO = _F32(0), _F32(1), _F32(32)

_jit = njit(cache=True, nogil=True, error_model="numpy")


@_jit
def _best_index(values: np.ndarray, x: np.float32) -> int:
    """best_index_int8: the index of the table value nearest ``x`` (ties go up), by bisection."""
    n = len(values)
    if x <= values[0]:
        return 0
    if x >= values[n - 1]:
        return n - 1
    lo, hi = 0, n - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < values[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if x - values[hi - 1] < values[hi] - x else hi


@_jit
def _sub_block_scale(xb, weight, values) -> np.float32:
    """The weighted least-squares scale of one 32-value sub-block: from the block's signed
    maximum, then 2 * ntry + 1 trial scales (the per-``ib`` body of quantize_row_iq4_nl_impl;
    its indices are recomputed from the final scale, so they are not kept here)."""
    amax = _ZERO
    mx = _ZERO
    for j in range(len(xb)):
        ax = abs(xb[j])
        if ax > amax:
            amax = ax
            mx = xb[j]
    if amax < _GROUP_MAX_EPS:
        return _ZERO
    d = -mx / values[0]
    inv = _ONE / d
    sumqx = _ZERO
    sumq2 = _ZERO
    for j in range(len(xb)):
        q = values[_best_index(values, inv * xb[j])]
        w = weight[j]
        sumqx += w * q * xb[j]
        sumq2 += w * q * q
    d = sumqx / sumq2 if sumq2 > _ZERO else _ZERO
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        inv = _F32(itry - 127) / mx  # (itry + values[0]) / max
        sumqx = _ZERO
        sumq2 = _ZERO
        for j in range(len(xb)):
            q = values[_best_index(values, inv * xb[j])]
            w = weight[j]
            sumqx += w * q * xb[j]
            sumq2 += w * q * q
        if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@_jit
def _sigma2(x) -> np.float32:
    """2 * mean(x^2) over the (super-)block, summed in order (the imatrix weights' floor)."""
    total = _ZERO
    for j in range(len(x)):
        total += x[j] * x[j]
    return total * (_F32(2) / _F32(len(x)))


@_jit
def _weights(x, qw, use_qw, sigma2, start, weight) -> None:
    """weight = qw * sqrt(sigma2 + x^2) with an imatrix, x^2 without (for x[start:start+32])."""
    for j in range(len(weight)):
        xj = x[start + j]
        weight[j] = qw[start + j] * np.sqrt(sigma2 + xj * xj) if use_qw else xj * xj


@_jit
def _pack_nibbles(lq, qs) -> None:
    for i in range(len(lq) // 32):
        for j in range(16):
            qs[16 * i + j] = lq[32 * i + j] | (lq[32 * i + 16 + j] << 4)


@_jit
def _iq4_nl_blocks(x, out, qw, use_qw) -> None:
    values = _VALUES
    weight = np.empty(32, _F32)
    lq = np.empty(32, np.uint8)
    for b in range(x.shape[0]):
        xb = x[b]
        _weights(xb, qw[b] if use_qw else xb, use_qw, _sigma2(xb) if use_qw else _ZERO, 0, weight)
        d = _sub_block_scale(xb, weight, values)
        h = fp32_to_fp16_bits(d)
        out[b, 0] = h & 0xFF
        out[b, 1] = h >> 8
        inv = _ONE / d if d != _ZERO else _ZERO
        for j in range(32):
            lq[j] = _best_index(values, inv * xb[j])
        _pack_nibbles(lq, out[b, 2:])


@_jit
def _iq4_xs_blocks(x, out, qw, use_qw) -> None:
    values = _VALUES
    weight = np.empty(32, _F32)
    lq = np.empty(256, np.uint8)
    scales = np.empty(8, _F32)
    for b in range(x.shape[0]):
        xs = x[b]
        max_scale = _ZERO
        amax_scale = _ZERO
        sigma2 = _sigma2(xs) if use_qw else _ZERO
        for ib in range(8):
            _weights(xs, qw[b] if use_qw else xs, use_qw, sigma2, 32 * ib, weight)
            d = _sub_block_scale(xs[32 * ib:32 * ib + 32], weight, values)
            scales[ib] = d
            if abs(d) > amax_scale:
                amax_scale = abs(d)
                max_scale = d
        d = -max_scale / _THIRTY_TWO  # -0.0 when every sub-block is zero, as in C
        h = fp32_to_fp16_bits(d)
        out[b, 0] = h & 0xFF
        out[b, 1] = h >> 8
        inv = _ONE / d if d != _ZERO else _ZERO
        scales_h = 0
        out[b, 4:8] = 0
        for ib in range(8):
            level = min(31, max(-32, nearest_int(inv * scales[ib])))
            dl = d * _F32(level)
            idl = _ONE / dl if dl != _ZERO else _ZERO
            for j in range(32 * ib, 32 * ib + 32):
                lq[j] = _best_index(values, idl * xs[j])
            level += 32
            out[b, 4 + ib // 2] |= (level & 0xF) << (4 * (ib % 2))
            scales_h |= (level >> 4) << (2 * ib)
        out[b, 2] = scales_h & 0xFF
        out[b, 3] = scales_h >> 8
        _pack_nibbles(lq, out[b, 8:])
