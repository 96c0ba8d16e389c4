"""Packaging as a release would ship it: ``python -m build`` makes an sdist and a wheel (the
wheel built from the sdist, as build does), each installs into a fresh venv, and the installed
package runs ``example``, ``inspect``, ``to-gguf`` and ``to-hf`` from there, not from this
source tree (templates included: ``to-hf`` copies ``modeling_mmqwen3.py`` out of the package).

The venvs see the site-packages of the environment running the tests for the dependencies
(numpy, gguf, ... are not downloaded again) but get mmconvert only from the built file
(``--no-deps``). The editable
install of this checkout would still answer imports through its finder, so each venv's
``sitecustomize`` removes that finder and every module of mmconvert is checked to load from
the venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

NO_EDITABLE = '''
import sys

# this checkout's editable install (a .pth in the running environment's site-packages) adds a
# finder that maps mmconvert to the source tree; a venv testing a built package must not see it
sys.meta_path[:] = [f for f in sys.meta_path
                    if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in getattr(type(f), "__module__", "")]
'''

ALL_FROM_VENV = '''
import importlib, pkgutil, sys
import mmconvert
names = [m.name for m in pkgutil.walk_packages(mmconvert.__path__, "mmconvert.")
         if ".templates" not in m.name]
for name in names:
    if name.endswith("__main__"):
        continue
    try:
        importlib.import_module(name)
    except ImportError as exc:  # an optional extra (torch, llama_cpp): the module is there
        if exc.name and exc.name.split(".")[0].startswith("mmconvert"):
            raise
outside = [n for n, m in sys.modules.items() if n.startswith("mmconvert")
           and getattr(m, "__file__", None) and not m.__file__.startswith(sys.prefix)]
assert not outside, outside
print(len(names))
'''


def _run(args: list, cwd: Path, timeout: float = 300, env: dict | None = None):
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """sdist + wheel of this checkout, built by ``python -m build`` from a folder outside it
    (the repository's own ``build/`` folder would shadow the ``build`` package)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", out, REPO], cwd=out, timeout=600)
    return out


def _outer_site_packages() -> list[str]:
    """The site-packages folders of the environment running the tests: a venv's own when the
    suite runs in one (``--system-site-packages`` would give the base interpreter's instead,
    which need not hold the dependencies), else the global ones."""
    return [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]


def _venv(root: Path) -> Path:
    """A fresh venv that sees the running environment's packages through a ``.pth`` of plain
    folder lines (the ``.pth`` files inside them, this checkout's editable finder among
    them, are not run), with ``sitecustomize`` removing that finder in case it loads anyway."""
    _run([sys.executable, "-m", "venv", "--without-pip", root], cwd=root.parent)
    python = root / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root.parent).stdout.strip())
    (site / "outer-environment.pth").write_text("\n".join(_outer_site_packages()) + "\n",
                                                encoding="utf-8")
    (site / "sitecustomize.py").write_text(NO_EDITABLE, encoding="utf-8")
    return python


def _install_and_use(package: Path, work: Path) -> None:
    python = _venv(work / "venv")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # pip of the running env, installing into the venv's interpreter; no build isolation for
    # the sdist (setuptools comes from the running env), nothing downloaded
    _run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
          "--no-index", package], cwd=work, env=env, timeout=600)
    count = _run([python, "-c", ALL_FROM_VENV], cwd=work, env=env).stdout
    assert int(count) > 40
    mmconvert = work / "venv" / "bin" / "mmconvert"  # the console script the package declares
    _run([mmconvert, "--version"], cwd=work, env=env)
    _run([mmconvert, "example", "ckpt"], cwd=work, env=env)
    _run([mmconvert, "inspect", "ckpt"], cwd=work, env=env)
    _run([mmconvert, "to-gguf", "ckpt", "-o", "gguf", "--outtype", "f16", "--outtype", "q8_0"],
         cwd=work, env=env)
    assert len(list((work / "gguf").glob("*.gguf"))) == 3
    _run([mmconvert, "to-hf", "ckpt", "-o", "hf"], cwd=work, env=env)
    shipped = (work / "hf" / "modeling_mmqwen3.py").read_bytes()
    assert shipped == (REPO / "formats" / "templates" / "modeling_mmqwen3.py").read_bytes()


def test_wheel_installs_and_converts(dist, tmp_path):
    wheel = next(dist.glob("mmconvert-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "mmconvert/formats/templates/modeling_mmqwen3.py" in names
    assert "mmconvert/convert/readers/__init__.py" in names
    assert not [n for n in names if n.startswith(("tests/", "testkit/", "bench/"))]
    _install_and_use(wheel, tmp_path)


def test_sdist_installs_and_converts(dist, tmp_path):
    sdist = next(dist.glob("mmconvert-*.tar.gz"))
    _install_and_use(sdist, tmp_path)


def test_sdist_carries_the_test_suite(dist):
    """Decided: the sdist is the repository minus history, so its tests can run (MANIFEST.in)."""
    sdist = next(dist.glob("mmconvert-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("tests/conftest.py", "tests/test_packaging.py", "testkit/checkpoints.py",
                   "tests/hostile/harness.py", "scripts/pytest_or_fail.py", "Makefile",
                   "constraints.txt", "docs/ci/mmconvert-verify.yml",
                   "formats/templates/modeling_mmqwen3.py", "README.md"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith("bench/_work") or "__pycache__" in n]
