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


@pytest.mark.parametrize("complementary", [False, True])
def test_tanh_gate_round_trip(complementary):
    g = np.array([-1.5, -0.2, 0.0, 0.3, 2.0], dtype=np.float32)
    m = T.apply_tanh_gate(g, complementary)
    expect = 1 - np.tanh(g) if complementary else np.tanh(g)
    assert np.allclose(m, expect)
    assert np.allclose(T.unapply_tanh_gate(m, complementary), g, atol=1e-5)
