"""Hostile values for every number, flag and table a checkpoint's JSON files give mmconvert.

For each key below (``config.json``, its ``text_config`` and ``modality_configs``,
``tokenizer_config.json``, ``generation_config.json``) every value of :data:`HOSTILE` is written
in turn. Each run must either succeed (the values listed as accepted for that key: the
documented meaning of ``null``, a count that still fits, ...) or be refused with exit 2 and one
short ``error:`` line naming the key, never a traceback, a hang or a file under OUT.

Most cases run in-process through click's ``CliRunner`` under a ``SIGALRM`` deadline (a Python
loop over a huge count is interrupted, so a hang fails the test instead of stalling it); the
huge-count cases also run through the real CLI in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mmconvert.cli import main
from tests.hostile.harness import CliResult, assert_refused, run_cli, tree_digest

HOSTILE: dict[str, Any] = {
    "10**9": 10**9, "1e9": 1e9, "2**63": 2**63, "-1": -1, "0": 0, "'7'": "7", "3.5": 3.5,
    "true": True, "null": None, "[]": [], "{}": {}, "NaN": float("nan"),
}
CASE_SECONDS = 20  # one in-process command; a hang over a config count takes forever

CONFIG, TOKENIZER, GENERATION = "config.json", "tokenizer_config.json", "generation_config.json"
IDS = {"0", "null", "[]"}  # a special id: a token of the vocabulary, unset, or no ids
# (file, key path) -> the hostile values that convert; every other one must be refused
KEYS: dict[tuple[str, tuple[str, ...]], set[str]] = {
    (CONFIG, ("modality_configs",)): set(),
    (CONFIG, ("use_layer_norm",)): {"true", "null"},
    (CONFIG, ("projector_dropout",)): {"0", "null"},
    (CONFIG, ("max_multimodal_length",)): {"10**9", "null"},
    (CONFIG, ("gate_up_gate_first",)): {"true", "null"},
    (CONFIG, ("multimodal_token",)): {"null", "'7'"},  # "7" is a token of the vocabulary
    (CONFIG, ("projector_hidden_act",)): {"null"},
    (CONFIG, ("fusion_strategy",)): {"null"},
    (CONFIG, ("rope_layout",)): {"null"},
    (CONFIG, ("base_model_name",)): {"'7'", "null"},
    (CONFIG, ("text_config",)): set(),
    (CONFIG, ("text_config", "vocab_size")): {"10**9"},
    (CONFIG, ("text_config", "hidden_size")): set(),
    (CONFIG, ("text_config", "intermediate_size")): set(),
    (CONFIG, ("text_config", "num_hidden_layers")): set(),
    (CONFIG, ("text_config", "num_attention_heads")): set(),
    (CONFIG, ("text_config", "num_key_value_heads")): set(),
    (CONFIG, ("text_config", "head_dim")): {"null"},
    (CONFIG, ("text_config", "max_position_embeddings")): {"10**9", "null"},
    (CONFIG, ("text_config", "rms_norm_eps")): {"null"},
    (CONFIG, ("text_config", "rope_theta")): {"10**9", "1e9", "2**63", "3.5", "null"},
    (CONFIG, ("text_config", "rope_scaling")): {"null", "{}"},
    (CONFIG, ("text_config", "rope_parameters")): {"null", "{}"},
    (CONFIG, ("text_config", "tie_word_embeddings")): {"true", "null"},
    (CONFIG, ("text_config", "attention_bias")): {"null"},
    (CONFIG, ("text_config", "hidden_act")): {"null"},
    (CONFIG, ("text_config", "torch_dtype")): {"'7'", "null"},
    (CONFIG, ("text_config", "num_experts")): {"0", "null"},
    (CONFIG, ("text_config", "bos_token_id")): IDS,
    (CONFIG, ("text_config", "eos_token_id")): IDS,
    (CONFIG, ("modality_configs", "m1")): set(),
    (CONFIG, ("modality_configs", "m1", "input_dim")): set(),
    (CONFIG, ("modality_configs", "m1", "hidden_dim")): {"null"},
    (CONFIG, ("modality_configs", "m1", "projector_type")): {"null"},
    (CONFIG, ("modality_configs", "m1", "bias")): {"true", "null"},
    (CONFIG, ("modality_configs", "m1", "layer_norm")): {"true", "null"},
    (CONFIG, ("modality_configs", "m1", "activation")): {"null"},
    (CONFIG, ("modality_configs", "m1", "gate")): {"null"},
    (CONFIG, ("modality_configs", "m1", "gate_up_gate_first")): {"true", "null"},
    (TOKENIZER, ("added_tokens_decoder",)): {"null", "{}"},
    (TOKENIZER, ("add_bos_token",)): {"true", "null"},
    (TOKENIZER, ("add_eos_token",)): {"true", "null"},
    (TOKENIZER, ("eos_token",)): {"null", "'7'"},
    (TOKENIZER, ("pad_token",)): {"null", "'7'"},
    (TOKENIZER, ("bos_token",)): {"null", "'7'"},
    (TOKENIZER, ("chat_template",)): {"null", "'7'", "[]"},
    (GENERATION, ("bos_token_id",)): IDS,
    (GENERATION, ("eos_token_id",)): IDS,
    (GENERATION, ("pad_token_id",)): IDS,
    (GENERATION, ("do_sample",)): {"true", "null"},
    (GENERATION, ("temperature",)): {"10**9", "1e9", "2**63", "0", "3.5", "null"},
    (GENERATION, ("top_p",)): {"0", "null"},
    (GENERATION, ("top_k",)): {"10**9", "0", "null"},
}
# counts that size tensors or loops: also run through the real CLI (a hang is bounded there)
COUNT_KEYS = [("text_config", "num_hidden_layers"), ("text_config", "num_attention_heads"),
              ("text_config", "num_key_value_heads"), ("text_config", "head_dim"),
              ("text_config", "hidden_size"), ("text_config", "intermediate_size"),
              ("text_config", "num_experts"), ("modality_configs", "m1", "input_dim"),
              ("modality_configs", "m1", "hidden_dim")]


class CaseTimeout(Exception):
    pass


@contextmanager
def deadline(seconds: int):
    """Interrupt the in-process command after ``seconds`` (Python loops see the signal)."""
    def expire(signum, frame):
        raise CaseTimeout(f"hung for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """JSON files copied (they are edited), the rest hard-linked (read only, and fast)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "tokenizer.json":
            shutil.copyfile(f, dst / f.name)
        else:
            os.link(f, dst / f.name)
    return dst


def set_value(ckpt: Path, file: str, path: tuple[str, ...], value: Any) -> None:
    data = json.loads((ckpt / file).read_text())
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    (ckpt / file).write_text(json.dumps(data))  # NaN is written as the literal NaN


def invoke(args: list[str]) -> CliResult:
    start = time.monotonic()
    with deadline(CASE_SECONDS):
        result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"mmconvert {' '.join(args)} raised {result.exception!r}")
    return CliResult(result.exit_code, result.stdout, result.stderr, time.monotonic() - start)


def check_refused(result: CliResult, out: Path | None = None) -> None:
    assert_refused(result, out=out)
    assert "Traceback" not in result.stderr


def key_id(item: tuple[tuple[str, tuple[str, ...]], set[str]]) -> str:
    (file, path), _ = item
    return f"{file}:{'.'.join(path)}"


@pytest.mark.parametrize("item", list(KEYS.items()), ids=key_id)
def test_hostile_config_values(example_ckpt, tmp_path, item):
    (file, path), accepted = item
    failures = []
    for number, (label, value) in enumerate(HOSTILE.items()):
        ckpt = copy_checkpoint(example_ckpt, tmp_path / f"c{number}")
        set_value(ckpt, file, path, value)
        before = tree_digest(ckpt)
        out = tmp_path / f"out{number}"
        try:
            inspect = invoke(["inspect", str(ckpt)])
            written = invoke(["to-safetensors", str(ckpt), "-o", str(out)])
            if label in accepted:
                dry = invoke(["to-gguf", str(ckpt), "--dry-run"])
                for result in (inspect, written, dry):
                    assert result.returncode == 0, result.stderr
                assert (out / "mmconvert.json").is_file()
            else:
                check_refused(inspect)
                check_refused(written, out)
                # the line names the key (or the tensor it sizes), not just "bad config"
                assert inspect.error_lines == written.error_lines
            assert tree_digest(ckpt) == before, "an input changed"
        except (AssertionError, CaseTimeout) as exc:
            failures.append(f"{label}: {exc}")
        shutil.rmtree(ckpt)
        shutil.rmtree(out, ignore_errors=True)
    assert not failures, f"{key_id(item)}:\n" + "\n\n".join(failures)


@pytest.mark.parametrize("path", COUNT_KEYS, ids=".".join)
def test_huge_counts_through_the_cli(example_ckpt, tmp_path, path):
    """A count of 10**9 or 2**63 is refused in seconds by every command, memory bounded."""
    runs = [("10**9", ["inspect"]), ("2**63", ["to-gguf", "--dry-run"])]  # two per key: fast
    for number, (label, command) in enumerate(runs):
        ckpt = copy_checkpoint(example_ckpt, tmp_path / f"c{number}")
        set_value(ckpt, CONFIG, path, HOSTILE[label])
        before = tree_digest(ckpt)
        result = run_cli(command[0], ckpt, *command[1:], timeout=60)
        assert_refused(result, before=before, inputs=(ckpt,))
        assert path[-1] in result.stderr or "shape" in result.stderr, result.stderr


def test_num_hidden_layers_is_bound_by_the_weights(example_ckpt, tmp_path):
    ckpt = copy_checkpoint(example_ckpt, tmp_path / "c")
    set_value(ckpt, CONFIG, ("text_config", "num_hidden_layers"), 10**9)
    result = invoke(["inspect", str(ckpt)])
    check_refused(result)
    assert "num_hidden_layers" in result.stderr and "2 layers" in result.stderr


@pytest.mark.parametrize("key, value", [
    ("max_position_embeddings", -1), ("max_position_embeddings", 2**32),
    ("max_position_embeddings", float("inf")), ("rope_theta", 1e39),  # float32 overflows
])
def test_values_that_gguf_cannot_hold(example_ckpt, tmp_path, key, value):
    ckpt = copy_checkpoint(example_ckpt, tmp_path / "c")
    set_value(ckpt, CONFIG, ("text_config", key), value)
    out = tmp_path / "out"
    result = invoke(["to-gguf", str(ckpt), "-o", str(out)])
    check_refused(result, out)
    assert key in result.error_lines[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0])
@pytest.mark.parametrize("where", [("text_config", "rope_theta"),
                                   ("text_config", "rope_parameters")])
def test_rope_theta_must_be_positive_and_finite(example_ckpt, tmp_path, value, where):
    ckpt = copy_checkpoint(example_ckpt, tmp_path / "c")
    if where[-1] == "rope_parameters":
        value = {"rope_type": "default", "rope_theta": value}
        set_value(ckpt, CONFIG, ("text_config", "rope_theta"), None)
    set_value(ckpt, CONFIG, where, value)
    result = invoke(["to-hf", str(ckpt), "-o", str(tmp_path / "out")])
    check_refused(result, tmp_path / "out")
    assert "rope_theta" in result.error_lines[0]


ADDED_TOKENS_DECODER_CASES = {
    "entry not an object": ({"387": "<|multimodal|>"}, "added_tokens_decoder"),
    "content not a string": ({"387": {"content": 7, "special": True}}, "content"),
    "id not a number": ({"abc": {"content": "<|x|>", "special": True}}, "'abc'"),
    "negative id": ({"-1": {"content": "<|x|>", "special": True}}, "'-1'"),
    "huge id": ({str(2**63): {"content": "<|x|>", "special": True}}, "added_tokens_decoder"),
    "special not a flag": ({"387": {"content": "<|multimodal|>", "special": "yes"}}, "special"),
}


@pytest.mark.parametrize("case", sorted(ADDED_TOKENS_DECODER_CASES))
def test_added_tokens_decoder_entries(example_ckpt, tmp_path, case):
    table, needle = ADDED_TOKENS_DECODER_CASES[case]
    ckpt = copy_checkpoint(example_ckpt, tmp_path / "c")
    set_value(ckpt, TOKENIZER, ("added_tokens_decoder",), table)
    result = invoke(["inspect", str(ckpt)])
    check_refused(result)
    assert needle in result.error_lines[0]


def test_tokenizer_json_added_token_ids(example_ckpt, tmp_path):
    ckpt = copy_checkpoint(example_ckpt, tmp_path / "c")
    tok_path = ckpt / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    tok_path.unlink()  # a hard link to the shared fixture: replace, never edit in place
    tok["added_tokens"][0]["id"] = "384"
    tok_path.write_text(json.dumps(tok))
    result = invoke(["inspect", str(ckpt)])
    check_refused(result)
    assert "added_tokens" in result.error_lines[0]


@pytest.mark.parametrize("file, path", [(GENERATION, ("eos_token_id",)),
                                        (GENERATION, ("pad_token_id",)),
                                        (CONFIG, ("text_config", "bos_token_id"))])
@pytest.mark.parametrize("command", ["to-hf", "to-safetensors", "to-gguf"])
def test_special_ids_outside_the_vocabulary(example_ckpt, tmp_path, file, path, command):
    """Every writer refuses an id past the embedding's rows, with the same line."""
    ckpt = copy_checkpoint(example_ckpt, tmp_path / "c")
    set_value(ckpt, file, path, [386, 388] if path[-1] == "eos_token_id" else 999)
    out = tmp_path / "out"
    result = invoke([command, str(ckpt), "-o", str(out)])
    check_refused(result, out)
    assert "outside the vocabulary of 388 tokens" in result.error_lines[0]


@pytest.mark.parametrize("value", ["384", 384.0, True, [384, "386"], {"id": 384}])
def test_generation_config_ids_of_the_wrong_type_are_refused(example_ckpt, tmp_path, value):
    ckpt = copy_checkpoint(example_ckpt, tmp_path / "c")
    set_value(ckpt, GENERATION, ("eos_token_id",), value)
    result = invoke(["to-safetensors", str(ckpt), "-o", str(tmp_path / "out")])
    check_refused(result, tmp_path / "out")
    assert "eos_token_id" in result.error_lines[0]


def test_a_null_pad_id_means_unset(example_ckpt, tmp_path):
    ckpt = copy_checkpoint(example_ckpt, tmp_path / "c")
    set_value(ckpt, GENERATION, ("pad_token_id",), None)
    result = invoke(["inspect", str(ckpt), "--json"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["special_ids"]["pad"] == [384]  # the tokenizer's pad


def test_untied_config_without_lm_head_is_refused(example_ckpt, make_checkpoint, tmp_path):
    ckpt = copy_checkpoint(make_checkpoint(tied=True), tmp_path / "c")
    set_value(ckpt, CONFIG, ("text_config", "tie_word_embeddings"), False)
    out = tmp_path / "out"
    result = invoke(["to-gguf", str(ckpt), "-o", str(out)])
    check_refused(result, out)
    assert "lm_head.weight" in result.error_lines[0]
    assert "tie_word_embeddings: true" in result.stderr  # the fix, on a detail line


def test_multimodal_token_unknown_to_the_tokenizer_is_refused(example_ckpt, tmp_path):
    ckpt = copy_checkpoint(example_ckpt, tmp_path / "c")
    set_value(ckpt, CONFIG, ("multimodal_token",), "<|image|>")
    out = tmp_path / "out"
    result = invoke(["to-hf", str(ckpt), "-o", str(out)])
    check_refused(result, out)
    assert "<|image|>" in result.error_lines[0]
    assert "add_special_tokens" in result.stderr


@pytest.mark.parametrize("edit", ["modality name", "multimodal_token", "activation"])
def test_long_hostile_values_make_short_lines(example_ckpt, tmp_path, edit):
    """600 characters echoed back (a modality name with ``../``, a token, an activation): the
    cause comes first in under 200 characters, the value cut."""
    ckpt = copy_checkpoint(example_ckpt, tmp_path / "c")
    cfg = json.loads((ckpt / CONFIG).read_text())
    long = "../" * 200 + "m1"
    if edit == "modality name":
        cfg["modality_configs"][long] = cfg["modality_configs"].pop("m1")
    elif edit == "multimodal_token":
        cfg["multimodal_token"] = long
    else:
        cfg["projector_hidden_act"] = long
    (ckpt / CONFIG).write_text(json.dumps(cfg))
    result = invoke(["inspect", str(ckpt)])
    check_refused(result)  # one error line of at most 200 characters
    assert "../../" in result.error_lines[0] and long not in result.stderr


def test_nan_is_written_as_json_literal(tmp_path):
    """The generator really writes NaN (json's extension), so the NaN cases test something."""
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"a": float("nan")}))
    assert "NaN" in path.read_text() and math.isnan(json.loads(path.read_text())["a"])


def test_expert_index_in_a_tensor_name_is_bound_by_the_tensors(make_checkpoint, tmp_path):
    """``experts.999999999.gate_proj`` in a header: the check counts the tensors present and
    never builds a list as long as the largest index a name claims."""
    from safetensors.torch import load_file, save_file

    ckpt = copy_checkpoint(make_checkpoint(num_experts=4), tmp_path / "c")
    weights = ckpt / "model.safetensors"
    state = load_file(str(weights))
    weights.unlink()  # a hard link to the shared fixture: replace, never edit in place
    name = next(n for n in state if ".experts.3.gate_proj." in n)
    state[name.replace(".experts.3.", ".experts.999999999.")] = state.pop(name)
    save_file(state, str(weights))
    result = run_cli("inspect", ckpt, timeout=60)
    assert_refused(result)
    assert "experts [3] missing" in result.error_lines[0]
