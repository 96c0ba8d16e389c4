"""The peer: llama.cpp's own ``convert_hf_to_gguf.py``, fetched at run time, never committed.

It comes from the ``llama-cpp-python`` source archive on PyPI (``pip download --no-binary
:all:``), which vendors llama.cpp. Only ``convert_hf_to_gguf.py``, the ``conversion/`` package
it imports and ``gguf-py/`` are extracted, under ``bench/_work/peer-<version>/`` (git-ignored).

Which ``gguf`` the peer runs with (``--peer-gguf``): ``pypi`` (the installed package, forced
with ``NO_LOCAL_GGUF=1``) or ``vendored`` (the archive's own ``gguf-py``, which the script puts
first on ``sys.path`` itself). ``auto`` takes PyPI's when the peer's Qwen3 code imports with
it, else the vendored one. For llama-cpp-python 0.3.36 PyPI's gguf 0.19.0 is too old (its
``MODEL_ARCH`` lacks ``DFLASH``, which ``conversion/qwen.py`` references at import), so
``auto`` resolves to ``vendored``: llama.cpp's converter exactly as that release ships it.

    python bench/peer.py                    # fetch, print where it is and which gguf it uses
    python bench/peer.py --run f16 HF_DIR   # run it alone (output removed afterwards)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work"
SCRIPT = "convert_hf_to_gguf.py"
LOCAL_PACKAGE = "conversion/"  # convert_hf_to_gguf.py imports ``conversion`` (its model classes)
GGUF_PY = "gguf-py/"  # the release's own gguf package (used when PyPI's is too old)
# module -> requirement (llama.cpp's requirements-convert_legacy_llama.txt pins this range)
PEER_DEPS = {"sentencepiece": "sentencepiece>=0.1.98,<0.3.0"}


def default_version() -> str:
    """The installed llama-cpp-python's version (the runtime the bundles are tested with)."""
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        return "0.3.36"


def fetch_peer(version: str | None = None, work: Path = WORK) -> Path:
    """A folder holding ``convert_hf_to_gguf.py`` and ``conversion/`` of that release."""
    version = version or default_version()
    dest = work / f"peer-{version}"
    if all((dest / p).exists() for p in (SCRIPT, LOCAL_PACKAGE, GGUF_PY)):
        return dest
    sdist_dir = work / "sdist"
    archive = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
                        "--no-deps", f"llama-cpp-python=={version}", "-d", str(sdist_dir)],
                       check=True)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = work / f".tmp-peer-{os.getpid()}"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
            m.name in (prefix + SCRIPT, prefix + "LICENSE")
            or m.name.startswith((prefix + LOCAL_PACKAGE, prefix + GGUF_PY)))]
        if not any(m.name == prefix + SCRIPT for m in members):
            raise SystemExit(f"{archive}: no {prefix}{SCRIPT}")
        for m in members:
            m.name = m.name[len(prefix):]
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=members, **safe)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def ensure_deps(work: Path = WORK) -> None:
    """Install the peer's requirements that mmconvert does not need (``sentencepiece``: the
    Qwen2 vocab code imports it before falling back to tokenizer.json) into
    ``bench/_work/peer-deps``, seen by the peer only."""
    missing = [req for mod, req in PEER_DEPS.items()
               if importlib.util.find_spec(mod) is None and not (work / "peer-deps" / mod).exists()]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", str(work / "peer-deps"), *missing], check=True)


def peer_env(gguf: str, work: Path = WORK) -> dict[str, str]:
    """Environment for the peer: the chosen ``gguf`` (``pypi``/``vendored``), its extra
    requirements, no network."""
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    if gguf == "pypi":
        env["NO_LOCAL_GGUF"] = "1"
    deps = str(work / "peer-deps")
    env["PYTHONPATH"] = deps + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


# imports the peer's Qwen3 code the way the script does, then names the gguf it got
_PROBE = ("import sys, os; sys.path.insert(0, '.');"
          "'NO_LOCAL_GGUF' in os.environ or sys.path.insert(1, 'gguf-py');"
          "import conversion, gguf; conversion.get_model_class('Qwen3ForCausalLM');"
          "print(gguf.__file__)")


def gguf_used(peer_dir: Path, gguf: str) -> str:
    """Which ``gguf`` the peer imports with that choice (version or 'vendored', location);
    raises ``CalledProcessError`` when the peer's Qwen3 code does not import with it."""
    out = subprocess.run([sys.executable, "-c", _PROBE], cwd=peer_dir, env=peer_env(gguf),
                         capture_output=True, text=True, check=True)
    if gguf == "pypi":
        return f"gguf {importlib.metadata.version('gguf')} from PyPI, {out.stdout.strip()}"
    meta = (peer_dir / GGUF_PY / "pyproject.toml").read_text()
    version = re.search(r'^version\s*=\s*"([^"]+)"', meta, re.M)
    return (f"gguf-py {version.group(1) if version else '?'} from the archive, "
            f"{out.stdout.strip()}")


def choose_gguf(peer_dir: Path, prefer: str = "auto") -> tuple[str, str]:
    """(``pypi`` or ``vendored``, description of the module the peer will import)."""
    if prefer in ("auto", "pypi"):
        try:
            return "pypi", gguf_used(peer_dir, "pypi")
        except subprocess.CalledProcessError as exc:
            if prefer == "pypi":
                raise SystemExit("the peer does not run with PyPI's gguf:\n" + exc.stderr) from exc
    return "vendored", gguf_used(peer_dir, "vendored")


def peer_command(peer_dir: Path, hf_dir: Path, outtype: str, outfile: Path) -> list[str]:
    return [sys.executable, str(peer_dir / SCRIPT), str(hf_dir), "--outtype", outtype,
            "--outfile", str(outfile)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default=None,
                        help="llama-cpp-python release [default: the installed one]")
    parser.add_argument("--peer-gguf", choices=["auto", "pypi", "vendored"], default="auto",
                        help="which gguf package the peer uses [auto]")
    parser.add_argument("--run", metavar="OUTTYPE", choices=["f16", "bf16", "q8_0", "f32"],
                        help="also convert HF_DIR with it once and report time and peak RSS")
    parser.add_argument("hf_dir", nargs="?", type=Path, help="Qwen3 HF folder (with --run)")
    args = parser.parse_args(argv)
    peer_dir = fetch_peer(args.version)
    ensure_deps()
    gguf, where = choose_gguf(peer_dir, args.peer_gguf)
    print(f"peer: {peer_dir / SCRIPT}\ngguf: {gguf} ({where})")
    if args.run:
        if args.hf_dir is None:
            parser.error("--run needs HF_DIR")
        from measure import run_measured, warm

        out = WORK / f"peer-alone.{args.run}.gguf"
        warm(args.hf_dir)
        m = run_measured(peer_command(peer_dir, args.hf_dir, args.run, out), env=peer_env(gguf),
                         log=WORK / "peer-alone.log")
        size = out.stat().st_size if out.exists() else 0
        out.unlink(missing_ok=True)
        print(f"rc {m.returncode}, {m.wall_s:.2f} s, peak RSS {m.peak_rss_mb:.0f} MB "
              f"(tree {m.tree_rss_mb:.0f} MB, anon {m.anon_mb:.0f} MB), output {size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
