"""Every bad input: one clear line on stderr, exit 2, nothing under the output name."""

import json
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mmconvert.cli import main


@pytest.fixture
def ckpt_copy(example_ckpt, tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(example_ckpt, copy)
    return copy


def _edit_config(ckpt, fn):
    cfg = json.loads((ckpt / "config.json").read_text())
    fn(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _edit_weights(ckpt, fn):
    state = load_file(str(ckpt / "model.safetensors"))
    fn(state)
    save_file(state, str(ckpt / "model.safetensors"))


def _drop(name):
    return lambda s: s.pop(name)


def _add(name, shape):
    import torch

    return lambda s: s.__setitem__(name, torch.zeros(shape))


def _truncate(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])


def _shrink_embeddings(state):
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        state[key] = state[key][:-5].clone()


CASES = {
    "missing config": (lambda c: (c / "config.json").unlink(), "missing config.json"),
    "unparsable config": (lambda c: (c / "config.json").write_text("{nope"), "cannot parse"),
    "unknown model_type": (lambda c: _edit_config(c, lambda x: x.update(model_type="whisper")),
                           "is not supported. Supported: "),
    "missing tensor": (lambda c: _edit_weights(c, _drop("language_model.model.layers.1.mlp.up_proj.weight")),
                       "missing against the config"),
    "extra tensor": (lambda c: _edit_weights(c, _add("language_model.model.layers.7.mlp.up_proj.weight", (2, 2))),
                     "not expected by the config"),
    "missing projector tensor": (lambda c: _edit_weights(c, _drop("multimodal_projector.projectors.m2.4.bias")),
                                 "projector tensor multimodal_projector.projectors.m2.4.bias missing"),
    "modality dims disagree": (lambda c: _edit_config(c, lambda x: x["modality_configs"]["m1"].update(input_dim=50)),
                               "declares input_dim=50"),
    "fewer embedding rows than tokens": (lambda c: _edit_weights(c, _shrink_embeddings),
                                         "tokenizer has 388 tokens"),
    "missing tokenizer": (lambda c: (c / "tokenizer.json").unlink(), "missing tokenizer"),
    "truncated safetensors": (_truncate, "truncated"),
    "garbage safetensors": (lambda c: (c / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"),
                            "not valid JSON"),
    "bad activation": (lambda c: _edit_config(c, lambda x: x.update(projector_hidden_act="swoosh")),
                       "projector_hidden_act"),
    "no weights": (lambda c: (c / "model.safetensors").unlink(), "no weights"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("command", ["to-safetensors", "inspect"])
def test_bad_input_is_one_clear_line(ckpt_copy, tmp_path, case, command):
    break_it, message = CASES[case]
    break_it(ckpt_copy)
    out = tmp_path / "out"
    args = [command, str(ckpt_copy)] + (["-o", str(out)] if command != "inspect" else [])
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    # one error line, cause first and short; a long path or detail goes on indented lines
    assert lines[0].startswith("error: ") and len(lines[0]) <= 200, result.stderr
    assert all(line.startswith("  ") for line in lines[1:]), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_not_a_folder(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    result = CliRunner().invoke(main, ["inspect", str(f)])
    assert result.exit_code == 2 and "expected a checkpoint folder" in result.stderr
    result = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such checkpoint folder" in result.stderr


def test_inspect_reports_everything(example_ckpt):
    result = CliRunner().invoke(main, ["inspect", str(example_ckpt)])
    assert result.exit_code == 0, result.output
    for needle in ("multimodal_qwen3", "m1: input 48", "m2: input 80 -> hidden 96", "<|multimodal|>",
                   "eos:", "generation_config.json", "tokenizer_config.json", "BF16"):
        assert needle in result.output
    data = json.loads(CliRunner().invoke(main, ["inspect", str(example_ckpt), "--json"]).output)
    assert data["vocab"]["embedding_rows"] == data["vocab"]["tokenizer_size"] == 388
    assert data["special_ids"]["eos"][0] == data["multimodal_token_id"] - 1
