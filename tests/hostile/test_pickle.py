"""Issue 9 item 13: a pickle that holds code is refused without running it, and the refusal
says how to convert the file safely instead of passing on torch's advice to turn the
safety off."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .harness import assert_refused, run_cli, tree_digest


class _Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _pickled_checkpoint(example_ckpt: Path, root: Path, marker: Path, protocol: int) -> Path:
    ckpt = root / "ck"
    shutil.copytree(example_ckpt, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save({"state_dict": tensors, "trainer": _Payload(marker)}, ckpt / "pytorch_model.bin",
               pickle_protocol=protocol)
    return ckpt


# protocol 4: torch also warns that its unpickler may not support it; that noise must not
# come before the error line
@pytest.mark.parametrize("command,protocol", [("inspect", 2), ("to-safetensors", 2),
                                              ("to-safetensors", 4)])
def test_code_in_pickle_is_refused_with_safe_advice(example_ckpt, tmp_path, command, protocol):
    marker = tmp_path / "payload-ran"
    ckpt = _pickled_checkpoint(example_ckpt, tmp_path, marker, protocol)
    out = tmp_path / "out"
    before = tree_digest(ckpt)
    args = (command, ckpt) if command == "inspect" else (command, ckpt, "-o", out)
    result = run_cli(*args)
    assert_refused(result, needle="refused to unpickle pytorch_model.bin", out=out,
                   before=before, inputs=(ckpt,), markers=(marker,))
    said = result.stdout + result.stderr
    assert not re.search(r"weights_only\W*(=|set to)\W*False", said), said
    assert "never unpickles code" in said
    assert "safetensors.torch.save_file(" in said and "torch.save(model.state_dict()" in said
    if protocol == 2:  # protocol 4 stops at its first FRAME instruction, before the payload
        assert "it would run code (posix.system)" in result.error_lines[0]
    assert str(ckpt / "pytorch_model.bin") in said
    # details are indented continuation lines, not further error lines
    assert all(line.startswith("  ") for line in result.stderr.strip().splitlines()[1:])


def test_protocol_4_state_dict_is_not_called_code(example_ckpt, tmp_path):
    """torch's safe loader cannot read protocol 4 even for plain tensors: the refusal must
    not claim the file holds code, and still says how to re-save it."""
    ckpt = tmp_path / "ck"
    shutil.copytree(example_ckpt, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(tensors, ckpt / "pytorch_model.bin", pickle_protocol=4)
    result = run_cli("inspect", ckpt)
    assert_refused(result, needle="pickle instruction 149")
    assert "run code" not in result.error_lines[0]
    assert "torch.save(model.state_dict()" in result.stderr


def test_plain_state_dict_pickle_still_converts(example_ckpt, tmp_path):
    ckpt = tmp_path / "ck"
    shutil.copytree(example_ckpt, ckpt)
    tensors = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(tensors, ckpt / "pytorch_model.bin")
    result = run_cli("to-safetensors", ckpt, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
