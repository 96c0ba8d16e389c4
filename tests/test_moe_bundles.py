"""Qwen3-MoE text models through every bundle: the HF folder is a standard Qwen3-MoE model
(per-expert tensors as ``save_pretrained`` writes them), the safetensors bundle gives the
source's own tensors back bit for bit, and ``verify`` passes every backend, for checkpoints
with per-expert and with transformers-5 fused experts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from mmconvert.cli import main
from mmconvert.convert.export_gguf import export_gguf
from mmconvert.convert.export_hf import export_hf
from mmconvert.convert.export_safetensors import export_safetensors
from mmconvert.convert.readers import read_checkpoint
from mmconvert.runtime import llama_lib
from tests.independent_reference import SeedModel, _state_dict

FORMATS = ["per_expert", "fused"]
MOE = {"num_experts": 4, "num_experts_per_tok": 2}


def _names(path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


@pytest.fixture(scope="module")
def moe_bundles(make_checkpoint, tmp_path_factory):
    """(checkpoint, HF bundle, safetensors bundle) per experts format, exported once."""
    out = {}
    for fmt in FORMATS:
        ckpt = make_checkpoint(**MOE, experts_format=fmt)
        root = tmp_path_factory.mktemp(f"moe-{fmt}")
        model = read_checkpoint(ckpt)
        export_hf(model, root / "hf")
        export_safetensors(model, root / "st", max_shard_bytes=40_000)
        out[fmt] = (ckpt, root / "hf", root / "st", model)
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_hf_bundle_is_a_standard_qwen3_moe_folder(moe_bundles, fmt):
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

    ckpt, hf, _, model = moe_bundles[fmt]
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"],
            cfg["norm_topk_prob"]) == (4, 2, 32, True)
    assert cfg["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_mmqwen3.MultimodalQwen3MoeForCausalLM"
    names = set(_names(hf / "model.safetensors"))
    experts = {n for n in names if ".mlp.experts." in n}
    assert experts == {f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
                       for i in range(2) for e in range(4) for p in ("gate", "up", "down")}
    plain, info = AutoModelForCausalLM.from_pretrained(hf, output_loading_info=True,
                                                       dtype=torch.float32,
                                                       attn_implementation="eager")
    assert type(plain) is Qwen3MoeForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = [5, 17, 42, 99, 3]
    with torch.no_grad():
        got = plain(input_ids=torch.tensor([ids])).logits[0]
    assert (got - SeedModel(ckpt).logits(ids)).abs().max() <= 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_remote_code_with_mm_inputs_matches_the_seed(moe_bundles, fmt):
    from transformers import AutoModelForCausalLM

    ckpt, hf, _, model = moe_bundles[fmt]
    remote = AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True,
                                                  dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    assert type(remote).__name__ == "MultimodalQwen3MoeForCausalLM"
    seed = SeedModel(ckpt)
    ph = model.multimodal_token_id
    gen = torch.Generator().manual_seed(0)
    mm = {"m1": [torch.randn(2, 48, generator=gen)], "m2": [torch.randn(80, generator=gen)]}
    for ids in ([5, ph, ph, 6, ph, 7], [8, 9]):  # placeholders, then prepended rows
        with torch.no_grad():
            got = remote(input_ids=torch.tensor([ids]), mm_inputs=mm).logits[0]
        assert (got - seed.logits(ids, mm)).abs().max() <= 1e-5
    out = remote.generate(torch.tensor([[5, ph, ph, 6, ph, 7]]), mm_inputs=mm,
                          max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("fmt", FORMATS)
def test_safetensors_bundle_is_bit_exact(moe_bundles, fmt):
    ckpt, _, st, model = moe_bundles[fmt]
    source = _state_dict(ckpt)
    bundle = {}
    for f in sorted(st.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            bundle.update({k: sf.get_tensor(k) for k in sf.keys()})  # noqa: SIM118
    assert set(bundle) == set(source)
    for name, tensor in source.items():
        assert bundle[name].dtype == tensor.dtype and bundle[name].shape == tensor.shape, name
        assert torch.equal(bundle[name].view(torch.uint8), tensor.view(torch.uint8)), name
    # and it reads back as the same model
    again = read_checkpoint(st)
    for name in model.tensors:
        assert np.array_equal(again.tensors[name].read(), model.tensors[name].read()), name


def test_safetensors_hf_naming_writes_experts_like_the_hf_bundle(moe_bundles, tmp_path):
    _, hf, _, model = moe_bundles["fused"]
    export_safetensors(model, tmp_path / "st", naming="hf")
    lm = set(_names(hf / "model.safetensors"))
    assert lm <= set(_names(tmp_path / "st" / "model.safetensors"))


@pytest.mark.llama
@pytest.mark.skipif(llama_lib.unavailable() is not None, reason="llama-cpp-python missing")
@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_passes_every_moe_bundle(moe_bundles, fmt, tmp_path):
    """HF, safetensors and GGUF (F16 and Q8_0, through gguf-py + torch and through llama.cpp)
    at the default thresholds; every tensor of every bundle checked."""
    ckpt, hf, st, model = moe_bundles[fmt]
    export_gguf(model, tmp_path / "g", outtypes=["f16", "q8_0"])
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["verify", str(ckpt), str(hf), str(st), str(tmp_path / "g"),
                                       "-q", "--device", "cpu", "--report-json", str(report)])
    assert result.exit_code == 0, result.output
    targets = json.loads(report.read_text())["targets"]
    assert {(t["backend"], t["output_type"]) for t in targets} == {
        ("hf", "same"), ("safetensors", "same"), ("gguf_torch", "F16"), ("gguf_torch", "Q8_0"),
        ("gguf_llama", "F16"), ("gguf_llama", "Q8_0")}
    for t in targets:
        assert t["status"] == "pass", t["causes"]
        assert t["tensors"]["checked"] == len(model.tensors), t["label"]


def test_plain_qwen3_moe_folder_with_a_projector_file(moe_bundles, tmp_path):
    from mmconvert.convert.readers import ReadOptions
    from tests.dialect_builders import qwen3_with_projector

    ckpt, _, _, model = moe_bundles["per_expert"]
    qwen, projector = qwen3_with_projector(ckpt, tmp_path)
    again = read_checkpoint(qwen, ReadOptions(projector=projector))
    assert again.text.is_moe and again.tensors.names() == model.tensors.names()
    for name in model.tensors:
        assert np.array_equal(again.tensors[name].read(), model.tensors[name].read()), name


def test_experts_out_of_order_are_caught(moe_bundles, tmp_path):
    """A writer that numbers experts wrongly: the HF tensors of experts 0 and 1 swapped."""
    from tests.test_verify_mutations import assert_caught, edit_safetensors, tree_copy, verify

    ckpt, hf, _, _ = moe_bundles["per_expert"]
    bundle = tree_copy(hf, tmp_path / "hf")
    a, b = (f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in (0, 1))
    edit_safetensors(bundle / "model.safetensors",
                     lambda t: t.update({a: t[b], b: t[a]}))
    code, out = verify(ckpt, bundle, None, "--backend", "hf")
    assert_caught(code, out, "model.layers.1.mlp.experts.*.down_proj.weight",
                  "experts are out of order (expert 0 holds expert 1, expert 1 holds expert 0)",
                  "logits:")


def test_fused_experts_with_halves_swapped_are_caught(moe_bundles, tmp_path):
    """The source-layout bundle of transformers-5 fused experts, fused back up-half first."""
    from tests.test_verify_mutations import assert_caught, edit_safetensors, tree_copy, verify

    ckpt, _, st, _ = moe_bundles["fused"]
    bundle = tree_copy(st, tmp_path / "st")
    name = "language_model.model.layers.0.mlp.experts.gate_up_proj"
    files = [f for f in bundle.glob("*.safetensors") if name in _names(f)]

    def swap(t):
        half = t[name].shape[1] // 2
        t[name] = np.concatenate([t[name][:, half:], t[name][:, :half]], axis=1)

    edit_safetensors(files[0], swap)
    code, out = verify(ckpt, bundle, None, "--backend", "safetensors")
    assert_caught(code, out, "model.layers.0.mlp.experts.gate_proj",
                  "holds the checkpoint's model.layers.0.mlp.experts.up_proj: the two are swapped")
