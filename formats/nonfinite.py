"""NaN and Inf values in the weights, counted while the writers stream them.

One NaN in a weight turns a whole quantized block (32 or 256 values) into NaN and every logit
that touches it, so the writers count non-finite values in each slice they already read
(:func:`count_nonfinite`: a bit test, no second read of the data) into the process-wide
:data:`SCAN`. At the end of each write call :meth:`NonFiniteScan.finish` either warns (one
line per tensor, capped at :data:`MAX_WARNINGS`) or, with ``--strict``, raises
:class:`NonFiniteWeightsError` while the output is still a temporary folder, so nothing is
left under OUT.

The CLI's converting commands run inside :func:`scanning` (``mmconvert/cli.py``), which resets
the tally, sets the policy and prints the warnings on stderr; library callers get them as
``RuntimeWarning``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from mmconvert.errors import NonFiniteWeightsError

MAX_WARNINGS = 10  # tensors named one per line; the rest are counted on one more line
# 16-bit floats by their bit patterns: exponent all ones is Inf (zero mantissa) or NaN
_HALF_BITS = {"BF16": (0x7F80, 0x007F), "F16": (0x7C00, 0x03FF)}  # (exponent, mantissa)


def _any_nonfinite_16(bits: np.ndarray, exponent: int) -> bool:
    """Two max reductions, no temporary array: a non-finite value is the largest positive
    pattern (>= exponent as int16) or, negative, the largest uint16 (>= 0x8000 | exponent)."""
    if not bits.size:
        return False
    return bool(bits.max() >= (0x8000 | exponent) or bits.view(np.int16).max() >= exponent)


def count_nonfinite(data: np.ndarray, dtype: str) -> tuple[int, int]:
    """(NaN count, Inf count) in a storage array of safetensors dtype ``dtype`` (BF16 as
    uint16 bit patterns). A fast any-check first; the exact count only when it finds one."""
    if dtype in _HALF_BITS:
        exponent, mantissa = _HALF_BITS[dtype]
        bits = np.ascontiguousarray(data).view(np.uint16)
        if not _any_nonfinite_16(bits, exponent):
            return 0, 0
        special = (bits & exponent) == exponent
        nan = int(np.count_nonzero(special & ((bits & mantissa) != 0)))
        return nan, int(np.count_nonzero(special)) - nan
    if data.dtype.kind != "f":
        return 0, 0
    bad = data.size - int(np.count_nonzero(np.isfinite(data)))
    if not bad:
        return 0, 0
    nan = int(np.count_nonzero(np.isnan(data)))
    return nan, bad - nan


def _describe(name: str, nan: int, inf: int) -> str:
    counts = " and ".join(f"{n} {what}" for n, what in ((nan, "NaN"), (inf, "Inf")) if n)
    return f"{name}: {counts}"


class NonFiniteScan:
    """Per-tensor NaN/Inf counts of one run, filled from the writers' threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.strict = False
        self.found: dict[str, list[int]] = {}  # tensor name -> [nan, inf]
        self._warned: set[str] = set()
        self._capped = False
        self.warn: Callable[[str], None] | None = None  # None: RuntimeWarning

    def reset(self, strict: bool = False, warn: Callable[[str], None] | None = None) -> None:
        with self._lock:
            self.strict, self.warn = strict, warn
            self.found.clear()
            self._warned.clear()
            self._capped = False

    def scan(self, name: str, data: np.ndarray, dtype: str) -> None:
        """Count the non-finite values of one slice of tensor ``name``."""
        nan, inf = count_nonfinite(data, dtype)
        if nan or inf:
            with self._lock:
                counts = self.found.setdefault(name, [0, 0])
                counts[0] += nan
                counts[1] += inf

    def finish(self) -> None:
        """End of a write call: raise under ``strict``, else warn once per new tensor."""
        with self._lock:
            new = [(n, c) for n, c in self.found.items() if n not in self._warned]
            if not new:
                return
            if self.strict:
                lines = [_describe(n, *c) for n, c in new]
                more = [f"... and {len(lines) - MAX_WARNINGS} more"] \
                    if len(lines) > MAX_WARNINGS else []
                raise NonFiniteWeightsError(
                    f"{len(new)} weight tensor(s) hold NaN or Inf values; --strict refuses "
                    "to write them\n" + "\n".join(lines[:MAX_WARNINGS] + more))
            lines = []
            for name, counts in new:
                if len(self._warned) < MAX_WARNINGS:
                    lines.append(f"{_describe(name, *counts)} values (a NaN spoils its whole "
                                 "quantized block)")
                elif not self._capped:
                    lines.append("more weight tensors hold NaN or Inf values (not listed); "
                                 "--strict refuses them all")
                    self._capped = True
                self._warned.add(name)
        for line in lines:
            if self.warn is None:
                warnings.warn(line, RuntimeWarning, stacklevel=2)
            else:
                self.warn(line)


SCAN = NonFiniteScan()
_depth = 0


@contextmanager
def scanning(strict: bool, warn: Callable[[str], None]) -> Iterator[NonFiniteScan]:
    """The policy for one command; a nested command (``--verify`` runs ``verify`` in the same
    process) keeps the outer one's tally and policy."""
    global _depth
    if _depth == 0:
        SCAN.reset(strict, warn)
    _depth += 1
    try:
        yield SCAN
    finally:
        _depth -= 1
        if _depth == 0:
            SCAN.reset()
