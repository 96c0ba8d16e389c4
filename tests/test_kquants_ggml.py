"""mmconvert's Q4_K / Q5_K / Q6_K and Q4_0 / Q4_1 / Q5_0 / Q5_1 kernels against libggml's own C
quantizers (``ggml_quantize_chunk``, the wheel's libggml-base), byte for byte, with and without
importance weights, on weight-like rows and on edge blocks; and the dequantizers against
libggml's ``dequantize_row_*`` and gguf-py, value for value."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from mmconvert.formats import quants
from tests.ggml_c import libggml

TYPES = ("Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
F32 = np.float32


def _weight_like_rows(rng: np.random.Generator, nrows: int, n: int) -> np.ndarray:
    """Normal rows whose scale changes every 64 values (1e-4 .. 1), a few outliers, and a
    small positive/negative mean shift in some stretches, as trained matrices have."""
    scales = 10.0 ** rng.uniform(-4, 0, size=(nrows, n // 64, 1))
    rows = rng.standard_normal((nrows, n // 64, 64)) * scales
    rows += rng.choice([0.0, 0.0, 0.5, -0.5], size=(nrows, n // 64, 1)) * scales
    rows = rows.reshape(nrows, n)
    outliers = rng.random(rows.shape) < 0.002
    rows[outliers] *= 40
    return rows.astype(F32)


def _edge_blocks(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """256-value blocks (one super-block, eight 32-value blocks) that stress the searches."""
    n = 256
    signs = rng.choice(F32([-1, 1]), n)
    noise = rng.standard_normal(n).astype(F32)
    blocks = {
        "zeros": np.zeros(n, F32),
        "negative zeros": np.full(n, -0.0, F32),
        "mixed zeros": 0.0 * signs,
        "first negative zero": np.where(np.arange(n) == 0, F32(-0.0), F32(0)),
        "constant": np.full(n, 0.25, F32),
        "negative constant": np.full(n, -3.0, F32),
        "tiny": 1e-30 * signs,
        "tiny noise": 1e-30 * noise,
        "huge": 1e30 * noise,
        "near f16 max": 65000 * signs,
        "past f16 max": 1e5 * noise,
        "subnormal": 1e-40 * noise,
        "lone outlier": np.where(np.arange(n) == 77, F32(100), F32(0)),
        "lone outlier in noise": np.where(np.arange(n) == 200, F32(50), 0.01 * noise),
        "lone negative outlier": np.where(np.arange(n) == 0, F32(-8), 0.001 * noise),
        "one nonzero": np.where(np.arange(n) == 255, F32(1e-3), F32(0)),
        "half zeros": np.where(np.arange(n) < 128, F32(0), noise),
        "positive only": np.abs(noise),
        "negative only": -np.abs(noise) - 1,
        "sub-block scales": noise * np.repeat(10.0 ** np.arange(-7, 1), 32).astype(F32),
        "plus minus equal": np.where(np.arange(n) % 2 == 0, F32(1), F32(-1)),
    }
    return {name: np.asarray(b, F32) for name, b in blocks.items()}


def _imatrices(rng: np.random.Generator, n: int) -> dict[str, np.ndarray | None]:
    positive = rng.uniform(0.01, 10, n).astype(F32)
    with_zeros = np.where(rng.random(n) < 0.3, F32(0), positive)
    with_zeros[:64] = 0  # whole zero-weight sub-blocks too
    return {"no imatrix": None, "positive imatrix": positive, "imatrix with zeros": with_zeros}


def _assert_same_blocks(ours: np.ndarray, theirs: np.ndarray, ggml_type: str, what: str,
                        rows: np.ndarray) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    size = quants.ggml_type_info(ggml_type).type_size
    bs = quants.ggml_type_info(ggml_type).block_size
    a, b = ours.reshape(-1, size), theirs.reshape(-1, size)
    bad = np.flatnonzero((a != b).any(axis=1))
    if len(bad):
        i = bad[0]
        pytest.fail(f"{ggml_type} {what}: {len(bad)} of {len(a)} blocks differ; first: block "
                    f"{i}\n  values {rows.reshape(-1, bs)[i][:8]}...\n  ours   {a[i].tolist()}"
                    f"\n  libggml {b[i].tolist()}")


@pytest.fixture(scope="module")
def ggml():
    return libggml()


@pytest.mark.parametrize("ggml_type", TYPES)
def test_random_rows_match_libggml(ggml, ggml_type: str) -> None:
    rng = np.random.default_rng(11)
    rows = _weight_like_rows(rng, 48, 1024)
    for what, imatrix in _imatrices(rng, rows.shape[1]).items():
        ours = quants.quantize(rows, ggml_type, imatrix)
        _assert_same_blocks(ours, ggml.quantize(rows, ggml_type, imatrix), ggml_type, what, rows)


@pytest.mark.parametrize("ggml_type", TYPES)
def test_edge_blocks_match_libggml(ggml, ggml_type: str) -> None:
    rng = np.random.default_rng(12)
    edges = _edge_blocks(rng)
    rows = np.stack(list(edges.values()))  # one row per edge case
    for what, imatrix in _imatrices(rng, rows.shape[1]).items():
        ours = quants.quantize(rows, ggml_type, imatrix)
        theirs = ggml.quantize(rows, ggml_type, imatrix)
        for i, name in enumerate(edges):
            _assert_same_blocks(ours[i], theirs[i], ggml_type, f"{name}, {what}", rows[i])


def test_signed_zero_scales_as_libggml(ggml) -> None:
    """The cases the numpy kernels (gguf-py's arithmetic) got wrong: d = -0 for every block of
    zeros in Q4_0/Q5_0, whatever the zeros' signs; Q4_1/Q5_1 keep the sign of the block's first
    zero as ``m`` (and d = +0)."""
    first_negative = np.zeros((1, 32), F32)
    first_negative[0, 0] = -0.0
    for ggml_type, d_and_m in (("Q4_0", [0x8000]), ("Q5_0", [0x8000]), ("Q4_1", [0, 0x8000]),
                               ("Q5_1", [0, 0x8000])):
        data = quants.quantize(first_negative, ggml_type)
        assert data.view(np.uint16)[0, :len(d_and_m)].tolist() == d_and_m
        assert (ggml.quantize(first_negative, ggml_type) == data).all()


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_matches_libggml_and_gguf_py(ggml, ggml_type: str) -> None:
    rng = np.random.default_rng(13)
    random_rows = _weight_like_rows(rng, 16, 1024)
    edge_rows = np.stack(list(_edge_blocks(rng).values()))
    for rows, imatrix in ((random_rows, None), (edge_rows, None),
                          (random_rows, rng.uniform(0.01, 10, 1024).astype(F32))):
        data = ggml.quantize(rows, ggml_type, imatrix)
        ours = quants.dequantize(data, ggml_type)
        theirs = ggml.dequantize(data, ggml_type, rows.shape[1])
        same = (ours.view(np.uint32) == theirs.view(np.uint32)) | (np.isnan(ours)
                                                                    & np.isnan(theirs))
        assert same.all(), f"{ggml_type}: {np.count_nonzero(~same)} values differ from libggml"
        finite = np.isfinite(theirs)
        with np.errstate(all="ignore"):  # inf scales
            reference = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[ggml_type])
        np.testing.assert_array_equal(ours[finite], reference[finite])


def test_imatrix_is_ignored_where_ggml_ignores_it() -> None:
    rows = np.random.default_rng(14).standard_normal((4, 256)).astype(F32)
    weights = np.linspace(0, 5, 256, dtype=F32)
    for ggml_type in ("F32", "F16", "BF16", "Q8_0"):
        assert (quants.quantize(rows, ggml_type, weights) == quants.quantize(rows, ggml_type)).all()
    with pytest.raises(ValueError, match="imatrix of 128 values"):
        quants.quantize(rows, "Q4_K", weights[:128])


def test_encoder_for_passes_the_imatrix(ggml) -> None:
    """The streaming encoder (BF16 storage rows, a slice at a time) gives libggml's bytes."""
    rng = np.random.default_rng(15)
    rows = _weight_like_rows(rng, 8, 512)
    bf16 = (rows.view(np.uint32) >> 16).astype(np.uint16)
    widened = (bf16.astype(np.uint32) << 16).view(F32)
    imatrix = rng.uniform(0.1, 3, 512).astype(F32)
    for ggml_type in ("Q4_K", "Q6_K", "Q4_0", "Q5_1"):
        encode = quants.encoder_for("BF16", ggml_type, imatrix=imatrix)
        ours = np.concatenate([encode(bf16[:3]), encode(bf16[3:])])
        _assert_same_blocks(ours, ggml.quantize(widened, ggml_type, imatrix), ggml_type,
                            "encoder_for BF16", widened)
