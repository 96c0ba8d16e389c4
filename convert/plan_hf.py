"""Plan for the Hugging Face bundle: a standard Qwen3 folder plus a separate projector file.

The language-model tensors keep their (already HF) canonical names so that a plain
``Qwen3ForCausalLM`` loads the shards with no missing or unexpected keys; the projector tensors
go to their own file in a subfolder (:data:`PROJECTOR_FILE`,
``multimodal_projector/model.safetensors``) under
``multimodal_projector.<modality>.<layer>.<weight|bias>``, which only the bundle's remote code
reads: loaders that glob ``*.safetensors`` at the folder's root when there is no index (vLLM
does) would otherwise try to load the projector into ``Qwen3ForCausalLM`` and fail. Tied embeddings stay tied: ``lm_head.weight`` is not in the canonical table then, so it is
not planned.
"""

from __future__ import annotations

from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan import Plan, PlannedTensor
from mmconvert.convert.plan_safetensors import hf_name, hf_targets, target_dtype
from mmconvert.convert.projector_export import export_projectors, fold_notes
from mmconvert.convert.rope import neox_fixups
from mmconvert.errors import UnsupportedError
from mmconvert.formats.dtypes import FLOAT_DTYPES, TORCH_NAMES

HF_DTYPES = ("auto", "float32", "float16", "bfloat16")
PROJECTOR_DIR = "multimodal_projector"  # a subfolder: nothing at the root but the LM's weights
PROJECTOR_STEM = "model"
PROJECTOR_FILE = f"{PROJECTOR_DIR}/{PROJECTOR_STEM}.safetensors"


def check_modality_names(model: CanonicalModel) -> None:
    """Modality and layer names become module names in the remote code: no dots, not empty."""
    for name, spec in model.projectors.items():
        for part in [name] + [layer.name for layer in spec.layers]:
            if not part or "." in part or not part.isprintable():
                raise UnsupportedError(
                    f"modality {name!r}: {part!r} cannot be a module name in the HF bundle "
                    "(use names without dots, e.g. 'vision' or 'audio_1')")


def plan_hf(model: CanonicalModel, dtype: str = "auto", fold_linear: bool = False
            ) -> tuple[Plan, Plan]:
    """(language-model plan, projector plan) for ``mmconvert to-hf``. Tanh gates stay raw
    (the remote code applies them); ``fold_linear`` folds adjacent linear projector layers."""
    if dtype not in HF_DTYPES:
        raise UnsupportedError(f"--dtype {dtype!r}: use one of {', '.join(HF_DTYPES)}")
    check_modality_names(model)
    fixups = neox_fixups(model)
    specs, projector_refs = export_projectors(model, apply_gates=False, fold_linear=fold_linear)
    projector = [PlannedTensor(hf_name(ref.name), ref, target_dtype(ref.dtype, dtype), ref.shape)
                 for ref in projector_refs]
    lm = []
    for ref in model.tensors.refs():
        if ref.name.startswith("mm."):
            continue
        for name, target, piece in hf_targets(fixups.get(ref.name, ref)):
            lm.append(PlannedTensor(name, target, target_dtype(target.dtype, dtype),
                                    target.shape, piece=piece))
    notes = [f"dtype: {dtype} (config dtype {hf_config_dtype(model, dtype)})"]
    if model.tied:
        notes.append("tied embeddings: lm_head is not stored (tie_word_embeddings: true)")
    if fixups:
        notes.append("rope: interleaved source layout permuted to HF's rotate-half (neox)")
    if model.text.is_moe:
        notes.append(f"Qwen3-MoE: {model.text.num_experts} experts per layer written one "
                     "tensor each (experts.{e}.{gate,up,down}_proj.weight), as save_pretrained does")
    if model.text.vocab_size > model.tokenizer.size:
        notes.append(f"vocab: {model.text.vocab_size} embedding rows kept for "
                     f"{model.tokenizer.size} tokenizer tokens (padding rows)")
    lm_plan = Plan("hf", lm, notes + ["files: model.safetensors (sharded with an index when "
                                      "over --max-shard-size)"])
    projector_plan = Plan("hf-projector", projector,
                          [f"file: {PROJECTOR_FILE}"] + fold_notes(specs, fold_linear),
                          projectors=specs)
    return lm_plan, projector_plan


def hf_config_dtype(model: CanonicalModel, dtype: str) -> str:
    """The torch dtype name config.json declares: the requested one, else the dominant float
    dtype of the language-model tensors (what ``dtype="auto"`` loading then uses)."""
    if dtype != "auto":
        return dtype
    counts: dict[str, int] = {}
    for ref in model.tensors.refs():
        if not ref.name.startswith("mm.") and ref.dtype in FLOAT_DTYPES:
            counts[ref.dtype] = counts.get(ref.dtype, 0) + ref.numel
    if not counts:
        return model.text.torch_dtype
    return TORCH_NAMES[max(counts, key=lambda k: counts[k])]

