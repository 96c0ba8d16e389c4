"""ggml's scale searches ``make_qkx2_quants`` (Q4_K, Q5_K) and ``make_qx_quants`` (Q6_K) for
many sub-blocks at once, vectorised across sub-blocks.

:func:`mmconvert.formats.kquant_search.make_qkx2_quants` handles one sub-block per call, as C
does; its sums run in order over the sub-block's values, so no SIMD lane can take part. Here
the values of ``lanes`` sub-blocks are laid out value-major (``x[i, lane]``) and every step runs
the same float32 operations, in the same order, for every lane: lane ``j`` computes exactly
what the one-sub-block search computes for sub-block ``j``, while the inner loop over lanes
compiles to vector instructions. Per-lane branches become selects.

One difference needs care: C rounds with ``nearest_int`` (integer bits of ``v + 1.5 * 2**23``),
which equals the float32 ``(v + 1.5 * 2**23) - 1.5 * 2**23`` used here only while
``|v| < 2**22``; beyond (NaN, inf, or a range so small the scale overflows) C returns bit
garbage. A lane that ever meets such a value makes :func:`qkx2_lanes` return False, and the
caller runs the one-sub-block search for those sub-blocks instead: the bytes are C's either way.
"""

from __future__ import annotations

import numpy as np
from numba import njit

F32 = np.float32
_jit = njit(cache=True, nogil=True, error_model="numpy")  # IEEE division, as in C

_ZERO, _ONE = F32(0), F32(1)
_MAGIC = F32(12582912.0)  # 1.5 * 2**23
_EXACT_BELOW = F32(4194304.0)  # 2**22: nearest_int's exact range


@_jit
def _level(v, top):
    """C's ``MAX(0, MIN(top, nearest_int(v)))`` for ``|v| < 2**22``, in float32."""
    return min(max((v + _MAGIC) - _MAGIC, _ZERO), top)


@_jit
def qkx2_lanes(nmax, x, w, L, scale_out, min_out, rmin, rdelta, nstep, aux):
    """``make_qkx2_quants(32, nmax, x[:, j], w[:, j], ...)`` for every lane ``j`` (use_mad
    false), with ``nstep >= 1``; also ``make_qkx3_quants`` with weights (the imatrix path),
    whose only difference, ``max <= min`` for ``max == min``, is none for values whose
    search stays exact. ``x``, ``w``: float32 (32, lanes); ``L``: float32 (32, lanes) out,
    the levels; ``scale_out``, ``min_out``: float32 (lanes,) out, the scale and C's
    ``*the_min``; ``aux``: float32 (32, lanes) scratch. Returns False when some lane may
    leave nearest_int's exact range (its results are then not C's: see the module docstring).

    Exactness is checked per lane and step, not per value: ``|iscale * (x - min)|`` is at most
    ``|iscale| * max(max - min, min - smallest x)`` rounded the same way (rounding is
    monotonic), so that bound below 2**22 covers every value; a NaN is flagged once. The
    levels are not copied at each accepted step: the step's ``iscale`` and ``min`` are kept
    and the levels recomputed from them at the end, the same float32 operations again."""
    n, lanes = x.shape
    nmax_f = F32(nmax)
    lo = np.empty(lanes, np.float32)
    hi = np.empty(lanes, np.float32)
    sum_w = np.empty(lanes, np.float32)
    sum_x = np.empty(lanes, np.float32)
    has_nan = np.zeros(lanes, np.bool_)
    for j in range(lanes):
        lo[j] = x[0, j]
        hi[j] = x[0, j]
        sum_w[j] = w[0, j]
        sum_x[j] = w[0, j] * x[0, j]
        has_nan[j] = x[0, j] != x[0, j]
    for i in range(1, n):
        for j in range(lanes):
            v = x[i, j]
            lo[j] = v if v < lo[j] else lo[j]
            hi[j] = v if v > hi[j] else hi[j]
            sum_w[j] += w[i, j]
            sum_x[j] += w[i, j] * v
            has_nan[j] |= v != v
    flat = np.empty(lanes, np.bool_)  # C's early return: levels 0, scale 0, the_min -min
    smallest = np.empty(lanes, np.float32)
    inexact = False
    for j in range(lanes):
        smallest[j] = lo[j]
        lo[j] = _ZERO if lo[j] > _ZERO else lo[j]
        flat[j] = hi[j] == lo[j]
        inexact |= has_nan[j] and not flat[j]
    scale = np.empty(lanes, np.float32)
    iscale = np.empty(lanes, np.float32)
    best_iscale = np.empty(lanes, np.float32)
    best_lo = np.empty(lanes, np.float32)
    best = np.zeros(lanes, np.float32)
    for j in range(lanes):
        iscale[j] = nmax_f / (_ONE if flat[j] else hi[j] - lo[j])
        scale[j] = _ONE / iscale[j]
        best_iscale[j] = iscale[j]
        best_lo[j] = lo[j]
    for i in range(n):
        for j in range(lanes):
            level = _level(iscale[j] * (x[i, j] - lo[j]), nmax_f)
            diff = scale[j] * level + lo[j] - x[i, j]
            best[j] += w[i, j] * (diff * diff)
    sum_l = np.empty(lanes, np.float32)
    sum_l2 = np.empty(lanes, np.float32)
    sum_xl = np.empty(lanes, np.float32)
    this_scale = np.empty(lanes, np.float32)
    this_min = np.empty(lanes, np.float32)
    usable = np.empty(lanes, np.bool_)
    error = np.empty(lanes, np.float32)
    for step in range(-1, nstep + 1):
        for j in range(lanes):
            if step >= 0:
                # C divides by (max - min), min the best min so far, max the sub-block's
                iscale[j] = (rmin + rdelta * F32(step) + nmax_f) / \
                    (_ONE if flat[j] else hi[j] - lo[j])
            reach = hi[j] - lo[j]
            reach = lo[j] - smallest[j] if lo[j] - smallest[j] > reach else reach
            inexact |= not (abs(iscale[j]) * reach < _EXACT_BELOW or flat[j])
            sum_l[j] = _ZERO
            sum_l2[j] = _ZERO
            sum_xl[j] = _ZERO
        if step < 0:
            continue  # the initial pass's range check only
        for i in range(n):
            for j in range(lanes):
                level = _level(iscale[j] * (x[i, j] - lo[j]), nmax_f)
                aux[i, j] = level
                weight = w[i, j]
                sum_l[j] += weight * level
                sum_l2[j] += weight * level * level
                sum_xl[j] += weight * level * x[i, j]
        for j in range(lanes):
            d = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j]
            usable[j] = d > _ZERO
            s = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / d
            m = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / d
            if m > _ZERO:
                m = _ZERO
                s = sum_xl[j] / sum_l2[j]
            this_scale[j] = s
            this_min[j] = m
            error[j] = _ZERO
        for i in range(n):
            for j in range(lanes):
                diff = this_scale[j] * aux[i, j] + this_min[j] - x[i, j]
                error[j] += w[i, j] * (diff * diff)
        for j in range(lanes):
            if usable[j] and error[j] < best[j] and not flat[j]:
                best[j] = error[j]
                scale[j] = this_scale[j]
                best_iscale[j] = iscale[j]
                best_lo[j] = lo[j]  # the min these levels were computed with
                lo[j] = this_min[j]
    for j in range(lanes):
        scale_out[j] = _ZERO if flat[j] else scale[j]
        min_out[j] = -lo[j]
    for i in range(n):
        for j in range(lanes):
            level = _level(best_iscale[j] * (x[i, j] - best_lo[j]), nmax_f)
            L[i, j] = _ZERO if flat[j] else level
    return not inexact


_GROUP_MAX_EPS = F32(1e-15)
_TENTH = F32(0.1)


@_jit
def qx_lanes(nmax, x, L, scale_out, qw, weighted):
    """``make_qx_quants(16, nmax, x[:, j], L[:, j], 1, w)`` (Q6_K's search) for every lane
    ``j``, the weights ``qw[:, j]`` when ``weighted`` else C's NULL (x**2). ``x``, ``qw``:
    float32 (n, lanes); ``L``: float32 (n, lanes) out, the stored levels (``nmax + l``);
    ``scale_out``: float32 (lanes,) out. Returns False when some lane may leave
    nearest_int's exact range. As in :func:`qkx2_lanes`: the range is checked per lane and step
    (``|iscale * x| <= |iscale| * amax``), NaN once, and the levels of the accepted step are
    recomputed at the end."""
    n, lanes = x.shape
    nmax_f = F32(nmax)
    bottom = F32(-nmax)
    top = F32(nmax - 1)
    mx = np.zeros(lanes, np.float32)
    amax = np.zeros(lanes, np.float32)
    has_nan = np.zeros(lanes, np.bool_)
    for i in range(n):
        for j in range(lanes):
            v = x[i, j]
            bigger = abs(v) > amax[j]
            amax[j] = abs(v) if bigger else amax[j]
            mx[j] = v if bigger else mx[j]
            has_nan[j] |= v != v
    flat = np.empty(lanes, np.bool_)  # all (near) zero: levels 0, scale 0
    iscale = np.empty(lanes, np.float32)
    best_iscale = np.empty(lanes, np.float32)
    inexact = False
    for j in range(lanes):
        flat[j] = amax[j] < _GROUP_MAX_EPS
        if flat[j]:
            mx[j] = _ONE  # unused: keeps the flat lane's arithmetic finite
        iscale[j] = F32(-nmax) / mx[j]
        best_iscale[j] = iscale[j]
    sumlx = np.zeros(lanes, np.float32)
    suml2 = np.zeros(lanes, np.float32)
    scale = np.empty(lanes, np.float32)
    best = np.empty(lanes, np.float32)
    for step in range(-10, 10):  # -10: the first pass, at -nmax / max
        if step == 0:
            continue
        for j in range(lanes):
            if step > -10:
                iscale[j] = -(nmax_f + _TENTH * F32(step)) / mx[j]
            inexact |= not (abs(iscale[j]) * amax[j] < _EXACT_BELOW or flat[j]) \
                or (has_nan[j] and not flat[j])
            sumlx[j] = _ZERO
            suml2[j] = _ZERO
        for i in range(n):
            for j in range(lanes):
                level = min(max((iscale[j] * x[i, j] + _MAGIC) - _MAGIC, bottom), top)
                weight = qw[i, j] if weighted else x[i, j] * x[i, j]
                sumlx[j] += weight * x[i, j] * level
                suml2[j] += weight * level * level
        for j in range(lanes):
            if step == -10:
                scale[j] = sumlx[j] / suml2[j] if suml2[j] != _ZERO else _ZERO
                best[j] = scale[j] * sumlx[j]
            elif suml2[j] > _ZERO and sumlx[j] * sumlx[j] > best[j] * suml2[j]:
                scale[j] = sumlx[j] / suml2[j]
                best[j] = scale[j] * sumlx[j]
                best_iscale[j] = iscale[j]
    for j in range(lanes):
        scale_out[j] = _ZERO if flat[j] else scale[j]
    for i in range(n):
        for j in range(lanes):
            level = min(max((best_iscale[j] * x[i, j] + _MAGIC) - _MAGIC, bottom), top)
            L[i, j] = _ZERO if flat[j] else level + nmax_f
    return not inexact
