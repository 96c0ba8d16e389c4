"""``mmconvert inspect`` names every transform each export would apply, without reading a
tensor."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mmconvert.cli import main
from mmconvert.convert.plan_summary import planned_transforms
from mmconvert.convert.readers import read_checkpoint
from mmconvert.convert.tensors import TensorRef

GATED_LOW_RANK = {"modalities": {
    "m1": {"input_dim": 48, "projector_type": "swiglu", "fused_gate_up": True,
           "gate": {"kind": "tanh", "complementary": True}},
    "m2": {"input_dim": 64, "projector_type": "low_rank", "rank": 8}}}


def inspect_json(ckpt, *extra: str) -> dict:
    result = CliRunner().invoke(main, ["inspect", str(ckpt), "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def transforms(summary: dict, target: str) -> dict[str, int]:
    return {name: e["tensors"] for name, e in summary["plans"][target]["transforms"].items()}


def test_each_target_lists_its_transforms(make_checkpoint):
    ckpt = make_checkpoint(**GATED_LOW_RANK)
    plain = inspect_json(ckpt)
    gguf = transforms(plain, "gguf")
    assert gguf["apply_tanh_gate"] == 1 and gguf["split_gate_up"] == 4  # gate/up weight + bias
    assert "fold_linear" not in gguf
    assert "apply_tanh_gate" not in transforms(plain, "hf")  # HF keeps the raw gate
    st = transforms(plain, "safetensors")
    assert st == {"split_gate_up": 2, "fuse_gate_up": 2}  # fused back as the source had it
    steps = plain["plans"]["gguf"]["transforms"]["apply_tanh_gate"]["steps"]
    assert steps == ["apply_tanh_gate(complementary=True)"]
    folded = inspect_json(ckpt, "--fold-linear")
    assert transforms(folded, "gguf")["fold_linear"] == 2
    assert transforms(folded, "hf")["fold_linear"] == 2
    text = CliRunner().invoke(main, ["inspect", str(ckpt), "--fold-linear"]).output
    assert "transforms each export applies (default options, --fold-linear):" in text
    assert "fold_linear(up @ down)" in text and "m2: input 64 -> hidden 8 -> 64, low_rank" in text


def test_moe_and_interleaved_transforms(make_checkpoint):
    ckpt = make_checkpoint(num_experts=4, experts_format="fused")
    summary = inspect_json(ckpt, "--rope-layout", "interleaved")
    hf, gguf = transforms(summary, "hf"), transforms(summary, "gguf")
    assert hf["select_expert"] == 2 * 3 * 4  # layers x projections x experts
    assert hf["interleaved_to_neox"] == gguf["interleaved_to_neox"] == 2 * 4  # q, k, norms
    assert transforms(summary, "safetensors")["fuse_gate_up"] == 2  # one per layer


def test_a_target_that_cannot_be_exported_says_why(make_checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "c"
    shutil.copytree(make_checkpoint(num_experts=4), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["norm_topk_prob"] = False
    (ckpt / "config.json").write_text(json.dumps(cfg))
    summary = inspect_json(ckpt)
    assert "norm_topk_prob" in summary["plans"]["gguf"]["error"]
    assert "error" not in summary["plans"]["hf"]
    text = CliRunner().invoke(main, ["inspect", str(ckpt)]).output
    assert "gguf: cannot export: norm_topk_prob is false" in text


def test_planning_reads_no_tensor(make_checkpoint, monkeypatch):
    """Plans are lazy: inspect stays a header read even for a large model."""
    model = read_checkpoint(make_checkpoint(**GATED_LOW_RANK))

    def refuse(*_):
        raise AssertionError("a tensor was read while planning")

    monkeypatch.setattr(TensorRef, "read", refuse)
    monkeypatch.setattr(TensorRef, "read_rows", refuse)
    plans = planned_transforms(model, fold_linear=True)
    assert set(plans) == {"gguf", "hf", "safetensors"}
    assert all("error" not in p for p in plans.values())


@pytest.mark.parametrize("target", ["gguf", "hf", "safetensors"])
def test_counts_match_the_plans(make_checkpoint, target):
    from mmconvert.convert.plan_gguf import plan_gguf
    from mmconvert.convert.plan_hf import plan_hf
    from mmconvert.convert.plan_mmproj import plan_mmproj
    from mmconvert.convert.plan_safetensors import plan_safetensors

    model = read_checkpoint(make_checkpoint(**GATED_LOW_RANK))
    plans = {"gguf": lambda: [plan_gguf(model), plan_mmproj(model)],
             "hf": lambda: list(plan_hf(model)),
             "safetensors": lambda: [plan_safetensors(model)]}[target]()
    expected: dict[str, int] = {}
    for plan in plans:
        for name, n in plan.transform_counts().items():
            expected[name] = expected.get(name, 0) + n
    summary = planned_transforms(model)[target]
    assert {k: v["tensors"] for k, v in summary["transforms"].items()} == expected
    assert summary["tensors"] == sum(len(p.tensors) for p in plans)
