"""formats/quants.py: bytes equal gguf-py's ``quantize`` (and libggml's where the two differ:
signed zeros), values equal its ``dequantize``. The K and IQ types, which gguf-py cannot
quantize, are compared with libggml in tests/test_kquants_ggml.py and its neighbours."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as reference

from mmconvert.formats import quants
from mmconvert.formats.dtypes import STORAGE_DTYPES, bf16_to_f32, to_float32
from tests.ggml_c import libggml

GGUF_PY_QUANTIZES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1")
TYPES = [t for t in quants.TYPES if t in GGUF_PY_QUANTIZES]
BLOCK_TYPES = [t for t in TYPES if quants.TYPES[t].quantized]
SHAPES = [(64,), (1, 96), (37, 64), (3, 5, 32)]


def ref_bytes(values: np.ndarray, ggml_type: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        out = reference.quantize(values.astype(np.float32), GGMLQuantizationType[ggml_type])
    return np.ascontiguousarray(out).view(np.uint8)


def weights(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Weight-like float32 values with a different scale per row."""
    scale = np.exp(rng.uniform(-8, 4, size=(*shape[:-1], 1)))
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def edge_blocks() -> np.ndarray:
    """(n, 32) float32 blocks that exercise every branch of the reference kernels."""
    rows = []
    row = np.zeros(32, np.float32)
    rows.append(row.copy())  # all zeros: d = 0
    rows.append(-row)  # all -0.0: Q4_0's d is -0 (max stays +0), Q4_1's m is -0
    mixed = row.copy()
    mixed[0], mixed[5] = -0.0, 0.0
    rows.append(mixed)
    for sign in (1, -1):
        one = row.copy()
        one[7] = sign * 3.0  # a lone maximum, positive and negative
        rows.append(one)
        tie = np.linspace(-1, 1, 32, dtype=np.float32)
        tie[3], tie[20] = sign * 2.0, -sign * 2.0  # +a and -a: the first one wins
        rows.append(tie)
    rows.append(np.full(32, 0.7, np.float32))  # constant: max == min
    rows.append(np.full(32, -0.7, np.float32))
    # exact rounding ties: amax 127 gives d = 1, so x * id lands on k + 0.5
    halves = (np.arange(32, dtype=np.float32) - 16) * 4 + np.float32(0.5)
    halves[0] = 127
    rows.append(halves)
    rows.append(-halves)
    near = np.nextafter(halves, np.float32(0))
    near[0] = 127
    rows.append(near)
    rng = np.random.default_rng(7)
    for magnitude in (3e38, 1e38, 1e30, 65504, 1e-8, 1.2e-38, 1e-40, 1e-44):
        rows.append(np.clip(rng.standard_normal(32) * magnitude, -3e38, 3e38).astype(np.float32))
        rows.append(np.full(32, magnitude, np.float32) * np.where(np.arange(32) % 2, 1, -1))
    ramp = np.linspace(-3.4e38, 3.4e38, 32, dtype=np.float32)  # max - min overflows to inf
    rows.append(ramp)
    return np.stack(rows).astype(np.float32)


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    finite = (bits & 0x7F80) != 0x7F80
    return np.where(finite, bits, bits & 0xBFFF)  # NaN/inf -> finite (exponent 0xFE)


# --- bytes and values against gguf-py ------------------------------------------------------

@pytest.mark.parametrize("ggml_type", list(quants.TYPES))
def test_sizes_and_ids_match_ggml(ggml_type):
    qt = quants.TYPES[ggml_type]
    assert (qt.block_size, qt.type_size) == GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    assert qt.type_id == GGMLQuantizationType[ggml_type].value


@pytest.mark.parametrize("ggml_type", TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_random_bytes_equal_gguf_py(ggml_type, shape):
    x = weights(np.random.default_rng(sum(shape)), shape)
    got = quants.quantize(x, ggml_type)
    assert got.dtype == np.uint8 and got.shape == quants.byte_shape(shape, ggml_type)
    np.testing.assert_array_equal(got, ref_bytes(x, ggml_type).reshape(got.shape))


@pytest.mark.parametrize("ggml_type", TYPES)
def test_edge_blocks_equal_reference(ggml_type):
    """Block types against libggml itself: gguf-py's port gets blocks of signed zeros wrong."""
    x = edge_blocks()
    if quants.TYPES[ggml_type].quantized:
        expected = libggml().quantize(x, ggml_type)
    else:
        expected = ref_bytes(x, ggml_type)
    np.testing.assert_array_equal(quants.quantize(x, ggml_type), expected)


@pytest.mark.parametrize("ggml_type", ["F32", "F16", "BF16"])
def test_float_types_keep_reference_nan_inf_and_rounding(ggml_type):
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 65504, 65519.99, 65520, 6e-8,
                        2.9802322e-08, 1e-45, -0.0], np.float32)
    signaling = np.array([0x7F800001, 0xFFA00000, 0x7FC00001], np.uint32).view(np.float32)
    x = np.concatenate([special, signaling, weights(np.random.default_rng(3), (200,))])
    np.testing.assert_array_equal(quants.quantize(x, ggml_type), ref_bytes(x, ggml_type))


@pytest.mark.parametrize("ggml_type", TYPES)
def test_dequantize_equals_gguf_py(ggml_type):
    x = np.concatenate([weights(np.random.default_rng(5), (16, 64)), edge_blocks()[:, :32]
                        .repeat(2, axis=1)[:, :64]])
    data = quants.quantize(x, ggml_type)
    with np.errstate(all="ignore"):
        expected = reference.dequantize(data, GGMLQuantizationType[ggml_type])
    got = quants.dequantize(data, ggml_type)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got, expected)


# --- storage sources and row slices ---------------------------------------------------------

def every_pattern(src: str) -> np.ndarray:
    """All 65536 bit patterns of a 16-bit dtype, shuffled into (2048, 32) rows."""
    bits = np.random.default_rng(11).permutation(1 << 16).astype(np.uint16).reshape(-1, 32)
    return bits if src == "BF16" else bits.view(np.float16)


@pytest.mark.parametrize("src", ["BF16", "F16"])
@pytest.mark.parametrize("ggml_type", TYPES)
def test_every_16bit_pattern_equals_reference_of_widened_values(src, ggml_type):
    rows = every_pattern(src)
    if quants.TYPES[ggml_type].quantized:  # block types are specified for finite input only
        finite = np.isfinite(to_float32(rows, src)).all(axis=1)
        rows = rows[finite]
    got = quants.encoder_for(src, ggml_type)(rows)
    np.testing.assert_array_equal(got, ref_bytes(to_float32(rows, src), ggml_type))


@pytest.mark.parametrize("src", quants.SOURCE_DTYPES)
@pytest.mark.parametrize("ggml_type", TYPES)
def test_storage_rows_equal_reference_of_widened_values(src, ggml_type):
    rng = np.random.default_rng(13)
    if src == "BF16":
        rows = random_bf16(rng, (40, 96))
        rows[:8] = (weights(rng, (8, 96)).view(np.uint32) >> 16).astype(np.uint16)
    else:
        rows = weights(rng, (40, 96)).astype(STORAGE_DTYPES[src])
    widened = to_float32(rows, src)
    got = quants.encoder_for(src, ggml_type)(rows)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref_bytes(widened, ggml_type).reshape(got.shape))


@pytest.mark.parametrize("src", quants.SOURCE_DTYPES)
@pytest.mark.parametrize("ggml_type", TYPES)
def test_slices_concatenate_to_whole(src, ggml_type, monkeypatch):
    monkeypatch.setattr(quants, "_CHUNK", 256)  # many kernel chunks per call as well
    x = weights(np.random.default_rng(17), (23, 4, 64))
    rows = (x.view(np.uint32) >> 16).astype(np.uint16) if src == "BF16" else x.astype(
        STORAGE_DTYPES[src])
    encode = quants.encoder_for(src, ggml_type)
    before = rows.copy()
    whole = encode(rows)
    np.testing.assert_array_equal(rows, before)  # the source is never written to
    parts = [encode(rows[a:b]) for a, b in [(0, 1), (1, 9), (9, 9), (9, 23)]]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert whole.nbytes == quants.encoded_nbytes(rows.shape, ggml_type)


def test_passthrough_keeps_memory_and_quiets_bf16_nan():
    rows = random_bf16(np.random.default_rng(19), (4, 64))
    assert np.shares_memory(quants.encoder_for("BF16", "BF16")(rows), rows)
    rows[2, 5] = 0x7F81  # signaling NaN: gguf-py's float32 round trip sets the quiet bit
    got = quants.encoder_for("BF16", "BF16")(rows).view(np.uint16)
    assert got[2, 5] == 0x7FC1 and not np.shares_memory(got, rows)
    f32 = bf16_to_f32(rows)
    assert np.shares_memory(quants.encoder_for("F32", "F32")(f32), f32)


# --- shapes, sizes and policy ---------------------------------------------------------------

def test_shapes_sizes_and_fallback():
    assert quants.byte_shape((4, 64), "Q8_0") == (4, 68)
    assert quants.byte_shape((64,), "BF16") == (128,)
    assert quants.encoded_nbytes((3, 5, 32), "Q4_1") == 3 * 5 * 20
    assert quants.can_quantize((8, 64), "Q5_0") and not quants.can_quantize((8, 48), "Q5_0")
    assert quants.fallback_type("Q4_0", 48) == "F16" and quants.fallback_type("Q4_0", 64) == "Q4_0"
    assert quants.fallback_type("BF16", 7) == "BF16"
    with pytest.raises(ValueError, match="fallback_type"):
        quants.byte_shape((8, 48), "Q8_0")
    with pytest.raises(ValueError, match="unsupported GGML type"):
        quants.encoder_for("BF16", "IQ2_XXS")
    with pytest.raises(ValueError, match="cannot encode"):
        quants.encoder_for("I32", "F16")


@pytest.mark.parametrize(("name", "shape", "expected"), [
    ("blk.0.attn_norm.weight", (64,), "F32"),
    ("blk.0.attn_q_norm.weight", (1, 64), "F32"),
    ("mm.image.1.bias", (64,), "F32"),
    ("model.layers.0.self_attn.q_proj.bias", (1, 64), "F32"),
    ("blk.0.attn_q.weight", (64, 64), "Q8_0"),
    ("token_embd.weight", (10, 48), "F16"),
])
def test_tensor_type_policy(name, shape, expected):
    assert quants.tensor_type(name, shape, "Q8_0") == expected


def test_docstring_examples():
    assert doctest.testmod(quants, raise_on_error=True).attempted > 0


def test_numba_loads_only_for_types_that_need_it():
    """numba's import (~1.5 s) and first compile are paid only by K-quant, IQ or imatrix runs."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "from mmconvert.formats import quants\n"
            "x = np.ones((2, 256), np.float32)\n"
            "for t in ('F16', 'BF16', 'Q8_0', 'Q4_0', 'Q5_1'): quants.quantize(x, t)\n"
            "print('numba' in sys.modules)\n"
            "quants.quantize(x, 'Q4_K')\n"
            "print('numba' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
