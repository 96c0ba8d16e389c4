"""The errors module: one place, stdlib bases, and what an error is about as attributes."""

import inspect
import json
import shutil
from pathlib import Path

import pytest

from mmconvert import errors
from mmconvert.convert.readers import read_checkpoint
from mmconvert.errors import CheckpointError, MMConvertError, UnsafePathError

REPO = Path(__file__).resolve().parents[1]


def test_every_user_facing_error_class_lives_in_the_errors_module():
    """No ``MMConvertError`` subclass is defined anywhere else."""
    elsewhere = []
    for path in sorted(p for root in ("convert", "formats", "verify", "runtime", "publish",
                                      "mmconvert") for p in (REPO / root).rglob("*.py")):
        if path == REPO / "mmconvert" / "errors.py":
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("class ") and "Error" in line.split("(")[-1] and any(
                    name in line for name in dir(errors) if name.endswith("Error")):
                elsewhere.append(f"{path.relative_to(REPO)}: {line}")
    assert not elsewhere, "\n".join(elsewhere)


def test_input_errors_are_value_errors_and_never_os_errors():
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if issubclass(cls, MMConvertError):
            # code handling the OS's errors (disk full while writing) must not swallow ours
            assert not issubclass(cls, OSError), name
    assert issubclass(CheckpointError, ValueError) and issubclass(UnsafePathError, ValueError)


def test_a_config_error_names_its_key_and_file(example_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["num_attention_heads"] = "seven"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(ckpt)
    assert caught.value.name == "num_attention_heads"
    assert Path(caught.value.path) == ckpt / "config.json"


def test_an_unsafe_path_error_names_the_link(example_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_ckpt, ckpt)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (ckpt / "tokenizer_config.json").unlink()
    (ckpt / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(UnsafePathError) as caught:
        read_checkpoint(ckpt)
    assert Path(caught.value.path).name == "tokenizer_config.json"


def test_two_tensors_that_unwrap_to_one_name_are_one_error_line(example_ckpt, tmp_path):
    """``module.x`` and ``x`` in one checkpoint: a CheckpointError naming both, not a KeyError."""
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_ckpt, ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    name = "language_model.model.norm.weight"
    state["module." + name] = state[name].clone()
    save_file(state, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match="both become") as caught:
        read_checkpoint(ckpt)
    assert caught.value.name == name


def test_an_error_line_is_cause_first_and_short():
    from mmconvert.cli import MAX_ERROR_LINE, format_error

    path = "/tmp/" + "deep/" * 30 + "model.safetensors"
    text = format_error(f"{path}: header is not valid JSON\nmore detail")
    first, *details = text.splitlines()
    assert first == "error: model.safetensors: header is not valid JSON"
    assert details == [f"  file: {path}", "  more detail"]
    listing = "model_type 'x' is not supported. Supported: " + ", ".join(f"d{i:03d}" for i in range(99))
    first, *details = format_error(listing).splitlines()
    assert len(first) <= MAX_ERROR_LINE and first.startswith("error: model_type 'x' is not")
    assert details and all(line.startswith("  ") for line in details)
    rebuilt = " ".join([first.removeprefix("error: ")] + [d.strip() for d in details])
    assert rebuilt.replace(",", "").split() == listing.replace(",", "").split()
    assert format_error("short") == "error: short"
