"""Issue 9 item 12: the source-hash cache must not hand out a stale sha256 for a file that was
rewritten in place keeping its size, mtime and inode."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from mmconvert.formats import hashing

from .harness import run_cli

MIB = 1 << 20


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCONVERT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MMCONVERT_NO_HASH_CACHE", raising=False)
    return tmp_path / "cache"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rewrite_in_place(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes without changing size or inode, then put the old times back."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == \
        (st.st_size, st.st_mtime_ns, st.st_ino)


def _settled_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    old = time.time() - 60  # the cache keeps only files untouched for a while
    os.utime(path, (old, old))
    return path


def test_rewrite_keeping_size_mtime_inode_is_rehashed(tmp_path, cache_dir):
    f = _settled_file(tmp_path / "w.bin", b"a" * 5000)
    assert hashing.sha256_sources([f])[str(f)] == _sha(f)
    assert hashing.cache_path().is_file()
    _rewrite_in_place(f, 2500, b"b")  # ctime moves (nothing can set it back)
    assert hashing.sha256_sources([f])[str(f)] == _sha(f)


@pytest.mark.parametrize("offset", [0, MIB - 2, 3 * MIB - 2, 2 * MIB])
def test_edge_change_is_caught_even_with_equal_stat(tmp_path, cache_dir, monkeypatch, offset):
    """A filesystem with coarse or faked timestamps: all of stat looks unchanged; a change in
    the first or last MiB still misses the cache."""
    monkeypatch.setattr(hashing, "_stat_key", lambda path: "same")
    f = _settled_file(tmp_path / "w.bin", os.urandom(3 * MIB))
    first = hashing.sha256_sources([f])[str(f)]
    _rewrite_in_place(f, offset, b"\x00\xff")
    assert hashing.sha256_sources([f])[str(f)] == _sha(f) != first


def test_what_the_cache_trusts(tmp_path, cache_dir, monkeypatch):
    """Documented limit: with all of stat equal, a change between the first and last MiB of
    a file over 2 MiB is not seen (formats/hashing.py says so)."""
    monkeypatch.setattr(hashing, "_stat_key", lambda path: "same")
    f = _settled_file(tmp_path / "w.bin", os.urandom(3 * MIB))
    first = hashing.sha256_sources([f])[str(f)]
    _rewrite_in_place(f, MIB + 10, b"\x00\xff")
    assert hashing.sha256_sources([f])[str(f)] == first


def test_manifest_gets_the_new_hash(example_ckpt, tmp_path):
    ckpt = tmp_path / "ck"
    shutil.copytree(example_ckpt, ckpt)
    weights = ckpt / "model.safetensors"
    old = time.time() - 60
    os.utime(weights, (old, old))
    env = {"MMCONVERT_CACHE_DIR": str(tmp_path / "cache"), "MMCONVERT_NO_HASH_CACHE": "0"}

    def manifest_hash(out: Path) -> str:
        result = run_cli("to-safetensors", ckpt, "-o", out, env=env)
        assert result.returncode == 0, result.stderr
        sources = json.loads((out / "mmconvert.json").read_text())["sources"]
        return next(s["sha256"] for s in sources if s["path"].endswith("model.safetensors"))

    assert manifest_hash(tmp_path / "one") == _sha(weights)
    size = weights.stat().st_size
    last = weights.read_bytes()[-1:]
    _rewrite_in_place(weights, size - 1, bytes([last[0] ^ 1]))  # a weight's last byte
    assert manifest_hash(tmp_path / "two") == _sha(weights)
