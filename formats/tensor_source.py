"""What the writers need of a tensor: a lazy source of storage bytes, and where it goes.

Writers stream from any object with these attributes; ``convert``'s ``TensorRef`` and
``PlannedTensor`` have them, so ``formats/`` never imports ``convert/``. Members are read-only
properties, so frozen dataclasses satisfy them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class TensorSource(Protocol):
    """A tensor not yet read. Sources that compare equal hold the same bytes (a writer storing
    both reads them once), so a source must be hashable."""

    @property
    def name(self) -> str: ...

    @property
    def source_name(self) -> str:
        """The name in the source checkpoint, for NaN/Inf warnings."""
        ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> str:
        """The storage dtype as safetensors spells it (``"BF16"``: uint16 bit patterns)."""
        ...

    @property
    def nbytes(self) -> int: ...

    @property
    def row_streamable(self) -> bool:
        """True when :meth:`read_rows` reads only the rows asked for (else read it whole)."""
        ...

    def read(self) -> np.ndarray: ...

    def read_rows(self, start: int, stop: int) -> np.ndarray: ...


class TargetTensor(Protocol):
    """One tensor of an output file: its name, shape and dtype there, and its source."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> str: ...

    @property
    def source(self) -> TensorSource: ...
