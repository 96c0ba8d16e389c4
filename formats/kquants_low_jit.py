"""The numba kernels of :mod:`mmconvert.formats.kquants_low` (Q2_K, Q3_K encoders), imported
on first use so that runs without K-quants never import numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmconvert.formats.kquant_search import (
    fp16_bits_to_fp32,
    fp32_to_fp16_bits,
    make_q3_quants,
    make_qkx2_quants,
    make_qkx3_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
)

_F32 = np.float32
_ZERO, _ONE, _FIFTEEN = _F32(0), _F32(1), _F32(15)
_QK = 256

_jit = njit(cache=True, nogil=True, error_model="numpy")  # IEEE division, as in C


@_jit
def _put_f16(out, col, value) -> int:
    """Store f16(value) at byte ``col``; returns the f16 bits."""
    h = fp32_to_fp16_bits(value)
    out[col] = h & 0xFF
    out[col + 1] = h >> 8
    return h


@_jit
def _pack_2bit(levels, qs) -> None:
    """qs[32 * (i // 128) + i % 32] |= levels[i] << (2 * (i % 128 // 32)), levels in [0, 4)."""
    for half in range(2):
        for lane in range(32):
            i = 128 * half + lane
            qs[32 * half + lane] = (levels[i] | (levels[i + 32] << 2) | (levels[i + 64] << 4)
                                    | (levels[i + 96] << 6))


@_jit
def _sum_squares(x) -> np.float32:
    total = _ZERO
    for j in range(len(x)):
        total += x[j] * x[j]
    return total


# --- Q2_K -----------------------------------------------------------------------------------

@_jit
def _q2_k_scales_ref(x, levels, scales, mins, out) -> None:
    """quantize_row_q2_K_ref's search: |x|-weighted affine levels per sub-block, then the
    sub-block scales and mins on 4 bits against their maxima (d = max_scale / 15)."""
    weights = np.empty(16, _F32)
    aux = np.empty(16, np.uint8)
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        for i in range(16):
            weights[i] = abs(xs[i])
        scale, the_min = make_qkx2_quants(16, 3, xs, weights, levels[16 * j:16 * j + 16], aux,
                                          _F32(-0.5), _F32(0.1), 15, True)
        scales[j] = scale
        mins[j] = the_min
        if scale > max_scale:
            max_scale = scale
        if the_min > max_min:
            max_min = the_min
    if max_scale > _ZERO:
        inv = _FIFTEEN / max_scale
        for j in range(16):
            out[j] = nearest_int(inv * scales[j]) & 0xFF
        _put_f16(out, 80, max_scale / _FIFTEEN)
    else:
        out[0:16] = 0
        _put_f16(out, 80, _ZERO)
    if max_min > _ZERO:
        inv = _FIFTEEN / max_min
        for j in range(16):
            out[j] = (out[j] | (nearest_int(inv * mins[j]) << 4)) & 0xFF
        _put_f16(out, 82, max_min / _FIFTEEN)
    else:
        _put_f16(out, 82, _ZERO)


@_jit
def _q2_k_scales_imatrix(x, qw, levels, scales, mins, out) -> None:
    """quantize_row_q2_K_impl's search: qw * sqrt(sigma2 + x^2) weights, make_qkx3_quants per
    sub-block, then make_qp_quants for the 4-bit scales and mins (weighted by sub-block sums)."""
    weight = np.empty(16, _F32)
    aux = np.empty(16, np.uint8)
    sub_weights = np.empty(16, _F32)
    ls = np.empty(16, np.uint8)
    lm = np.empty(16, np.uint8)
    sigma2 = _sum_squares(x) / _F32(_QK)
    for j in range(16):
        total = _ZERO
        for i in range(16):
            xi = x[16 * j + i]
            weight[i] = qw[16 * j + i] * np.sqrt(sigma2 + xi * xi)
            total += weight[i]
        sub_weights[j] = total
        scale, the_min = make_qkx3_quants(16, 3, x[16 * j:16 * j + 16], weight,
                                          levels[16 * j:16 * j + 16], aux,
                                          _F32(-0.9), _F32(0.05), 36, False)
        scales[j] = scale
        mins[j] = the_min
    dm = make_qp_quants(16, 15, scales, ls, sub_weights)
    mm = make_qp_quants(16, 15, mins, lm, sub_weights)
    _put_f16(out, 80, dm)
    _put_f16(out, 82, mm)
    for j in range(16):
        out[j] = (ls[j] | (lm[j] << 4)) & 0xFF


@_jit
def _q2_k_blocks(x, out, qw, use_qw) -> None:
    levels = np.empty(_QK, np.uint8)
    scales = np.empty(16, _F32)
    mins = np.empty(16, _F32)
    for b in range(x.shape[0]):
        xb = x[b]
        ob = out[b]
        if use_qw:
            _q2_k_scales_imatrix(xb, qw[b], levels, scales, mins, ob)
        else:
            _q2_k_scales_ref(xb, levels, scales, mins, ob)
        d = fp16_bits_to_fp32(np.int64(ob[80]) | (np.int64(ob[81]) << 8))
        dmin = fp16_bits_to_fp32(np.int64(ob[82]) | (np.int64(ob[83]) << 8))
        for j in range(16):  # requantize against the stored scales; d == 0 keeps the search's
            dj = d * _F32(ob[j] & 0xF)
            if dj == _ZERO:
                continue
            mj = dmin * _F32(ob[j] >> 4)
            for i in range(16 * j, 16 * j + 16):
                levels[i] = max(0, min(3, nearest_int((xb[i] + mj) / dj)))
        _pack_2bit(levels, ob[16:80])


# --- Q3_K -----------------------------------------------------------------------------------

@_jit
def _q3_k_put_scale(scale_bytes, j, level) -> None:
    """Sub-block j's 6-bit scale (0..63): low nibble in byte j % 8 (high half for j >= 8),
    high 2 bits in byte 8 + j % 4 at bit 2 * (j // 4)."""
    if j < 8:
        scale_bytes[j] = level & 0xF
    else:
        scale_bytes[j - 8] |= (level & 0xF) << 4
    scale_bytes[8 + j % 4] |= (level >> 4) << (2 * (j // 4))


@_jit
def _q3_k_scale(scale_bytes, j) -> int:
    low = np.int64(scale_bytes[j]) & 0xF if j < 8 else np.int64(scale_bytes[j - 8]) >> 4
    high = (np.int64(scale_bytes[8 + j % 4]) >> (2 * (j // 4))) & 3
    return (low | (high << 4)) - 32


@_jit
def _q3_k_scales_ref(x, levels, scales, scale_bytes) -> np.float32:
    """quantize_row_q3_K_ref's search: make_q3_quants per sub-block, 6-bit scales against
    the sub-block scale of largest magnitude; returns the super-block scale."""
    max_scale = _ZERO
    amax = _ZERO
    for j in range(16):
        scales[j] = make_q3_quants(16, 4, x[16 * j:16 * j + 16], levels[16 * j:16 * j + 16], True)
        if abs(scales[j]) > amax:
            amax = abs(scales[j])
            max_scale = scales[j]
    if max_scale == _ZERO:
        return _ZERO
    inv = _F32(-32) / max_scale
    for j in range(16):
        level = ((nearest_int(inv * scales[j]) + 128) & 0xFF) - 128  # C stores it in an int8
        _q3_k_put_scale(scale_bytes, j, max(-32, min(31, level)) + 32)
    return _ONE / inv


@_jit
def _q3_k_scales_imatrix(x, qw, levels, scales, scale_bytes) -> np.float32:
    """quantize_row_q3_K_impl's search: qw * sqrt(sigma2 + x^2) weights, make_qx_quants per
    sub-block and again for the 6-bit scales (weighted by sub-block sums)."""
    weight = np.empty(16, _F32)
    sub_weights = np.empty(16, _F32)
    ls = np.empty(16, np.int8)
    sigma2 = _F32(2) * _sum_squares(x) / _F32(_QK)
    for j in range(16):
        total = _ZERO
        for i in range(16):
            xi = x[16 * j + i]
            weight[i] = qw[16 * j + i] * np.sqrt(sigma2 + xi * xi)
        for i in range(16):
            total += weight[i]
        sub_weights[j] = total
        scales[j] = make_qx_quants(16, 4, x[16 * j:16 * j + 16], levels[16 * j:16 * j + 16], 1,
                                   weight)
    d_block = make_qx_quants(16, 32, scales, ls, 1, sub_weights)
    for j in range(16):
        _q3_k_put_scale(scale_bytes, j, np.int64(ls[j]))
    return d_block


@_jit
def _q3_k_blocks(x, out, qw, use_qw) -> None:
    levels = np.empty(_QK, np.int8)
    scales = np.empty(16, _F32)
    for b in range(x.shape[0]):
        xb = x[b]
        ob = out[b]
        scale_bytes = ob[96:108]
        scale_bytes[:] = 0
        if use_qw:
            d_block = _q3_k_scales_imatrix(xb, qw[b], levels, scales, scale_bytes)
        else:
            d_block = _q3_k_scales_ref(xb, levels, scales, scale_bytes)
        d_all = fp16_bits_to_fp32(_put_f16(ob, 108, d_block))
        for j in range(16):  # requantize against the stored scales; d == 0 keeps the search's
            dj = d_all * _F32(_q3_k_scale(scale_bytes, j))
            if dj == _ZERO:
                continue
            for i in range(16 * j, 16 * j + 16):
                levels[i] = max(-4, min(3, nearest_int(xb[i] / dj))) + 4
        ob[0:32] = 0
        for i in range(_QK):
            if levels[i] > 3:
                ob[i % 32] |= 1 << (i // 32)
                levels[i] -= 4
        _pack_2bit(levels, ob[32:96])
