"""``mmconvert.api``: every function called directly on the example checkpoint (no click), the
errors a bad input raises (classes of ``mmconvert.errors``, ``ValueError`` s where that module
says so; never ``SystemExit``), warnings as ``RuntimeWarning``, and the example of
docs/api.md run as written."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from mmconvert import api
from mmconvert.errors import (
    BundleError,
    CheckpointError,
    MMConvertError,
    NonFiniteWeightsError,
    OutputError,
    ThresholdError,
    UnsupportedError,
    UsageError,
)

REPO = Path(__file__).resolve().parents[1]
PROJ = "multimodal_projector.projectors.m1.0.weight"  # F32 in the example checkpoint


@pytest.fixture(scope="module")
def gguf_bundle(example_ckpt, tmp_path_factory) -> api.ExportResult:
    return api.to_gguf(example_ckpt, tmp_path_factory.mktemp("api") / "gguf",
                       outtypes="q8_0")


def test_example_writes_a_checkpoint_inspect_reads(tmp_path):
    ckpt = api.example(tmp_path / "ckpt")
    assert (ckpt / "config.json").is_file()
    info = api.inspect(ckpt)
    assert info["dialect"] == "multimodal_qwen3"
    assert sorted(info["modalities"]) == ["m1", "m2"]
    assert set(info["plans"]) >= {"gguf", "hf", "safetensors"}
    json.dumps(info)  # what `inspect --json` prints
    with pytest.raises(OutputError):  # an existing folder without force
        api.example(ckpt)
    assert api.example(ckpt, force=True) == ckpt


def test_read_checkpoint_and_options_are_re_exported(example_ckpt):
    model = api.read_checkpoint(example_ckpt, api.read_options(rope_layout="neox"))
    assert model.text.rope_layout == "neox"
    assert api.ReadOptions is type(api.read_options())


def test_to_gguf(gguf_bundle):
    out = gguf_bundle.out
    assert gguf_bundle.files[-1] == "mmconvert.json" and gguf_bundle.plan is None
    assert all((out / name).is_file() for name in gguf_bundle.files)
    manifest = json.loads((out / "mmconvert.json").read_text())
    assert manifest["kind"] == "gguf"
    assert [e["quant"] for e in manifest["files"] if e.get("role") == "text"] == ["Q8_0"]


def test_dry_runs_write_nothing(example_ckpt, tmp_path):
    for export in (api.to_gguf, api.to_hf, api.to_safetensors):
        result = export(example_ckpt, tmp_path / "out", dry_run=True)
        assert result.out is None and result.files == [] and "plan" in result.plan
    assert not (tmp_path / "out").exists()


def test_to_hf_and_to_safetensors(example_ckpt, tmp_path):
    hf = api.to_hf(example_ckpt, tmp_path / "hf", dtype="bfloat16", max_shard_size="30KB")
    assert (hf.out / "model.safetensors.index.json").is_file()  # sharded at 30 KB
    assert "multimodal_projector/model.safetensors" in hf.files
    st = api.to_safetensors(example_ckpt, tmp_path / "st", naming="hf")
    assert st.out == tmp_path / "st" and "model.safetensors" in st.files
    assert json.loads((st.out / "mmconvert.json").read_text())["kind"] == "safetensors"


def test_verify_returns_its_result(example_ckpt, gguf_bundle, tmp_path):
    report = tmp_path / "verify.md"
    result = api.verify(example_ckpt, gguf_bundle.out, device="cpu", backends=["gguf_torch"],
                        markdown=report)
    assert result.passed and [t.status for t in result.targets] == ["pass"]
    assert report.is_file() and "| pass |" in report.read_text()
    # a parity failure is a verdict, not an exception (and never SystemExit)
    failed = api.verify(example_ckpt, [gguf_bundle.out], device="cpu", backends=["gguf_torch"],
                        thresholds=["top1=2"])  # unreachable, whatever the type
    assert not failed.passed and failed.targets[0].status == "fail"


def test_strict_and_warnings(example_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "nan"
    shutil.copytree(example_ckpt, ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    state[PROJ] = state[PROJ].clone()
    state[PROJ].view(-1)[0] = float("nan")
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.warns(RuntimeWarning, match="1 NaN"):
        api.to_safetensors(ckpt, tmp_path / "st")
    with pytest.raises(NonFiniteWeightsError):
        api.to_safetensors(ckpt, tmp_path / "strict", strict=True)
    assert not (tmp_path / "strict").exists()
    lines: list[str] = []
    api.to_hf(ckpt, tmp_path / "hf", warn=lines.append)
    assert any("1 NaN" in line for line in lines)


@pytest.mark.parametrize("call, error, is_value_error", [
    (lambda ckpt, tmp: api.inspect(tmp / "missing"), CheckpointError, True),
    (lambda ckpt, tmp: api.to_gguf(ckpt / "config.json", tmp / "o"), CheckpointError, True),
    (lambda ckpt, tmp: api.to_gguf(ckpt, tmp / "o", outtypes=["q3_x"]), UnsupportedError, True),
    (lambda ckpt, tmp: api.to_gguf(ckpt, tmp / "o", projector_outtype="q4_0"),
     UnsupportedError, True),
    (lambda ckpt, tmp: api.to_gguf(ckpt, tmp / "o", split_max_size="lots"), OutputError, False),
    (lambda ckpt, tmp: api.to_gguf(ckpt, ckpt), OutputError, False),  # the input itself
    (lambda ckpt, tmp: api.to_hf(ckpt, tmp / "o", dtype="float8"), UnsupportedError, True),
    (lambda ckpt, tmp: api.to_hf(ckpt, tmp / "o", max_shard_size="-1"), OutputError, False),
    (lambda ckpt, tmp: api.to_safetensors(ckpt, tmp / "o", naming="mine"), UsageError, True),
    (lambda ckpt, tmp: api.inspect(ckpt, rope_layout="sideways"), UsageError, True),
    (lambda ckpt, tmp: api.verify(ckpt, []), UsageError, True),
    (lambda ckpt, tmp: api.verify(ckpt, [tmp], backends=["onnx"]), UsageError, True),
    (lambda ckpt, tmp: api.verify(ckpt, [tmp], thresholds=["kld"]), ThresholdError, True),
    (lambda ckpt, tmp: api.verify(ckpt, [tmp], device="cpu"), BundleError, True),
    (lambda ckpt, tmp: api.push(ckpt, "alice/tiny"), BundleError, True),  # before the network
])
def test_bad_input_raises_the_error_class(example_ckpt, tmp_path, call, error, is_value_error):
    with pytest.raises(error) as caught:
        call(example_ckpt, tmp_path)
    assert isinstance(caught.value, MMConvertError)
    assert isinstance(caught.value, ValueError) is is_value_error
    assert not list(tmp_path.glob("o*"))


def test_push_refuses_a_malformed_repo_id_before_the_network(gguf_bundle):
    with pytest.raises(UsageError, match="OWNER/NAME|repo"):
        api.push(gguf_bundle.out, "not a repo id", token="hf_unused")


def test_unknown_read_option_is_a_type_error(example_ckpt):
    with pytest.raises(TypeError, match="rope"):
        api.inspect(example_ckpt, rope="neox")


def docs_example() -> str:
    text = (REPO / "docs" / "api.md").read_text(encoding="utf-8")
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_docs_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(docs_example(), "docs/api.md", "exec"), {})
    assert (tmp_path / "ckpt-gguf" / "mmconvert.json").is_file()
    assert (tmp_path / "ckpt-gguf-verify.md").is_file()
    assert "multimodal_qwen3" in capsys.readouterr().out
