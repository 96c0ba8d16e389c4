"""formats/iquants.py (IQ4_NL, IQ4_XS): bytes equal libggml's ``ggml_quantize_chunk`` block for
block, with and without importance weights; decoded values equal libggml's ``dequantize_row_*``
and gguf-py's ``dequantize`` bit for bit.

The helpers (weight-like rows, edge super-blocks, imatrices, the block comparison) are shared
with tests/test_kquants_low_ggml.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from mmconvert.formats import quants
from tests.ggml_c import libggml

TYPES = ["IQ4_NL", "IQ4_XS"]
IMATRIX_KINDS = ["none", "positive", "with_zeros"]
SUPER = 256


def weight_like_rows(rng: np.random.Generator, nrows: int, n: int) -> np.ndarray:
    """Heavy-tailed rows whose scale changes every 256 values (several scales per row)."""
    values = rng.standard_t(5, size=(nrows, n))
    scales = np.exp(rng.uniform(-9, 2, size=(nrows, n // SUPER, 1)))
    return (values.reshape(nrows, -1, SUPER) * scales).reshape(nrows, n).astype(np.float32)


def edge_blocks() -> dict[str, np.ndarray]:
    """Named 256-value blocks that reach the kernels' special branches."""
    rng = np.random.default_rng(11)
    noise = rng.standard_normal(SUPER).astype(np.float32)
    zeros = np.zeros(SUPER, np.float32)
    blocks = {
        "zeros": zeros,
        "neg_zeros": -zeros,
        "mixed_zeros": np.where(rng.random(SUPER) < 0.5, zeros, -zeros),
        "constant": np.full(SUPER, 0.37, np.float32),
        "neg_constant": np.full(SUPER, -2.5, np.float32),
        "tiny": noise * np.float32(1e-30),
        "huge": noise * np.float32(1e30),
        "f16_max": np.clip(noise * 40000, -65504, 65504).astype(np.float32),
        "f16_max_constant": np.full(SUPER, 65504, np.float32),
        "subnormal": noise * np.float32(1e-40),
        "positive": np.abs(noise),
        "negative": -np.abs(noise),
    }
    outlier = noise * np.float32(0.01)
    outlier[37] = 50
    blocks["lone_outlier"] = outlier
    for sign in (1, -1):
        one = zeros.copy()
        one[100] = sign * 0.3
        blocks[f"one_nonzero_{sign:+d}"] = one
    holes = noise.copy()
    holes[:32] = 0
    holes[64:80] = -0.0
    blocks["zero_sub_blocks"] = holes
    mixed_scale = noise.copy()
    mixed_scale[128:] *= np.float32(1e-20)
    blocks["tiny_half"] = mixed_scale
    return blocks


def imatrix(kind: str, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """None, random positive importance weights, or positive ones with zeros (scattered, and a
    whole 32-value run)."""
    if kind == "none":
        return None
    w = (rng.random(n) * 4 + np.float32(1e-3)).astype(np.float32)
    if kind == "with_zeros":
        w[rng.random(n) < 0.25] = 0
        w[32:64] = 0
    return w


def assert_same_blocks(ours: np.ndarray, ref: np.ndarray, type_size: int,
                       labels: list[str] | None = None) -> None:
    """Zero differing blocks; otherwise say how many and show the first."""
    ours = np.ascontiguousarray(ours).view(np.uint8).reshape(-1, type_size)
    ref = ref.reshape(-1, type_size)
    assert ours.shape == ref.shape
    bad = np.flatnonzero((ours != ref).any(axis=1))
    if len(bad):
        first = bad[0]
        where = f" ({labels[first]})" if labels else ""
        pytest.fail(f"{len(bad)} of {len(ref)} blocks differ; first: block {first}{where}\n"
                    f"  ours {ours[first].tobytes().hex()}\n  ggml {ref[first].tobytes().hex()}")


def check_type(ggml_type: str, kind: str, seed: int) -> None:
    """Random rows and every edge block, ours vs libggml, with the given imatrix kind."""
    ggml = libggml()
    qt = quants.TYPES[ggml_type]
    rng = np.random.default_rng(seed)
    rows = weight_like_rows(rng, 48, 2048)
    w = imatrix(kind, rows.shape[1], rng)
    assert_same_blocks(quants.quantize(rows, ggml_type, w), ggml.quantize(rows, ggml_type, w),
                       qt.type_size)
    edges = edge_blocks()
    edge_row = np.concatenate(list(edges.values()))[None, :]
    per_block = qt.block_size
    labels = [name for name in edges for _ in range(SUPER // per_block)]
    w = imatrix(kind, edge_row.shape[1], rng)
    assert_same_blocks(quants.quantize(edge_row, ggml_type, w),
                       ggml.quantize(edge_row, ggml_type, w), qt.type_size, labels)


def check_decode(ggml_type: str) -> None:
    """Decoding libggml's own bytes (random and edge rows) gives libggml's and gguf-py's floats."""
    ggml = libggml()
    rows = np.concatenate([weight_like_rows(np.random.default_rng(5), 4, 4096).reshape(-1),
                           *edge_blocks().values()])[None, :]
    data = ggml.quantize(rows, ggml_type)
    ours = quants.dequantize(data, ggml_type)
    theirs = ggml.dequantize(data, ggml_type, rows.shape[1])
    with np.errstate(all="ignore"):
        gguf_values = gguf_quants.dequantize(data, GGMLQuantizationType[ggml_type])
    assert ours.dtype == np.float32 and ours.shape == rows.shape
    for other in (theirs, gguf_values.astype(np.float32)):
        same = (ours.view(np.uint32) == other.view(np.uint32)) | (np.isnan(ours) & np.isnan(other))
        assert same.all(), f"{(~same).sum()} values differ; first at {np.flatnonzero(~same)[0]}"


@pytest.mark.parametrize("kind", IMATRIX_KINDS)
@pytest.mark.parametrize("ggml_type", TYPES)
def test_bytes_equal_libggml(ggml_type: str, kind: str) -> None:
    check_type(ggml_type, kind, seed=TYPES.index(ggml_type) * 10 + IMATRIX_KINDS.index(kind))


@pytest.mark.parametrize("ggml_type", TYPES)
def test_decode_equals_libggml_and_gguf(ggml_type: str) -> None:
    check_decode(ggml_type)


def test_iq4_xs_all_zero_super_block_has_negative_zero_scale() -> None:
    """ggml's d = -max_scale / 32 is -0.0 for a block of zeros: f16 bits 0x8000, not 0."""
    data = quants.quantize(np.zeros((1, SUPER), np.float32), "IQ4_XS")
    assert data[0, :2].view(np.uint16)[0] == 0x8000
    assert (data[0, 8:] == 0x88).all()  # every index points at the table value nearest 0
