"""The base install (``pip install .``: numpy, safetensors, gguf, tokenizers, jinja2, click,
tqdm, huggingface_hub, numba) runs every base command; a command whose extra is missing says
which one to install in one line and exits 2 (pyproject.toml's extras, the mapping in
``mmconvert/errors.py``).

"Not installed" is simulated in a real subprocess: a ``sitecustomize`` on ``PYTHONPATH``
makes torch, transformers, accelerate, peft and llama_cpp unimportable and logs every attempt
to import one, so a base command is held to never even trying.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPTIONAL = ("torch", "transformers", "accelerate", "peft", "llama_cpp")

BLOCKER = '''
import os, sys

BLOCKED = set(os.environ["MMCONVERT_TEST_BLOCK"].split(","))
LOG = os.environ["MMCONVERT_TEST_BLOCK_LOG"]


class NotInstalled:
    """Answers for the blocked packages as if they were not installed, and logs the try."""

    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in BLOCKED:
            with open(LOG, "a", encoding="utf-8") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)
        return None


sys.meta_path.insert(0, NotInstalled())
'''

INSTALL_HINT = re.compile(r"^error: .{1,80} needs the \[(hf|verify|llama)\] extra \([^)]+\): "
                          r"pip install -e '\.\[\1\]' in the mmconvert checkout$")


def blocked_env(tmp_path: Path, blocked: tuple[str, ...], log: Path,
                extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process in which ``blocked`` are not importable."""
    site = tmp_path / "site-blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    path = [str(site), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, **(extra or {}), "MMCONVERT_TEST_BLOCK": ",".join(blocked),
            "MMCONVERT_TEST_BLOCK_LOG": str(log), "PYTHONPATH": os.pathsep.join(path)}


@pytest.fixture
def without(tmp_path):
    """``without(*packages)(*cli_args, env=...)``: run ``python -m mmconvert`` (in tmp_path)
    with those packages unimportable; returns (process, the modules it tried to import)."""

    def run_without(*blocked: str):
        log = tmp_path / "blocked-imports.log"

        def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
            log.write_text("", encoding="utf-8")
            proc = subprocess.run([sys.executable, "-m", "mmconvert", *args], cwd=tmp_path,
                                  env=blocked_env(tmp_path, blocked, log, env),
                                  capture_output=True, text=True, timeout=timeout)
            return proc, sorted(set(log.read_text(encoding="utf-8").split()))

        return cli

    return run_without


def test_the_blocker_blocks(tmp_path):
    """The simulation itself: torch imports here (dev install), and not behind the blocker."""
    code = [sys.executable, "-c", "import torch.nn"]
    assert subprocess.run(code, capture_output=True, timeout=120).returncode == 0
    log = tmp_path / "log"
    proc = subprocess.run(code, capture_output=True, text=True, timeout=120,
                          env=blocked_env(tmp_path, ("torch",), log))
    assert proc.returncode == 1 and "ModuleNotFoundError: No module named 'torch'" in proc.stderr
    assert log.read_text(encoding="utf-8").split() == ["torch"]


def _ok(proc: subprocess.CompletedProcess, tried: list[str]) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert tried == [], f"a base command tried to import {tried}"


def test_every_help_runs_without_the_extras(without):
    from mmconvert.cli import main

    cli = without(*OPTIONAL)
    for args in (["--help"], ["--version"], *([name, "--help"] for name in main.commands)):
        proc, tried = cli(*args)
        _ok(proc, tried)
        assert "Usage:" in proc.stdout or "mmconvert" in proc.stdout


def test_base_commands_run_without_the_extras(without, tmp_path):
    """example, inspect, to-gguf (float and quantized), to-safetensors, to-hf (a writer only:
    numpy) and push (to the local fake Hub) with none of torch, transformers, accelerate,
    peft, llama_cpp importable, and none of them ever tried."""
    from tests.fake_hub import Account, FakeHub

    cli = without(*OPTIONAL)
    _ok(*cli("example", "ckpt"))
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    _ok(*cli("inspect", "ckpt"))
    proc, tried = cli("inspect", "ckpt", "--json")
    _ok(proc, tried)
    assert json.loads(proc.stdout)
    _ok(*cli("to-gguf", "ckpt", "-o", "gguf", "--outtype", "f16", "--outtype", "q8_0",
             "--outtype", "q4_0"))
    assert len(list((tmp_path / "gguf").glob("*.gguf"))) == 4  # three text GGUFs + projector
    _ok(*cli("to-safetensors", "ckpt", "-o", "st"))
    _ok(*cli("to-safetensors", "ckpt", "-o", "st-hf", "--naming", "hf"))
    _ok(*cli("to-hf", "ckpt", "-o", "hf"))
    token = "hf_BaseInstallToken_0123456789"
    with FakeHub({token: Account("alice")}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": token,
               "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
        _ok(*cli("push", "gguf", "--repo", "alice/tiny-gguf", env=env))


@pytest.fixture(scope="module")
def gguf_bundle(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("extras")
    for args in (["example", "ckpt"], ["to-gguf", "ckpt", "-o", "gguf", "--outtype", "f16"]):
        subprocess.run([sys.executable, "-m", "mmconvert", *args], cwd=root, check=True,
                       capture_output=True, timeout=120)
    return root / "ckpt", root / "gguf"


def _names_the_extra(proc: subprocess.CompletedProcess, extra: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, no traceback, no detail lines
    match = INSTALL_HINT.match(lines[0])
    assert match and match.group(1) == extra, lines[0]
    assert len(lines[0]) <= 200


def test_verify_without_torch_names_the_verify_extra(without, gguf_bundle):
    ckpt, gguf = gguf_bundle
    proc, tried = without(*OPTIONAL)("verify", str(ckpt), str(gguf))
    _names_the_extra(proc, "verify")
    assert "torch" in tried


def test_run_without_llama_cpp_names_the_llama_extra(without, gguf_bundle):
    _, gguf = gguf_bundle
    proc, _ = without("llama_cpp")("run", str(gguf), "--prompt", "hi", "--max-tokens", "1")
    _names_the_extra(proc, "llama")


@pytest.mark.llama
def test_run_needs_only_the_llama_extra(without, gguf_bundle):
    """[llama] without [hf]: run generates, and never tries torch or transformers."""
    from mmconvert.runtime import llama_lib

    if llama_lib.unavailable():
        pytest.skip(llama_lib.unavailable())
    _, gguf = gguf_bundle
    proc, tried = without("torch", "transformers", "accelerate", "peft")(
        "run", str(gguf), "--prompt", "The quick brown", "--max-tokens", "3")
    _ok(proc, tried)
    assert proc.stdout.strip()


def test_pickled_checkpoint_without_torch_names_the_hf_extra(without, make_checkpoint):
    ckpt = make_checkpoint(weights_format="pickle")
    for command in ("inspect", "to-gguf"):
        args = [command, str(ckpt)] + (["-o", "out"] if command == "to-gguf" else [])
        proc, _ = without(*OPTIONAL)(*args)
        _names_the_extra(proc, "hf")


def test_verify_skips_the_llama_backend_naming_the_extra(without, gguf_bundle):
    """torch present, llama_cpp not: the GGUF is still verified (torch backend) and the
    llama.cpp target's skip line says what to install."""
    ckpt, gguf = gguf_bundle
    proc, _ = without("llama_cpp")("verify", str(ckpt), str(gguf), "--device", "cpu",
                                   timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip install -e '.[llama]' in the mmconvert checkout" in proc.stdout + proc.stderr


# -- the README, docs, cards and hints install mmconvert the way that works today -----------
# `pip install [flags] mmconvert[extras]` not followed by `@ URL` (a direct reference works)
PYPI_INSTALL = re.compile(r"""pip3?\s+install\s+(?:-[-\w]+\s+)*["']?mmconvert"""
                          r"""(?:\[[\w,\s-]*\])?(?![\w.[-])(?!\s*@)""", re.I)


def _documents() -> dict[str, str]:
    texts = {"README.md": (REPO / "README.md").read_text(encoding="utf-8")}
    for path in sorted((REPO / "docs").rglob("*")):
        if path.is_file() and path.suffix in (".md", ".yml", ".yaml", ".txt", ".sh"):
            texts[str(path.relative_to(REPO))] = path.read_text(encoding="utf-8")
    for root in ("mmconvert", "convert", "formats", "verify", "runtime", "publish"):
        for path in sorted((REPO / root).rglob("*.py")):
            texts[str(path.relative_to(REPO))] = path.read_text(encoding="utf-8")
    return texts


def test_nothing_installs_mmconvert_from_pypi():
    """mmconvert is not on PyPI: `pip install mmconvert` / `pip install 'mmconvert[x]'` would
    fail (or install someone else's package), so no doc, card template or hint may say it."""
    for pypi in ("pip install mmconvert", "pip install 'mmconvert[llama]'",
                 'pip install -U "mmconvert[hf,llama]"'):
        assert PYPI_INSTALL.search(pypi), pypi
    for works in ("pip install -e '.[llama]' in the mmconvert checkout",
                  'pip install "mmconvert[verify] @ git+https://example.org/mmconvert@v1"',
                  "pip install mmconvert-other"):
        assert not PYPI_INSTALL.search(works), works
    found = [f"{name}: {m.group(0)}" for name, text in _documents().items()
             for m in PYPI_INSTALL.finditer(text)]
    assert found == []


def test_generated_model_cards_install_from_the_repository(tmp_path):
    subprocess.run([sys.executable, "-m", "mmconvert", "example", str(tmp_path / "ckpt")],
                   check=True, capture_output=True)
    for command in ("to-gguf", "to-hf"):
        subprocess.run([sys.executable, "-m", "mmconvert", command, str(tmp_path / "ckpt"),
                        "-o", str(tmp_path / command)], check=True, capture_output=True)
        card = (tmp_path / command / "README.md").read_text(encoding="utf-8")
        assert not PYPI_INSTALL.search(card), card


# -- the Makefile: the torch index is a variable, empty meaning PyPI -------------------------
def _make_n(*args: str) -> str:
    proc = subprocess.run(["make", "-n", "-C", str(REPO), "install", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_makefile_torch_index_defaults_to_pypi_and_can_be_the_cpu_index():
    plain = [line for line in _make_n("TORCH_INDEX=").splitlines() if "torch==" in line]
    assert plain and all("--index-url" not in line for line in plain), plain
    cpu = "https://download.pytorch.org/whl/cpu"
    chosen = [line for line in _make_n(f"TORCH_INDEX={cpu}").splitlines() if "torch==" in line]
    assert chosen and all(f"--index-url {cpu}" in line for line in chosen), chosen


def test_ci_entry_point_runs_exactly_the_readme_test_command():
    run = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    commands = [line for line in run.splitlines() if line and not line.startswith("#")]
    assert commands[-1] == "make test"
    assert "make test " in (REPO / "README.md").read_text(encoding="utf-8")
