"""How glibc's allocator holds freed memory, set per kind of work (process-wide; glibc only,
a no-op elsewhere).

glibc serves a block below its mmap threshold from arenas it keeps, a larger one as a mapping
of its own, unmapped when freed; by default it raises the threshold to the size of any mapped
block freed (up to 32 MiB) and trims an arena's top past twice that. Two kinds of work want
opposite things:

- **Streaming** (conversions: the same 8 MB slice buffers over and over): from the arenas, so
  a freed buffer is reused instead of unmapped and page-faulted in afresh for the next slice
  (15x fewer page faults, ~1 s less system time per GB written). :data:`STREAMING`.
- **Models** (verify: tensors of 1 to 32 MiB that live for one stage, layers fetched and
  dropped per forward when offloaded): a mapping each, so what is freed leaves at once. From
  the arenas they fragment and stay resident: on the bench's 0.6B shape with a 1 GB weight
  budget and disk offload, the reference held 2.58 GB after one forward with glibc's
  defaults, 1.48 GB with the threshold at 1 MiB. :data:`MODELS`.

Setting a threshold turns glibc's adjustment off for the process, so each kind of work sets
its own when it starts (:func:`use`) instead of inheriting what ran before it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3


@dataclass(frozen=True)
class Policy:
    mmap_threshold: int  # blocks of this size and more: a mapping each
    trim_threshold: int  # free memory at an arena's top past this goes back to the kernel


STREAMING = Policy(mmap_threshold=32 << 20, trim_threshold=64 << 20)  # glibc's dynamic maximum
MODELS = Policy(mmap_threshold=1 << 20, trim_threshold=128 << 10)  # trim: glibc's default


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None  # not glibc (musl, macOS): its allocator is left as it is
    return libc


def use(policy: Policy) -> bool:
    """Hold freed memory as ``policy`` says from now on; True when the allocator took it."""
    libc = _libc()
    return bool(libc is not None
                and libc.mallopt(_M_MMAP_THRESHOLD, policy.mmap_threshold)
                and libc.mallopt(_M_TRIM_THRESHOLD, policy.trim_threshold))


def trim() -> None:
    """Give the arenas' free memory back to the kernel (after a model is freed)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
