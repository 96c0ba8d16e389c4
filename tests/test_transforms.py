import numpy as np
import pytest

from mmconvert.convert import transforms as T

rng = np.random.default_rng(0)


def test_pad_trim_round_trip():
    m = rng.standard_normal((5, 3)).astype(np.float32)
    padded = T.pad_rows(m, 8)
    assert padded.shape == (8, 3) and not padded[5:].any()
    assert np.array_equal(T.trim_rows(padded, 5), m)
    with pytest.raises(ValueError):
        T.pad_rows(m, 4)
    with pytest.raises(ValueError):
        T.trim_rows(m, 6)


@pytest.mark.parametrize("shape", [(8, 3), (4, 8, 3)])
@pytest.mark.parametrize("gate_first", [True, False])
def test_split_fuse_gate_up_round_trip(shape, gate_first):
    fused = rng.standard_normal(shape).astype(np.float32)
    gate, up = T.split_gate_up(fused, gate_first)
    half = shape[-2] // 2
    expect_gate = fused[..., :half, :] if gate_first else fused[..., half:, :]
    assert np.array_equal(gate, expect_gate)
    assert np.array_equal(T.fuse_gate_up(gate, up, gate_first), fused)


def test_split_gate_up_rejects_odd():
    with pytest.raises(ValueError):
        T.split_gate_up(np.zeros((5, 2)))


@pytest.mark.parametrize("heads,head_dim,cols", [(2, 8, 4), (4, 16, 3), (1, 4, 1)])
def test_rope_permutation_round_trip_bit_exact(heads, head_dim, cols):
    w = rng.integers(0, 2**16, size=(heads * head_dim, cols), dtype=np.uint16)  # bf16 bits
    neox = T.interleaved_to_neox(w, heads)
    assert np.array_equal(T.neox_to_interleaved(neox, heads), w)
    assert np.array_equal(T.interleaved_to_neox(T.neox_to_interleaved(w, heads), heads), w)


def test_rope_permutation_is_the_layout_change():
    """Rotating interleaved pairs equals rotating the permuted vector in rotate-half layout."""
    heads, d = 2, 8
    q = rng.standard_normal((heads * d, 1)).astype(np.float64)
    theta = rng.uniform(0, np.pi, size=d // 2)
    cos, sin = np.cos(theta), np.sin(theta)

    def rope_interleaved(x):
        x = x.reshape(heads, d // 2, 2)
        a, b = x[..., 0], x[..., 1]
        return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(heads * d, 1)

    def rope_neox(x):
        x = x.reshape(heads, 2, d // 2)
        a, b = x[:, 0], x[:, 1]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(heads * d, 1)

    assert np.allclose(T.interleaved_to_neox(rope_interleaved(q), heads),
                       rope_neox(T.interleaved_to_neox(q, heads)))


def _all_bf16() -> np.ndarray:
    from mmconvert.formats.dtypes import bf16_to_f32

    values = bf16_to_f32(np.arange(2**16, dtype=np.uint16))
    return values[np.isfinite(values)]


@pytest.mark.parametrize("complementary, lo, hi", [(False, 0.0, 7.40625), (True, 2**-10, 4.0)])
def test_tanh_gate_round_trip_is_bit_exact_for_bf16_gates(complementary, lo, hi):
    """Checkpoints store g in bf16. Through the float32 multiplier and back, every bf16 g in
    the range where float32 resolves it comes back bit for bit: |g| < 7.40625 for tanh(g)
    (beyond, tanh(g) rounds to the same float32 for neighbouring g), 2^-10 <= |g| < 4 for
    1 - tanh(g) (near 1 and near 2 the subtraction drops g's low bits). Outside those ranges
    no function can invert it: distinct gates share one multiplier."""
    from mmconvert.formats.dtypes import f32_to_bf16

    g = _all_bf16()
    inside = (np.abs(g) >= lo) & (np.abs(g) < hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        back = T.unapply_tanh_gate(T.apply_tanh_gate(g[inside], complementary), complementary)
    assert np.array_equal(f32_to_bf16(back), f32_to_bf16(g[inside]))
    # and why not further: two neighbouring bf16 gates with one float32 multiplier
    a, b = (2.0**-30, 2.0**-30 + 2.0**-37) if complementary else (7.40625, 7.4375)
    assert T.apply_tanh_gate(np.array([a]), complementary) == \
        T.apply_tanh_gate(np.array([b]), complementary)


@pytest.mark.parametrize("complementary", [False, True])
def test_tanh_gate_round_trip_float32_is_within_one_rounding(complementary):
    """For float32 gates the inverse is as exact as float allows: the error is the half-ulp
    rounding of the float32 multiplier carried through atanh (slope 1 / (1 - tanh^2)) plus
    the rounding of g itself, nothing more."""
    g = rng.uniform(-6, 6, 50_000).astype(np.float32)
    m = T.apply_tanh_gate(g, complementary)
    assert m.dtype == np.float32
    exact = np.tanh(g.astype(np.float64))
    assert np.array_equal(m, ((1 - exact) if complementary else exact).astype(np.float32))
    back = T.unapply_tanh_gate(m, complementary).astype(np.float64)
    bound = (np.spacing(np.abs(m)).astype(np.float64) / 2 / (1 - exact ** 2)
             + np.spacing(np.abs(g)).astype(np.float64) / 2)
    assert (np.abs(back - g) <= 1.01 * bound).all()


@pytest.mark.parametrize("bias", [(True, True), (True, False), (False, True), (False, False)])
def test_fold_linear_is_the_composition(bias):
    """Folding x -> down -> up into one map gives the same rows, to float64 rounding."""
    fan_in, rank, out = 12, 3, 7
    w1, w2 = rng.standard_normal((rank, fan_in)), rng.standard_normal((out, rank))
    b1 = rng.standard_normal(rank) if bias[0] else None
    b2 = rng.standard_normal(out) if bias[1] else None
    w, b = T.fold_linear([w1, w2], [b1, b2])
    assert w.shape == (out, fan_in) and (b is None) == (b1 is None and b2 is None)
    x = rng.standard_normal((5, fan_in))
    h = x @ w1.T + (0 if b1 is None else b1)
    want = h @ w2.T + (0 if b2 is None else b2)
    assert np.allclose(x @ w.T + (0 if b is None else b), want, rtol=1e-12, atol=1e-12)


def test_fold_linear_chains_and_refuses_mismatched_maps():
    ws = [rng.standard_normal((4, 6)), rng.standard_normal((5, 4)), rng.standard_normal((3, 5))]
    bs = [rng.standard_normal(4), None, rng.standard_normal(3)]
    w, b = T.fold_linear(ws, bs)
    x = rng.standard_normal((2, 6))
    want = ((x @ ws[0].T + bs[0]) @ ws[1].T) @ ws[2].T + bs[2]
    assert np.allclose(x @ w.T + b, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cannot fold"):
        T.fold_linear([ws[0], ws[2]], [None, None])
