"""ggml's scale searches for the K-quants (``ggml-quants.c``), as numba kernels in float32.

Each function handles ONE sub-block per call, like its C namesake: it reads ``x`` (float32,
``n`` values), writes the chosen quant levels into ``L`` and returns the scale (and, for the
affine searches, the min). The arithmetic repeats C's float32 operations in C's order, with C's
int -> float conversions where C makes them, so the levels and scales are bit-identical with
libggml (built without FMA or fast-math, as is this module: numba's default, no ``fastmath``).
Every float constant is a ``np.float32``: a Python float literal would make numba compute in
float64 and change results.

C's ``NULL`` weight pointer is an empty array here (``NO_WEIGHTS``): one compiled signature, no
Optional types inside the kernels.

Public API (all ``@njit(cache=True, nogil=True, error_model="numpy")``; call from other njit code or from Python):

- ``nearest_int(f) -> int``: C's ``nearest_int`` (the 1.5 * 2**23 trick, bit for bit,
  including its results outside +-4194303).
- ``fp32_to_fp16_bits(f) -> uint16`` / ``fp16_bits_to_fp32(h) -> float32``: ggml's
  ``GGML_FP32_TO_FP16`` / ``GGML_FP16_TO_FP32`` (NaN -> 0x7E00 with its sign, as there).
- ``make_qx_quants(n, nmax, x, L, rmse_type, qw) -> float``  L: int8 (n,) gets nmax + l.
- ``make_q3_quants(n, nmax, x, L, do_rmse) -> float``         L: int8 (n,).
- ``make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad)
  -> (scale, the_min)``                                       L, Laux: uint8 (n,).
- ``make_qkx3_quants(...)``: same signature; ``weights`` may be ``NO_WEIGHTS`` (then x**2).
- ``make_qp_quants(n, nmax, x, L, quant_weights) -> float``   L: uint8 (n,).

Example::

    L = np.empty(32, np.uint8); aux = np.empty(32, np.uint8)
    scale, the_min = make_qkx2_quants(32, 15, x, w, L, aux, F32(-1), F32(0.1), 20, False)
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F32 = np.float32
NO_WEIGHTS = np.empty(0, np.float32)  # C's NULL weights pointer

GROUP_MAX_EPS = F32(1e-15)
_ZERO, _HALF, _ONE, _TWO = F32(0), F32(0.5), F32(1), F32(2)
_ROUND_MAGIC = F32(12582912.0)  # 1.5 * 2**23
_TENTH = F32(0.1)
_SCALE_TO_INF = F32(2.0**112)
_SCALE_TO_ZERO = F32(2.0**-110)
_EXP_SCALE = F32(2.0**-112)

_jit = njit(cache=True, nogil=True, error_model="numpy")  # IEEE division, as in C


@intrinsic
def _f32_bits(typingctx, value):
    """float32 -> its bit pattern as uint32 (C's union / memcpy)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, bits):
    """The low 32 bits of an integer (numba widens uint32 arithmetic to 64 bits) -> float32."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        low = args[0]
        if bits.bitwidth > 32:
            low = builder.trunc(low, ir.IntType(32))
        elif bits.bitwidth < 32:
            low = builder.zext(low, ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())

    return types.float32(bits), codegen


@_jit
def nearest_int(fval):
    """Round to nearest, ties to even, via float32 addition of 1.5 * 2**23 (C's trick; for
    |fval| > 4194303 the same garbage as C, since the assert is compiled out there)."""
    bits = np.int64(_f32_bits(F32(fval) + _ROUND_MAGIC))
    return (bits & 0x007FFFFF) - 0x00400000


@_jit
def fp32_to_fp16_bits(f):
    """ggml_compute_fp32_to_fp16: round to nearest even; overflow -> inf; NaN -> 0x7E00.
    (Integer work in int64 with 32-bit masks: numba widens uint32 arithmetic anyway.)"""
    f = F32(f)
    base = (abs(f) * _SCALE_TO_INF) * _SCALE_TO_ZERO
    w = np.int64(_f32_bits(f))
    shl1_w = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1_w & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = _bits_f32((bias >> 1) + 0x07800000) + base
    bits = np.int64(_f32_bits(base))
    nonsign = ((bits >> 13) & 0x7C00) + (bits & 0x0FFF)
    if shl1_w > 0xFF000000:
        nonsign = 0x7E00
    return np.uint16((sign >> 16) | nonsign)


@_jit
def fp16_bits_to_fp32(h):
    """ggml_compute_fp16_to_fp32 (exact; subnormals through the 0.5-bias trick, as there)."""
    w = np.int64(h) << 16
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    if two_w < (1 << 27):
        magnitude = _bits_f32((two_w >> 17) | (126 << 23)) - _HALF
    else:
        magnitude = _bits_f32((two_w >> 4) + (0xE0 << 23)) * _EXP_SCALE
    return _bits_f32(sign | np.int64(_f32_bits(magnitude)))


@_jit
def fp16_round(f):
    """float32 -> f16 -> float32 (``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f))``)."""
    return fp16_bits_to_fp32(fp32_to_fp16_bits(f))


@_jit
def _qx_weight(x, qw, i, rmse_type):
    if qw.shape[0] > 0:
        return qw[i]
    if rmse_type == 1:
        return x[i] * x[i]
    if rmse_type == 2:
        return _ONE
    if rmse_type == 3:
        return abs(x[i])
    return F32(np.sqrt(abs(x[i])))


@_jit
def make_qx_quants(n, nmax, x, L, rmse_type, qw):
    """Symmetric levels in [0, 2*nmax) (L: int8), scale returned; qw: weights or NO_WEIGHTS."""
    mx = _ZERO
    amax = _ZERO
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return _ZERO
    iscale = F32(-nmax) / mx
    if rmse_type == 0:
        for i in range(n):
            lv = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, lv))
        return _ONE / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    weights = np.empty(n, np.float32)  # C recomputes w in every pass; the values are the same
    for i in range(n):
        weights[i] = _qx_weight(x, qw, i, rmse_type)
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        lv = nearest_int(iscale * x[i])
        lv = max(-nmax, min(nmax - 1, lv))
        L[i] = lv + nmax
        w = weights[i]
        fl = F32(lv)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != _ZERO else _ZERO
    if return_early:
        return _HALF * (scale + _ONE / iscale) if suml2 > _ZERO else _ONE / iscale
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + _TENTH * F32(step)) / mx
        sumlx = _ZERO
        suml2 = _ZERO
        for i in range(n):
            lv = nearest_int(iscale * x[i])
            lv = max(-nmax, min(nmax - 1, lv))
            w = weights[i]
            fl = F32(lv)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > _ZERO and sumlx * sumlx > best * suml2:
            for i in range(n):
                lv = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, lv))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@_jit
def make_q3_quants(n, nmax, x, L, do_rmse):
    """Q3_K's symmetric search with x**2 weights and coordinate refinement (L: int8)."""
    mx = _ZERO
    amax = _ZERO
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return _ZERO
    iscale = F32(-nmax) / mx
    if do_rmse:
        sumlx = _ZERO
        suml2 = _ZERO
        for i in range(n):
            lv = nearest_int(iscale * x[i])
            lv = max(-nmax, min(nmax - 1, lv))
            L[i] = lv
            w = x[i] * x[i]
            fl = F32(lv)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        for _itry in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                li = F32(L[i])
                slx = sumlx - w * x[i] * li
                if slx > _ZERO:
                    sl2 = suml2 - w * li * li
                    new_l = nearest_int(x[i] * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[i]:
                        fn = F32(new_l)
                        slx += w * x[i] * fn
                        sl2 += w * fn * fn
                        if sl2 > _ZERO and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > _ZERO else _ZERO
    for i in range(n):
        lv = nearest_int(iscale * x[i])
        lv = max(-nmax, min(nmax - 1, lv))
        L[i] = lv + nmax
    return _ONE / iscale


@_jit
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """Affine levels in [0, nmax] (L: uint8) minimising the weighted error over ``nstep + 1``
    trial scales; returns (scale, the_min) with the_min = -min >= 0 (C's ``*the_min``)."""
    rmin = F32(rmin)
    rdelta = F32(rdelta)
    lo = x[0]
    hi = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < lo:
            lo = x[i]
        if x[i] > hi:
            hi = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if lo > _ZERO:
        lo = _ZERO
    if hi == lo:
        for i in range(n):
            L[i] = 0
        return _ZERO, -lo
    iscale = F32(nmax) / (hi - lo)
    scale = _ONE / iscale
    best_error = _ZERO
    for i in range(n):
        lv = nearest_int(iscale * (x[i] - lo))
        L[i] = max(0, min(nmax, lv))
        diff = scale * F32(L[i]) + lo - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -lo
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + F32(nmax)) / (hi - lo)
        sum_l = _ZERO
        sum_l2 = _ZERO
        sum_xl = _ZERO
        for i in range(n):
            lv = nearest_int(iscale * (x[i] - lo))
            lv = max(0, min(nmax, lv))
            Laux[i] = lv
            w = weights[i]
            fl = F32(lv)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _ZERO:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _ZERO:
                this_min = _ZERO
                this_scale = sum_xl / sum_l2
            cur_error = _ZERO
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                lo = this_min
    return scale, -lo


@_jit
def _qkx3_weight(x, weights, i):
    return weights[i] if weights.shape[0] > 0 else x[i] * x[i]


@_jit
def make_qkx3_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants' variant used with importance weights (weights may be NO_WEIGHTS:
    x**2), ``max <= min`` as the empty test; returns (scale, the_min)."""
    rmin = F32(rmin)
    rdelta = F32(rdelta)
    lo = x[0]
    hi = x[0]
    sum_w = _qkx3_weight(x, weights, 0)
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < lo:
            lo = x[i]
        if x[i] > hi:
            hi = x[i]
        w = _qkx3_weight(x, weights, i)
        sum_w += w
        sum_x += w * x[i]
    if lo > _ZERO:
        lo = _ZERO
    if hi <= lo:
        for i in range(n):
            L[i] = 0
        return _ZERO, -lo
    iscale = F32(nmax) / (hi - lo)
    scale = _ONE / iscale
    best_mad = _ZERO
    for i in range(n):
        lv = nearest_int(iscale * (x[i] - lo))
        L[i] = max(0, min(nmax, lv))
        diff = scale * F32(L[i]) + lo - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_mad += _qkx3_weight(x, weights, i) * diff
    if nstep < 1:
        return scale, -lo
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * F32(step) + F32(nmax)) / (hi - lo)
        sum_l = _ZERO
        sum_l2 = _ZERO
        sum_xl = _ZERO
        for i in range(n):
            lv = nearest_int(iscale * (x[i] - lo))
            lv = max(0, min(nmax, lv))
            Laux[i] = lv
            w = _qkx3_weight(x, weights, i)
            fl = F32(lv)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > _ZERO:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > _ZERO:
                this_min = _ZERO
                this_scale = sum_xl / sum_l2
            mad = _ZERO
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                mad += _qkx3_weight(x, weights, i) * diff
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                lo = this_min
    return scale, -lo


@_jit
def make_qp_quants(n, nmax, x, L, quant_weights):
    """Levels in [0, nmax] for non-negative ``x`` (the sub-block scales or mins of a
    super-block; L: uint8, C's wrap-around stores kept), weighted refinement; scale returned."""
    mx = _ZERO
    for i in range(n):
        mx = mx if mx > x[i] else x[i]  # C's MAX(max, x[i]), NaN and -0.0 included
    if mx < GROUP_MAX_EPS:  # all zero
        for i in range(n):
            L[i] = 0
        return _ZERO
    iscale = F32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = _ONE / iscale
    best_mse = _ZERO
    for i in range(n):
        diff = x[i] - scale * F32(L[i])
        w = quant_weights[i]
        best_mse += w * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (_TENTH * F32(step) + F32(nmax)) / mx
        scale_is = _ONE / iscale_is
        mse = _ZERO
        for i in range(n):
            lv = nearest_int(iscale_is * x[i])
            lv = min(nmax, lv)
            diff = x[i] - scale_is * F32(lv)
            w = quant_weights[i]
            mse += w * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        lv = nearest_int(iscale * x[i])
        lv = min(nmax, lv)
        L[i] = lv & 0xFF
        w = quant_weights[i]
        fl = F32(lv)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            li = F32(L[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > _ZERO and sl2 > _ZERO:
                new_l = nearest_int(x[i] * sl2 / slx)
                new_l = min(nmax, new_l)
                if new_l != L[i]:
                    fn = F32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > _ZERO else _ZERO
