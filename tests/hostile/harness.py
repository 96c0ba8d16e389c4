"""What every hostile-input test asserts, in one place.

A hostile case runs the real CLI in a subprocess (so a hang is bounded by a timeout and a
crash cannot take the test process with it) and checks the product's promises:
exit 2 (or a documented warning), exactly one ``error:`` line first on stderr, no traceback,
nothing under OUT nor a partial folder beside it, every input byte-identical afterwards, and
no marker file created by a planted payload.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def run_cli(*args: str | os.PathLike, timeout: float = 60, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> CliResult:
    """``python -m mmconvert ARGS`` in a subprocess; a run past ``timeout`` fails the test."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONPATH": str(REPO), **(env or {})}
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "mmconvert", *map(str, args)],
                              capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env=full_env)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"mmconvert {' '.join(map(str, args))} hung (> {timeout} s)") from exc
    return CliResult(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def tree_digest(*roots: Path) -> dict[str, str]:
    """Every file and link under ``roots``: sha256 of files, target of links (not followed)."""
    digest: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        paths = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                digest[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                digest[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                digest[str(p)] = "dir"
    return digest


def assert_refused(result: CliResult, *, needle: str | None = None, out: Path | None = None,
                   before: dict[str, str] | None = None, inputs: tuple[Path, ...] = (),
                   markers: tuple[Path, ...] = (), code: int = 2, max_len: int = 200) -> None:
    """The run was refused cleanly (see the module docstring)."""
    context = f"rc={result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == code, context
    assert "Traceback" not in result.stderr + result.stdout, context
    lines = result.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: "), context
    assert len(result.error_lines) == 1, context
    assert len(lines[0]) <= max_len, f"error line is {len(lines[0])} characters:\n{lines[0]}"
    if needle is not None:
        assert needle in result.stderr, f"{needle!r} not in:\n{result.stderr}"
    if out is not None:
        assert not out.exists() or out.is_symlink() or not any(Path(out).iterdir()), \
            f"{out} was written: {sorted(os.listdir(out))}"
        partials = [p.name for p in Path(out).parent.glob(f".{Path(out).name}.*")
                    if ".lock" not in p.name]
        assert not partials, f"left behind: {partials}"
    if before is not None:
        assert tree_digest(*inputs) == before, "an input changed"
    for marker in markers:
        assert not Path(marker).exists(), f"a planted payload ran: {marker} exists"


def reseal_manifest(bundle: Path, add: tuple[str, ...] = ()) -> None:
    """Record a bundle's files as they are now in its ``mmconvert.json`` (size and sha256;
    ``null`` stays ``null``; entries of deleted files dropped; ``add``: more files to list), as
    a writer that produced these bytes would have. A planted conversion bug then reaches
    verify's comparisons instead of its tamper check; a hostile test reseals to prove that a
    check does not rest on the manifest alone."""
    import json

    path = Path(bundle) / "mmconvert.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    outputs = []
    listed = manifest.get("outputs") or []
    for entry in [*listed, *({"path": name, "sha256": "new"} for name in add)]:
        file = Path(bundle) / entry["path"]
        if not file.is_file():
            continue
        sha = hashlib.sha256(file.read_bytes()).hexdigest() if entry.get("sha256") else None
        outputs.append({**entry, "sha256": sha, "bytes": file.stat().st_size})
    if outputs != listed:
        manifest["outputs"] = outputs
        path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
