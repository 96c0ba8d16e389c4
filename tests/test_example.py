"""``mmconvert example``: the checkpoint and its embeddings file (``example_inputs.safetensors``),
which the README's ``mmconvert run`` uses."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from mmconvert import api
from mmconvert.errors import MMConvertError

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    return api.example(tmp_path_factory.mktemp("example") / "ckpt")


def test_inputs_hold_one_item_per_modality_of_its_projector_width(example):
    inputs = load_file(str(example / "example_inputs.safetensors"))
    modalities = api.inspect(example)["modalities"]
    assert sorted(inputs) == sorted(modalities)
    for name, item in inputs.items():
        assert item.dtype == np.float32 and item.ndim == 2 and item.shape[0] >= 1
        assert item.shape[1] == modalities[name]["input_dim"], name
        assert np.isfinite(item).all() and item.std() > 0.5  # seeded normal rows, not zeros


def test_inputs_are_deterministic_listed_in_the_manifest_and_follow_the_umask(example, tmp_path):
    again = api.example(tmp_path / "again")
    name = "example_inputs.safetensors"
    assert (again / name).read_bytes() == (example / name).read_bytes()
    listed = {o["path"] for o in json.loads((example / "mmconvert.json").read_text())["outputs"]}
    assert name in listed and "model.safetensors" in listed
    umask = os.umask(0)
    os.umask(umask)
    assert (example / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_force_replaces_an_example_but_not_one_whose_inputs_were_edited(tmp_path):
    ckpt = api.example(tmp_path / "ckpt")
    assert api.example(ckpt, force=True) == ckpt
    (ckpt / "example_inputs.safetensors").write_bytes(b"edited by the user")
    with pytest.raises(MMConvertError, match="example_inputs.safetensors"):
        api.example(ckpt, force=True)
    assert (ckpt / "example_inputs.safetensors").read_bytes() == b"edited by the user"


def test_readme_run_prompt_has_one_placeholder_per_item(example):
    """The quick start's ``run`` line names this file, with a placeholder per item (the
    fusion rule of docs/running.md; the doc snippet test runs it)."""
    text = README.read_text(encoding="utf-8")
    run = re.search(r'mmconvert run \S+ --prompt "([^"]*)" \\\n\s*--embeddings (\S+)', text)
    assert run, "the README's quick start has no mmconvert run line with --embeddings"
    prompt, path = run.groups()
    assert path == "ckpt/example_inputs.safetensors"
    items = load_file(str(example / "example_inputs.safetensors"))
    assert prompt.count("<|multimodal|>") == len(items)
