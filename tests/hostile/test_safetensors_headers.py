"""safetensors headers: our parser refuses exactly what the safetensors library refuses.

The library is the anchor (issue 9, items 8, 9 and 14): every crafted header below is opened
with ``safetensors.safe_open`` and with our parser, and both must agree. A header the library
accepts but whose dtype we cannot convert is an ``UnsupportedError``, never a structural
refusal. A few cases also run through the CLI, as do JSON files nested thousands deep.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import struct
from pathlib import Path

import pytest
from safetensors import safe_open

from mmconvert.errors import CheckpointError, UnsupportedError
from mmconvert.formats.safetensors_io import MAX_HEADER_BYTES, read_safetensors_header
from tests.hostile.harness import assert_refused, run_cli, tree_digest

GOOD = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
SMALL = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'


def fill(template: str, *parts: str) -> str:
    """``template`` with each ``%s`` replaced by the next part (JSON braces stay as typed)."""
    for part in parts:
        template = template.replace("%s", part, 1)
    return template


def tensor(**fields) -> str:
    info = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **fields}
    return json.dumps(info)


# name -> (header text, bytes of data after it)
CASES: dict[str, tuple[str, int]] = {
    "valid": (fill('{"a": %s}', GOOD), 8),
    "valid, no tensors": ("{}", 0),
    "valid, metadata only": ('{"__metadata__": {"format": "pt"}}', 0),
    "valid, metadata null": (fill('{"__metadata__": null, "a": %s}', GOOD), 8),
    "valid, scalar": ('{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}', 4),
    "valid, zero-size tensors": (fill('{"z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},'
                                 ' "a": %s}', GOOD), 8),
    "valid, zero-size at the end": (fill('{"z": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]},'
                                    ' "a": %s}', GOOD), 8),
    "valid, zero dim first": (fill('{"z": {"dtype": "F32", "shape": [0, 1099511627776, 1099511627776],'
                              ' "data_offsets": [0, 0]}, "a": %s}', GOOD), 8),
    "valid, whitespace around": (fill(' \t\n{"a": %s}\r\n   ', GOOD), 8),
    "valid, extra field": (fill('{"a": %s}', tensor(extra={"x": [1, 2.5, None, "y"]})), 8),
    "valid, duplicate extra field": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8],'
                                     ' "z": 1, "z": 2}}', 8),
    "valid, big int in extra field": (fill('{"a": %s}', tensor(z=10**300)), 8),
    "valid, tensor info as a list": ('{"a": ["F32", [2], [0, 8]]}', 8),
    "valid, duplicate tensor (last wins)": (fill('{"a": %s, "a": %s}', SMALL, GOOD), 8),
    "valid, duplicate metadata key": (fill('{"__metadata__": {"x": "1", "x": "2"}, "a": %s}', GOOD), 8),
    "valid, surrogate pair name": (fill('{"\\ud83d\\ude00": %s}', GOOD), 8),
    "valid, unsorted offsets": (fill('{"b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},'
                                ' "a": %s}', SMALL), 8),
    "valid, depth 127": (fill('{"a": %s}', tensor(z=json.loads("[" * 125 + "]" * 125))), 8),
    # item 9: the library refuses these
    "trailing bytes after the data": (fill('{"a": %s}', GOOD), 9),
    "data shorter than the offsets": (fill('{"a": %s}', GOOD), 7),
    "data but no tensors": ("{}", 1),
    "gap before the first tensor": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}', 12),
    "gap between tensors": (fill('{"a": %s, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}', GOOD), 16),
    "overlapping tensors": (fill('{"a": %s, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', GOOD), 8),
    "offsets reversed": ('{"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}', 8),
    "float shape": ('{"a": {"dtype": "F32", "shape": [64.7], "data_offsets": [0, 8]}}', 8),
    "integral float shape": ('{"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}', 8),
    "exponent shape": ('{"a": {"dtype": "F32", "shape": [2e0], "data_offsets": [0, 8]}}', 8),
    "negative shape": ('{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', 8),
    "minus zero shape": ('{"a": {"dtype": "F32", "shape": [-0, 2], "data_offsets": [0, 0]}}', 0),
    "bool shape": ('{"a": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', 4),
    "shape not a list": ('{"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}', 8),
    "shape 2**64": ('{"a": {"dtype": "U8", "shape": [18446744073709551616], "data_offsets": [0, 0]}}', 0),
    "float offset": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}', 8),
    "three offsets": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}}', 8),
    "offsets as an object": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": {"0": 0, "1": 8}}}', 8),
    "offsets past 2**64": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 18446744073709551616]}}', 8),
    "size overflow, zero last": (fill('{"a": {"dtype": "F32", "shape": [1099511627776, 1099511627776, 0],'
                                 ' "data_offsets": [0, 0]}, "b": %s}', GOOD), 8),
    "size overflow in bits": (fill('{"a": {"dtype": "U8", "shape": [18446744073709551615], '
                              '"data_offsets": [0, 0]}, "b": %s}', GOOD), 8),
    "size disagrees with shape": ('{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', 8),
    "missing data_offsets": ('{"a": {"dtype": "F32", "shape": [2]}}', 8),
    "duplicate field": ('{"a": {"dtype": "F32", "shape": [2], "shape": [2], "data_offsets": [0, 8]}}', 8),
    "tensor info not an object": ('{"a": 5}', 0),
    "tensor info list too short": ('{"a": ["F32", [2]]}', 8),
    "tensor info list too long": ('{"a": ["F32", [2], [0, 8], 1]}', 8),
    "invalid duplicate tensor first": (fill('{"a": 5, "a": %s}', GOOD), 8),
    # item 8: list/dict dtypes and bad __metadata__ gave tracebacks
    "list dtype": ('{"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', 8),
    "dict dtype": ('{"a": {"dtype": {"F32": 1}, "shape": [2], "data_offsets": [0, 8]}}', 8),
    "null dtype": ('{"a": {"dtype": null, "shape": [2], "data_offsets": [0, 8]}}', 8),
    "lower-case dtype": ('{"a": {"dtype": "f32", "shape": [2], "data_offsets": [0, 8]}}', 8),
    "list metadata": (fill('{"__metadata__": ["x"], "a": %s}', GOOD), 8),
    "string metadata": (fill('{"__metadata__": "x", "a": %s}', GOOD), 8),
    "int metadata value": (fill('{"__metadata__": {"x": 1}, "a": %s}', GOOD), 8),
    "null metadata value": (fill('{"__metadata__": {"x": null}, "a": %s}', GOOD), 8),
    "dict metadata value": (fill('{"__metadata__": {"x": {"y": "z"}}, "a": %s}', GOOD), 8),
    "invalid duplicate metadata value": (fill('{"__metadata__": {"x": 1, "x": "s"}, "a": %s}', GOOD), 8),
    "duplicate metadata": (fill('{"__metadata__": {}, "__metadata__": {}, "a": %s}', GOOD), 8),
    # JSON the library's parser (serde_json) refuses
    "top level a list": ("[]", 0),
    "top level a string": ('"x"', 0),
    "depth 128": (fill('{"a": %s}', tensor(z=json.loads("[" * 126 + "]" * 126))), 8),
    "NaN in an extra field": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "z": NaN}}', 8),
    "Infinity in an extra field": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], '
                                   '"z": -Infinity}}', 8),
    "float out of range": ('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "z": 2e308}}', 8),
    "integer out of range": (fill('{"a": %s}', tensor(z=10**400)), 8),
    "lone surrogate in a name": (fill('{"\\ud800": %s}', GOOD), 8),
    "lone surrogate in metadata": (fill('{"__metadata__": {"x": "\\udc00"}, "a": %s}', GOOD), 8),
    "control character in a name": (fill('{"a\x01": %s}', GOOD), 8),
    "form feed before the header": (fill('\x0c{"a": %s}', GOOD), 8),
    "NUL after the header": (fill('{"a": %s}\x00', GOOD), 8),
    "byte order mark": (fill('\ufeff{"a": %s}', GOOD), 8),
    "not JSON": ("not json at all!", 0),
    "truncated JSON": (fill('{"a": %s', GOOD), 8),
    # dtypes the library knows and we do not convert: well formed, so UnsupportedError
    "F8_E4M3 (unsupported)": ('{"a": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}', 8),
    "C64 (unsupported)": ('{"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}', 8),
    "F4 (unsupported)": ('{"a": {"dtype": "F4", "shape": [16], "data_offsets": [0, 8]}}', 8),
    "F4 off a byte boundary": ('{"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}', 2),
}


def craft(path: Path, header: str | bytes, data: int | bytes, declared: int | None = None) -> Path:
    raw = header.encode("utf-8") if isinstance(header, str) else header
    payload = b"\0" * data if isinstance(data, int) else data
    length = len(raw) if declared is None else declared
    path.write_bytes(struct.pack("<Q", length) + raw + payload)
    return path


def library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), "np") as f:
            list(f.keys())
    except Exception:  # the library raises SafetensorError (and others for odd headers)
        return False
    return True


def our_verdict(path: Path) -> str:
    """'ok', 'refused' (CheckpointError) or 'unsupported'; any other exception propagates."""
    try:
        read_safetensors_header(path)
    except UnsupportedError:
        return "unsupported"
    except CheckpointError:
        return "refused"
    return "ok"


def assert_agrees(path: Path, label: str) -> None:
    lib, ours = library_accepts(path), our_verdict(path)
    if ours == "unsupported":
        assert lib, f"{label}: the library refuses it, we call it only unsupported"
    else:
        assert (ours == "ok") == lib, f"{label}: library {'accepts' if lib else 'refuses'}, we say {ours}"


@pytest.mark.parametrize("case", list(CASES))
def test_header_verdict_matches_the_library(tmp_path, case):
    header, data = CASES[case]
    assert_agrees(craft(tmp_path / "t.safetensors", header, data), case)


def test_the_cases_cover_both_verdicts(tmp_path):
    """Guard against a table where the library accepts (or refuses) everything."""
    verdicts = {library_accepts(craft(tmp_path / f"{i}.safetensors", *CASES[c]))
                for i, c in enumerate(CASES)}
    assert verdicts == {True, False}


def test_valid_entries_are_where_the_library_puts_them(tmp_path):
    path = craft(tmp_path / "t.safetensors", fill('{"b": %s, "a": {"dtype": "F32", "shape": [1], '
                 '"data_offsets": [8, 12]}, "__metadata__": {"k": "v"}}', GOOD),
                 struct.pack("<3f", 1.0, 2.0, 3.0))
    entries, metadata = read_safetensors_header(path)
    assert metadata == {"k": "v"}
    header_end = path.stat().st_size - 12
    assert (entries["b"].offset, entries["b"].nbytes) == (header_end, 8)
    assert (entries["a"].offset, entries["a"].nbytes, entries["a"].shape) == (header_end + 8, 4, (1,))


@pytest.mark.parametrize("declared, accepted", [(100_000_000, True), (100_000_001, False)])
def test_header_size_limit_is_the_librarys(tmp_path, declared, accepted):
    assert MAX_HEADER_BYTES == 100_000_000
    body = fill('{"a": %s}', GOOD)
    path = craft(tmp_path / "t.safetensors", body + " " * (declared - len(body)), 8)
    assert library_accepts(path) is accepted
    assert our_verdict(path) == ("ok" if accepted else "refused")


def test_header_length_beyond_the_file(tmp_path):
    path = craft(tmp_path / "t.safetensors", fill('{"a": %s}', GOOD), 8, declared=10_000)
    assert not library_accepts(path)
    assert our_verdict(path) == "refused"


def test_deep_nesting_is_refused_quickly(tmp_path):
    """200k-deep nesting was a RecursionError traceback."""
    deep = "[" * 200_000 + "]" * 200_000
    path = craft(tmp_path / "t.safetensors", fill('{"a": {"dtype": "F32", "shape": [2], '
                 '"data_offsets": [0, 8], "z": %s}}', deep), 8)
    assert not library_accepts(path)
    with pytest.raises(CheckpointError, match="nested"):
        read_safetensors_header(path)


def _mutations(rng: random.Random, text: str) -> str:
    """One small edit of a valid header: a character replaced, dropped, or inserted."""
    alphabet = '{}[]",:0123456789-.eE nulltruefalseNaF_3286BUI\\'
    pos = rng.randrange(len(text))
    kind = rng.randrange(3)
    if kind == 0:
        return text[:pos] + rng.choice(alphabet) + text[pos + 1:]
    if kind == 1:
        return text[:pos] + text[pos + 1:]
    return text[:pos] + rng.choice(alphabet) + text[pos:]


def test_seeded_header_mutations_match_the_library(tmp_path):
    rng = random.Random(9)
    base = ('{"__metadata__": {"format": "pt"}, "w": {"dtype": "BF16", "shape": [2, 3], '
            '"data_offsets": [0, 12]}, "b": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}}')
    path = tmp_path / "t.safetensors"
    disagreements = []
    for _ in range(400):
        text = base
        for _edit in range(rng.randint(1, 3)):
            text = _mutations(rng, text)
        craft(path, text, rng.choice([24, 24, 24, 20, 25, 0]))
        try:
            assert_agrees(path, text)
        except AssertionError as exc:
            disagreements.append(str(exc))
    assert not disagreements, "\n".join(disagreements[:5])


VALUE_POOL = [-1, 0, 1, 3, 6, 12, 24, 2**64 - 1, 2**64, 2.5, 12.0, "F32", "BF16", "U8", "x", "",
              None, True, False, [], {}, [0, 12], [12, 24], [2, 3], [3], [0], ["F32", [3], [12, 24]],
              {"a": "b"}, {"dtype": "F32"}, [[]], "\u00e9"]


def test_seeded_value_mutations_match_the_library(tmp_path):
    """Values swapped for others of every JSON type, at every level of the header."""
    rng = random.Random(14)
    path = tmp_path / "t.safetensors"
    disagreements, accepted = [], 0
    for _ in range(400):
        header = {"__metadata__": {"format": "pt"},
                  "w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                  "b": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}}
        for _edit in range(rng.randint(1, 2)):
            key = rng.choice(["__metadata__", "w", "b", "new"])
            target = header.get(key)
            if isinstance(target, dict) and rng.random() < 0.8:
                field = rng.choice([*target, "extra"])
                inner = target.get(field)
                if isinstance(inner, list) and inner and rng.random() < 0.5:
                    inner[rng.randrange(len(inner))] = copy.deepcopy(rng.choice(VALUE_POOL))
                else:
                    target[field] = copy.deepcopy(rng.choice(VALUE_POOL))
            else:
                header[key] = copy.deepcopy(rng.choice(VALUE_POOL))
        text = json.dumps(header)
        craft(path, text, rng.choice([24, 24, 24, 24, 12, 25, 0]))
        accepted += library_accepts(path)
        try:
            assert_agrees(path, text)
        except AssertionError as exc:
            disagreements.append(str(exc))
    assert not disagreements, "\n".join(disagreements[:5])
    assert 10 < accepted < 390  # both verdicts are exercised


# ---------------------------------------------------------------------------------------------
# the same through the CLI: one error line, nothing written, inputs untouched

CLI_CASES = {
    "list dtype": ('{"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', 8, "dtype"),
    "dict dtype": ('{"a": {"dtype": {"x": 1}, "shape": [2], "data_offsets": [0, 8]}}', 8, "dtype"),
    "list metadata": (fill('{"__metadata__": [1], "a": %s}', GOOD), 8, "__metadata__"),
    "non-string metadata": (fill('{"__metadata__": {"x": 1}, "a": %s}', GOOD), 8, "__metadata__"),
    "float shape": ('{"a": {"dtype": "F32", "shape": [64.7], "data_offsets": [0, 8]}}', 8, "shape"),
    "trailing bytes": (fill('{"a": %s}', GOOD), 9, "trailing"),
    "deep nesting": (fill('{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "z": %s}}', ("[" * 200_000 + "]" * 200_000)), 8, "nested"),
}


@pytest.fixture
def ckpt_copy(example_ckpt, tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(example_ckpt, copy)
    return copy


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_bad_header(ckpt_copy, tmp_path, case):
    header, data, needle = CLI_CASES[case]
    craft(ckpt_copy / "model.safetensors", header, data)
    before = tree_digest(ckpt_copy)
    out = tmp_path / "out"
    result = run_cli("to-safetensors", ckpt_copy, "-o", out, timeout=60)
    assert_refused(result, needle=needle, out=out, before=before, inputs=(ckpt_copy,))


def test_cli_refuses_oversized_header(ckpt_copy, tmp_path):
    craft(ckpt_copy / "model.safetensors", fill('{"a": %s}', GOOD), 8, declared=MAX_HEADER_BYTES + 1)
    out = tmp_path / "out"
    result = run_cli("to-safetensors", ckpt_copy, "-o", out)
    assert_refused(result, needle="100000000", out=out)


# ---------------------------------------------------------------------------------------------
# item 14: any JSON file nested thousands deep is one error line, not a RecursionError


def _deep(depth: int) -> str:
    return '{"x": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json",
                                  "generation_config.json", "tokenizer.json"])
def test_deeply_nested_json_file_is_refused(ckpt_copy, tmp_path, name):
    (ckpt_copy / name).write_text(_deep(200_000), encoding="utf-8")
    before = tree_digest(ckpt_copy)
    out = tmp_path / "out"
    result = run_cli("to-hf", ckpt_copy, "-o", out, timeout=60)
    assert_refused(result, needle="nested", out=out, before=before, inputs=(ckpt_copy,))
    assert name in result.error_lines[0]


def test_moderately_nested_config_still_reads(ckpt_copy, tmp_path):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["some_tool_state"] = json.loads("[" * 100 + "]" * 100)
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    result = run_cli("inspect", ckpt_copy)
    assert result.returncode == 0, result.stderr
