"""A plan: what each output tensor is, where it comes from, and what is done to it.

Writers only execute plans; ``--dry-run`` prints them. The transform chain of a planned tensor
is its source's ``derivation`` (pure functions from :mod:`mmconvert.convert.transforms`) plus
the final cast or quantization to ``dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmconvert.convert.tensors import TensorRef


@dataclass(frozen=True)
class Piece:
    """How a target tensor relates to canonical tensors when it is not exactly one of them.

    ``kind``: ``"item"`` (the target is item ``index`` of the leading axis of canonical
    ``parts[0]``: one expert of stacked experts) or ``"concat"`` (the target is the canonical
    ``parts`` concatenated along ``axis``, ``sizes`` long each: a fused gate/up). Written to
    the manifest (``pieces``) so that ``verify`` maps the bundle back to canonical tensors.
    """

    kind: str
    parts: tuple[str, ...]
    index: int = 0
    axis: int = 0
    sizes: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        if self.kind == "item":
            return {"kind": "item", "of": self.parts[0], "index": self.index}
        return {"kind": "concat", "parts": list(self.parts), "axis": self.axis,
                "sizes": list(self.sizes)}


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor (a :class:`~mmconvert.formats.tensor_source.TargetTensor`)."""

    name: str  # target name in the output file
    source: TensorRef  # lazy canonical tensor (already carrying its derivation)
    dtype: str  # target dtype: a safetensors dtype ("BF16") or a GGML type name ("Q8_0")
    shape: tuple[int, ...]  # target shape, row-major as the consumer reads it
    file: str = ""  # output file (set by writers that split into several)
    piece: Piece | None = None  # set when the target is not one canonical tensor as it is

    @property
    def transforms(self) -> tuple[str, ...]:
        steps = list(self.source.derivation)
        if self.dtype != self.source.dtype:
            steps.append(f"{self.source.dtype}->{self.dtype}")
        return tuple(steps)


def step_label(step: str) -> str:
    """A transform step without its parameters: ``split_gate_up(gate,up)[gate]`` ->
    ``split_gate_up``."""
    return step.split("(")[0].split("[")[0]


@dataclass
class Plan:
    kind: str  # "hf", "safetensors", "gguf", "mmproj"
    tensors: list[PlannedTensor]
    notes: list[str] = field(default_factory=list)
    # the projectors as this target stores them (layers after gates are applied or linear
    # maps folded), for the target's own metadata; empty for plans without projectors
    projectors: dict[str, Any] = field(default_factory=dict)

    def transforms_applied(self) -> list[str]:
        """Distinct transform names across the plan (for the manifest)."""
        return list(self.transform_counts())

    def transform_counts(self) -> dict[str, int]:
        """Transform name -> how many planned tensors it touches, in first-seen order."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            for label in dict.fromkeys(step_label(s) for s in t.transforms):
                counts[label] = counts.get(label, 0) + 1
        return counts

    def pieces(self) -> dict[str, dict[str, Any]]:
        """Target name -> :class:`Piece` JSON for targets that are not one canonical tensor."""
        return {t.name: t.piece.to_json() for t in self.tensors if t.piece is not None}

    def describe(self) -> str:
        """A fixed-width table of the plan (``--dry-run``)."""
        rows = [("target", "shape", "dtype", "source", "transforms")]
        for t in self.tensors:
            rows.append((t.name, "x".join(map(str, t.shape)) or "scalar", t.dtype,
                         t.source.source_name, ", ".join(t.transforms) or "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [f"# plan: {self.kind} ({len(self.tensors)} tensors)"]
        lines += [f"# {n}" for n in self.notes]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        return "\n".join(lines)
