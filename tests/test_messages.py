"""Messages a user meets: wrong-kind paths, Ctrl-C, huge tensor errors, what a conversion
printed, file modes, and the pre-tokenizer note (issue 13, items 4 and 7)."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest

from mmconvert import api
from mmconvert.cli import report_error
from mmconvert.convert.readers import read_checkpoint
from mmconvert.formats.gguf_vocab import build_vocab
from mmconvert.verify.tensorcheck import TensorDiff
from tests.hostile.harness import REPO, run_cli


@pytest.fixture(scope="module")
def st_bundle(example_ckpt, tmp_path_factory):
    return api.to_safetensors(example_ckpt, tmp_path_factory.mktemp("st") / "st").out


# 1. a path of the wrong kind
def test_verify_names_a_file_given_as_bundle(example_ckpt, tmp_path):
    (tmp_path / "random.bin").write_bytes(os.urandom(64))
    result = run_cli("verify", example_ckpt, tmp_path / "random.bin", "-q", "--device", "cpu")
    assert result.returncode == 2, result.stderr
    assert "random.bin: is a file, not a bundle folder" in result.error_lines[0]
    result = run_cli("verify", example_ckpt, tmp_path / "nope", "-q", "--device", "cpu")
    assert result.returncode == 2 and "no such bundle folder" in result.error_lines[0]


def test_run_on_a_missing_folder_says_so(tmp_path):
    result = run_cli("run", tmp_path / "nonexist", "--prompt", "hi")
    assert result.returncode == 2, result.stderr
    assert result.error_lines == [f"error: {tmp_path / 'nonexist'}: no such folder"]


# 2. Ctrl-C
def test_ctrl_c_in_verify_says_interrupted_only(example_ckpt, st_bundle):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    # Ctrl-C as a terminal delivers it: a shell's background job (CI started with `&`)
    # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all
    proc = subprocess.Popen([sys.executable, "-m", "mmconvert", "verify", str(example_ckpt),
                             str(st_bundle), "--device", "cpu"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        first = proc.stderr.readline()  # the first progress line: inside the command
        assert first, "verify printed nothing"
        while "reference:" not in first and time.monotonic() < deadline:
            first = proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest
    assert rest.strip().splitlines()[-1] == "interrupted", rest
    assert "nothing was written" not in rest and "Traceback" not in rest


@pytest.mark.parametrize("command, line", [
    ("to-gguf", "interrupted: nothing was written under the output name"),
    ("to-hf", "interrupted: nothing was written under the output name"),
    ("verify", "interrupted"), ("inspect", "interrupted")])
def test_interrupted_line_fits_the_command(command, line, capsys):
    with click.Context(click.Command(command), info_name=command):
        assert report_error(KeyboardInterrupt()) == 130
    assert capsys.readouterr().err.strip() == line


# 3. huge relative errors
def test_huge_relative_error_is_a_factor_not_a_percentage():
    from mmconvert.verify.tensorcheck import relative_text

    assert relative_text(0.0123) == "1.23% of the tensor's max |x|"
    assert relative_text(8.2e38) == "8.2e+38× the tensor's max |x|"
    assert relative_text(37.4) == "37× the tensor's max |x|"
    assert relative_text(float("inf")) == "∞× the tensor's max |x|"
    diff = TensorDiff("w", "w", "F16", "mismatch", numel=4, bad=1, max_abs=8.2e36, rel=8.2e38)
    text = diff.describe()
    assert "%" not in text and "8.2e+38×" in text, text


# 4. what a conversion prints
@pytest.mark.parametrize("command", ["to-hf", "to-safetensors", "to-gguf"])
def test_converting_commands_print_the_path_as_given_and_the_names(example_ckpt, tmp_path,
                                                                   command):
    shutil.copytree(example_ckpt, tmp_path / "ckpt")
    result = run_cli(command, "ckpt", "-o", "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"  # files in subfolders (the HF projector) are named by their path
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"wrote {len(names)} files to out: "), line
    assert sorted(line.split(": ", 1)[1].split(", ")) == names
    # the default OUT beside the checkpoint, relative as the checkpoint was given
    result = run_cli(command, "ckpt", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    kind = command.removeprefix("to-")
    assert f" files to ckpt-{kind}: " in result.stdout, result.stdout


def test_a_long_file_list_is_capped():
    from mmconvert.commands.options import wrote_line

    files = [f"model-{i:05d}.safetensors" for i in range(20)]
    line = wrote_line(Path("o"), Path("o"), files)
    assert line == f"wrote 20 files to o: {', '.join(files[:8])} and 12 more"
    assert wrote_line(None, Path("o").resolve(), files[:9]).endswith(files[8])


# 5. file modes follow the umask
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_every_written_file_follows_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        ckpt = api.example(tmp_path / "ckpt")
        outs = [ckpt, api.to_gguf(ckpt, tmp_path / "g").out,
                api.to_hf(ckpt, tmp_path / "h").out,
                api.to_safetensors(ckpt, tmp_path / "s").out]
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
             for out in outs for p in Path(out).rglob("*") if p.is_file()}
    assert "ckpt/model.safetensors" in modes
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes


# 6. the pre-tokenizer note only when the user should check it
def test_pre_tokenizer_note_only_when_not_known(example_ckpt, tmp_path):
    from testkit.qwen_vocab import build_qwen_tokenizer, qwen_vocab_size
    from tests.test_gguf_vocab import vocab_model

    qwen = build_qwen_tokenizer(tmp_path / "qwen")
    known = build_vocab(vocab_model(qwen), qwen_vocab_size())
    assert "is known" in known.pre_reason
    assert not any("pre-tokenizer" in n for n in known.notes), known.notes
    model = read_checkpoint(example_ckpt)  # structurally Qwen2's, hash not in the table
    fallback = build_vocab(model, model.text.vocab_size)
    assert fallback.pre_reason in fallback.notes
    override = build_vocab(vocab_model(qwen), qwen_vocab_size(), "gpt2")
    assert any("--pre-tokenizer" in n for n in override.notes)
