"""A plan: what each output tensor is, where it comes from, and what is done to it.

Writers only execute plans; ``--dry-run`` prints them. The transform chain of a planned tensor
is its source's ``derivation`` (pure functions from :mod:`mmconvert.convert.transforms`) plus
the final cast or quantization to ``dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmconvert.convert.tensors import TensorRef


@dataclass(frozen=True)
class PlannedTensor:
    name: str  # target name in the output file
    source: TensorRef  # lazy canonical tensor (already carrying its derivation)
    dtype: str  # target dtype: a safetensors dtype ("BF16") or a GGML type name ("Q8_0")
    shape: tuple[int, ...]  # target shape, row-major as the consumer reads it
    file: str = ""  # output file (set by writers that split into several)

    @property
    def transforms(self) -> tuple[str, ...]:
        steps = list(self.source.derivation)
        if self.dtype != self.source.dtype:
            steps.append(f"{self.source.dtype}->{self.dtype}")
        return tuple(steps)


@dataclass
class Plan:
    kind: str  # "hf", "safetensors", "gguf", "mmproj"
    tensors: list[PlannedTensor]
    notes: list[str] = field(default_factory=list)

    def transforms_applied(self) -> list[str]:
        """Distinct transform names across the plan (for the manifest)."""
        seen: list[str] = []
        for t in self.tensors:
            for step in t.transforms:
                label = step.split("(")[0]
                if label not in seen:
                    seen.append(label)
        return seen

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
