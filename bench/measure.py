"""Wall time and peak memory of one child process (and everything it starts).

- ``peak_rss``: the kernel's per-process high-water mark (``VmHWM`` in ``/proc/PID/status``),
  read every ``poll`` seconds for every process of the tree; the largest last-seen value. The
  kernel keeps the mark itself, so peaks between two reads are not missed (only growth in the
  last ``poll`` seconds before a process exits could be). It is the number the targets are
  judged on, unless ``tree_rss`` is larger.
- ``tree_rss``: sampled every ``poll`` seconds, the *sum* of RSS over the child and all its
  descendants (catches tools that run several processes at once).
- ``anon``: the same sampled sum, without file-backed pages (RSS minus ``shared``: what the
  processes allocated, as opposed to file pages they have mapped).
- ``cpu_s``: user + system CPU time (``wait4``): less sensitive than wall time to other
  processes sharing the cores.
- ``kernel_maxrss``: ``ru_maxrss`` from ``wait4`` (what ``/usr/bin/time`` prints), kept for
  reference only: Linux carries the *forking parent's* high-water mark over ``exec`` into it,
  so it never reads below the benchmark process's own RSS (~50 MB).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

MB = 1e6


@dataclass(frozen=True)
class Measurement:
    returncode: int
    wall_s: float
    peak_rss: int  # bytes, VmHWM of the largest process in the tree
    tree_rss: int  # bytes, sampled peak of the tree's summed RSS
    anon: int  # bytes, sampled peak of the tree's summed anonymous RSS
    kernel_maxrss: int  # bytes, ru_maxrss from wait4 (includes the parent's pre-exec mark)
    cpu_s: float  # user + system CPU seconds of the child and its waited-for descendants

    @property
    def peak_rss_mb(self) -> float:
        return max(self.peak_rss, self.tree_rss) / MB

    @property
    def tree_rss_mb(self) -> float:
        return self.tree_rss / MB

    @property
    def anon_mb(self) -> float:
        return self.anon / MB


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class _TreeSampler(threading.Thread):
    def __init__(self, pid: int, poll: float):
        super().__init__(daemon=True)
        self.pid = pid
        self.poll = poll
        self.stop = threading.Event()
        self.rss = 0
        self.anon = 0
        self.hwm: dict[int, int] = {}  # pid -> last VmHWM seen (monotonic after its exec)

    @property
    def peak(self) -> int:
        return max(self.hwm.values(), default=0)

    def run(self) -> None:
        try:
            self.root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self.stop.is_set():
            rss = anon = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = [self.root]
            for p in procs:
                try:
                    info = p.memory_info()
                except psutil.Error:
                    continue
                rss += info.rss
                anon += info.rss - info.shared
                hwm = _vm_hwm(p.pid)
                if hwm:
                    self.hwm[p.pid] = hwm
            self.rss = max(self.rss, rss)
            self.anon = max(self.anon, anon)
            self.stop.wait(self.poll)


def run_measured(cmd: Sequence[str], *, env: dict[str, str] | None = None,
                 cwd: Path | None = None, log: Path | None = None,
                 poll: float = 0.02) -> Measurement:
    """Run ``cmd`` to completion; stdout and stderr go to ``log`` (or are discarded)."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        sampler = _TreeSampler(proc.pid, poll)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            out.close()
    return Measurement(proc.returncode, wall, sampler.peak, sampler.rss, sampler.anon,
                       usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime)


def warm(*paths: Path) -> int:
    """Read every file under ``paths`` once (page cache warm for whoever reads them next);
    returns the bytes read."""
    total = 0
    buf = bytearray(16 << 20)
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    total += n
    return total


def settle() -> None:
    """Flush dirty pages (a previous run's output) so they are not written back during the next."""
    os.sync()


# virtio-balloon free page reporting (Firecracker and other VMs): a guest page left free for
# ~2 s is handed back to the host, and the next first touch of it costs a host page fault.
# Measured on this project's VM: writing 1.2 GB into the page cache took 3.5 s of system time
# from settled memory and 0.3 s right after the same amount was freed; both tools write
# their whole output that way, so which state a run starts from moves wall times by seconds.
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/reported_kib")


def _reported_kib() -> int | None:
    try:
        return int(PAGE_REPORTING.read_text())
    except (OSError, ValueError):
        return None


def settle_memory(quiet_s: float = 3.0, limit_s: float = 60.0) -> float:
    """Wait until the host has taken back the guest's free memory (the reporting counter has
    not moved for ``quiet_s``), so that every run starts from the same state whatever ran
    before it; seconds waited (0 on a machine without free page reporting)."""
    last = _reported_kib()
    if last is None:
        return 0.0
    start = quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s and time.monotonic() - start < limit_s:
        time.sleep(0.25)
        now = _reported_kib()
        if now != last:
            last, quiet_since = now, time.monotonic()
    return time.monotonic() - start


def _page_cache_write_gbps(path: Path, nbytes: int) -> float:
    block = b"\x5a" * (8 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for offset in range(0, nbytes, len(block)):
            os.pwrite(fd, block, offset)
        return nbytes / (time.perf_counter() - start) / 1e9
    finally:
        os.close(fd)
        path.unlink()


def first_touch_probe(directory: Path, nbytes: int = 512 << 20) -> dict[str, float] | None:
    """Page-cache write speed (GB/s) into settled memory and into memory freed a moment
    before: how much this machine charges a run for memory it touches first. None where the
    kernel reports no free pages to a host (both speeds are then the same)."""
    if _reported_kib() is None:
        return None
    settle_memory()
    settled = _page_cache_write_gbps(directory / "first-touch-probe", nbytes)
    recycled = _page_cache_write_gbps(directory / "first-touch-probe", nbytes)
    os.sync()
    return {"settled_gbps": settled, "recycled_gbps": recycled}


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
