"""Plan for the safetensors bundle: every tensor (LM + projectors), cast as asked.

Two namings. ``source`` writes the checkpoint's own tensors under their own names, so the
bundle loads back into the training code: canonical tensors that were cut from a source tensor
(a fused gate/up split by the reader) are concatenated again and stacked experts are written
one per expert as the source had them, bit for bit (:class:`~mmconvert.convert.tensors.Origin`).
``hf`` writes the HF bundle's names (:func:`hf_targets`).
"""

from __future__ import annotations

import re

from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan import Piece, Plan, PlannedTensor
from mmconvert.convert.tensors import TensorRef, concat_tensors
from mmconvert.formats.dtypes import DTYPE_FROM_TORCH, FLOAT_DTYPES

NAMINGS = ("source", "hf")
STACKED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts\.)(gate|up|down)_proj$")

Target = tuple[str, TensorRef, Piece | None]  # (target name, lazy tensor, how it maps back)


def hf_name(name: str) -> str:
    """Canonical -> HF bundle name (LM names are already HF's; projectors get a module path)."""
    if name.startswith("mm."):
        return "multimodal_projector." + name[3:]
    return name


def hf_targets(ref: TensorRef) -> list[Target]:
    """The HF names of one canonical tensor: itself, or, for stacked Qwen3-MoE experts, one
    tensor per expert as ``save_pretrained`` writes them
    (``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``), each read lazily."""
    m = STACKED_EXPERTS.match(ref.name)
    if not m:
        return [(hf_name(ref.name), ref, None)]
    return [(f"{m.group(1)}{e}.{m.group(2)}_proj.weight", ref.item(e, f"select_expert({e})"),
             Piece("item", (ref.name,), index=e)) for e in range(ref.shape[0])]


def source_targets(refs: list[TensorRef]) -> list[Target]:
    """The source's own tensors rebuilt from canonical ones (see the module docstring)."""
    out: list[Target | str] = []
    cut: dict[str, list[TensorRef]] = {}  # source name -> canonical slices of it
    for ref in refs:
        origin = ref.origin
        if origin is None:
            out.append((ref.source_name, ref, None))
        elif origin.kind == "stack":
            out += [(name, ref.item(e, f"select_expert({e})"), Piece("item", (ref.name,), index=e))
                    for e, name in enumerate(origin.names)]
        else:
            if ref.source_name not in cut:
                out.append(ref.source_name)  # placeholder: the fused tensor goes here
            cut.setdefault(ref.source_name, []).append(ref)
    result: list[Target] = []
    for item in out:
        if not isinstance(item, str):
            result.append(item)
            continue
        parts = sorted(cut[item], key=lambda r: r.origin.start)
        axis = parts[0].origin.axis
        bounds = [(p.origin.start, p.origin.stop) for p in parts]
        if bounds[0][0] != 0 or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"{item}: the canonical slices {bounds} do not tile the source tensor")
        fused = concat_tensors(parts[0].name, parts, axis, "fuse_gate_up")
        result.append((item, fused, Piece("concat", tuple(p.name for p in parts), axis=axis,
                                          sizes=tuple(p.shape[axis] for p in parts))))
    return result


def target_dtype(source_dtype: str, dtype: str) -> str:
    """``dtype`` is ``auto`` (keep) or a torch dtype name; integer tensors are never cast."""
    if dtype == "auto" or source_dtype not in FLOAT_DTYPES:
        return source_dtype
    return DTYPE_FROM_TORCH[dtype]


def plan_safetensors(model: CanonicalModel, naming: str = "source", dtype: str = "auto") -> Plan:
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}")
    refs = model.tensors.refs()
    targets = source_targets(refs) if naming == "source" else \
        [t for ref in refs for t in hf_targets(ref)]
    tensors = [PlannedTensor(name, ref, target_dtype(ref.dtype, dtype), ref.shape, piece=piece)
               for name, ref, piece in targets]
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("two tensors map to the same output name")
    notes = [f"naming: {naming}", f"dtype: {dtype}"]
    if model.tied:
        notes.append("tied embeddings: lm_head is not stored (the embedding serves both)")
    kinds = {t.piece.kind for t in tensors if t.piece is not None}
    where = "the source stores them" if naming == "source" else "the HF bundle does"
    if "item" in kinds:
        notes.append(f"Qwen3-MoE experts written one tensor per expert, as {where}")
    if "concat" in kinds:
        notes.append("tensors the reader split (fused gate/up) fused again, as the source "
                     "stores them")
    return Plan("safetensors", tensors, notes)
