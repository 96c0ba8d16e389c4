"""The tensor check's tolerances and the diagnosis of mismatching tensors."""

import gguf
import numpy as np
import pytest

from mmconvert.convert.readers import ReadOptions, read_checkpoint
from mmconvert.convert.transforms import interleaved_to_neox, neox_to_interleaved
from mmconvert.formats import quants
from mmconvert.formats.dtypes import bf16_to_f32, f32_to_bf16, to_float32
from mmconvert.verify.diagnose import explain, rank
from mmconvert.verify.tensorcheck import QUANT_BOUNDS, compare_tensor
from tests.ggml_c import libggml


def _quant(x: np.ndarray, name: str) -> np.ndarray:
    qtype = gguf.GGMLQuantizationType[name]
    return gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)


@pytest.mark.parametrize("name", sorted(QUANT_BOUNDS))
def test_reference_quantization_is_within_bound(name):
    rng = np.random.default_rng(0)
    # gaussian, heavy-tailed, constant, all-zero and tiny blocks: every regime of the scales
    x = np.concatenate([rng.standard_normal((8, 128)), rng.standard_t(2, (8, 128)),
                        np.full((2, 128), 0.37), np.zeros((2, 128)),
                        1e-7 * rng.standard_normal((2, 128))]).astype(np.float32)
    diff = compare_tensor("w", "w", name, _quant(x, name), x)
    assert diff.ok, diff.describe()


@pytest.mark.parametrize("name", sorted(QUANT_BOUNDS))
def test_a_wrong_block_scale_is_out_of_bound(name):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    y = _quant(x, name)
    y[2, 32:64] *= 1.5
    diff = compare_tensor("w", "w", name, y, x)
    assert diff.status == "mismatch" and diff.bad_blocks == [(2, 32)]


K_TYPES = ["Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS"]


def _k_rows() -> np.ndarray:
    rng = np.random.default_rng(5)
    # gaussian, heavy-tailed, constant, all-zero, tiny and one-outlier rows
    x = np.concatenate([rng.standard_normal((8, 512)), rng.standard_t(2, (4, 512)),
                        np.full((1, 512), 0.37), np.zeros((1, 512)),
                        1e-7 * rng.standard_normal((1, 512))]).astype(np.float32)
    x[-1, 7] = 3.0
    return x


@pytest.mark.parametrize("name", K_TYPES)
def test_k_types_equal_the_source_quantized_again(name):
    """ggml's own bytes (libggml's quantizer, not ours) dequantize to the values the check
    expects; every type of formats.quants is checked, none is 'unchecked'."""
    ggml = libggml()
    x = _k_rows()
    bundle = ggml.dequantize(ggml.quantize(x, name), name, x.shape[1])
    diff = compare_tensor("w", "w", name, bundle, x)
    assert diff.status == "ok", diff.describe()
    off = bundle.copy()
    off[3, 300] += np.float32(0.25) * np.abs(x[3]).max()  # one value a quarter of the row off
    diff = compare_tensor("w", "w", name, off, x)
    assert diff.status == "mismatch" and diff.bad == 1, diff.describe()
    block = 256 if name != "IQ4_NL" else 32
    assert diff.bad_blocks == [(3, 300 // block * block)]
    assert f"1 {name} block(s) of {block} differ from the source quantized again: row 3 col " \
           f"{300 // block * block} (values 300-300)" in diff.describe()


def test_every_quantized_type_has_a_tensor_check():
    x = _k_rows()
    for name in quants.TYPES:
        stored = quants.dequantize(quants.quantize(x, name), name)
        diff = compare_tensor("w", "w", name, stored, x)
        assert diff.status == "ok", (name, diff.describe())


def _flip_q4_k_scale_bit(data: np.ndarray, row: int, block: int, sub: int, bit: int) -> None:
    """Flip one bit of the 6-bit scale of sub-block ``sub`` (< 4) of a Q4_K block: bytes 4..15
    of a block are ggml's packed scales, byte 4 + j holding sub-block j's scale in its low 6."""
    data[row, block * 144 + 4 + sub] ^= np.uint8(1 << bit)


@pytest.mark.parametrize("bit", [0, 5])
def test_a_wrong_k_sub_block_scale_is_caught(bit):
    ggml = libggml()
    x = _k_rows()
    data = ggml.quantize(x, "Q4_K")
    _flip_q4_k_scale_bit(data, 2, 1, 1, bit)  # row 2, second block, its values 32..63
    diff = compare_tensor("w", "w", "Q4_K", ggml.dequantize(data, "Q4_K", 512), x)
    assert diff.status == "mismatch" and diff.bad_blocks == [(2, 256)], diff.describe()
    first, last = diff.bad_spans[0]
    assert 288 <= first <= last <= 319  # only that sub-block's values moved


def test_importance_weighted_bytes_need_their_imatrix():
    ggml = libggml()
    x = _k_rows()
    w = np.random.default_rng(6).uniform(0.01, 10, 512).astype(np.float32)
    bundle = ggml.dequantize(ggml.quantize(x, "Q4_K", imatrix=w), "Q4_K", 512)
    assert compare_tensor("w", "w", "Q4_K", bundle, x, imatrix=w).status == "ok"
    assert compare_tensor("w", "w", "Q4_K", bundle, x).status == "mismatch"


def test_derived_k_tensors_allow_one_rounding_step_of_the_source():
    """A recomputed source (a fold's product on another BLAS) may sit a few float32 steps
    away: its quantization may then move a level, but stays within the block's own error."""
    ggml = libggml()
    x = _k_rows()[:8]
    bundle = ggml.dequantize(ggml.quantize(x, "Q4_K"), "Q4_K", 512)
    nudged = x.copy()
    for _ in range(256):  # far more than summation order moves a product; now a level moves
        nudged = np.nextafter(nudged, np.float32(np.inf))
    assert compare_tensor("w", "w", "Q4_K", bundle, nudged).status == "mismatch"
    assert compare_tensor("w", "w", "Q4_K", bundle, nudged, derived=True).ok
    data = ggml.quantize(x, "Q4_K")
    _flip_q4_k_scale_bit(data, 2, 1, 1, 5)
    wrong = ggml.dequantize(data, "Q4_K", 512)
    assert compare_tensor("w", "w", "Q4_K", wrong, nudged, derived=True).status == "mismatch"


def test_exact_types_must_equal_the_cast():
    rng = np.random.default_rng(2)
    x = bf16_to_f32(f32_to_bf16(rng.standard_normal((6, 8)).astype(np.float32)))
    assert compare_tensor("w", "w", "F16", x.astype(np.float16).astype(np.float32), x).ok
    assert compare_tensor("w", "w", "BF16", x, x).ok
    off = x.copy()
    off[4, 3] = np.nextafter(off[4, 3], np.float32(9))  # one ulp of float32
    diff = compare_tensor("w", "w", "F32", off, x)
    assert diff.status == "mismatch" and diff.bad == 1 and diff.bad_rows == [4]
    shape = compare_tensor("w", "w", "F32", x.T.copy(), x)
    assert shape.status == "shape" and "transposed" in shape.hint
    # a K type whose rows are not whole blocks cannot be quantized again: not compared
    assert compare_tensor("w", "w", "Q2_K", x, x).status == "unchecked"


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return read_checkpoint(make_checkpoint())


def _source(model):
    def read(name):
        ref = model.tensors.get(name)
        return None if ref is None else to_float32(ref.read(), ref.dtype)
    return read


def _explain(model, name, bundle, dtype="F32"):
    read = _source(model)
    source = read(name if name != "lm_head.weight" or not model.tied else
                  "model.embed_tokens.weight")
    diff = compare_tensor(name, name, dtype, bundle.astype(np.float32), source)
    assert diff.status == "mismatch"
    return explain(diff, bundle.astype(np.float32), source, model, read)


def test_diagnoses(model, make_checkpoint):
    read = _source(model)
    q = read("model.layers.0.self_attn.q_proj.weight")
    heads = model.text.num_attention_heads
    assert "a rope-layout permutation was applied" in _explain(
        model, "model.layers.0.self_attn.q_proj.weight", interleaved_to_neox(q, heads))
    up = read("model.layers.1.mlp.up_proj.weight")
    assert "mlp.up_proj.weight: the two are swapped" in _explain(
        model, "model.layers.1.mlp.gate_proj.weight", up)
    other_layer = read("model.layers.1.mlp.down_proj.weight")
    assert "layers are off by +1" in _explain(model, "model.layers.0.mlp.down_proj.weight",
                                              other_layer)
    emb = read("model.embed_tokens.weight")
    assert "vocabulary is off by one row" in _explain(model, "model.embed_tokens.weight",
                                                      np.roll(emb, -1, axis=0))
    assert "the output matrix is the embedding" in _explain(model, "lm_head.weight", emb)
    down = read("model.layers.0.mlp.down_proj.weight")
    assert "scaled by 2" in _explain(model, "model.layers.0.mlp.down_proj.weight", down * 2)
    bad = down.copy()
    bad[9] = 0.0
    assert "corrupted rows" in _explain(model, "model.layers.0.mlp.down_proj.weight", bad)
    noise = down + np.random.default_rng(3).standard_normal(down.shape).astype(np.float32)
    assert _explain(model, "model.layers.0.mlp.down_proj.weight", noise) == \
        "values differ throughout the tensor"
    tied = read_checkpoint(make_checkpoint(tied=True))
    assert "ties the output matrix" in _explain(tied, "lm_head.weight", -_source(tied)(
        "model.embed_tokens.weight"))


def test_interleaved_source_diagnoses(example_ckpt):
    model = read_checkpoint(example_ckpt, ReadOptions(rope_layout="interleaved"))
    read = _source(model)
    norm = read("model.layers.0.self_attn.q_norm.weight")
    # the runtime's permutation undone on a tensor that never had it: it is missing
    assert "permutation (interleaved -> rotate-half) is missing" in _explain(
        model, "model.layers.0.self_attn.q_norm.weight", neox_to_interleaved(norm, 1))
    k = read("model.layers.0.self_attn.k_proj.weight")
    assert "permuted per head twice" in _explain(
        model, "model.layers.0.self_attn.k_proj.weight",
        interleaved_to_neox(k, model.text.num_key_value_heads))


def test_rank_puts_missing_and_worst_first(model):
    x = np.ones((4, 4), np.float32)
    small = compare_tensor("a", "a", "F32", x + np.float32(1e-3), x)
    large = compare_tensor("b", "b", "F32", x * 3, x)
    ok = compare_tensor("c", "c", "F32", x, x)
    from mmconvert.verify.tensorcheck import TensorDiff

    missing = TensorDiff("d", "d", "F32", "missing")
    assert [d.name for d in rank([small, ok, large, missing])] == ["d", "b", "a"]
