"""Plan for the safetensors bundle: every tensor (LM + projectors), cast as asked."""

from __future__ import annotations

from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan import Plan, PlannedTensor
from mmconvert.formats.dtypes import DTYPE_FROM_TORCH, FLOAT_DTYPES

NAMINGS = ("source", "hf")


def hf_name(name: str) -> str:
    """Canonical -> HF bundle name (LM names are already HF's; projectors get a module path)."""
    if name.startswith("mm."):
        return "multimodal_projector." + name[3:]
    return name


def target_dtype(source_dtype: str, dtype: str) -> str:
    """``dtype`` is ``auto`` (keep) or a torch dtype name; integer tensors are never cast."""
    if dtype == "auto" or source_dtype not in FLOAT_DTYPES:
        return source_dtype
    return DTYPE_FROM_TORCH[dtype]


def plan_safetensors(model: CanonicalModel, naming: str = "source", dtype: str = "auto") -> Plan:
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {NAMINGS}")
    tensors = []
    for ref in model.tensors.refs():
        name = ref.source_name if naming == "source" else hf_name(ref.name)
        tensors.append(PlannedTensor(name, ref, target_dtype(ref.dtype, dtype), ref.shape))
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError("two tensors map to the same output name")
    notes = [f"naming: {naming}", f"dtype: {dtype}"]
    if model.tied:
        notes.append("tied embeddings: lm_head is not stored (the embedding serves both)")
    return Plan("safetensors", tensors, notes)
