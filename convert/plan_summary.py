"""What each target's plan would do to the checkpoint, for ``mmconvert inspect``.

Plans are lazy (no tensor is read to build one), so planning every target costs a few
milliseconds even for a large model. A target the checkpoint cannot be exported to (e.g. a
Qwen3-MoE layout llama.cpp cannot run) reports why instead.
"""

from __future__ import annotations

import re
from typing import Any

from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan import Plan, step_label
from mmconvert.errors import MMConvertError
from mmconvert.formats.gguf_constants import MIXTURE_BASE
from mmconvert.formats.gguf_mixtures import quantizable

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
    if "error" not in out["gguf"]:
        out["gguf"]["types"] = mixture_types(model)
    return out


def mixture_types(model: CanonicalModel) -> dict[str, dict[str, Any]]:
    """K-quant ``--outtype`` -> {summary: one line, tensors: {GGUF name: type}}: the type
    llama-quantize's rules give every text tensor (no overrides)."""
    from mmconvert.convert.plan_gguf import plan_gguf, text_sources

    sources = text_sources(model)
    out = {}
    for mixture in MIXTURE_BASE:
        plan = plan_gguf(model, mixture.lower(), sources)
        out[mixture.lower()] = {"summary": type_summary(plan),
                                "tensors": {t.name: t.dtype for t in plan.tensors}}
    return out


def type_summary(plan: Plan) -> str:
    """Every tensor's type in one line: the most common type of the weight matrices, then each
    other type with the tensors (and layers) that have it; ``1-D/norms F32`` for the rest.

    >>> type_summary(plan)      # doctest: +SKIP
    'Q4_K; Q6_K: token_embd, attn_v [0-2,5,8,11-15], ffn_down [0-2,5,8,11-15]; 1-D/norms F32'
    """
    weights = [t for t in plan.tensors if quantizable(t.name, t.shape)]
    counts: dict[str, int] = {}
    for t in weights:
        counts[t.dtype] = counts.get(t.dtype, 0) + 1
    if not counts:
        return "1-D/norms F32"
    base = max(counts, key=lambda k: counts[k])
    layers = {int(m.group(1)) for t in plan.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))}
    groups: dict[str, dict[str, list[int]]] = {}
    for t in weights:
        if t.dtype != base:
            m = re.match(r"blk\.(\d+)\.(.+)", t.name)
            kind, layer = (m.group(2), int(m.group(1))) if m else (t.name, -1)
            groups.setdefault(t.dtype, {}).setdefault(kind.removesuffix(".weight"), []).append(
                layer)
    parts = [base]
    for ggml_type, kinds in groups.items():
        shown = [kind if at == [-1] else kind + ("" if set(at) == layers else f" [{_ranges(at)}]")
                 for kind, at in kinds.items()]
        parts.append(f"{ggml_type}: {', '.join(shown)}")
    return "; ".join(parts + ["1-D/norms F32"])


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out: list[str] = []
    for v in sorted(values):
        if out and v == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ",".join(out)


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
        if summary.get("types"):
            lines.append("    tensor types per K-quant --outtype (llama-quantize's rules; "
                         "[layers]):")
            lines += [f"      {outtype:<7} {entry['summary']}"
                      for outtype, entry in summary["types"].items()]
    return lines
