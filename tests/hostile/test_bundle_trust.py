"""issue 9, item 3: ``verify`` imports no code from a bundle that mmconvert did not write, and
reads no bundle file that does not match the bundle's ``mmconvert.json``.

A tampered ``modeling_mmqwen3.py`` plants a payload that creates a marker file at import: it
must not run unless ``--trust-bundle-code`` is given. Most cases are refused before the
reference runs, so they cost one CLI start each; two cases run a whole verify (against one
saved reference).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmconvert.convert.export_gguf import export_gguf
from mmconvert.convert.export_hf import export_hf
from mmconvert.convert.export_safetensors import export_safetensors
from mmconvert.convert.readers import read_checkpoint
from tests.hostile.harness import assert_refused, reseal_manifest, run_cli, tree_digest

MODELING = "modeling_mmqwen3.py"


@pytest.fixture(scope="module")
def bundles(example_ckpt, tmp_path_factory) -> Path:
    """Correct bundles of every kind (one GGUF without checksums) and a saved reference.
    Read-only: tests copy a bundle before changing it."""
    root = tmp_path_factory.mktemp("trust")
    model = read_checkpoint(example_ckpt)
    export_hf(model, root / "hf")
    export_safetensors(model, root / "st")
    export_gguf(model, root / "gguf", outtypes=["f16"])
    export_gguf(model, root / "gguf-nosum", outtypes=["f16"], checksums=False)
    result = run_cli("verify", example_ckpt, "--save-reference", root / "ref.safetensors",
                     "--device", "cpu", "-q", timeout=300)
    assert result.returncode == 0, result.stderr
    return root


def copy_bundle(bundles: Path, kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundles / kind, tmp_path / kind))


def verify(ckpt: Path, bundles: Path, bundle: Path, *extra: str):
    return run_cli("verify", ckpt, bundle, "--reference", bundles / "ref.safetensors",
                   "--device", "cpu", "-q", *extra, timeout=300)


def payload(marker: Path) -> str:
    """Python that leaves ``marker`` behind when it is imported."""
    return f"\nimport pathlib as _pathlib\n_pathlib.Path({str(marker)!r}).write_text('ran')\n"


def plant(bundle: Path, marker: Path) -> None:
    """The real remote code with a payload appended: the model still works."""
    with open(bundle / MODELING, "a", encoding="utf-8") as f:
        f.write(payload(marker))


def edit_config(bundle: Path, fn) -> None:
    config = json.loads((bundle / "config.json").read_text())
    fn(config)
    (bundle / "config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------------------------
# code


@pytest.mark.parametrize("resealed", [False, True], ids=["manifest-stale", "manifest-resealed"])
def test_tampered_remote_code_is_not_run(example_ckpt, bundles, tmp_path, resealed):
    """Refused against the manifest, and against the template even when the manifest was
    rewritten to match the payload."""
    bundle, marker = copy_bundle(bundles, "hf", tmp_path), tmp_path / "ran"
    plant(bundle, marker)
    if resealed:
        reseal_manifest(bundle)
    before = tree_digest(bundle, example_ckpt)
    result = verify(example_ckpt, bundles, bundle)
    assert_refused(result, needle=MODELING, markers=(marker,), before=before,
                   inputs=(bundle, example_ckpt))
    assert "--trust-bundle-code" in result.stderr


def test_trust_bundle_code_runs_it_and_warns(example_ckpt, bundles, tmp_path):
    bundle, marker = copy_bundle(bundles, "hf", tmp_path), tmp_path / "ran"
    plant(bundle, marker)
    result = verify(example_ckpt, bundles, bundle, "--trust-bundle-code")
    assert result.returncode == 0, result.stderr
    assert marker.exists(), "the user consented: the bundle's code ran"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and MODELING in warnings[0], result.stderr
    assert not result.error_lines


@pytest.mark.parametrize("redirect", ["other-module", "extra-auto-class"])
def test_auto_map_must_point_at_our_class(example_ckpt, bundles, tmp_path, redirect):
    bundle, marker = copy_bundle(bundles, "hf", tmp_path), tmp_path / "ran"
    if redirect == "other-module":
        # a full working copy of the remote code plus the payload, listed in the manifest
        (bundle / "evil.py").write_text((bundle / MODELING).read_text() + payload(marker))
        edit_config(bundle, lambda c: c["auto_map"].update(
            AutoModelForCausalLM="evil.MultimodalQwen3ForCausalLM"))
        reseal_manifest(bundle, add=("evil.py",))
    else:
        edit_config(bundle, lambda c: c["auto_map"].update(
            AutoConfig="modeling_mmqwen3.MultimodalQwen3ForCausalLM"))
        reseal_manifest(bundle)
    before = tree_digest(bundle)
    result = verify(example_ckpt, bundles, bundle)
    assert_refused(result, needle="auto_map", markers=(marker,), before=before, inputs=(bundle,))
    assert "config.json" in result.error_lines[0]


@pytest.mark.parametrize("name", ["helper.py", "custom_generate/generate.py"])
def test_an_extra_python_file_is_refused(example_ckpt, bundles, tmp_path, name):
    """transformers imports more than auto_map names (relative imports, custom_generate/)."""
    bundle, marker = copy_bundle(bundles, "hf", tmp_path), tmp_path / "ran"
    (bundle / name).parent.mkdir(parents=True, exist_ok=True)
    (bundle / name).write_text(payload(marker))
    reseal_manifest(bundle, add=(name,))
    result = verify(example_ckpt, bundles, bundle)
    assert_refused(result, needle=name, markers=(marker,))


def test_remote_code_missing_from_the_manifest_is_refused(example_ckpt, bundles, tmp_path):
    bundle = copy_bundle(bundles, "hf", tmp_path)
    manifest = json.loads((bundle / "mmconvert.json").read_text())
    manifest["outputs"] = [o for o in manifest["outputs"] if o["path"] != MODELING]
    (bundle / "mmconvert.json").write_text(json.dumps(manifest))
    result = verify(example_ckpt, bundles, bundle)
    assert_refused(result, needle="not listed in mmconvert.json")
    assert MODELING in result.error_lines[0]


# ---------------------------------------------------------------------------------------------
# data files


def flip_last_byte(path: Path) -> None:
    """One bit of the last tensor's data changes; the size does not."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("kind", "pattern"), [
    ("st", "model.safetensors"), ("hf", "multimodal_projector/model.safetensors"),
    ("hf", "config.json"), ("gguf", "ckpt-*.gguf"), ("gguf", "mmproj-*.gguf")])
def test_a_tampered_file_is_reported_as_tampered_not_compared(example_ckpt, bundles, tmp_path,
                                                              kind, pattern):
    bundle = copy_bundle(bundles, kind, tmp_path)
    (target,) = bundle.glob(pattern)
    if target.suffix == ".json":
        edit_config(bundle, lambda c: c.update(rms_norm_eps=1e-5))
    else:
        flip_last_byte(target)
    result = verify(example_ckpt, bundles, bundle)
    rel = target.relative_to(bundle).as_posix()
    assert_refused(result, needle=f"{bundle.name}/{rel} does not match mmconvert.json")
    assert result.error_lines[0].startswith("error: tampered bundle: ")
    assert "parity" not in result.stdout.lower() and "FAIL" not in result.stdout


def test_an_unlisted_weight_file_is_tampered(example_ckpt, bundles, tmp_path):
    """verify reads every *.safetensors of the folder: one the writer did not list is refused."""
    bundle = copy_bundle(bundles, "st", tmp_path)
    shutil.copyfile(bundle / "model.safetensors", bundle / "extra.safetensors")
    result = verify(example_ckpt, bundles, bundle)
    assert_refused(result, needle="extra.safetensors is not listed in mmconvert.json")


def test_an_unlisted_weight_file_in_a_subfolder_is_tampered(example_ckpt, bundles, tmp_path):
    """The HF bundle's projector lives in multimodal_projector/: files there are held to the
    manifest like the root's."""
    bundle = copy_bundle(bundles, "hf", tmp_path)
    shutil.copyfile(bundle / "model.safetensors", bundle / "multimodal_projector" / "x.safetensors")
    result = verify(example_ckpt, bundles, bundle)
    assert_refused(result, needle="multimodal_projector/x.safetensors is not listed in "
                                  "mmconvert.json")


def test_no_checksums_bundle_verifies_on_sizes(example_ckpt, bundles, tmp_path):
    result = verify(example_ckpt, bundles, bundles / "gguf-nosum", "--backend", "gguf_torch")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "content not checked" in warnings[0], result.stderr
    # sizes are still held to the manifest
    bundle = copy_bundle(bundles, "gguf-nosum", tmp_path)
    (text,) = bundle.glob("ckpt-*.gguf")
    with open(text, "ab") as f:
        f.write(b"\0" * 32)
    result = verify(example_ckpt, bundles, bundle, "--backend", "gguf_torch")
    assert_refused(result, needle=f"{bundle.name}/{text.name} does not match mmconvert.json")


@pytest.mark.parametrize("command", ["verify", "run", "push"])
@pytest.mark.parametrize("content", ["[" * 200_000 + "]" * 200_000, "[1, 2]"],
                         ids=["nested-deep", "a-list"])
def test_a_manifest_nested_deep_or_not_an_object_is_one_line(example_ckpt, tmp_path, command,
                                                              content):
    """Every reader of mmconvert.json (verify, run, push) refuses it in one line."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "mmconvert.json").write_text(content)
    args = {"verify": ["verify", example_ckpt, bundle],
            "run": ["run", bundle, "--prompt", "hi"],
            "push": ["push", bundle, "--repo", "me/model"]}[command]
    result = run_cli(*args, env={"HF_TOKEN": "hf_x", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_refused(result)
