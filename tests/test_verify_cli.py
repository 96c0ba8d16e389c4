"""``mmconvert verify``: exit codes, reports and golden references end to end."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from mmconvert.cli import main
from mmconvert.convert.export_safetensors import export_safetensors
from mmconvert.convert.readers import read_checkpoint
from tests.hostile.harness import reseal_manifest


@pytest.fixture(scope="module")
def st_bundle(example_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("st") / "st"
    export_safetensors(read_checkpoint(example_ckpt), out)
    return out


def invoke(*args: str):
    result = CliRunner().invoke(main, ["verify", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_pass_writes_every_report(example_ckpt, st_bundle, tmp_path):
    files = {k: tmp_path / f"r.{k}" for k in ("json", "xml", "md")}
    result = invoke(example_ckpt, st_bundle, "--device", "cpu", "--report-json", files["json"],
                    "--junit", files["xml"], "--markdown", files["md"])
    assert result.exit_code == 0, result.output
    assert "PASS: every bundle matches the checkpoint" in result.output
    # progress goes to stderr while it works
    assert "reference: case long" in result.stderr and "[safetensors]: PASS" in result.stderr
    report = json.loads(files["json"].read_text())
    assert report["passed"] is True
    (target,) = report["targets"]
    assert target["output_type"] == "same" and target["overall"]["max_abs"] == 0
    assert [c["name"] for c in target["cases"]] == [c["name"] for c in report["cases"]]
    assert all(c["generated"] == 8 for c in report["cases"])
    suites = ET.parse(files["xml"]).getroot()
    assert suites.get("failures") == "0" and int(suites.get("tests")) >= 10
    names = [tc.get("name") for tc in suites.iter("testcase")]
    assert "facts" in names and "case long" in names and "tokenizer files" in names
    md = files["md"].read_text()
    assert md.startswith("### Logit parity (`mmconvert verify`)")
    assert "| st (safetensors) | safetensors | same |" in md and "pass |" in md
    # a well-formed table: every row has as many (unescaped) cells as the header
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 3 and len({len(re.split(r"(?<!\\)\|", r)) for r in rows}) == 1


def test_failure_exits_1_and_reports_it(example_ckpt, st_bundle, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in st_bundle.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((broken / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-5
    (broken / "config.json").write_text(json.dumps(cfg))
    reseal_manifest(broken)  # as a buggy writer would have: a parity failure, not tampering
    xml = tmp_path / "j.xml"
    md = tmp_path / "m.md"
    result = invoke(example_ckpt, broken, "--device", "cpu", "-q", "--junit", xml,
                    "--markdown", md)
    assert result.exit_code == 1
    assert "FAIL: at least one bundle differs" in result.output
    assert "text.rms_norm_eps: the bundle says 1e-05, the checkpoint 1e-06" in result.output
    failures = [f.get("message") for f in ET.parse(xml).getroot().iter("failure")]
    assert any("rms_norm_eps" in m for m in failures)
    assert "**FAIL**" in md.read_text()
    # a threshold override can make the logit check pass, never the facts
    result = invoke(example_ckpt, broken, "--device", "cpu", "-q", "--threshold",
                    "max_abs=1")
    assert result.exit_code == 1 and "logits:" not in result.output


@pytest.mark.parametrize("args, message", [
    ((), "nothing to do"),
    (("--threshold", "bogus=1"), "unknown metric"),
    (("--device", "cuda"), "torch sees no CUDA device"),
    (("--reference", "r.safetensors", "--save-reference", "s.safetensors"), "exclude each other"),
    (("--reference", "r.safetensors", "--cases", "c.safetensors"), "carries its own cases"),
])
def test_usage_errors_exit_2(example_ckpt, st_bundle, args, message):
    if args and args[0] == "--device" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    bundles = () if not args else (st_bundle,)
    result = invoke(example_ckpt, *bundles, *args, "-q")
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_input_errors_exit_2(example_ckpt, tmp_path):
    result = invoke(example_ckpt, tmp_path / "nope", "-q", "--device", "cpu")
    assert result.exit_code == 2 and "no such bundle folder" in result.output
    (tmp_path / "empty").mkdir()
    result = invoke(example_ckpt, tmp_path / "empty", "-q", "--device", "cpu")
    assert result.exit_code == 2 and "no mmconvert.json" in result.output
    result = invoke(tmp_path / "missing-ckpt", tmp_path / "empty", "-q")
    assert result.exit_code == 2 and "no such checkpoint folder" in result.output


def test_save_reference_then_compare(example_ckpt, st_bundle, tmp_path):
    ref = tmp_path / "ref.safetensors"
    result = invoke(example_ckpt, "--save-reference", ref, "--device", "cpu", "-q")
    assert result.exit_code == 0, result.output
    with safe_open(str(ref), "pt") as f:
        meta = json.loads(f.metadata()["mmconvert.reference"])
        assert f.get_tensor("logits.0").dtype == torch.float32
        n_cases = len(json.loads(f.metadata()["mmconvert.cases"])["cases"])
        assert all(f"logits.{i}" in f.keys() for i in range(n_cases))  # noqa: SIM118
    assert len(meta["checkpoint"]["content_hash"]) == 64
    assert {x["name"] for x in meta["checkpoint"]["files"]} >= {"model.safetensors",
                                                                "config.json", "tokenizer.json"}
    assert meta["reference"]["logits_dtype"] == "float32"
    assert meta["environment"]["torch"] == torch.__version__
    result = invoke(example_ckpt, st_bundle, "--reference", ref, "-q", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert f"reference: {ref}" in result.output


def test_reference_refused_for_another_checkpoint(example_ckpt, make_checkpoint, st_bundle,
                                                  tmp_path):
    ref = tmp_path / "ref.safetensors"
    assert invoke(example_ckpt, "--save-reference", ref, "-q", "--device", "cpu").exit_code == 0
    other = make_checkpoint(seed=5)
    result = invoke(other, st_bundle, "--reference", ref, "-q", "--device", "cpu")
    assert result.exit_code == 2
    assert "made from a different checkpoint" in result.output
    assert "model.safetensors" in result.output  # which files differ


def test_user_cases_file(example_ckpt, st_bundle, tmp_path):
    from mmconvert.verify.cases import Case, write_cases_file

    model = read_checkpoint(example_ckpt)
    cases = [Case("mine", "a user case", [5, model.multimodal_token_id, 9],
                  {"m2": [torch.randn(80)]}, generate=4)]
    path = tmp_path / "cases.safetensors"
    write_cases_file(path, cases)
    report = tmp_path / "r.json"
    result = invoke(example_ckpt, st_bundle, "--cases", path, "--report-json", report, "-q",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert [c["name"] for c in data["cases"]] == ["mine"]
    assert data["cases"][0]["generated"] == 4


def test_ci_recipe_uses_real_options():
    """Every mmconvert option the CI recipe passes exists (the recipe cannot drift)."""
    import re
    import shlex
    from pathlib import Path

    yaml = pytest.importorskip("yaml")
    recipe = Path(__file__).parent.parent / "docs" / "ci" / "mmconvert-verify.yml"
    doc = yaml.safe_load(recipe.read_text())
    runs = [step["run"] for job in doc["jobs"].values() for step in job["steps"] if "run" in step]
    commands = [line for run in runs for line in run.replace("\\\n", " ").splitlines()
                if line.strip().startswith("mmconvert ")]
    assert any(" verify " in c and "--reference" in c and "--junit" in c for c in commands)
    assert any("--save-reference" in c for c in commands)
    for line in commands:
        words = shlex.split(re.sub(r"#.*", "", line))
        command = main.commands[words[1]]
        known = {o for p in command.params for o in p.opts}
        for word in words[2:]:
            if word.startswith("--"):
                assert word in known, f"{word} is not an option of mmconvert {words[1]}"
