"""The lane-batched K-quant searches equal the one-sub-block searches bit for bit, say when they
cannot, and the encoders then fall back: bytes equal libggml's either way.

Lanes are checked against :mod:`mmconvert.formats.kquant_search` (itself bit-exact with
libggml, tests/test_kquants_ggml.py) on random sub-blocks and on edge ones (zeros, ±0,
constant, tiny, subnormal, a lone outlier, all negative); the fallback against libggml on rows
whose ranges overflow float32 or hold NaN.
"""

from __future__ import annotations

import numpy as np
import pytest

from mmconvert.formats import kquant_lanes as kl
from mmconvert.formats import kquant_search as ks
from mmconvert.formats.kquants import Q4_K, Q5_K, Q6_K
from tests.ggml_c import libggml

F32 = np.float32


def _sub_blocks(n: int) -> np.ndarray:
    """(lanes, n) sub-blocks: random ones and the edge cases."""
    rng = np.random.default_rng(3)
    blocks = [rng.standard_normal(n).astype(F32) * F32(10.0 ** rng.integers(-6, 3))
              for _ in range(200)]
    lone = np.zeros(n, F32)
    lone[5] = 3.0
    signed = np.zeros(n, F32)
    signed[::3] = -0.0
    blocks += [np.zeros(n, F32), signed, np.full(n, 0.25, F32), np.full(n, -2.0, F32),
               (rng.standard_normal(n) * 1e-30).astype(F32), lone,
               -np.abs(rng.standard_normal(n)).astype(F32),
               np.abs(rng.standard_normal(n)).astype(F32) + 5]
    return np.stack(blocks)


@pytest.mark.parametrize("nmax, rmin, rdelta, nstep", [(15, -1.0, 0.1, 20), (31, -0.5, 0.1, 15)],
                         ids=["Q4_K", "Q5_K"])
def test_qkx2_lanes_equal_the_one_block_search(nmax, rmin, rdelta, nstep):
    subs = _sub_blocks(32)
    weights = np.stack([np.sqrt(np.mean(s * s)).astype(F32) + np.abs(s) for s in subs])
    lanes = len(subs)
    x, w = np.ascontiguousarray(subs.T), np.ascontiguousarray(weights.T)
    L = np.empty((32, lanes), F32)
    scale, the_min = np.empty(lanes, F32), np.empty(lanes, F32)
    exact = kl.qkx2_lanes(nmax, x, w, L, scale, the_min, F32(rmin), F32(rdelta), nstep,
                          np.empty_like(x))
    assert exact
    for j, sub in enumerate(subs):
        levels, aux = np.empty(32, np.uint8), np.empty(32, np.uint8)
        s, m = ks.make_qkx2_quants(32, nmax, sub, weights[j], levels, aux, F32(rmin),
                                   F32(rdelta), nstep, False)
        assert F32(s).tobytes() == scale[j].tobytes() and F32(m).tobytes() == \
            the_min[j].tobytes(), j
        assert np.array_equal(L[:, j].astype(np.uint8), levels), j


def test_qkx2_lanes_equal_the_imatrix_search():
    """With importance weights (quantize_row_q4_K_impl's parameters) the lanes are
    make_qkx3_quants."""
    subs = _sub_blocks(32)
    rng = np.random.default_rng(4)
    weights = (rng.random(subs.shape) * np.sqrt(subs * subs + 1)).astype(F32)
    x, w = np.ascontiguousarray(subs.T), np.ascontiguousarray(weights.T)
    L = np.empty_like(x)
    scale, the_min = np.empty(len(subs), F32), np.empty(len(subs), F32)
    assert kl.qkx2_lanes(15, x, w, L, scale, the_min, F32(-0.9), F32(0.05), 36,
                         np.empty_like(x))
    for j, sub in enumerate(subs):
        levels, aux = np.empty(32, np.uint8), np.empty(32, np.uint8)
        s, m = ks.make_qkx3_quants(32, 15, sub, weights[j], levels, aux, F32(-0.9), F32(0.05),
                                   36, False)
        assert (F32(s).tobytes(), F32(m).tobytes()) == (scale[j].tobytes(),
                                                        the_min[j].tobytes()), j
        assert np.array_equal(L[:, j].astype(np.uint8), levels), j


@pytest.mark.parametrize("weighted", [False, True], ids=["x2-weights", "imatrix"])
def test_qx_lanes_equal_the_one_block_search(weighted):
    subs = _sub_blocks(16)
    lanes = len(subs)
    qw = (np.random.default_rng(6).random(subs.shape) + 0.1).astype(F32)
    x, w = np.ascontiguousarray(subs.T), np.ascontiguousarray(qw.T)
    L, scale = np.empty((16, lanes), F32), np.empty(lanes, F32)
    assert kl.qx_lanes(32, x, L, scale, w, weighted)
    for j, sub in enumerate(subs):
        levels = np.empty(16, np.int8)
        s = ks.make_qx_quants(16, 32, sub, levels, 1, qw[j] if weighted else ks.NO_WEIGHTS)
        assert F32(s).tobytes() == scale[j].tobytes(), j
        assert np.array_equal(L[:, j].astype(np.int8), levels), j


def _overflowing_rows() -> np.ndarray:
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((4, 1024)).astype(F32)
    rows[1, 300:310] = [3e38, -3e38] * 5  # max - min overflows: C's nearest_int garbage
    rows[2, 700] = np.nan
    rows[3, 520:552] *= F32(1e-40)  # a subnormal sub-block
    return rows


def test_lanes_report_values_outside_their_exact_range():
    """A range that overflows float32, a subnormal range (its scale overflows) and a NaN."""
    subnormal = (np.random.default_rng(1).standard_normal(32) * 1e-40).astype(F32)
    x = np.ascontiguousarray(np.stack([subnormal, np.ones(32, F32)]).T)
    assert not kl.qkx2_lanes(15, x, np.ones_like(x), np.empty((32, 2), F32), np.empty(2, F32),
                             np.empty(2, F32), F32(-1.0), F32(0.1), 20, np.empty_like(x))
    rows = _overflowing_rows()
    sub = rows[1, 288:320].copy()
    x = np.ascontiguousarray(np.stack([sub, rows[0, :32]]).T)
    w = np.ascontiguousarray(np.abs(x) + 1)
    out = np.empty((32, 2), F32)
    assert not kl.qkx2_lanes(15, x, w, out, np.empty(2, F32), np.empty(2, F32), F32(-1.0),
                             F32(0.1), 20, np.empty_like(x))
    nan = np.ascontiguousarray(np.stack([rows[2, 688:704], rows[0, :16]]).T)
    assert not kl.qx_lanes(32, nan, np.empty((16, 2), F32), np.empty(2, F32), nan, False)


@pytest.mark.llama
@pytest.mark.parametrize("kind", [Q4_K, Q5_K, Q6_K], ids=lambda k: k.__name__)
def test_a_group_outside_the_range_falls_back_to_c_bytes(kind):
    """Rows with an overflowing range and a NaN: the encoders' bytes are still libggml's."""
    rows = _overflowing_rows()
    ours = np.empty((rows.size // 256, kind.type_size), np.uint8)
    kind.encode_blocks(rows.reshape(-1, 256), ours)
    theirs = libggml().quantize(rows, kind.__name__).reshape(ours.shape)
    assert np.array_equal(ours, theirs)
