"""What each target's plan would do to the checkpoint, for ``mmconvert inspect``.

Plans are lazy (no tensor is read to build one), so planning every target costs a few
milliseconds even for a large model. A target the checkpoint cannot be exported to (e.g. a
Qwen3-MoE layout llama.cpp cannot run) reports why instead.
"""

from __future__ import annotations

from typing import Any

from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan import Plan, step_label
from mmconvert.errors import MMConvertError

MAX_VARIANTS = 3  # distinct parameterisations listed per transform


def _summarise(plans: list[Plan]) -> dict[str, Any]:
    transforms: dict[str, dict[str, Any]] = {}
    for plan in plans:
        for t in plan.tensors:
            for step in dict.fromkeys(t.transforms):
                entry = transforms.setdefault(step_label(step), {"tensors": 0, "steps": []})
                entry["tensors"] += 1
                if step not in entry["steps"] and len(entry["steps"]) < MAX_VARIANTS:
                    entry["steps"].append(step)
    return {"tensors": sum(len(p.tensors) for p in plans), "transforms": transforms,
            "notes": [n for p in plans for n in p.notes]}


def planned_transforms(model: CanonicalModel, fold_linear: bool = False) -> dict[str, Any]:
    """Target -> {tensors, transforms: {name: {tensors, steps}}, notes} (or {error}), for the
    default options of each command (``--fold-linear`` as given)."""
    from mmconvert.convert.plan_gguf import plan_gguf
    from mmconvert.convert.plan_hf import plan_hf
    from mmconvert.convert.plan_mmproj import plan_mmproj
    from mmconvert.convert.plan_safetensors import plan_safetensors

    builders = {
        "gguf": lambda: [plan_gguf(model, "auto")] +
        ([plan_mmproj(model, "f16", fold_linear)] if model.projectors else []),
        "hf": lambda: list(plan_hf(model, "auto", fold_linear)),
        "safetensors": lambda: [plan_safetensors(model, "source")],
    }
    out: dict[str, Any] = {}
    for target, build in builders.items():
        try:
            out[target] = _summarise(build())
        except (MMConvertError, ValueError) as exc:
            out[target] = {"error": str(exc)}
    return out


def format_planned(plans: dict[str, Any], fold_linear: bool = False) -> list[str]:
    """The ``inspect`` text lines for :func:`planned_transforms`."""
    options = "default options" + (", --fold-linear" if fold_linear else "")
    lines = [f"transforms each export applies ({options}):"]
    for target, summary in plans.items():
        if "error" in summary:
            lines.append(f"  {target}: cannot export: {summary['error']}")
            continue
        steps = summary["transforms"]
        lines.append(f"  {target}: {summary['tensors']} tensors" + ("" if steps else
                                                                    ", copied as they are"))
        for name, entry in steps.items():
            shown = ", ".join(entry["steps"]) if entry["steps"] != [name] else ""
            lines.append(f"    {name:<22} {entry['tensors']:>5} tensors"
                         + (f"  ({shown})" if shown else ""))
    return lines
