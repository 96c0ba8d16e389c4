import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from mmconvert.cli import main
from mmconvert.convert.export_safetensors import export_safetensors
from mmconvert.convert.readers import read_checkpoint


def _source_tensors(ckpt):
    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        state.update(load_file(str(f)))
    for f in sorted(ckpt.glob("pytorch_model*.bin")):
        state.update(torch.load(f, weights_only=True))
    return state


def _bundle_tensors(folder):
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for name in sf.keys():  # noqa: SIM118 (safe_open is not iterable)
                assert name not in state, f"{name} written twice"
                state[name] = sf.get_tensor(name)
    return state


@pytest.mark.parametrize("variant", [{}, {"shards": 3}, {"weights_format": "pickle"},
                                     {"tied": True}, {"weights_format": "pickle", "shards": 2}])
def test_source_naming_is_bit_exact(make_checkpoint, tmp_path, variant):
    ckpt = make_checkpoint(**variant)
    out = tmp_path / "st"
    export_safetensors(read_checkpoint(ckpt), out, max_shard_bytes=60_000)
    src, dst = _source_tensors(ckpt), _bundle_tensors(out)
    assert set(src) == set(dst)
    for name, tensor in src.items():
        assert dst[name].dtype == tensor.dtype
        assert torch.equal(dst[name].view(torch.uint8), tensor.contiguous().view(torch.uint8)), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src)
    assert len(set(index["weight_map"].values())) > 1
    if variant.get("tied"):
        assert "language_model.lm_head.weight" not in dst


def test_source_naming_loads_back_into_seed_layout(example_ckpt, tmp_path):
    out = tmp_path / "st"
    export_safetensors(read_checkpoint(example_ckpt), out)
    # the bundle is itself a readable checkpoint (config.json travels along)
    again = read_checkpoint(out)
    original = read_checkpoint(example_ckpt)
    for name in original.tensors:
        assert np.array_equal(again.tensors[name].read(), original.tensors[name].read())


def test_hf_naming_and_cast(example_ckpt, tmp_path):
    out = tmp_path / "st"
    export_safetensors(read_checkpoint(example_ckpt), out, naming="hf", dtype="float32")
    dst = _bundle_tensors(out)
    src = _source_tensors(example_ckpt)
    assert "model.embed_tokens.weight" in dst
    assert "multimodal_projector.m1.fc1.weight" in dst
    assert torch.equal(dst["multimodal_projector.m1.fc1.weight"],
                       src["multimodal_projector.projectors.m1.0.weight"].float())
    assert all(t.dtype == torch.float32 for t in dst.values())
    manifest = json.loads((out / "mmconvert.json").read_text())
    assert manifest["kind"] == "safetensors"
    assert "BF16->F32" in manifest["transforms"]
    hashes = {o["path"]: o["sha256"] for o in manifest["outputs"]}
    assert "model.safetensors" in hashes
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"])


def test_pickle_input_never_executes_code(make_checkpoint, tmp_path):
    """A pickle with a code-running reduce is refused, and the payload never runs."""
    import pickle

    ckpt = make_checkpoint(weights_format="pickle")
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in ckpt.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    state["evil"] = Payload()
    with open(bad / "pytorch_model.bin", "wb") as f:
        torch.save(state, f, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    marker.unlink(missing_ok=True)
    result = CliRunner().invoke(main, ["to-safetensors", str(bad), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "weights_only" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_force_and_progress(example_ckpt, tmp_path):
    runner = CliRunner()
    out = tmp_path / "st"
    dry = runner.invoke(main, ["to-safetensors", str(example_ckpt), "-o", str(out), "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "language_model.model.embed_tokens.weight" in dry.output
    assert not out.exists()
    ok = runner.invoke(main, ["to-safetensors", str(example_ckpt), "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(main, ["to-safetensors", str(example_ckpt), "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.stderr
    forced = runner.invoke(main, ["to-safetensors", str(example_ckpt), "-o", str(out), "--force",
                                  "--dtype", "float16"])
    assert forced.exit_code == 0, forced.output
    assert all(t.dtype == torch.float16 for t in _bundle_tensors(out).values())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []
