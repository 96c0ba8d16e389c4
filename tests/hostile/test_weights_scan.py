"""NaN and Inf weights: every writer warns per tensor with the count; ``--strict`` refuses.

The scan runs in the writers' own read loop (formats/streaming.py, formats/gguf_writer.py);
these tests plant non-finite values in BF16, F16 and F32 tensors of a generated checkpoint.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from mmconvert.cli import main
from mmconvert.formats.dtypes import f32_to_bf16
from mmconvert.formats.nonfinite import MAX_WARNINGS, NonFiniteScan, count_nonfinite
from tests.hostile.harness import CliResult, assert_refused, tree_digest

UP = "language_model.model.layers.0.mlp.up_proj.weight"  # BF16: 3 NaN, 1 Inf
PROJ = "multimodal_projector.projectors.m1.0.weight"  # F32: 2 Inf
NORM = "language_model.model.norm.weight"  # F16: 1 NaN
COMMANDS = ["to-gguf", "to-hf", "to-safetensors"]


@pytest.fixture(scope="module")
def poisoned(make_checkpoint, tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("nan") / "ckpt"
    shutil.copytree(make_checkpoint(), ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    up = state[UP].clone()
    up.view(-1)[[0, 5, 17]] = float("nan")
    up.view(-1)[40] = float("inf")
    state[UP] = up
    proj = state[PROJ].float().clone()
    proj.view(-1)[[1, 2]] = float("-inf")
    state[PROJ] = proj
    norm = state[NORM].half().clone()
    norm[3] = float("nan")
    state[NORM] = norm
    save_file(state, str(ckpt / "model.safetensors"))
    return ckpt


def invoke(*args: str | os.PathLike) -> CliResult:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"raised {result.exception!r}")
    return CliResult(result.exit_code, result.stdout, result.stderr, 0.0)


@pytest.mark.parametrize("command", COMMANDS)
def test_nonfinite_weights_are_named_with_their_count(poisoned, tmp_path, command):
    out = tmp_path / "out"
    result = invoke(command, poisoned, "-o", out)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    for name, counts in ((UP, "3 NaN and 1 Inf"), (PROJ, "2 Inf"), (NORM, "1 NaN")):
        lines = [line for line in warned if f"{name}: " in line]
        assert len(lines) == 1, result.stderr  # once per tensor, however many slices/files
        assert f"{name}: {counts} values" in lines[0], lines[0]
    assert not any("embed_tokens" in line for line in warned)
    assert (out / "mmconvert.json").is_file()


@pytest.mark.parametrize("command", COMMANDS)
def test_strict_refuses_and_writes_nothing(poisoned, tmp_path, command):
    out = tmp_path / "out"
    before = tree_digest(poisoned)
    result = invoke(command, poisoned, "-o", out, "--strict")
    # to-gguf logs its notes (the pre-tokenizer it chose) before writing, so before an error
    # found while writing: those lines alone may precede it
    notes = [line for line in result.stderr.splitlines() if line.startswith("pre-tokenizer ")]
    stderr = "\n".join(line for line in result.stderr.splitlines() if line not in notes)
    assert_refused(CliResult(result.returncode, result.stdout, stderr, 0.0), out=out,
                   before=before, inputs=(poisoned,))
    assert "NaN or Inf" in result.error_lines[0] and "--strict" in result.error_lines[0]
    assert UP in result.stderr  # the tensors are listed on the detail lines


def test_strict_passes_clean_weights(example_ckpt, tmp_path):
    result = invoke("to-gguf", example_ckpt, "-o", tmp_path / "out", "--strict")
    assert result.returncode == 0, result.stderr
    assert "NaN" not in result.stderr


def test_two_outtypes_scan_each_slice_once(poisoned, tmp_path):
    """The GGUF writer feeds several files from one read: counts are not doubled."""
    result = invoke("to-gguf", poisoned, "-o", tmp_path / "out", "--outtype", "f16",
                    "--outtype", "q8_0")
    assert result.returncode == 0, result.stderr
    assert f"{UP}: 3 NaN and 1 Inf values" in result.stderr


@pytest.mark.parametrize("dtype, make", [
    ("F32", lambda v: np.asarray(v, np.float32)),
    ("F16", lambda v: np.asarray(v, np.float16)),
    ("F64", lambda v: np.asarray(v, np.float64)),
    ("BF16", lambda v: f32_to_bf16(np.asarray(v, np.float32))),
])
def test_count_nonfinite_per_dtype(dtype, make):
    values = [0.0, np.nan, 1.5, np.inf, -np.inf, np.nan, -2.0, 65504.0]
    assert count_nonfinite(make(values), dtype) == (2, 2)
    assert count_nonfinite(make([0.0, -0.0, 1.0, -3.5]), dtype) == (0, 0)


def test_count_nonfinite_bf16_bit_patterns():
    # +Inf, -Inf, quiet NaN, signalling NaN, largest finite, smallest subnormal
    bits = np.array([0x7F80, 0xFF80, 0x7FC0, 0x7F81, 0x7F7F, 0x0001], np.uint16)
    assert count_nonfinite(bits, "BF16") == (2, 2)
    assert count_nonfinite(np.array([1, 2], np.int64), "I64") == (0, 0)


def test_warnings_are_capped():
    scan = NonFiniteScan()
    lines: list[str] = []
    scan.reset(strict=False, warn=lines.append)
    for i in range(MAX_WARNINGS + 5):
        scan.scan(f"t{i}", np.array([np.nan], np.float32), "F32")
    scan.finish()
    scan.finish()  # a second write call repeats nothing
    assert len(lines) == MAX_WARNINGS + 1
    assert "not listed" in lines[-1]


def test_library_callers_get_runtime_warnings():
    scan = NonFiniteScan()
    scan.scan("w", torch.tensor([float("nan")]).numpy(), "F32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scan.finish()
    assert [str(w.message).split(":")[0] for w in caught] == ["w"]


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_every_16_bit_pattern_is_classified(dtype):
    """The bit-pattern fast path against numpy's own isnan/isinf, on all 65536 patterns one
    at a time (so the any-check is tested for each) and all together."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    values = (bits.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" \
        else bits.view(np.float16)
    nan, inf = np.isnan(values), np.isinf(values)
    assert count_nonfinite(bits, dtype) == (int(nan.sum()), int(inf.sum()))
    singles = [count_nonfinite(bits[i:i + 1], dtype) for i in range(bits.size)]
    assert singles == [(int(n), int(i)) for n, i in zip(nan, inf)]
