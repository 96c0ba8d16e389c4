"""Correct bundles of every output type pass through every backend, within their thresholds."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mmconvert.cli import main
from mmconvert.convert.export_gguf import export_gguf
from mmconvert.convert.export_hf import export_hf
from mmconvert.convert.export_safetensors import export_safetensors
from mmconvert.convert.readers import ReadOptions, read_checkpoint
from mmconvert.runtime import llama_lib
from mmconvert.verify.thresholds import THRESHOLDS

GGUF_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


@pytest.fixture(scope="module")
def reference(example_ckpt, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    result = CliRunner().invoke(main, ["verify", str(example_ckpt), "--save-reference", str(path),
                                       "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return path


def run(ckpt, bundles, reference, *extra, tmp_path):
    report = tmp_path / "report.json"
    args = ["verify", str(ckpt), *map(str, bundles), "-q", "--device", "cpu",
            "--report-json", str(report), *extra]
    if reference is not None:
        args += ["--reference", str(reference)]
    result = CliRunner().invoke(main, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output, json.loads(report.read_text())


def test_every_gguf_output_type_passes(example_ckpt, reference, tmp_path):
    model = read_checkpoint(example_ckpt)
    export_gguf(model, tmp_path / "g", outtypes=GGUF_TYPES, projector_outtype="f32")
    code, out, report = run(example_ckpt, [tmp_path / "g"], reference, "--backend", "gguf_torch",
                            tmp_path=tmp_path)
    assert code == 0, out
    targets = {t["output_type"]: t for t in report["targets"]}
    assert set(targets) == {t.upper() for t in GGUF_TYPES}
    for kind, t in targets.items():
        assert t["status"] == "pass" and not t["causes"], (kind, t["causes"])
        assert t["tensors"]["checked"] == len(model.tensors)
        assert {c["name"]: c["passed"] for c in t["checks"]} == {"vocabulary": True}
    # exact types are exact through the torch forward: the same weights, the same code
    for kind in ("F32", "BF16"):
        assert targets[kind]["overall"]["max_abs"] < 1e-5
    assert targets["F16"]["overall"]["mean_kld"] < 1e-9
    # a quantized type is judged against its dequantized reference (the same code on the same
    # weights here: exact); its loss against the source sits well inside the type's limits
    # (margins documented in docs/verification.md), and coarser types lose more
    for kind in ("Q8_0", "Q5_0", "Q4_0"):
        assert targets[kind]["compared_with"] == "dequantized"
        assert targets[kind]["overall"]["max_abs"] == 0
    q8 = targets["Q8_0"]["quantization_loss"]
    assert q8["mean_kld"] < THRESHOLDS["Q8_0"]["mean_kld"] / 5
    assert targets["Q4_0"]["quantization_loss"]["mean_kld"] > \
        targets["Q5_0"]["quantization_loss"]["mean_kld"] > q8["mean_kld"]


def test_hf_and_safetensors_bundles_pass(example_ckpt, reference, tmp_path):
    model = read_checkpoint(example_ckpt)
    bundles = []
    for dtype in ("auto", "float16", "bfloat16", "float32"):
        export_hf(model, tmp_path / f"hf-{dtype}", dtype=dtype)
        export_safetensors(model, tmp_path / f"st-{dtype}", dtype=dtype,
                           naming="hf" if dtype == "float16" else "source")
        bundles += [tmp_path / f"hf-{dtype}", tmp_path / f"st-{dtype}"]
    code, out, report = run(example_ckpt, bundles, reference, tmp_path=tmp_path)
    assert code == 0, out
    types = {t["label"]: t["output_type"] for t in report["targets"]}
    assert types["hf-auto (hf)"] == "same" and types["st-auto (safetensors)"] == "same"
    # a cast counts as that type; bfloat16 of a bfloat16 source is the same dtype
    assert types["hf-float16 (hf)"] == "F16" and types["st-float32 (safetensors)"] == "F32"
    assert types["st-bfloat16 (safetensors)"] == "same"
    for t in report["targets"]:
        assert t["status"] == "pass", t
        checks = {c["name"]: c["passed"] for c in t["checks"]}
        assert checks.pop("tokenizer files") is True
        assert checks == ({"transformers loading": True} if t["backend"] == "hf" else {})
        if t["output_type"] == "same":
            assert t["overall"]["max_abs"] <= THRESHOLDS["same"]["max_abs"]


def test_interleaved_source_bundles_pass(example_ckpt, tmp_path):
    """A source trained with interleaved rope: the HF and GGUF bundles permute Q/K and their
    norms to rotate-half; verify undoes that for the tensor check and matches the logits."""
    model = read_checkpoint(example_ckpt, ReadOptions(rope_layout="interleaved"))
    export_hf(model, tmp_path / "hf")
    export_safetensors(model, tmp_path / "st")
    export_gguf(model, tmp_path / "g", outtypes=["f32"], projector_outtype="f32")
    code, out, _ = run(example_ckpt, [tmp_path / "hf", tmp_path / "st", tmp_path / "g"], None,
                       "--rope-layout", "interleaved", "--backend", "gguf_torch",
                       "--backend", "hf", "--backend", "safetensors", tmp_path=tmp_path)
    assert code == 0, out


@pytest.mark.llama
@pytest.mark.skipif(llama_lib.unavailable() is not None, reason="llama-cpp-python missing")
def test_llama_runtime_matches_for_every_gguf_type(example_ckpt, reference, tmp_path):
    model = read_checkpoint(example_ckpt)
    export_gguf(model, tmp_path / "g", outtypes=GGUF_TYPES, projector_outtype="f32")
    code, out, report = run(example_ckpt, [tmp_path / "g"], reference, "--backend", "gguf_llama",
                            tmp_path=tmp_path)
    assert code == 0, out
    for t in report["targets"]:
        assert t["status"] == "pass", t["causes"]
        checks = {c["name"]: c["passed"] for c in t["checks"]}
        assert checks == {"vocabulary": True, "tokenizer parity": True,
                          "end of generation": True}
    f32 = next(t for t in report["targets"] if t["output_type"] == "F32")
    assert f32["overall"]["max_abs"] < 1e-4  # exact attention: only summation order differs


def test_llama_backend_is_reported_skipped_without_llama_cpp(example_ckpt, reference, tmp_path,
                                                            monkeypatch):
    model = read_checkpoint(example_ckpt)
    export_gguf(model, tmp_path / "g", outtypes=["f16"])
    monkeypatch.setattr(llama_lib, "unavailable", lambda: "llama-cpp-python is not importable")
    code, out, report = run(example_ckpt, [tmp_path / "g"], reference, tmp_path=tmp_path)
    assert code == 0, out
    status = {t["backend"]: t["status"] for t in report["targets"]}
    assert status == {"gguf_llama": "skip", "gguf_torch": "pass"}
    assert "skipped: llama-cpp-python is not importable" in out


def test_qwen3_moe_bundles_pass(make_checkpoint, tmp_path):
    """Qwen3-MoE: the reference runs transformers' Qwen3-MoE; the GGUF is read back as
    llama.cpp's qwen3moe (stacked experts, router)."""
    ckpt = make_checkpoint(num_experts=4)
    model = read_checkpoint(ckpt)
    export_gguf(model, tmp_path / "g", outtypes=["f16", "q8_0"])
    export_safetensors(model, tmp_path / "st")
    code, out, report = run(ckpt, [tmp_path / "g", tmp_path / "st"], None, "--backend",
                            "gguf_torch", "--backend", "safetensors", tmp_path=tmp_path)
    assert code == 0, out
    assert {t["output_type"] for t in report["targets"]} == {"F16", "Q8_0", "same"}
    assert all(t["tensors"]["checked"] == len(model.tensors) for t in report["targets"])


def test_split_gguf_is_one_target(example_ckpt, reference, tmp_path):
    export_gguf(read_checkpoint(example_ckpt), tmp_path / "g", outtypes=["q8_0"],
                split_max_bytes=60_000)
    assert len(list((tmp_path / "g").glob("*-of-*.gguf"))) > 1
    code, out, report = run(example_ckpt, [tmp_path / "g"], reference, "--backend",
                            "gguf_torch", tmp_path=tmp_path)
    assert code == 0, out
    (target,) = report["targets"]
    assert "-00001-of-" in target["label"]
    assert len(target["files"]) == len(list((tmp_path / "g").glob("*.gguf")))


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.skipif(llama_lib.unavailable() is not None, reason="llama-cpp-python missing")
def test_llama_cpp_runs_every_k_mixture_with_parity(make_checkpoint, tmp_path):
    """Every llama-quantize mixture mmconvert writes (rows of 256: the K and IQ types, not
    their fallbacks) loads in llama.cpp, and its projector-injected logits pass against the
    dequantized reference with llama.cpp's input rounding, at the documented limits."""
    from mmconvert.formats.gguf_mixtures import MIXTURES

    ckpt = make_checkpoint(hidden_size=256, intermediate_size=512, head_dim=64)
    export_gguf(read_checkpoint(ckpt), tmp_path / "g", outtypes=[m.lower() for m in MIXTURES])
    code, out, report = run(ckpt, [tmp_path / "g"], None, "--backend", "gguf_llama",
                            "--greedy-tokens", "4", tmp_path=tmp_path)
    assert code == 0, out
    assert sorted(t["output_type"] for t in report["targets"]) == sorted(MIXTURES)
    for t in report["targets"]:
        assert t["status"] == "pass" and t["compared_with"] == "dequantized", t["causes"]
        assert t["input_rounding_sensitivity"] is None  # passed without widening
        assert {c["name"]: c["passed"] for c in t["checks"]}["tokenizer parity"]
