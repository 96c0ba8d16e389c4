"""Name clean-up every reader applies before mapping to canonical names.

Training wrappers prefix state-dict keys: DDP and FSDP add ``module.``, ``torch.compile`` adds
``_orig_mod.``, Lightning-style modules add ``model.``. They are stripped (repeatedly, in any
order) only while what follows is still a known top-level name, so a genuine ``model.layers``
is never touched. Fused dense ``gate_up_proj [2I, H]`` weights are split into the canonical
``gate_proj``/``up_proj`` pair (lazily, by row slices), as
:func:`mmconvert.convert.transforms.split_gate_up` defines the halves.
"""

from __future__ import annotations

import re
from dataclasses import replace

from mmconvert.convert.config_values import shown
from mmconvert.convert.tensors import Origin, TensorRef, stack_tensors
from mmconvert.errors import CheckpointError

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")
FUSED_GATE_UP = re.compile(r"^(.*\.mlp\.)gate_up_proj\.weight$")


def strip_wrapper_prefixes(name: str, roots: tuple[str, ...]) -> tuple[str, list[str]]:
    """Strip wrapper prefixes from ``name`` while the rest still starts with one of ``roots``
    once stripped; returns (clean name, prefixes removed)."""
    removed: list[str] = []
    while not name.startswith(roots):
        prefix = next((p for p in WRAPPER_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            break
        name = name[len(prefix):]
        removed.append(prefix)
    return name, removed


def unwrap_names(refs: dict[str, TensorRef], roots: tuple[str, ...]
                 ) -> tuple[dict[str, TensorRef], list[str]]:
    """Rename every tensor with its wrapper prefixes stripped; report what was stripped."""
    out: dict[str, TensorRef] = {}
    seen: list[str] = []
    for name, ref in refs.items():
        clean, removed = strip_wrapper_prefixes(name, roots)
        if clean in out:
            first = next(n for n, r in refs.items() if n != name and
                         strip_wrapper_prefixes(n, roots)[0] == clean)
            raise CheckpointError(
                f"tensors {shown(first)} and {shown(name)} both become {shown(clean)} once the "
                "wrapper prefixes (module., _orig_mod., ...) are stripped; keep one of them",
                name=clean)
        out[clean] = ref.renamed(clean)
        for p in removed:
            if p not in seen:
                seen.append(p)
    return out, seen


def split_fused_gate_up(lm: dict[str, TensorRef], gate_first: bool = True) -> tuple[dict[str, TensorRef], int]:
    """Replace ``*.mlp.gate_up_proj.weight [2I, H]`` by lazy ``gate_proj``/``up_proj`` halves."""
    out: dict[str, TensorRef] = {}
    fused = 0
    for name, ref in lm.items():
        m = FUSED_GATE_UP.match(name)
        if not m or len(ref.shape) != 2:
            out[name] = ref
            continue
        fused += 1
        half = ref.shape[0] // 2
        if ref.shape[0] != 2 * half:
            raise ValueError(f"{ref.source_name}: fused gate/up has an odd row count {ref.shape[0]}")
        # a 2-D split is two row ranges (split_gate_up's semantics), read lazily by rows
        order = "gate,up" if gate_first else "up,gate"
        gate_rows, up_rows = ((0, half), (half, 2 * half)) if gate_first else ((half, 2 * half), (0, half))
        for part, (lo, hi) in (("gate", gate_rows), ("up", up_rows)):
            target = f"{m.group(1)}{part}_proj.weight"
            out[target] = replace(ref.row_slice(target, f"split_gate_up({order})[{part}]", lo, hi),
                                  origin=Origin("slice", 0, lo, hi))
    return out, fused


# an expert index of up to 9 digits (a longer one is an unexpected tensor, reported as such)
PER_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(\d{1,9})\.(gate|up|down)_proj\.weight$")
FUSED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)gate_up_proj$")


def stack_experts(lm: dict[str, TensorRef], gate_first: bool = True) -> tuple[dict[str, TensorRef], int]:
    """Bring Qwen3-MoE experts to the canonical stacked form (``experts.{gate,up,down}_proj``).

    Accepts what ``save_pretrained`` writes (``experts.{e}.gate_proj.weight``, one tensor per
    expert: stacked lazily, reading one expert per row) and what transformers 5 holds in memory
    (``experts.gate_up_proj [E, 2I, H]``: split along axis 1, row-separable so it streams; its
    ``experts.down_proj [E, H, I]`` already has the canonical name).
    """
    out: dict[str, TensorRef] = {}
    groups: dict[tuple[str, str], dict[int, TensorRef]] = {}
    for name, ref in lm.items():
        m = PER_EXPERT.match(name)
        if m:
            groups.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = ref
            continue
        m = FUSED_EXPERTS.match(name)
        if m and len(ref.shape) == 3:
            half = ref.shape[1] // 2
            shape = (ref.shape[0], half, ref.shape[2])
            order = "gate,up" if gate_first else "up,gate"
            for part, first_half in (("gate", gate_first), ("up", not gate_first)):
                sl = slice(0, half) if first_half else slice(half, 2 * half)
                split = ref.derive(f"{m.group(1)}{part}_proj", f"split_gate_up({order})[{part}]",
                                   lambda a, sl=sl: a[:, sl, :], shape, row_separable=True)
                out[split.name] = replace(split, origin=Origin("slice", 1, sl.start, sl.stop))
            continue
        out[name] = ref
    for (prefix, part), experts in groups.items():
        count = len(experts)
        if max(experts) != count - 1:  # distinct indices: complete iff the largest is n - 1
            # bounded by the tensors present, never by the largest index a name claims
            missing = [e for e in range(count) if e not in experts][:3]
            raise ValueError(f"{prefix}: experts {missing} missing for {part}_proj")
        name = f"{prefix}{part}_proj"
        out[name] = stack_tensors(name, [experts[e] for e in range(count)], "stack_experts",
                                  f"{prefix}*.{part}_proj.weight")
    return out, len(groups)
