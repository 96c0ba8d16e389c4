"""Stages of a verification, one model at a time: their time, their peak memory, and the
loading and freeing of every model, observable.

verify runs the reference, then each target, strictly one after the other; each frees its
model before the next loads (:func:`release`). :func:`track` attaches a finaliser to the
object holding a model's weights, so listeners (:data:`LISTENERS`, a test, a benchmark) see
``("load", label)`` when it is built and ``("free", label)`` when the last reference to it
is gone, i.e. when its memory can actually be reused, not when the code meant to drop it.

Peak RSS per stage: Linux keeps a per-process high-water mark (``VmHWM``) that writing ``5``
to ``/proc/self/clear_refs`` resets, so each stage starts from its own baseline. llama.cpp
runs in a worker process whose memory is not ours: a sampling thread adds the resident size
of child processes (every 50 ms). Elsewhere (no ``/proc``) only the sampler measures.
"""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from mmconvert.formats import heap

Listener = Callable[[str, str], None]  # (event "load" | "free", model label)
# everyone who wants to see models come and go; tests append and remove themselves
LISTENERS: list[Listener] = []
SAMPLE_SECONDS = 0.05


def _emit(event: str, label: str) -> None:
    for listener in list(LISTENERS):
        listener(event, label)


def track(holder: object, label: str) -> None:
    """``holder`` (the object that owns a model's weights) was just built: say so now, and
    say ``free`` when it is garbage."""
    _emit("load", label)
    weakref.finalize(holder, _emit, "free", label)


def release() -> None:
    """Give a dropped model's memory back: collect reference cycles (transformers' modules
    have some), hand the allocator's free arenas to the kernel (``formats/heap.py``), then
    return torch's cached GPU blocks."""
    gc.collect()
    heap.trim()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass
class StageStats:
    """One stage: its name, wall time, peak resident memory (this process plus its workers)
    and, on CUDA, peak GPU memory allocated by torch."""

    name: str
    seconds: float = 0.0
    peak_rss: int = 0  # bytes
    # bytes of anonymous memory (heap, tensors; not mapped files), sampled: what memory
    # pressure is made of. RSS also counts the pages of mapped GGUF files, which are page
    # cache, reclaimable, and shared by the llama.cpp worker that maps the same file
    peak_anon: int = 0
    peak_gpu: int | None = None  # bytes, None without CUDA
    note: str = ""  # e.g. "disk offload", "skipped: ..."

    def line(self) -> str:
        text = (f"stage {self.name}: {self.seconds:.1f}s, peak RSS {gib(self.peak_rss)}"
                f" (anonymous {gib(self.peak_anon)})")
        if self.peak_gpu is not None:
            text += f", peak GPU {gib(self.peak_gpu)}"
        return text + (f" ({self.note})" if self.note else "")

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "seconds": round(self.seconds, 3),
                "peak_rss_bytes": self.peak_rss, "peak_anon_bytes": self.peak_anon,
                "peak_gpu_bytes": self.peak_gpu,
                "note": self.note}


def gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.0f} MiB"


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str, pid: int | str = "self") -> int:
    """A ``kB`` field of ``/proc/PID/status`` (``VmHWM``, ``RssAnon``) in bytes; 0 where
    there is no such file or line."""
    prefix = field.encode() + b":"
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(prefix):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class _Sampler(threading.Thread):
    """Largest resident size of this process plus its children seen while running."""

    def __init__(self) -> None:
        super().__init__(daemon=True, name="verify-rss-sampler")
        import psutil

        self.process = psutil.Process()
        self.peak = 0  # this process and its children together
        self.children_peak = 0
        self.anon_peak = 0  # anonymous memory, this process and its children together
        self.stop = threading.Event()

    def sample(self) -> None:
        import psutil

        children = anon = 0
        for child in self.process.children(recursive=True):
            with suppress(psutil.Error):  # it ended between listing and reading
                children += child.memory_info().rss
                anon += _status_bytes("RssAnon", child.pid)
        self.children_peak = max(self.children_peak, children)
        self.peak = max(self.peak, self.process.memory_info().rss + children)
        self.anon_peak = max(self.anon_peak, anon + _status_bytes("RssAnon"))

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_SECONDS):
            self.sample()


@contextmanager
def measure(name: str, into: list[StageStats]) -> Iterator[StageStats]:
    """Time a stage and its peak memory; the stats are appended to ``into`` on leaving (also
    on an error, so a report shows where the time went)."""
    import torch

    heap.use(heap.MODELS)  # a model freed in one stage must not stay under the next
    stats = StageStats(name)
    exact = _reset_high_water_mark()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sampler = _Sampler()
    sampler.sample()
    sampler.start()
    start = time.perf_counter()
    try:
        yield stats
    finally:
        stats.seconds = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
        sampler.sample()
        # our exact high-water mark plus the workers' sampled one: an upper bound when both
        # peaks did not coincide, never an underestimate of our own
        own = _status_bytes("VmHWM") if exact else 0
        stats.peak_rss = max(sampler.peak, own + sampler.children_peak)
        stats.peak_anon = sampler.anon_peak
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            stats.peak_gpu = int(torch.cuda.max_memory_allocated())
        into.append(stats)
