"""The numba kernels of :mod:`mmconvert.formats.kquants` (Q4_K, Q5_K, Q6_K encoders and
decoders), imported on first use so that runs without K-quants never import numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mmconvert.formats import kquant_lanes as kl
from mmconvert.formats import kquant_search as ks

F32 = np.float32
QK_K = 256
_jit = njit(cache=True, nogil=True, error_model="numpy")  # IEEE division, as in C

_ZERO, _ONE = F32(0), F32(1)
_SIXTY_THREE = F32(63)
_MINUS_128 = F32(-128)
_QK_K_F = F32(QK_K)
_SUB_F = F32(32)
_TWO = F32(2)
_IMPL_RMIN, _IMPL_RDELTA = F32(-0.9), F32(0.05)  # quantize_row_q{4,5}_K_impl's search


@_jit
def _put_f16(out, col, value):
    bits = ks.fp32_to_fp16_bits(value)
    out[col] = bits & 0xFF
    out[col + 1] = bits >> 8


@_jit
def _get_f16(data, col):
    return ks.fp16_bits_to_fp32(np.uint16(data[col]) | (np.uint16(data[col + 1]) << 8))


@_jit
def _scale_min_k4(j, q):
    """ggml's get_scale_min_k4: the 6-bit scale and min of sub-block j from scales[12]."""
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


@_jit
def _pack_scale_min_k4(scales, ls, lm):
    """The inverse of _scale_min_k4 for j = 0..7 in order (C's uint8 stores: values wrap)."""
    for j in range(8):
        if j < 4:
            scales[j] = ls[j]
            scales[j + 4] = lm[j]
        else:
            scales[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            scales[j - 4] |= (ls[j] >> 4) << 6
            scales[j] |= (lm[j] >> 4) << 6


@_jit
def _sub_block_weights(x, qw, j, sigma2, weights):
    """Sub-block ``j``'s search weights into ``weights`` (32,): ``av_x + |x|`` on the ref
    path (``qw`` empty), ``qw * sqrt(sigma2 + x**2)`` on the imatrix path; returns their sum
    (C's ``sum_w`` of the imatrix path, summed in order)."""
    xb = x[32 * j:32 * j + 32]
    total = _ZERO
    if qw.shape[0] == 0:
        sum_x2 = _ZERO
        for i in range(32):
            sum_x2 += xb[i] * xb[i]
        av_x = F32(np.sqrt(sum_x2 / _SUB_F))
        for i in range(32):
            weights[i] = av_x + abs(xb[i])
        return total
    for i in range(32):
        weights[i] = qw[32 * j + i] * F32(np.sqrt(sigma2 + xb[i] * xb[i]))
        total += weights[i]
    return total


@_jit
def _impl_sigma2(x, qw):
    """The imatrix path's ``sigma2 = 2 * sum(x**2) / 256`` (0 on the ref path, unused)."""
    if qw.shape[0] == 0:
        return _ZERO
    sum_x2 = _ZERO
    for i in range(QK_K):
        sum_x2 += x[i] * x[i]
    return _TWO * sum_x2 / _QK_K_F


@_jit
def _quantize_scales(scales, mins, sw, weighted, clamp_qp, ls, lm):
    """A super-block's 6-bit scales and mins (ls, lm) from its sub-blocks' ones; returns
    (d, dmin). Ref path: against the largest; imatrix path: make_qp_quants weighted by each
    sub-block's weight sum ``sw`` (Q5_K's impl clamps the levels to 63, Q4_K's does not)."""
    if not weighted:
        max_scale = _ZERO
        max_min = _ZERO
        for j in range(8):
            max_scale = scales[j] if scales[j] > max_scale else max_scale
            max_min = mins[j] if mins[j] > max_min else max_min
        inv_scale = _SIXTY_THREE / max_scale if max_scale > _ZERO else _ZERO
        inv_min = _SIXTY_THREE / max_min if max_min > _ZERO else _ZERO
        for j in range(8):
            ls[j] = min(63, ks.nearest_int(inv_scale * scales[j]) & 0xFF)
            lm[j] = min(63, ks.nearest_int(inv_min * mins[j]) & 0xFF)
        return max_scale / _SIXTY_THREE, max_min / _SIXTY_THREE
    d_block = ks.make_qp_quants(8, 63, scales, ls, sw)
    m_block = ks.make_qp_quants(8, 63, mins, lm, sw)
    if clamp_qp:
        for j in range(8):
            ls[j] = min(63, ls[j])
            lm[j] = min(63, lm[j])
    return d_block, m_block


@_jit
def _affine_k_superblock(x, qw, nmax, rmin, rdelta, nstep, clamp_qp, y, L):
    """One Q4_K / Q5_K super-block, one sub-block search at a time: fill y[0:16] (d, dmin,
    scales) and the levels L[256]. ``qw`` empty: the ref path (make_qkx2_quants), else the
    imatrix path (make_qkx3_quants, make_qp_quants for the scales)."""
    weights = np.empty(32, np.float32)
    laux = np.empty(32, np.uint8)
    scales = np.empty(8, np.float32)
    mins = np.empty(8, np.float32)
    sw = np.empty(8, np.float32)
    ls = np.empty(8, np.uint8)
    lm = np.empty(8, np.uint8)
    weighted = qw.shape[0] > 0
    sigma2 = _impl_sigma2(x, qw)
    for j in range(8):
        sw[j] = _sub_block_weights(x, qw, j, sigma2, weights)
        xb = x[32 * j:32 * j + 32]
        if weighted:
            scale, the_min = ks.make_qkx3_quants(32, nmax, xb, weights, L[32 * j:32 * j + 32],
                                                 laux, _IMPL_RMIN, _IMPL_RDELTA, 36, False)
        else:
            scale, the_min = ks.make_qkx2_quants(32, nmax, xb, weights, L[32 * j:32 * j + 32],
                                                 laux, rmin, rdelta, nstep, False)
        scales[j] = scale
        mins[j] = the_min
    d_block, m_block = _quantize_scales(scales, mins, sw, weighted, clamp_qp, ls, lm)
    _finish_affine(x, nmax, ls, lm, d_block, m_block, y, L)


@_jit
def _finish_affine(x, nmax, ls, lm, d_block, m_block, y, L):
    """Pack a Q4_K / Q5_K super-block's scales into y[0:16] and requantize its levels L
    against the stored (F16) d, dmin (a sub-block whose d is 0 keeps the search's levels)."""
    _pack_scale_min_k4(y[4:16], ls, lm)
    _put_f16(y, 0, d_block)
    _put_f16(y, 2, m_block)
    d_all = _get_f16(y, 0)
    m_all = _get_f16(y, 2)
    for j in range(8):
        sc, m = _scale_min_k4(j, y[4:16])
        d = d_all * F32(sc)
        if d == _ZERO:
            continue
        dm = m_all * F32(m)
        for i in range(32):
            lv = ks.nearest_int((x[32 * j + i] + dm) / d)
            L[32 * j + i] = max(0, min(nmax, lv))


LANE_BLOCKS = 32  # super-blocks searched together: 256 Q4_K / 512 Q6_K sub-blocks


@_jit
def _affine_k_levels(x, qw, nmax, rmin, rdelta, nstep, clamp_qp, out, levels):
    """Scales and levels of every super-block of ``x`` (levels: uint8 (B, 256) out). The
    sub-block searches of LANE_BLOCKS super-blocks run together
    (:func:`mmconvert.formats.kquant_lanes.qkx2_lanes`; with importance weights as
    make_qkx3_quants, without as make_qkx2_quants), one sub-block at a time for a group whose
    values leave the lanes' exact range."""
    L = np.empty(QK_K, np.uint8)
    nblocks = x.shape[0]
    weighted = qw.shape[0] > 0
    if weighted:  # quantize_row_q{4,5}_K_impl's search (make_qkx3_quants)
        rmin, rdelta, nstep = _IMPL_RMIN, _IMPL_RDELTA, 36
    lanes = 8 * LANE_BLOCKS
    sw = np.empty(lanes, np.float32)
    xt = np.empty((32, lanes), np.float32)
    wt = np.empty((32, lanes), np.float32)
    lt = np.empty((32, lanes), np.float32)
    aux = np.empty((32, lanes), np.float32)
    scale = np.empty(lanes, np.float32)
    the_min = np.empty(lanes, np.float32)
    weights = np.empty(32, np.float32)
    ls = np.empty(8, np.uint8)
    lm = np.empty(8, np.uint8)
    for start in range(0, nblocks, LANE_BLOCKS):
        count = min(LANE_BLOCKS, nblocks - start)
        if count < LANE_BLOCKS:  # the last group: zero (flat) sub-blocks fill the lanes
            xt[:, 8 * count:] = _ZERO
            wt[:, 8 * count:] = _ZERO
        for b in range(count):
            values = x[start + b]
            qw_row = qw[start + b] if weighted else qw[0:0, 0]
            sigma2 = _impl_sigma2(values, qw_row)
            for j in range(8):
                lane = 8 * b + j
                sw[lane] = _sub_block_weights(values, qw_row, j, sigma2, weights)
                for i in range(32):
                    xt[i, lane] = values[32 * j + i]
                    wt[i, lane] = weights[i]
        exact = kl.qkx2_lanes(nmax, xt, wt, lt, scale, the_min, rmin, rdelta, nstep, aux)
        for b in range(count):
            block = start + b
            if not exact:
                _affine_k_superblock(x[block], qw[block] if weighted else qw[0:0, 0], nmax,
                                     rmin, rdelta, nstep, clamp_qp, out[block], L)
                levels[block] = L
                continue
            for j in range(8):
                for i in range(32):
                    L[32 * j + i] = np.uint8(lt[i, 8 * b + j])
            d_block, m_block = _quantize_scales(scale[8 * b:8 * b + 8], the_min[8 * b:8 * b + 8],
                                                sw[8 * b:8 * b + 8], weighted, clamp_qp, ls, lm)
            _finish_affine(x[block], nmax, ls, lm, d_block, m_block, out[block], L)
            levels[block] = L


@_jit
def _encode_q4_k(x, qw, out):
    levels = np.empty((x.shape[0], QK_K), np.uint8)
    _affine_k_levels(x, qw, 15, F32(-1.0), F32(0.1), 20, False, out, levels)
    for b in range(x.shape[0]):
        y = out[b]
        L = levels[b]
        for half in range(4):
            for i in range(32):
                y[16 + 32 * half + i] = L[64 * half + i] | (L[64 * half + 32 + i] << 4)


@_jit
def _encode_q5_k(x, qw, out):
    levels = np.empty((x.shape[0], QK_K), np.uint8)
    _affine_k_levels(x, qw, 31, F32(-0.5), F32(0.1), 15, True, out, levels)
    for b in range(x.shape[0]):
        y = out[b]
        L = levels[b]
        qh = y[16:48]
        ql = y[48:176]
        qh[:] = 0
        m1 = 1
        m2 = 2
        for half in range(4):
            for i in range(32):
                l1 = np.int64(L[64 * half + i])
                if l1 > 15:
                    l1 -= 16
                    qh[i] |= m1
                l2 = np.int64(L[64 * half + 32 + i])
                if l2 > 15:
                    l2 -= 16
                    qh[i] |= m2
                ql[32 * half + i] = l1 | (l2 << 4)
            m1 <<= 2
            m2 <<= 2


@_jit
def _q6_k_searches(x, qw, all_scales, all_levels):
    """Every Q6_K sub-block's make_qx_quants (scales: (B, 16), levels: int8 (B, 256) out),
    LANE_BLOCKS super-blocks at a time through :func:`mmconvert.formats.kquant_lanes.qx_lanes`
    (one at a time for a group whose values leave its exact range)."""
    nblocks = x.shape[0]
    weighted = qw.shape[0] > 0
    lanes = 16 * LANE_BLOCKS
    xt = np.empty((16, lanes), np.float32)
    wt = np.empty((16, lanes), np.float32)
    lt = np.empty((16, lanes), np.float32)
    scale = np.empty(lanes, np.float32)
    for start in range(0, nblocks, LANE_BLOCKS):
        count = min(LANE_BLOCKS, nblocks - start)
        if count < LANE_BLOCKS:  # the last group: zero (flat) sub-blocks fill the lanes
            xt[:, 16 * count:] = _ZERO
            wt[:, 16 * count:] = _ZERO
        for b in range(count):
            for ib in range(16):
                for i in range(16):
                    xt[i, 16 * b + ib] = x[start + b, 16 * ib + i]
                    if weighted:
                        wt[i, 16 * b + ib] = qw[start + b, 16 * ib + i]
        exact = kl.qx_lanes(32, xt, lt, scale, wt, weighted)
        for b in range(count):
            block = start + b
            for ib in range(16):
                if exact:
                    all_scales[block, ib] = scale[16 * b + ib]
                    for i in range(16):
                        all_levels[block, 16 * ib + i] = np.int8(lt[i, 16 * b + ib])
                else:
                    w = qw[block, 16 * ib:16 * ib + 16] if qw.shape[0] > 0 else ks.NO_WEIGHTS
                    all_scales[block, ib] = ks.make_qx_quants(
                        16, 32, x[block, 16 * ib:16 * ib + 16],
                        all_levels[block, 16 * ib:16 * ib + 16], 1, w)


@_jit
def _encode_q6_k(x, qw, out):
    all_scales = np.empty((x.shape[0], 16), np.float32)
    all_levels = np.empty((x.shape[0], QK_K), np.int8)
    _q6_k_searches(x, qw, all_scales, all_levels)
    for b in range(x.shape[0]):
        y = out[b]
        xs = x[b]
        L = all_levels[b]
        scales = all_scales[b]
        max_scale = _ZERO
        max_abs_scale = _ZERO
        for ib in range(16):
            scale = scales[ib]
            abs_scale = abs(scale)
            if abs_scale > max_abs_scale:
                max_abs_scale = abs_scale
                max_scale = scale
        if max_abs_scale < ks.GROUP_MAX_EPS:
            y[:] = 0
            continue
        iscale = _MINUS_128 / max_scale
        _put_f16(y, 208, _ONE / iscale)
        sc = y[192:208].view(np.int8)
        for ib in range(16):
            sc[ib] = min(127, ks.nearest_int(iscale * scales[ib]))
        d_all = _get_f16(y, 208)
        for j in range(16):
            d = d_all * F32(sc[j])
            if d == _ZERO:
                continue
            for i in range(16):
                lv = ks.nearest_int(xs[16 * j + i] / d)
                L[16 * j + i] = max(-32, min(31, lv)) + 32
        for half in range(2):
            ql = y[64 * half:64 * half + 64]
            qh = y[128 + 32 * half:128 + 32 * half + 32]
            lb = L[128 * half:128 * half + 128]
            for i in range(32):
                ql[i] = (lb[i] & 0xF) | ((lb[i + 64] & 0xF) << 4)
                ql[i + 32] = (lb[i + 32] & 0xF) | ((lb[i + 96] & 0xF) << 4)
                qh[i] = ((lb[i] >> 4) | ((lb[i + 32] >> 4) << 2) | ((lb[i + 64] >> 4) << 4)
                         | ((lb[i + 96] >> 4) << 6))


@_jit
def _decode_affine_k(data, five_bits, out):
    """dequantize_row_q4_K / q5_K: value = d * sc * q - dmin * m, in C's float order."""
    for b in range(data.shape[0]):
        blk = data[b]
        d = _get_f16(blk, 0)
        dmin = _get_f16(blk, 2)
        sc_bytes = blk[4:16]
        qs = blk[48:176] if five_bits else blk[16:144]
        y = out[b]
        u1 = 1
        u2 = 2
        for half in range(4):
            sc, m = _scale_min_k4(2 * half, sc_bytes)
            d1 = d * F32(sc)
            m1 = dmin * F32(m)
            sc, m = _scale_min_k4(2 * half + 1, sc_bytes)
            d2 = d * F32(sc)
            m2 = dmin * F32(m)
            for i in range(32):
                q = qs[32 * half + i]
                lo = np.int64(q & 0xF)
                hi = np.int64(q >> 4)
                if five_bits:
                    if blk[16 + i] & u1:
                        lo += 16
                    if blk[16 + i] & u2:
                        hi += 16
                y[64 * half + i] = d1 * F32(lo) - m1
                y[64 * half + 32 + i] = d2 * F32(hi) - m2
            u1 <<= 2
            u2 <<= 2


@_jit
def _decode_q6_k(data, out):
    for b in range(data.shape[0]):
        blk = data[b]
        d = _get_f16(blk, 208)
        sc = blk[192:208].view(np.int8)
        y = out[b]
        for half in range(2):
            ql = blk[64 * half:64 * half + 64]
            qh = blk[128 + 32 * half:128 + 32 * half + 32]
            for i in range(32):
                s = 8 * half + i // 16
                q1 = np.int64((ql[i] & 0xF) | (((qh[i] >> 0) & 3) << 4)) - 32
                q2 = np.int64((ql[i + 32] & 0xF) | (((qh[i] >> 2) & 3) << 4)) - 32
                q3 = np.int64((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) - 32
                q4 = np.int64((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) - 32
                base = 128 * half + i
                y[base] = d * F32(sc[s]) * F32(q1)
                y[base + 32] = d * F32(sc[s + 2]) * F32(q2)
                y[base + 64] = d * F32(sc[s + 4]) * F32(q3)
                y[base + 96] = d * F32(sc[s + 6]) * F32(q4)
