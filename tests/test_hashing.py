import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mmconvert.formats import hashing


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCONVERT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MMCONVERT_NO_HASH_CACHE", raising=False)
    return tmp_path / "cache"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_sources_are_hashed_and_cached(tmp_path, cache_dir, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    old = time.time() - 60
    os.utime(f, (old, old))
    assert hashing.sha256_sources([f]) == {str(f): _sha(b"a" * 1000)}
    assert hashing.cache_path().is_file()
    calls = []
    monkeypatch.setattr(hashing, "sha256_file", lambda p: calls.append(p) or "x")
    assert hashing.sha256_sources([f])[str(f)] == _sha(b"a" * 1000)  # from the cache
    assert calls == []
    f.write_bytes(b"b" * 1000)  # same size, new mtime: hashed again
    os.utime(f, (old + 1, old + 1))
    assert hashing.sha256_sources([f])[str(f)] == "x"


def test_recently_written_files_are_not_cached(tmp_path, cache_dir, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 10)
    hashing.sha256_sources([f])
    calls = []
    monkeypatch.setattr(hashing, "sha256_file", lambda p: calls.append(p) or "x")
    hashing.sha256_sources([f])
    assert calls == [f]


def test_cache_can_be_disabled(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("MMCONVERT_NO_HASH_CACHE", "1")
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    old = time.time() - 60
    os.utime(f, (old, old))
    assert hashing.sha256_sources([f])[str(f)] == _sha(b"abc")
    assert not hashing.cache_path().exists()


def test_sha256_following_hashes_regions_as_they_complete(tmp_path):
    path = tmp_path / "out.bin"
    header, parts = b"HEAD", [os.urandom(3000), os.urandom(10), os.urandom(70000)]
    size = len(header) + sum(len(p) for p in parts) + 5  # trailing padding stays zero
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, header, 0)
        offsets, pos = [], len(header)
        for p in parts:
            offsets.append(pos)
            pos += len(p)

        def write(i):
            time.sleep(0.01 * (len(parts) - i))  # finish out of order
            os.pwrite(fd, parts[i], offsets[i])

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(write, i) for i in range(len(parts))]
            regions = [(offsets[i] + len(parts[i]), futures[i]) for i in range(len(parts))]
            digest = hashing.sha256_following(fd, size, regions)
    finally:
        os.close(fd)
    assert digest == _sha(path.read_bytes())


def test_cache_forgets_deleted_files(tmp_path, cache_dir):
    old = time.time() - 60
    files = []
    for name in ("a.bin", "b.bin"):
        f = tmp_path / name
        f.write_bytes(name.encode())
        os.utime(f, (old, old))
        files.append(f)
    hashing.sha256_sources(files[:1])
    files[0].unlink()
    hashing.sha256_sources(files[1:])
    import json

    kept = json.loads(hashing.cache_path().read_text())
    assert list(kept) == [str(files[1].resolve())]
