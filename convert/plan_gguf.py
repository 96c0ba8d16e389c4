"""Plan for the text GGUF: canonical Qwen3 tensors -> llama.cpp's ``qwen3`` (dense) or
``qwen3moe`` names and types. The metadata keys are in :mod:`convert.gguf_metadata`.

Types (``--outtype``)
---------------------
* 1-D tensors (norms, biases) are always F32 (:func:`mmconvert.formats.quants.tensor_type`):
  llama.cpp computes with them in F32 and they are tiny. The MoE router (``ffn_gate_inp``)
  stays F32 too, as llama.cpp's converter keeps it: expert choice is a top-k of its outputs.
* Other weights take the outtype. ``auto`` keeps a 16-bit source lossless: BF16 source -> BF16,
  F16 -> F16; an F32 source -> BF16 (llama.cpp's ``--outtype auto`` makes the same choice: BF16
  keeps F32's range, so no trained weight can overflow).
* Block-quantized types need the row length to be a multiple of the block (32); other rows get
  F16 (:func:`mmconvert.formats.quants.fallback_type`).
* For the 4/5-bit types the output projection (``output``, or ``token_embd`` when it is tied and
  serves as the output) stays Q8_0: logits are the most quantization-sensitive matrix, and
  llama.cpp's own quantizer also keeps it at a higher precision (Q6_K, a type we do not write).

Rope: llama.cpp runs Qwen3 with NEOX (rotate-half) rope, as HF does, so Q/K are copied as they
are; a source declared ``interleaved`` gets its Q/K rows (and biases, and the q/k norms)
permuted per head to NEOX (:mod:`mmconvert.convert.rope`).
"""

from __future__ import annotations

import re

from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan import Plan, PlannedTensor
from mmconvert.convert.rope import neox_fixups
from mmconvert.convert.tensors import TensorRef
from mmconvert.errors import UnsupportedError
from mmconvert.formats import quants
from mmconvert.formats.gguf_constants import (
    OUTTYPES,
    PRECISION_ORDER,
    TEXT_ARCH,
    TEXT_MOE_ARCH,
)
from mmconvert.formats.gguf_writer import GGUFTensor

# types under 8 bits per weight keep the logit projection at Q8_0 (llama.cpp's converter too)
LOW_BIT = tuple(t for t in PRECISION_ORDER if quants.TYPES[t].bits_per_weight < 8)

# canonical name under model.layers.{i}. -> name under blk.{i}., in llama.cpp's reading order
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    # Qwen3-MoE: router [E, H] and experts stacked [E, I, H] / [E, H, I]
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.gate_proj": "ffn_gate_exps.weight",
    "mlp.experts.up_proj": "ffn_up_exps.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
              "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_LAYER_ORDER = list(_LAYER_NAMES.values())


def architecture(model: CanonicalModel) -> str:
    """``qwen3`` or ``qwen3moe``; MoE layouts llama.cpp's qwen3moe cannot run are refused."""
    t = model.text
    if not t.is_moe:
        return TEXT_ARCH
    dense = [i for i in range(t.num_hidden_layers) if not t.layer_is_moe(i)]
    if dense:
        raise UnsupportedError(f"layers {dense[:4]} use a dense MLP (mlp_only_layers / "
                               "decoder_sparse_step): llama.cpp's qwen3moe needs experts in "
                               "every layer")
    if not t.norm_topk_prob:
        raise UnsupportedError("norm_topk_prob is false: llama.cpp's qwen3moe always "
                               "renormalises the top-k expert weights")
    return TEXT_MOE_ARCH


def gguf_tensor_name(canonical: str) -> str:
    """llama.cpp's name for a canonical language-model tensor."""
    if canonical in _TOP_NAMES:
        return _TOP_NAMES[canonical]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", canonical)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise UnsupportedError(f"tensor {canonical} has no llama.cpp qwen3 counterpart")


def resolve_outtype(model: CanonicalModel, outtype: str) -> str:
    """``--outtype`` value -> GGML type name of the weights (``auto`` resolved)."""
    outtype = outtype.lower()
    if outtype not in OUTTYPES:
        raise UnsupportedError(f"--outtype {outtype}: choose one of {', '.join(OUTTYPES)}")
    if outtype != "auto":
        return outtype.upper()
    matrices = [r.dtype for r in model.tensors.refs()
                if not r.name.startswith("mm.") and len(r.shape) >= 2]
    return "F16" if matrices and all(d == "F16" for d in matrices) else "BF16"


def text_sources(model: CanonicalModel) -> list[tuple[str, TensorRef]]:
    """(GGUF name, lazy source) for every text-model tensor, rope layout fixed up, in
    llama.cpp's reading order. Build once and share between outtypes so that one read of the
    source feeds every output file."""
    architecture(model)
    fixups = neox_fixups(model)
    out = []
    for ref in model.tensors.refs():
        if ref.name.startswith("mm."):
            continue
        out.append((gguf_tensor_name(ref.name), fixups.get(ref.name, ref)))
    return sorted(out, key=lambda item: _order(item[0]))


def _order(name: str) -> tuple[int, int, int]:
    if name.startswith("blk."):
        _, index, rest = name.split(".", 2)
        return (1, int(index), _LAYER_ORDER.index(rest))
    return ({"token_embd.weight": 0, "output_norm.weight": 2}.get(name, 3), 0, 0)


def tensor_type(name: str, shape: tuple[int, ...], outtype: str, tied: bool) -> str:
    """The GGML type of one text tensor under ``outtype`` (see the module docstring)."""
    if name.endswith(".ffn_gate_inp.weight"):
        return "F32"
    wanted = outtype
    if outtype in LOW_BIT and (name == "output.weight" or (tied and name == "token_embd.weight")):
        wanted = "Q8_0"
    return quants.tensor_type(name, shape, wanted)


def plan_gguf(model: CanonicalModel, outtype: str = "auto",
              sources: list[tuple[str, TensorRef]] | None = None) -> Plan:
    """The text GGUF's tensors for ``outtype`` (a ``--outtype`` value)."""
    ggml = resolve_outtype(model, outtype)
    sources = sources if sources is not None else text_sources(model)
    tensors = [PlannedTensor(name, ref, tensor_type(name, ref.shape, ggml, model.tied), ref.shape)
               for name, ref in sources]
    notes = [f"arch: {architecture(model)}", f"outtype: {outtype} -> {ggml}",
             "1-D tensors (norms, biases): F32"]
    if model.text.is_moe:
        notes.append("MoE router (ffn_gate_inp): F32")
    if model.tied:
        notes.append("tied embeddings: no output tensor (llama.cpp reuses token_embd)")
    if ggml in LOW_BIT:
        notes.append(f"{'token_embd' if model.tied else 'output'} (the logit projection): Q8_0")
    if model.text.rope_layout == "interleaved":
        notes.append("rope: source is interleaved; Q/K permuted per head to llama.cpp's NEOX")
    else:
        notes.append("rope: NEOX source, Q/K copied unpermuted")
    odd = [t.name for t in tensors if t.dtype == "F16" and ggml not in ("F16", "F32", "BF16")]
    if odd:
        notes.append(f"rows not a multiple of 32, stored as F16: {', '.join(odd[:3])}"
                     + (f" (+{len(odd) - 3} more)" if len(odd) > 3 else ""))
    return Plan("gguf", tensors, notes)


def gguf_tensors(plan: Plan) -> list[GGUFTensor]:
    """The writer's view of a plan: encoders and encoded sizes from :mod:`formats.quants`."""
    for t in plan.tensors:
        if t.source.dtype not in quants.SOURCE_DTYPES:
            raise UnsupportedError(f"{t.source.source_name}: {t.source.dtype} tensors cannot be "
                                   f"written to GGUF (supported: {', '.join(quants.SOURCE_DTYPES)})")
    return [GGUFTensor(t.name, t.shape, t.dtype, quants.encoded_nbytes(t.shape, t.dtype),
                       t.source, quants.encoder_for(t.source.dtype, t.dtype))
            for t in plan.tensors]


def parameter_count(plan: Plan) -> int:
    return sum(t.source.numel for t in plan.tensors)
