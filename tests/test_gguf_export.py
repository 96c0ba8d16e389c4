"""``mmconvert to-gguf`` end to end on generated checkpoints, read back with gguf-py."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from mmconvert.cli import main
from mmconvert.convert.gguf_metadata import size_label
from mmconvert.convert.readers import ReadOptions, read_checkpoint
from mmconvert.convert.transforms import interleaved_to_neox
from mmconvert.formats import quants
from mmconvert.formats.dtypes import to_float32

T = GGMLQuantizationType


def to_gguf(*args, ok=True):
    result = CliRunner().invoke(main, ["to-gguf", *map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def value(reader, key):
    found = reader.get_field(key)
    return None if found is None else found.contents()


def tensors(reader):
    return {t.name: t for t in reader.tensors}


def source(model, canonical):
    ref = model.tensors[canonical]
    return to_float32(ref.read(), ref.dtype)


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def bundle(example_ckpt, tmp_path_factory):
    """The example converted to F32, F16 and Q8_0 in one run (one read of the source)."""
    out = tmp_path_factory.mktemp("gguf") / "out"
    to_gguf(example_ckpt, "-o", out, "--outtype", "f32", "--outtype", "f16", "--outtype", "q8_0")
    return out


def test_files_follow_hub_names(bundle):
    names = sorted(p.name for p in bundle.iterdir())
    assert names == ["README.md", "ckpt-124K-F16.gguf", "ckpt-124K-F32.gguf",
                     "ckpt-124K-Q8_0.gguf", "mmconvert.json", "mmproj-ckpt-F16.gguf"]
    manifest = json.loads((bundle / "mmconvert.json").read_text())
    assert manifest["kind"] == "gguf"
    quant = {f["path"]: (f["role"], f["quant"]) for f in manifest["files"]}
    assert quant["ckpt-124K-Q8_0.gguf"] == ("text", "Q8_0")
    assert quant["mmproj-ckpt-F16.gguf"] == ("projector", "F16")
    assert {o["path"] for o in manifest["outputs"]} == set(names) - {"mmconvert.json"}
    assert manifest["pre_tokenizer"] == "qwen2"


def test_text_keys(bundle, example_ckpt):
    model = read_checkpoint(example_ckpt)
    t = model.text
    r = GGUFReader(bundle / "ckpt-124K-F16.gguf")
    expected = {
        "general.architecture": "qwen3", "general.name": "ckpt", "general.size_label": "124K",
        "general.file_type": 1, "general.quantization_version": 2,
        "qwen3.block_count": t.num_hidden_layers, "qwen3.context_length": 4096,
        "qwen3.embedding_length": 64, "qwen3.feed_forward_length": 128,
        "qwen3.attention.head_count": 4, "qwen3.attention.head_count_kv": 2,
        "qwen3.attention.key_length": 16, "qwen3.attention.value_length": 16,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.eos_token_id": model.special.eos_id,
        "tokenizer.ggml.bos_token_id": model.special.bos_id,
        "tokenizer.ggml.padding_token_id": model.special.pad_id,
        "tokenizer.ggml.add_bos_token": False, "general.sampling.top_k": 20,
    }
    for key, want in expected.items():
        assert value(r, key) == want, key
    uint32 = ["qwen3.block_count", "qwen3.context_length", "qwen3.embedding_length",
              "qwen3.attention.head_count", "qwen3.attention.key_length", "general.file_type"]
    for key in uint32:
        assert r.get_field(key).types == [GGUFValueType.UINT32], key
    assert value(r, "qwen3.rope.freq_base") == pytest.approx(1e6)
    assert value(r, "qwen3.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert value(r, "general.sampling.temp") == pytest.approx(0.6)
    assert value(r, "general.sampling.top_p") == pytest.approx(0.95)
    assert value(r, "tokenizer.ggml.eos_token_ids") == model.special.eos
    assert value(r, "tokenizer.chat_template") == model.tokenizer.chat_template
    tokens = value(r, "tokenizer.ggml.tokens")
    assert len(tokens) == model.text.vocab_size == len(value(r, "tokenizer.ggml.token_type"))
    assert tokens[model.multimodal_token_id] == "<|multimodal|>"
    assert len(value(r, "tokenizer.ggml.merges")) > 0


def test_tensor_names_types_and_values(bundle, example_ckpt):
    model = read_checkpoint(example_ckpt)
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(2):
        names += [f"blk.{i}.{n}.weight" for n in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
            "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
    f32 = tensors(GGUFReader(bundle / "ckpt-124K-F32.gguf"))
    f16 = tensors(GGUFReader(bundle / "ckpt-124K-F16.gguf"))
    q8 = tensors(GGUFReader(bundle / "ckpt-124K-Q8_0.gguf"))
    assert set(f32) == set(f16) == set(q8) == set(names)
    canon = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "model.norm.weight",
             "blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
             "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
             "blk.0.attn_k_norm.weight": "model.layers.0.self_attn.k_norm.weight"}
    for name, canonical in canon.items():
        want = source(model, canonical)
        np.testing.assert_array_equal(np.asarray(f32[name].data), want)
        assert [int(d) for d in f32[name].shape] == list(reversed(want.shape))
        if want.ndim == 1:
            assert f16[name].tensor_type == q8[name].tensor_type == T.F32
            np.testing.assert_array_equal(np.asarray(q8[name].data), want)
        else:
            assert f16[name].tensor_type == T.F16 and q8[name].tensor_type == T.Q8_0
            np.testing.assert_array_equal(np.asarray(f16[name].data), want.astype(np.float16))
            np.testing.assert_array_equal(np.asarray(q8[name].data).reshape(want.shape[0], -1),
                                          quants.quantize(want, "Q8_0"))


def test_projector_gguf(bundle, example_ckpt):
    model = read_checkpoint(example_ckpt)
    r = GGUFReader(bundle / "mmproj-ckpt-F16.gguf")
    a = "mmproj-embed"
    assert value(r, "general.architecture") == a
    assert value(r, f"{a}.spec_version") == 1
    assert value(r, f"{a}.modalities") == ["m1", "m2"]
    assert value(r, f"{a}.embedding_length") == 64
    assert value(r, f"{a}.placeholder.token") == "<|multimodal|>"
    assert value(r, f"{a}.placeholder.token_id") == model.multimodal_token_id
    assert value(r, f"{a}.fusion") == "replace-placeholders-else-prepend"
    assert value(r, f"{a}.m2.input_dim") == 80 and value(r, f"{a}.m2.hidden_dim") == 96
    assert value(r, f"{a}.m2.output_dim") == 64
    assert value(r, f"{a}.m1.layer.names") == ["fc1", "norm1", "act", "fc2", "norm2"]
    assert value(r, f"{a}.m1.layer.kinds") == ["linear", "layer_norm", "act", "linear",
                                               "layer_norm"]
    assert value(r, f"{a}.m1.layer.activations") == ["", "", "gelu", "", ""]
    assert value(r, f"{a}.m1.layer.eps")[1] == pytest.approx(1e-5)
    assert value(r, f"{a}.m1.layer.has_bias") == [True, True, False, True, True]
    found = tensors(r)
    assert list(found) == [n for p in model.projectors.values() for n in p.tensor_names()]
    for name, t in found.items():
        want = source(model, name)
        if want.ndim == 1:
            assert t.tensor_type == T.F32
            np.testing.assert_array_equal(np.asarray(t.data), want)
        else:
            assert t.tensor_type == T.F16
            np.testing.assert_array_equal(np.asarray(t.data), want.astype(np.float16))


def test_projector_q8_0_falls_back_for_odd_rows(example_ckpt, tmp_path):
    to_gguf(example_ckpt, "-o", tmp_path / "o", "--outtype", "bf16", "--projector-outtype", "q8_0")
    found = tensors(GGUFReader(tmp_path / "o" / "mmproj-ckpt-Q8_0.gguf"))
    assert found["mm.m1.fc1.weight"].tensor_type == T.F16  # rows of 48: not whole Q8_0 blocks
    assert found["mm.m1.fc2.weight"].tensor_type == T.Q8_0  # rows of 64
    assert found["mm.m2.fc2.weight"].tensor_type == T.Q8_0  # rows of 96
    assert found["mm.m1.fc1.bias"].tensor_type == T.F32


def test_one_run_with_several_outtypes_equals_separate_runs(bundle, example_ckpt, tmp_path):
    to_gguf(example_ckpt, "-o", tmp_path / "alone", "--outtype", "q8_0")
    assert sha(tmp_path / "alone" / "ckpt-124K-Q8_0.gguf") == sha(bundle / "ckpt-124K-Q8_0.gguf")


def test_same_input_same_bytes(example_ckpt, tmp_path):
    for run in ("a", "b"):
        to_gguf(example_ckpt, "-o", tmp_path / run, "--outtype", "f16", "--outtype", "q4_1")
    for name in ("ckpt-124K-F16.gguf", "ckpt-124K-Q4_1.gguf", "mmproj-ckpt-F16.gguf"):
        assert sha(tmp_path / "a" / name) == sha(tmp_path / "b" / name)


def test_tied_embeddings_have_no_output(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(tied=True, activation="silu")
    to_gguf(ckpt, "-o", tmp_path / "o", "--outtype", "q4_0", "--name", "tied")
    (text,) = [p for p in (tmp_path / "o").glob("tied-*.gguf")]
    found = tensors(GGUFReader(text))
    assert "output.weight" not in found
    # token_embd is also the output projection: kept at Q8_0 under a 4-bit outtype
    assert found["token_embd.weight"].tensor_type == T.Q8_0
    assert found["blk.0.ffn_up.weight"].tensor_type == T.Q4_0


def test_low_bit_outtypes_keep_output_at_q8_0(example_ckpt, tmp_path):
    to_gguf(example_ckpt, "-o", tmp_path / "o", "--outtype", "q5_1")
    found = tensors(GGUFReader(tmp_path / "o" / "ckpt-124K-Q5_1.gguf"))
    assert found["output.weight"].tensor_type == T.Q8_0
    assert found["token_embd.weight"].tensor_type == T.Q5_1
    assert found["blk.1.attn_v.weight"].tensor_type == T.Q5_1
    assert value(GGUFReader(tmp_path / "o" / "ckpt-124K-Q5_1.gguf"), "general.file_type") == 9


@pytest.mark.parametrize("dtype, want", [("bfloat16", "BF16"), ("float16", "F16"),
                                         ("float32", "BF16")])
def test_auto_outtype(make_checkpoint, tmp_path, dtype, want):
    ckpt = make_checkpoint(dtype=dtype)
    result = to_gguf(ckpt, "--dry-run")
    assert f"outtype: auto -> {want}" in result.output


def test_padded_vocab_rows_are_unused_tokens(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(resize_vocab=False)
    to_gguf(ckpt, "-o", tmp_path / "o", "--outtype", "f16")
    (text,) = (tmp_path / "o").glob("ckpt-*-F16.gguf")
    r = GGUFReader(text)
    tokens = value(r, "tokenizer.ggml.tokens")
    types = value(r, "tokenizer.ggml.token_type")
    rows = tensors(r)["token_embd.weight"].shape[1]
    assert len(tokens) == rows == 448
    assert tokens[-1] == "[PAD447]" and types[-1] == 5


def test_interleaved_rope_source_is_permuted_to_neox(example_ckpt, tmp_path):
    to_gguf(example_ckpt, "-o", tmp_path / "o", "--outtype", "f32", "--rope-layout", "interleaved")
    model = read_checkpoint(example_ckpt, ReadOptions(rope_layout="interleaved"))
    found = tensors(GGUFReader(tmp_path / "o" / "ckpt-124K-F32.gguf"))
    q = source(model, "model.layers.0.self_attn.q_proj.weight")
    k = source(model, "model.layers.1.self_attn.k_proj.weight")
    v = source(model, "model.layers.1.self_attn.v_proj.weight")
    np.testing.assert_array_equal(np.asarray(found["blk.0.attn_q.weight"].data),
                                  interleaved_to_neox(q, 4))
    np.testing.assert_array_equal(np.asarray(found["blk.1.attn_k.weight"].data),
                                  interleaved_to_neox(k, 2))
    np.testing.assert_array_equal(np.asarray(found["blk.1.attn_v.weight"].data), v)


def test_moe_tensors_and_keys(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(num_experts=4, num_experts_per_tok=2)
    to_gguf(ckpt, "-o", tmp_path / "o", "--outtype", "q8_0")
    (path,) = (tmp_path / "o").glob("ckpt-*-Q8_0.gguf")
    r = GGUFReader(path)
    assert value(r, "general.architecture") == "qwen3moe"
    assert value(r, "qwen3moe.expert_count") == 4
    assert value(r, "qwen3moe.expert_used_count") == 2
    assert value(r, "qwen3moe.expert_feed_forward_length") == 32
    found = tensors(r)
    assert "blk.0.ffn_gate.weight" not in found
    assert found["blk.0.ffn_gate_inp.weight"].tensor_type == T.F32  # the router
    assert [int(d) for d in found["blk.1.ffn_gate_exps.weight"].shape] == [64, 32, 4]
    assert [int(d) for d in found["blk.1.ffn_down_exps.weight"].shape] == [32, 64, 4]
    model = read_checkpoint(ckpt)
    want = source(model, "model.layers.1.mlp.experts.up_proj")
    np.testing.assert_array_equal(
        np.asarray(found["blk.1.ffn_up_exps.weight"].data).reshape(4, 32, -1),
        quants.quantize(want, "Q8_0"))


def test_unsupported_moe_is_refused(make_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(make_checkpoint(num_experts=4, num_experts_per_tok=2), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["norm_topk_prob"] = False
    (ckpt / "config.json").write_text(json.dumps(cfg))
    result = to_gguf(ckpt, "-o", tmp_path / "o", ok=False)
    assert result.exit_code == 2 and "norm_topk_prob" in result.output


def test_split_output(example_ckpt, tmp_path):
    to_gguf(example_ckpt, "-o", tmp_path / "o", "--outtype", "f32", "--split-max-size", "120K")
    shards = sorted((tmp_path / "o").glob("ckpt-124K-F32-*.gguf"))
    n = len(shards)
    assert n >= 3 and shards[0].name == f"ckpt-124K-F32-00001-of-{n:05d}.gguf"
    names = []
    for i, path in enumerate(shards):
        r = GGUFReader(path)
        assert value(r, "split.no") == i and value(r, "split.count") == n
        assert value(r, "split.tensors.count") == 25
        assert (value(r, "general.architecture") == "qwen3") == (i == 0)
        names += [t.name for t in r.tensors]
    assert len(names) == len(set(names)) == 25
    manifest = json.loads((tmp_path / "o" / "mmconvert.json").read_text())
    assert [f["split"] for f in manifest["files"] if f["role"] == "text"] == [
        [i + 1, n] for i in range(n)]


def test_dry_run_prints_the_plan_and_writes_nothing(example_ckpt, tmp_path):
    result = to_gguf(example_ckpt, "-o", tmp_path / "o", "--outtype", "q8_0", "--dry-run")
    out = result.output
    assert "# plan: gguf (25 tensors)" in out and "# plan: mmproj (16 tensors)" in out
    assert "blk.0.attn_q.weight" in out and "BF16->Q8_0" in out
    assert "ckpt-124K-Q8_0.gguf" in out and "mmproj-ckpt-F16.gguf" in out
    assert "pre-tokenizer 'qwen2'" in out
    assert not (tmp_path / "o").exists()


def test_generation_and_rope_scaling_keys(example_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 1024}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [386, 384], "do_sample": False}))
    to_gguf(ckpt, "-o", tmp_path / "o", "--outtype", "f16", "--name", "My Model v2")
    (text,) = (tmp_path / "o").glob("My-Model-v2-*-F16.gguf")
    r = GGUFReader(text)
    assert value(r, "general.name") == "My-Model-v2"
    assert value(r, "qwen3.rope.scaling.type") == "yarn"
    assert value(r, "qwen3.rope.scaling.factor") == pytest.approx(4.0)
    assert value(r, "qwen3.rope.scaling.original_context_length") == 1024
    assert value(r, "general.sampling.temp") == 0.0  # do_sample false: greedy
    assert value(r, "general.sampling.top_k") is None


def test_unsupported_rope_scaling_is_one_clear_error(example_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    result = to_gguf(ckpt, "-o", tmp_path / "o", ok=False)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and "dynamic" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unknown_pre_tokenizer_refusal_and_override(example_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_ckpt, ckpt)
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                            "use_regex": True}
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    result = to_gguf(ckpt, "-o", tmp_path / "o", ok=False)
    assert result.exit_code == 2 and "--pre-tokenizer NAME" in result.output
    first, *details = result.output.strip().splitlines()  # cause first; a long path below it
    assert first.startswith("error: ") and len(first) <= 200
    assert all(line.startswith("  ") for line in details)
    assert not (tmp_path / "o").exists()
    to_gguf(ckpt, "-o", tmp_path / "o", "--pre-tokenizer", "gpt2", "--outtype", "f16")
    (text,) = (tmp_path / "o").glob("ckpt-*-F16.gguf")
    assert value(GGUFReader(text), "tokenizer.ggml.pre") == "gpt2"


@pytest.mark.parametrize("args, message", [
    (["--split-max-size", "lots"], "--split-max-size"),
    (["--outtype", "q3_k"], "Invalid value for '--outtype'"),
])
def test_bad_options(example_ckpt, tmp_path, args, message):
    result = to_gguf(example_ckpt, "-o", tmp_path / "o", *args, ok=False)
    assert result.exit_code == 2 and message in result.output


def test_existing_output_needs_force(example_ckpt, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    result = to_gguf(example_ckpt, "-o", out, ok=False)
    assert result.exit_code == 2 and "--force" in result.output
    # --force replaces only a bundle mmconvert wrote: a foreign file is refused, and kept
    result = to_gguf(example_ckpt, "-o", out, "--force", "--outtype", "f16", ok=False)
    assert result.exit_code == 2 and "keep" in result.output and (out / "keep").is_file()
    (out / "keep").unlink()
    to_gguf(example_ckpt, "-o", out, "--outtype", "f16")
    to_gguf(example_ckpt, "-o", out, "--force", "--outtype", "q8_0")
    assert [p.name for p in out.glob("*.gguf") if "Q8_0" in p.name]
    assert not [p for p in out.glob("*.gguf") if "F16" in p.name and "mmproj" not in p.name]


def test_checksums_by_default_and_opt_out(example_ckpt, tmp_path):
    to_gguf(example_ckpt, "-o", tmp_path / "plain", "--outtype", "f16", "--no-checksums")
    plain = json.loads((tmp_path / "plain" / "mmconvert.json").read_text())
    assert all(o["sha256"] is None and o["bytes"] > 0 for o in plain["outputs"])
    # several outtypes and a split: every file's hash, taken while writing, is the file's
    to_gguf(example_ckpt, "-o", tmp_path / "sums", "--outtype", "f16", "--outtype", "q8_0",
            "--split-max-size", "100K")
    sums = json.loads((tmp_path / "sums" / "mmconvert.json").read_text())
    assert len(sums["outputs"]) > 4
    for o in sums["outputs"]:
        assert o["sha256"] == sha(tmp_path / "sums" / o["path"])
    assert all(s["sha256"] for s in sums["sources"])


def test_to_gguf_never_imports_torch_or_transformers(example_ckpt, tmp_path):
    code = (
        "import sys\n"
        "from mmconvert.cli import main\n"
        f"try:\n    main(['to-gguf', {str(example_ckpt)!r}, '-o', {str(tmp_path / 'o')!r},"
        " '--outtype', 'q8_0', '--outtype', 'bf16'])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("count, label", [(124_000, "124K"), (6_480_000, "6.5M"),
                                          (596_049_920, "596M"), (1_720_574_976, "1.7B"),
                                          (751_632_384, "752M"), (8_190_735_360, "8.2B")])
def test_size_label(count, label):
    assert size_label(count) == label


def test_a_tensor_shared_by_several_outtypes_is_encoded_once(make_checkpoint, tmp_path,
                                                            monkeypatch):
    """Q4_K_M and Q6_K in one run both store output.weight as Q6_K (and other tensors as the
    same type): each such slice is encoded once for both files, and each file holds the bytes
    of its own run."""
    from mmconvert import api
    from mmconvert.formats import kquants

    ckpt = make_checkpoint(hidden_size=256, intermediate_size=512, head_dim=64)
    encoded: list[int] = []
    original = kquants._SuperBlockType.encode_blocks.__func__

    def counting(cls, x, out, weights=None):
        encoded.append(x.size if cls is kquants.Q6_K else 0)
        return original(cls, x, out, weights)

    monkeypatch.setattr(kquants._SuperBlockType, "encode_blocks", classmethod(counting))
    alone = {}
    for outtype in ("q4_k_m", "q6_k"):
        encoded.clear()
        api.to_gguf(ckpt, tmp_path / outtype, outtypes=[outtype])
        alone[outtype] = sum(encoded)
    encoded.clear()
    api.to_gguf(ckpt, tmp_path / "both", outtypes=["q4_k_m", "q6_k"])
    assert alone["q4_k_m"] > 0 and sum(encoded) == alone["q6_k"]  # q4_k_m's Q6_K: shared
    for outtype in ("q4_k_m", "q6_k"):
        (single,) = (tmp_path / outtype).glob("*-Q*.gguf")
        assert (tmp_path / "both" / single.name).read_bytes() == single.read_bytes()
