"""Sources are hashed from the bytes the conversion reads: one pass over each file for both.

Reads are counted at the Python level: every ``os.pread``/``os.preadv`` and every read of a
file object opened on a source, by file and offset, while the conversion runs. The manifest's
sha256 must be hashlib's of the whole file (header, tensors no target uses and tensors read
twice included) and the tensor data of each source must be read once, not once for the
conversion and once more for its hash.
"""

from __future__ import annotations

import builtins
import gc
import hashlib
import io
import json
import os
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mmconvert.convert.tensors import file_tensor
from mmconvert.formats import hashing
from mmconvert.formats.safetensors_io import read_safetensors_header
from mmconvert.formats.streaming import Target, TensorWrite, create_file, write_tensors
from testkit.checkpoints import ExampleOptions, write_checkpoint


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ReadCounter:
    """Bytes read from each watched file, as (offset, length) pieces."""

    def __init__(self, paths, monkeypatch):
        self.watched = {os.path.realpath(p) for p in paths}
        self.reads: dict[str, list[tuple[int, int]]] = defaultdict(list)
        real_pread, real_preadv, real_open = os.pread, os.preadv, builtins.open

        def path_of(fd: int) -> str | None:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                return None
            return target if target in self.watched else None

        def pread(fd, n, offset):
            data = real_pread(fd, n, offset)
            if (p := path_of(fd)) is not None:
                self.reads[p].append((offset, len(data)))
            return data

        def preadv(fd, buffers, offset, *flags):
            n = real_preadv(fd, buffers, offset, *flags)
            if (p := path_of(fd)) is not None:
                self.reads[p].append((offset, n))
            return n

        counter = self

        class Counted:  # a file object opened on a watched file, counting its reads
            def __init__(self, f, path):
                self._f, self._path = f, path

            def _count(self, start, n):
                counter.reads[self._path].append((start, n))

            def read(self, *args):
                start = self._f.tell()
                data = self._f.read(*args)
                self._count(start, len(data))
                return data

            def readinto(self, buf):
                start = self._f.tell()
                n = self._f.readinto(buf)
                self._count(start, n or 0)
                return n

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._f.close()

            def __iter__(self):
                return iter(self._f)

            def __getattr__(self, name):
                return getattr(self._f, name)

        def counted_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, Path)) and "r" in mode and \
                    os.path.realpath(file) in self.watched:
                return Counted(f, os.path.realpath(file))
            return f

        monkeypatch.setattr(os, "pread", pread)
        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(builtins, "open", counted_open)
        monkeypatch.setattr(io, "open", counted_open)

    def data_bytes_read(self, path: Path) -> int:
        """Bytes read at or after the start of ``path``'s tensor data (every read counted)."""
        entries, _ = read_safetensors_header(path)
        start = min(e.offset for e in entries.values())
        return sum(max(0, off + n - max(off, start)) for off, n in
                   self.reads[os.path.realpath(path)])


@pytest.fixture
def cold_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MMCONVERT_NO_HASH_CACHE", "1")
    monkeypatch.setenv("MMCONVERT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(params=["child", "taps"])
def hash_mode(request, monkeypatch):
    """``child``: sources that fit in memory are hashed by a child process (the default for
    them); ``taps``: as sources too large for that are, from the conversion's own reads."""
    if request.param == "taps":
        monkeypatch.setattr(hashing, "child_hash_room", lambda: 0)
    return request.param


class ChildLog:
    """Every hashing child started, and the order of child starts and checkpoint reads."""

    def __init__(self, monkeypatch):
        import mmconvert.convert.readers as readers

        self.children: list = []
        self.events: list[str] = []
        log = self
        real_read = readers.read_checkpoint

        class Logged(hashing._ChildHashes):
            def __init__(self, paths):
                super().__init__(paths)
                log.children.append(self)
                log.events.append("child")

        def read_checkpoint(*args, **kwargs):
            log.events.append("read")
            return real_read(*args, **kwargs)

        monkeypatch.setattr(hashing, "_ChildHashes", Logged)
        monkeypatch.setattr(readers, "read_checkpoint", read_checkpoint)


def _data_size(path: Path) -> int:
    entries, _ = read_safetensors_header(path)
    return path.stat().st_size - min(e.offset for e in entries.values())


@pytest.mark.parametrize("command", ["to_gguf", "to_safetensors"])
def test_sharded_sources_are_read_once_and_hashed_right(tmp_path, cold_cache, monkeypatch,
                                                        command, hash_mode):
    """The conversion reads each shard's data once, whoever hashes it (a child reads it
    again, from the page cache, in a process of its own)."""
    from mmconvert import api

    ckpt = write_checkpoint(tmp_path / "ckpt", ExampleOptions(shards=3))
    shards = sorted(ckpt.glob("*.safetensors"))
    assert len(shards) == 3
    counter = ReadCounter(shards, monkeypatch)
    out = tmp_path / "out"
    if command == "to_gguf":
        api.to_gguf(ckpt, out, outtypes=["f16"])
    else:
        api.to_safetensors(ckpt, out)
    read = {shard: counter.data_bytes_read(shard) for shard in shards}  # before hashing here
    manifest = json.loads((out / "mmconvert.json").read_text())
    recorded = {Path(s["path"]).name: s["sha256"] for s in manifest["sources"]}
    assert set(recorded) >= {s.name for s in shards} | {"config.json", "tokenizer.json"}
    for name, digest in recorded.items():
        assert digest == _sha(ckpt / name), name
    for shard in shards:
        assert read[shard] == _data_size(shard), shard.name


def test_a_tensor_read_twice_is_hashed_once(tmp_path, cold_cache, monkeypatch, hash_mode):
    """transformers-5 fused experts: gate and up each read the whole gate_up_proj."""
    from mmconvert import api

    ckpt = write_checkpoint(tmp_path / "ckpt", ExampleOptions(
        num_experts=4, experts_format="fused", shards=2))
    shards = sorted(ckpt.glob("*.safetensors"))
    fused = sum(e.nbytes for s in shards for e in read_safetensors_header(s)[0].values()
                if e.name.endswith("experts.gate_up_proj"))
    assert fused
    counter = ReadCounter(shards, monkeypatch)
    api.to_gguf(ckpt, tmp_path / "out", outtypes=["f16"])
    total = sum(counter.data_bytes_read(s) for s in shards)
    manifest = json.loads((tmp_path / "out" / "mmconvert.json").read_text())
    recorded = {Path(s["path"]).name: s["sha256"] for s in manifest["sources"]}
    assert all(recorded[s.name] == _sha(s) for s in shards)
    data = sum(_data_size(s) for s in shards)
    # the conversion's own second read of gate_up_proj (one per half) is all there is: the
    # hash adds no read of its own
    assert data <= total <= data + fused


@pytest.mark.parametrize("command", ["to_gguf", "to_hf", "to_safetensors"])
def test_one_child_hashes_the_sources_from_before_the_read(tmp_path, cold_cache, monkeypatch,
                                                           command):
    """Sources that fit in memory are hashed by one child process started before the
    checkpoint is read (so it runs while the tokenizer is parsed and the layout built); the
    export takes its digests over: no tap, no second child."""
    from mmconvert import api

    ckpt = write_checkpoint(tmp_path / "ckpt", ExampleOptions(shards=2))
    log = ChildLog(monkeypatch)
    taps: list = []
    real_tap = hashing.SourceTap.__init__

    def counted_tap(self, *args, **kwargs):
        taps.append(args[0])
        real_tap(self, *args, **kwargs)

    monkeypatch.setattr(hashing.SourceTap, "__init__", counted_tap)
    getattr(api, command)(ckpt, tmp_path / "out")
    assert log.events[:2] == ["child", "read"], log.events
    assert log.events.count("child") == 1, [c.paths for c in log.children]
    (child,) = log.children
    assert {p.name for p in child.paths} >= {s.name for s in ckpt.glob("*.safetensors")}
    assert child._proc.returncode == 0 and not taps and not hashing._AHEAD
    manifest = json.loads((tmp_path / "out" / "mmconvert.json").read_text())
    for source in manifest["sources"]:
        assert source["sha256"] == _sha(ckpt / Path(source["path"]).name), source["path"]


def test_nothing_outside_the_checkpoint_is_hashed_ahead(tmp_path, cold_cache, monkeypatch):
    """Hashing starts before the reader has checked the folder: a tokenizer.json that is a
    symlink out of it is not handed to the child (the reader then refuses the checkpoint)."""
    from mmconvert import api
    from mmconvert.errors import CheckpointError

    ckpt = write_checkpoint(tmp_path / "ckpt", ExampleOptions())
    outside = tmp_path / "elsewhere.json"
    (ckpt / "tokenizer.json").rename(outside)
    (ckpt / "tokenizer.json").symlink_to(outside)
    log = ChildLog(monkeypatch)
    with pytest.raises(CheckpointError):
        api.to_gguf(ckpt, tmp_path / "out", outtypes=["f16"])
    hashed = {os.path.realpath(p) for child in log.children for p in child.paths}
    assert os.path.realpath(outside) not in hashed
    assert all(c._proc.returncode is not None for c in log.children)


def test_a_child_that_fails_is_replaced_by_hashing_here(tmp_path, cold_cache, monkeypatch):
    """A child that cannot hash (here it exits at once) costs time, never a wrong digest."""
    from mmconvert import api

    monkeypatch.setattr(hashing, "_CHILD_SCRIPT", "import sys; sys.exit(3)")
    ckpt = write_checkpoint(tmp_path / "ckpt", ExampleOptions())
    api.to_gguf(ckpt, tmp_path / "out", outtypes=["f16"])
    manifest = json.loads((tmp_path / "out" / "mmconvert.json").read_text())
    assert manifest["sources"]
    for source in manifest["sources"]:
        assert source["sha256"] == _sha(ckpt / Path(source["path"]).name), source["path"]


@pytest.mark.parametrize("size", [0, 1, (16 << 20) + 5])
def test_the_child_hashes_files_of_any_size(tmp_path, size):
    """Its mapped windows cover empty files, short ones and a window plus a few bytes."""
    path = tmp_path / "f.bin"
    path.write_bytes(np.random.default_rng(size).integers(0, 256, size, np.uint8).tobytes())
    child = hashing._ChildHashes([path])
    assert child.result() == {str(path): _sha(path)}
    assert child._proc.returncode == 0


def test_a_source_cut_short_while_the_child_maps_it_is_refused(tmp_path, monkeypatch):
    """A file truncated under the child's mapping kills it with SIGBUS: the parent hashes again
    itself and, the file having changed, refuses it instead of recording any digest."""
    import signal

    from mmconvert.errors import CheckpointError

    cut_after_first_window = (
        "import mmap, os\n"
        "_real, _seen = mmap.mmap, []\n"
        "def _cutting(fd, length, **kw):\n"
        "    window = _real(fd, length, **kw)\n"
        "    if _seen: os.truncate(sys.argv[1], 4096)\n"
        "    _seen.append(1)\n"
        "    return window\n"
        "mmap.mmap = _cutting\n")
    script = hashing._CHILD_SCRIPT.replace("WINDOW = ", cut_after_first_window + "WINDOW = ")
    assert script != hashing._CHILD_SCRIPT, "the child script no longer sets WINDOW"
    monkeypatch.setattr(hashing, "_CHILD_SCRIPT", script)
    path = tmp_path / "f.bin"
    path.write_bytes(b"\x07" * (40 << 20))
    child = hashing._ChildHashes([path])
    with pytest.raises(CheckpointError, match="changed while it was being converted"):
        child.result()
    assert child._proc.returncode == -signal.SIGBUS


def test_a_source_rewritten_during_the_conversion_is_refused(tmp_path, monkeypatch):
    """The child hashes a file at another moment than the conversion reads it: a rewrite in
    between (here in place, mtime put back; ctime still moves) fails the export instead of
    recording a sha256 of other bytes than those converted, and nothing is cached."""
    from mmconvert.errors import CheckpointError

    monkeypatch.setenv("MMCONVERT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MMCONVERT_NO_HASH_CACHE", raising=False)
    path = tmp_path / "a.safetensors"
    refs = _write_file(path, {"w": np.arange(4096, dtype=np.float32).reshape(64, 64)})
    old = os.stat(path).st_mtime - 60
    os.utime(path, (old, old))
    with hashing.hashing_ahead([path]):
        child = hashing._AHEAD[os.path.realpath(path)][0]
        child.result()  # the child has read this version
        with open(path, "r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(b"\x01\x02\x03\x04")
        os.utime(path, (old, old))
        sources = hashing.SourceHashes([path], refs)
        refs[0].read()
        with pytest.raises(CheckpointError, match="changed while it was being converted"):
            sources.result()
    assert str(path.resolve()) not in hashing._load_cache()
    with hashing.hashing_ahead([path]):  # unchanged since: hashed and remembered
        assert hashing.SourceHashes([path], refs).result() == {str(path): _sha(path)}
    assert str(path.resolve()) in hashing._load_cache()


def _copy_into(out: Path, refs: list, **write_options) -> str:
    """Write ``refs``' bytes back to back into ``out`` with write_tensors; its sha256 as
    write_tensors hashed it."""
    fd = create_file(out, sum(r.nbytes for r in refs), b"")
    try:
        jobs, offset = [], 0
        for ref in refs:
            jobs.append(TensorWrite(ref, (Target(fd, offset, ref.nbytes, lambda x: x,
                                                 ref.name),)))
            offset += ref.nbytes
        (digest,) = write_tensors(jobs, hash_files=[(fd, offset)], **write_options)
    finally:
        os.close(fd)
    return digest


def _write_file(path: Path, tensors: dict[str, np.ndarray]) -> list:
    save_file(tensors, str(path))
    entries, _ = read_safetensors_header(path)
    return [file_tensor(name, entries[name]) for name in tensors]


@pytest.mark.parametrize("told", [True, False], ids=["reads-given", "reads-unknown"])
def test_taps_hash_gaps_unused_tensors_and_repeats(tmp_path, cold_cache, monkeypatch, told):
    """A file of which some tensors are never read, one is read twice and the rest out of
    order, and a second file read backwards: both digests are the files'; the taps read by
    themselves only what the conversion does not (when told what it reads)."""
    monkeypatch.setattr(hashing, "child_hash_room", lambda: 0)  # taps, not a child
    rng = np.random.default_rng(0)
    a = _write_file(tmp_path / "a.safetensors",
                    {f"t{i}": rng.standard_normal((64, 48)).astype(np.float32) for i in range(6)})
    b = _write_file(tmp_path / "b.safetensors",
                    {f"u{i}": rng.standard_normal((3, 40)).astype(np.float16) for i in range(5)})
    used = [a[3], a[1], a[1].renamed("again"), a[5], *b[::-1]]  # t0, t2, t4 never read
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    counter = ReadCounter(files, monkeypatch)
    sources = hashing.SourceHashes(files, used if told else None)
    out = tmp_path / "out.bin"
    digest = _copy_into(out, used, workers=3, chunk_bytes=1000)
    hashes = sources.result()
    read = [counter.data_bytes_read(f) for f in files]
    assert hashes == {str(f): _sha(f) for f in files}
    assert digest == _sha(out)
    assert not hashing._TAPS  # nothing left observing reads
    if told:  # the conversion read t1 twice, t3 and t5 once; the tap t0, t2, t4 once
        assert read[0] == _data_size(files[0]) + a[1].nbytes
        assert read[1] == _data_size(files[1])


def test_cached_sources_are_not_read(tmp_path, monkeypatch):
    monkeypatch.setenv("MMCONVERT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MMCONVERT_NO_HASH_CACHE", raising=False)
    refs = _write_file(tmp_path / "a.safetensors",
                       {"w": np.arange(4096, dtype=np.float32).reshape(64, 64)})
    path = tmp_path / "a.safetensors"
    old = os.stat(path).st_mtime - 60
    os.utime(path, (old, old))
    first = hashing.SourceHashes([path], refs)
    refs[0].read()  # the conversion's read feeds the tap
    assert first.result() == {str(path): _sha(path)}
    second = hashing.SourceHashes([path], refs)
    assert not hashing._TAPS  # a cache hit needs no tap
    assert second.result() == {str(path): _sha(path)}


@pytest.mark.parametrize("command", ["to-gguf", "to-hf", "to-safetensors"])
def test_a_refused_conversion_leaves_no_tap_behind(tmp_path, monkeypatch, command, hash_mode):
    """A conversion that fails mid-write (here --strict on a NaN) closes its taps and stops
    its hashing child on the way out, not whenever the garbage collector gets to it: a tap
    left registered keeps its file open and observes the next conversion's reads."""
    from click.testing import CliRunner

    from mmconvert.cli import main

    monkeypatch.setenv("MMCONVERT_NO_HASH_CACHE", "1")
    log = ChildLog(monkeypatch)
    ckpt = write_checkpoint(tmp_path / "ckpt", ExampleOptions(base_dir=tmp_path / "base"))
    weights = ckpt / "model.safetensors"
    entries, _ = read_safetensors_header(weights)
    entry = entries["language_model.model.norm.weight"]
    with open(weights, "r+b") as f:  # one NaN in a tensor every output holds
        f.seek(entry.offset)
        f.write({"F32": b"\x00\x00\xc0\x7f", "BF16": b"\xc0\x7f", "F16": b"\x00\x7e"}[entry.dtype])
    gc_was_enabled = gc.isenabled()
    gc.disable()  # only a deterministic close may count
    try:
        result = CliRunner().invoke(main, [command, str(ckpt), "-o", str(tmp_path / "out"),
                                           "--strict"])
        assert result.exit_code == 2, result.output
        assert not hashing._TAPS and not hashing._AHEAD
        assert all(child._proc.returncode is not None for child in log.children)
        assert len(log.children) == (hash_mode == "child")
    finally:
        if gc_was_enabled:
            gc.enable()


def test_no_finalizer_takes_the_hash_lock(tmp_path, monkeypatch):
    """The collector may free an unclosed SourceHashes inside ``with _lock`` (an allocation
    in sha256_sources): nothing it runs there may take that lock again. Checked on a thread
    so that a regression fails here instead of hanging the suite."""
    path = tmp_path / "a.safetensors"
    _write_file(path, {"w": np.ones((8, 8), np.float32)})
    monkeypatch.setattr(hashing, "child_hash_room", lambda: 0)  # a tap: what registers

    def leak() -> None:
        sources = hashing.SourceHashes([path])
        cycle: list = [sources]
        cycle.append(cycle)  # only the cycle collector frees it

    def collect_under_lock() -> None:
        leak()
        with hashing._lock:
            gc.collect()

    worker = threading.Thread(target=collect_under_lock, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "a finalizer deadlocked on formats.hashing._lock"
    for taps in list(hashing._TAPS.values()):  # the tap leaked on purpose: close it here
        for tap in taps:
            hashing._register(tap, False)
            tap.close()


@pytest.mark.parametrize("taps", [False, True], ids=["child-or-none", "taps"])
def test_slices_follow_the_sources_only_while_a_tap_reads_along(tmp_path, monkeypatch, taps):
    """safetensors keeps ``layers.10`` before ``layers.2``; GGUF keeps them in layer order.
    While a tap hashes a source from the conversion's reads, the writers read each source in
    file order; otherwise they fill each output from its start, so its hash never waits."""
    from mmconvert.formats import streaming

    refs = _write_file(tmp_path / "a.safetensors",
                       {f"t{i}": np.full((4, 8), i, np.float32) for i in range(5)})
    entries, _ = read_safetensors_header(tmp_path / "a.safetensors")
    in_file = sorted(refs, key=lambda r: entries[r.source_name].offset)
    wanted = in_file[::-1]  # the output's order: the reverse of the file's
    done: list[str] = []
    real = streaming._write_slice
    monkeypatch.setattr(streaming, "_write_slice",
                        lambda piece, progress: (done.append(piece.job.source.name),
                                                 real(piece, progress)))
    if taps:
        monkeypatch.setattr(hashing, "child_hash_room", lambda: 0)
    sources = hashing.SourceHashes([tmp_path / "a.safetensors"], refs)
    out = tmp_path / "out.bin"
    digest = _copy_into(out, wanted, workers=1)
    assert sources.result() == {str(tmp_path / "a.safetensors"): _sha(tmp_path / "a.safetensors")}
    assert digest == _sha(out)
    assert done == [r.name for r in (in_file if taps else wanted)]
