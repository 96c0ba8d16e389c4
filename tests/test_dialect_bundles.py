"""Issue 5's "done means" for the readers: a checkpoint in each dialect converts to all three
bundles and passes ``verify`` with every backend (llama.cpp included when installed); a LoRA
adapter that was not merged makes ``verify`` fail."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from mmconvert.cli import main
from mmconvert.convert.readers import read_checkpoint
from tests import dialect_builders as build


def _run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output + (result.stderr or "")


def convert_all(ckpt, out, source_args=()):
    bundles = []
    for command, name, extra in (("to-safetensors", "st", ()), ("to-hf", "hf", ()),
                                 ("to-gguf", "gguf", ("--outtype", "f32", "--outtype", "q8_0",
                                                      "--projector-outtype", "f32"))):
        code, output = _run(command, ckpt, "-o", out / name, *source_args, *extra)
        assert code == 0, output
        bundles.append(out / name)
    return bundles


def verify(ckpt, bundles, source_args=(), tmp_path=None):
    report = tmp_path / "report.json"
    code, output = _run("verify", ckpt, *bundles, *source_args, "-q", "--device", "cpu",
                        "--report-json", report)
    return code, output, json.loads(report.read_text())


DIALECTS = ["prefixed", "fused-gate-up", "llava-old", "llava-new", "qwen3+projector", "lora"]


@pytest.mark.slow
@pytest.mark.parametrize("dialect", DIALECTS)
def test_dialect_converts_and_verifies(make_checkpoint, tmp_path, dialect):
    source_args: tuple = ()
    if dialect == "prefixed":
        ckpt = build.prefixed(make_checkpoint(), tmp_path / "c")
    elif dialect == "fused-gate-up":
        ckpt = build.fused_gate_up(make_checkpoint(), tmp_path / "c", gate_first=False)
    elif dialect.startswith("llava"):
        seed = make_checkpoint(layer_norm=False, modalities={"vision": {"input_dim": 40}})
        ph = read_checkpoint(seed).multimodal_token_id
        ckpt = build.llava(seed, tmp_path / "c", ph, layout=dialect.split("-")[1])
    elif dialect == "qwen3+projector":
        ckpt, projector = build.qwen3_with_projector(make_checkpoint(), tmp_path / "c")
        source_args = ("--projector", projector)
    else:
        base = make_checkpoint(dtype="float32")
        ckpt = build.lora_adapter(base, tmp_path / "adapter")
        source_args = ("--base", base)
    bundles = convert_all(ckpt, tmp_path, source_args)
    code, output, report = verify(ckpt, bundles, source_args, tmp_path)
    assert code == 0, output
    backends = {t["backend"] for t in report["targets"]}
    assert {"safetensors", "hf", "gguf_torch"} <= backends
    assert all(t["status"] in ("pass", "skipped") for t in report["targets"]), output


@pytest.mark.slow
def test_unmerged_lora_fails_verify(make_checkpoint, tmp_path):
    """Bundles of the base alone do not compute the adapted model: verify says so."""
    base = make_checkpoint(dtype="float32")
    adapter = build.lora_adapter(base, tmp_path / "adapter")
    bundles = convert_all(base, tmp_path)  # the adapter was forgotten
    code, output, report = verify(adapter, bundles, ("--base", base), tmp_path)
    assert code == 1, output
    failed = [t for t in report["targets"] if t["status"] == "fail"]
    assert failed and any("q_proj" in json.dumps(t["causes"]) for t in failed), output
