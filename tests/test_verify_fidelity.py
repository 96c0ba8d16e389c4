"""A quantized GGUF is judged on its conversion (runtime against the reference forward on its
own dequantized weights); its loss against the source is reported, and fails only under the
user's quality gate, in words that do not blame the bundle."""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from mmconvert import api
from mmconvert.cli import main
from mmconvert.runtime import llama_lib
from mmconvert.verify.fidelity import QualityGates
from tests.hostile.harness import reseal_manifest

BACKENDS = ["gguf_torch"] + (["gguf_llama"] if llama_lib.unavailable() is None else [])


@pytest.fixture(scope="module")
def q8(example_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("fidelity")
    api.to_gguf(example_ckpt, root / "gguf", outtypes=["q8_0"], projector_outtype="f16")
    ref = root / "ref.safetensors"
    api.verify(example_ckpt, save_reference=ref, device="cpu")
    return root / "gguf", ref


def run(ckpt, bundle, ref, tmp_path, *extra):
    out = tmp_path / "report.json"
    args = ["verify", str(ckpt), str(bundle), "--reference", str(ref), "-q", "--device", "cpu",
            "--report-json", str(out), *[a for b in BACKENDS for a in ("--backend", b)], *extra]
    result = CliRunner().invoke(main, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output, json.loads(out.read_text())


def test_correct_q8_0_passes_on_fidelity_with_its_loss_reported(example_ckpt, q8, tmp_path):
    code, output, doc = run(example_ckpt, *q8, tmp_path)
    assert code == 0, output
    for t in doc["targets"]:
        assert t["compared_with"] == "dequantized" and t["status"] == "pass"
        assert 0 < t["quantization_loss"]["mean_kld"] < 1e-2  # rounding moved something
        assert t["quality_gate_failures"] == []
    # gguf_torch runs the same code on the same weights as the dequantized reference
    torch_target = next(t for t in doc["targets"] if t["backend"] == "gguf_torch")
    assert torch_target["overall"]["max_abs"] <= 1e-3
    assert "quantization loss against the source" in output and "not a conversion error" in output
    assert any(s["name"] == "dequantized ckpt-124K-Q8_0.gguf" for s in doc["stages"])


def test_quality_gate_fails_on_loss_without_blaming_the_bundle(example_ckpt, q8, tmp_path):
    code, output, doc = run(example_ckpt, *q8, tmp_path, "--max-kld", "1e-9", "--min-top1",
                            "0.5")
    assert code == 1, output
    assert "FAILED" not in output and "differs from the checkpoint" not in output
    assert "above your quality gate (mean KLD" in output and "--max-kld 1e-09" in output
    assert "the conversion itself is faithful" in output
    assert "FAIL: quantization loss above the quality gate" in output
    assert all(t["quality_gate_failures"] and not t["causes"] for t in doc["targets"])


def test_gate_messages():
    gates = QualityGates(max_kld=0.1, min_top1=0.9)
    assert gates.failures({"mean_kld": 0.05, "top1": 0.95}) == []
    assert gates.failures({"mean_kld": 0.71, "top1": 0.71}) == [
        "mean KLD 0.71 > --max-kld 0.1", "top-1 71.0% < --min-top1 90.0%"]
    assert gates.failures({"mean_kld": float("nan"), "top1": 1.0})  # NaN never passes
    assert QualityGates().failures({"mean_kld": 5.0, "top1": 0.0}) == []


def _rewrite(path, kv=None, tensors=None):
    reader = gguf.GGUFReader(str(path))
    tmp = path.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, (kv or {}).get(key, field.contents()), field.types[0], sub)
    for t in reader.tensors:
        data = np.array(t.data)
        writer.add_tensor(t.name, tensors(t.name, data) if tensors else data,
                          raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)


@pytest.mark.parametrize("bug", ["metadata", "weights"])
def test_conversion_bugs_in_a_quantized_bundle_still_fail_as_such(example_ckpt, q8, tmp_path,
                                                                  bug):
    """A declared hyper-parameter differs: the runtime's logits leave the dequantized
    reference. A corrupted row: the dequantized reference carries it too, so the tensor check
    (bit-exact against the source's quantization) is what fails it."""
    bundle, ref = q8
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    text = next(out.glob("*-Q8_0.gguf"))
    if bug == "metadata":
        _rewrite(text, kv={"qwen3.attention.layer_norm_rms_epsilon": 0.5})
    else:
        def corrupt(name, data):
            if name == "blk.0.ffn_down.weight":
                data = data.copy()
                data[3] = data[3][::-1]  # a row's blocks in reverse byte order
            return data

        _rewrite(text, tensors=corrupt)
    reseal_manifest(out)
    code, output, doc = run(example_ckpt, out, ref, tmp_path)
    assert code == 1, output
    assert "FAIL: at least one bundle differs from the checkpoint" in output
    for t in doc["targets"]:
        assert t["status"] == "fail" and t["causes"], t
        needle = "rms_norm_eps" if bug == "metadata" else "blk.0.ffn_down.weight"
        assert any(needle in c for c in t["causes"]), t["causes"]


# ---------------------------------------------------------------------------------------------
# a model that amplifies rounding: llama.cpp's own input rounding must not read as a bug


def _wild(ckpt) -> None:
    """Replace every language-model weight by random bf16 values of magnitude 2^-7..1 with
    random signs (the bench generator's weights): 24 such layers amplify any rounding."""
    import torch
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(0)
    path = ckpt / "model.safetensors"
    state = load_file(str(path))
    for name, value in state.items():
        if name.startswith("language_model."):
            bits = rng.integers(0, 1 << 16, size=value.numel(), dtype=np.uint16)
            exponent = (bits >> np.uint16(4)) & np.uint16(0x7)
            bits = (bits & np.uint16(0x807F)) | ((exponent + np.uint16(120)) << np.uint16(7))
            state[name] = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16) \
                .reshape(value.shape)
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def wild(tmp_path_factory):
    from testkit.checkpoints import ExampleOptions, write_checkpoint

    root = tmp_path_factory.mktemp("wild")
    ckpt = write_checkpoint(root / "ckpt", ExampleOptions(
        num_hidden_layers=24, hidden_size=256, intermediate_size=512, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64))
    _wild(ckpt)
    api.to_gguf(ckpt, root / "gguf", outtypes=["f16", "q8_0"])
    ref = root / "ref.safetensors"
    api.verify(ckpt, save_reference=ref, device="cpu")
    return ckpt, root / "gguf", ref


def _llama(doc, output_type):
    return next(t for t in doc["targets"]
                if t["backend"] == "gguf_llama" and t["output_type"] == output_type)


@pytest.mark.slow
@pytest.mark.skipif(llama_lib.unavailable() is not None, reason="llama-cpp-python missing")
def test_llama_cpps_input_rounding_is_not_blamed_on_the_bundle(wild, tmp_path, monkeypatch):
    """F16: llama.cpp rounds an F16 weight's inputs to F16, which alone moves this model past
    the F16 limits against the source; against the stored weights with inputs rounded so it
    passes. Q8_0: judged against the dequantized weights with Q8_0-rounded inputs; with the
    limits made too tight for what the emulation leaves, the model's measured sensitivity to
    that rounding widens them, and the report says by how much."""
    ckpt, bundle, ref = wild
    code, output, doc = run(ckpt, bundle, ref, tmp_path, "--backend", "gguf_llama")
    assert code == 0, output
    f16 = _llama(doc, "F16")
    assert f16["compared_with"] == "dequantized" and f16["status"] == "pass", f16
    assert any(s["name"] == "dequantized ckpt-14M-F16.gguf, llama.cpp input rounding"
               for s in doc["stages"])
    assert _llama(doc, "Q8_0")["compared_with"] == "dequantized"

    from mmconvert.verify import fidelity

    monkeypatch.setitem(fidelity.FIDELITY_LIMITS, "gguf_llama", {"mean_kld": 1e-6,
                                                                 "top1": 0.999})
    code, output, doc = run(ckpt, bundle, ref, tmp_path, "--backend", "gguf_llama")
    q8 = _llama(doc, "Q8_0")
    sensitivity = q8["input_rounding_sensitivity"]
    assert sensitivity is not None and sensitivity["mean_kld"] > q8["overall"]["mean_kld"], q8
    assert q8["thresholds"]["mean_kld"] == pytest.approx(sensitivity["mean_kld"])
    assert q8["status"] == "pass" and code == 0, output
    assert "llama.cpp's input rounding alone moves this model by mean KLD" in output
