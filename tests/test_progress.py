"""The converting commands' progress bar: bytes written, through the API's ``progress``
callback; a bar on a terminal only, none on a pipe or with ``--quiet``; output bytes unchanged."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from mmconvert import api

EXPORTS = {
    "gguf": lambda ckpt, out, **kw: api.to_gguf(ckpt, out, outtypes=["f16", "q8_0", "q4_0"],
                                                **kw),
    "hf": lambda ckpt, out, **kw: api.to_hf(ckpt, out, max_shard_size=40_000, **kw),
    "safetensors": lambda ckpt, out, **kw: api.to_safetensors(ckpt, out, dtype="float16",
                                                              max_shard_size=40_000, **kw),
}


class Counter:
    """A progress factory that records the total and every delta (and the calling threads)."""

    def __init__(self):
        self.totals: list[int] = []
        self.deltas: list[int] = []
        self.threads: set[int] = set()

    def __call__(self, total: int):
        self.totals.append(total)
        return self.update

    def update(self, n: int) -> None:
        self.threads.add(threading.get_ident())
        self.deltas.append(n)


def _data_bytes(folder: Path) -> int:
    """Tensor bytes in the weight files of a bundle, read back from the files themselves."""
    total = 0
    for path in folder.rglob("*"):  # the HF bundle keeps its projector in a subfolder
        if path.suffix == ".gguf":
            from gguf import GGUFReader

            total += sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
        elif path.suffix == ".safetensors":
            with open(path, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            total += sum(v["data_offsets"][1] - v["data_offsets"][0]
                         for k, v in header.items() if k != "__metadata__")
    return total


def _weights(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.suffix in (".gguf", ".safetensors")}


@pytest.mark.parametrize("kind", sorted(EXPORTS))
def test_callback_counts_the_bytes_written_and_changes_no_byte(kind, example_ckpt, tmp_path):
    counter = Counter()
    with_bar = EXPORTS[kind](example_ckpt, tmp_path / "with", progress=counter).out
    without = EXPORTS[kind](example_ckpt, tmp_path / "without").out
    assert len(counter.totals) == 1  # one bar for the whole run (every outtype, the projector)
    assert counter.totals[0] == sum(counter.deltas) == _data_bytes(with_bar) > 0
    assert len(counter.deltas) > 1 and all(n > 0 for n in counter.deltas)
    weights = _weights(with_bar)
    assert len(weights) >= 2 and weights == _weights(without)
    if kind == "gguf":  # every outtype in the one total
        assert sum(p.suffix == ".gguf" for p in with_bar.iterdir()) == 4


def test_dry_run_and_library_default_report_nothing(example_ckpt, tmp_path):
    counter = Counter()
    assert api.to_gguf(example_ckpt, tmp_path / "g", dry_run=True, progress=counter).plan
    assert counter.totals == [] and counter.deltas == []


def test_tqdm_is_not_imported_by_the_writers_nor_the_commands():
    code = ("import sys, mmconvert.formats.gguf_writer, mmconvert.formats.safetensors_writer, "
            "mmconvert.convert.export_gguf, mmconvert.cli; assert 'tqdm' not in sys.modules, 'tqdm imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _run_on_terminal(args: list[str]) -> tuple[int, str]:
    """Run ``mmconvert ARGS`` with stdin/stdout/stderr on a pseudo-terminal (100 columns)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "mmconvert", *args], stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=60), out.decode("utf-8", "replace")


def _has_bar(text: str) -> bool:
    return "B/s" in text or "%|" in text


@pytest.mark.parametrize("command", [["to-gguf", "--outtype", "f16", "--outtype", "q8_0"],
                                     ["to-hf"], ["to-safetensors"]])
def test_bar_on_a_terminal_only(command, example_ckpt, tmp_path):
    name, *rest = command
    rc, text = _run_on_terminal([name, str(example_ckpt), "-o", str(tmp_path / "tty"), *rest])
    assert rc == 0, text
    assert _has_bar(text), text
    assert "wrote " in text.splitlines()[-1]  # the final line stays, after the bar is cleared

    rc, text = _run_on_terminal([name, str(example_ckpt), "-o", str(tmp_path / "quiet"), "-q",
                                 *rest])
    assert rc == 0, text
    assert not _has_bar(text) and "wrote " in text, text

    piped = subprocess.run([sys.executable, "-m", "mmconvert", name, str(example_ckpt), "-o",
                            str(tmp_path / "pipe"), *rest], capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
    assert piped.returncode == 0, piped.stderr
    assert not _has_bar(piped.stderr + piped.stdout)
    assert _weights(tmp_path / "tty") == _weights(tmp_path / "quiet") == _weights(
        tmp_path / "pipe")


@pytest.fixture(scope="module")
def f32_gguf(example_ckpt, tmp_path_factory) -> Path:
    return api.to_gguf(example_ckpt, tmp_path_factory.mktemp("verify") / "gguf",
                       outtypes=["f32"]).out


def test_verify_shows_a_bar_per_stage_on_a_terminal_only(example_ckpt, f32_gguf,
                                                           tmp_path):
    args = ["verify", str(example_ckpt), str(f32_gguf), "--backend", "gguf_torch",
            "--greedy-tokens", "2"]
    rc, text = _run_on_terminal(args)
    assert rc == 0, text
    stages = {line.split(":")[0].strip() for line in text.replace("\r", "\n").splitlines()
              if "%|" in line}
    assert any(s.startswith("reference") for s in stages), text  # the reference's pass
    assert any("[gguf_torch]" in s for s in stages), text  # the target's pass over the cases
    assert "case/s" in text or "s/case" in text, text
    assert "reference: case " not in text  # the bar stands for the per-case lines
    assert "PASS" in text.splitlines()[-1] or "pass" in text.lower(), text

    # -q and a pipe: the reference's pass alone (no bundle) is enough to show a bar
    only_reference = ["verify", str(example_ckpt), "--save-reference", str(tmp_path / "r1"),
                      "--greedy-tokens", "2"]
    rc, text = _run_on_terminal([*only_reference, "-q"])
    assert rc == 0, text
    assert not _has_bar(text) and text.strip() == "", text

    only_reference[3] = str(tmp_path / "r2")
    piped = subprocess.run([sys.executable, "-m", "mmconvert", *only_reference],
                           capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert piped.returncode == 0, piped.stderr
    assert not _has_bar(piped.stderr + piped.stdout), piped.stderr
    assert "reference: case " in piped.stderr  # a log keeps its lines
