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
  llama.cpp's own quantizer also keeps it at a higher precision.
* The K-quant mixtures (``q2_k`` ... ``q6_k``, ``iq4_nl``, ``iq4_xs``) give each tensor the type
  llama-quantize gives it for that file type, overrides included
  (:mod:`mmconvert.formats.gguf_mixtures`); what it never quantizes (1-D, norms, the MoE
  router) is F32, as in the F32/F16 GGUF llama-quantize reads.

Rope: llama.cpp runs Qwen3 with NEOX (rotate-half) rope, as HF does, so Q/K are copied as they
are; a source declared ``interleaved`` gets its Q/K rows (and biases, and the q/k norms)
permuted per head to NEOX (:mod:`mmconvert.convert.rope`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan import Plan, PlannedTensor
from mmconvert.convert.plan_summary import type_summary
from mmconvert.convert.rope import neox_fixups
from mmconvert.convert.tensors import TensorRef
from mmconvert.errors import UnsupportedError
from mmconvert.formats import gguf_mixtures, quants
from mmconvert.formats.gguf_constants import (
    GGML_QUANT_SIZES,
    MIXTURE_BASE,
    OUTTYPES,
    PRECISION_ORDER,
    TEXT_ARCH,
    TEXT_MOE_ARCH,
    GGMLQuantizationType,
)
from mmconvert.formats.gguf_mixtures import NO_OVERRIDES, Overrides
from mmconvert.formats.gguf_writer import GGUFTensor
from mmconvert.formats.imatrix import WeightSlot, requires_imatrix

# the types written whole (not a mixture) under 8 bits per weight keep the logit projection at
# Q8_0 (llama.cpp's converter too)
LOW_BIT = tuple(t for t in PRECISION_ORDER if t.lower() in OUTTYPES and t in quants.TYPES
                and quants.TYPES[t].bits_per_weight < 8)

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


def model_facts(model: CanonicalModel) -> gguf_mixtures.ModelFacts:
    """What llama-quantize's rules read about the model (its GGUF's hyper-parameters)."""
    t = model.text
    return gguf_mixtures.ModelFacts(t.num_hidden_layers, t.num_attention_heads,
                                    t.num_key_value_heads, t.num_experts if t.is_moe else 0)


def mixture_types(model: CanonicalModel, mixture: str, sources: list[tuple[str, TensorRef]],
                  overrides: Overrides = NO_OVERRIDES, has_imatrix: bool = False
                  ) -> dict[str, gguf_mixtures.Choice]:
    """GGUF name -> llama-quantize's choice for file type ``mixture`` (``Q4_K_M``)."""
    try:
        return gguf_mixtures.choose_types(mixture, [(n, r.shape) for n, r in sources],
                                          model_facts(model), overrides, has_imatrix)
    except ValueError as exc:
        raise UnsupportedError(f"--outtype {mixture.lower()}: {exc}") from None


def plan_gguf(model: CanonicalModel, outtype: str = "auto",
              sources: list[tuple[str, TensorRef]] | None = None,
              overrides: Overrides = NO_OVERRIDES, has_imatrix: bool = False) -> Plan:
    """The text GGUF's tensors for ``outtype`` (a ``--outtype`` value). ``overrides`` and
    ``has_imatrix`` steer the K-quant mixtures as llama-quantize's options do; the other
    outtypes ignore them."""
    ggml = resolve_outtype(model, outtype)
    sources = sources if sources is not None else text_sources(model)
    if ggml in MIXTURE_BASE:
        return _plan_mixture(model, outtype, ggml, sources, overrides, has_imatrix)
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
        notes.append(f"rows not a multiple of 32, stored as F16: {_some(odd)}")
    return Plan("gguf", tensors, notes)


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


def _plan_mixture(model: CanonicalModel, outtype: str, mixture: str,
                  sources: list[tuple[str, TensorRef]], overrides: Overrides,
                  has_imatrix: bool) -> Plan:
    choices = mixture_types(model, mixture, sources, overrides, has_imatrix)
    tensors = [PlannedTensor(name, ref, choices[name].ggml_type or "F32", ref.shape)
               for name, ref in sources]
    notes = [f"arch: {architecture(model)}",
             f"outtype: {outtype} -> {mixture}: llama-quantize's mixture, base "
             f"{MIXTURE_BASE[mixture]} (rules: docs/quantization.md, K-quant mixtures)",
             "not quantized by llama-quantize (1-D tensors, norms, MoE router): F32",
             "types: " + ", ".join(f"{k} x{v}" for k, v in _type_counts(tensors).items())]
    if overrides:
        notes.append(f"overrides: {overrides.describe()}")
    if model.tied:
        notes.append("tied embeddings: no output tensor; token_embd takes the output's rules")
    fell = [n for n, c in choices.items() if "not a multiple" in c.reason]
    if fell:
        notes.append(f"rows not a multiple of the block, fallback type: {_some(fell)}")
    if model.text.rope_layout == "interleaved":
        notes.append("rope: source is interleaved; Q/K permuted per head to llama.cpp's NEOX")
    plan = Plan("gguf", tensors, notes)
    notes.insert(4, f"tensors: {type_summary(plan)}")
    return plan


def _type_counts(tensors: list[PlannedTensor]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tensors:
        counts[t.dtype] = counts.get(t.dtype, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def missing_kernels(plans: list[Plan]) -> list[str]:
    """The planned GGML types this mmconvert has no encoder for (in first-use order)."""
    return list(dict.fromkeys(t.dtype for p in plans for t in p.tensors
                              if t.dtype not in quants.TYPES))


def _encoded_nbytes(shape: tuple[int, ...], ggml_type: str) -> int:
    """Bytes of a tensor, from gguf-py's block sizes (also for a type without a kernel yet)."""
    if ggml_type in quants.TYPES:
        return quants.encoded_nbytes(shape, ggml_type)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    count = 1
    for n in shape:
        count *= n
    return count // block * size


def _no_kernel(ggml_type: str):
    def encode(rows):
        raise UnsupportedError(f"no {ggml_type} kernel in this mmconvert: cannot write "
                               f"{ggml_type} tensors")
    return encode


def gguf_tensors(plan: Plan, imatrix: Mapping[str, np.ndarray] | None = None
                 ) -> list[GGUFTensor]:
    """The writer's view of a plan: encoders and encoded sizes from :mod:`formats.quants`.
    ``imatrix``: GGUF name -> llama-quantize's weight vector (:mod:`formats.imatrix`)."""
    for t in plan.tensors:
        if t.source.dtype not in quants.SOURCE_DTYPES:
            raise UnsupportedError(f"{t.source.source_name}: {t.source.dtype} tensors cannot be "
                                   f"written to GGUF (supported: {', '.join(quants.SOURCE_DTYPES)})")
    weights = imatrix or {}
    # the encoder depends on the source (the job), the type and the weights, looked up by name
    return [GGUFTensor(t.name, t.shape, t.dtype, _encoded_nbytes(t.shape, t.dtype), t.source,
                       _encoder(t, weights.get(t.name)) if t.dtype in quants.TYPES
                       else _no_kernel(t.dtype),
                       (t.dtype, t.name if t.name in weights else None))
            for t in plan.tensors]


def _encoder(t: PlannedTensor, weights: np.ndarray | None):
    if weights is None or len(t.shape) != 3:
        return quants.encoder_for(t.source.dtype, t.dtype, imatrix=weights)
    # 3-D experts: llama-quantize passes expert e's rows ``imatrix + e * n_per_row``. The
    # encoder needs to know which experts a slice holds, so these sources are read whole
    # (export_gguf.imatrix_sources) and every call gets all experts.
    n_expert, n = t.shape[0], t.shape[-1]
    per_expert = [quants.encoder_for(t.source.dtype, t.dtype, imatrix=weights[e * n:(e + 1) * n])
                  for e in range(n_expert)]

    def encode(rows: np.ndarray) -> np.ndarray:
        if rows.shape[0] != n_expert:
            raise AssertionError(f"{t.name}: an imatrix expert tensor must be encoded whole "
                                 f"({rows.shape[0]} of {n_expert} experts given)")
        return np.stack([enc(rows[e]) for e, enc in enumerate(per_expert)])

    return encode


def imatrix_slots(plan: Plan, file_type: str | None = None) -> list[WeightSlot]:
    """The plan's tensors an imatrix may feed (two or more dimensions), with whether their
    type uses importance weights and whether llama-quantize requires them (``file_type``:
    the mixture, e.g. ``Q2_K_S``)."""
    return [WeightSlot(t.name, t.shape, t.dtype,
                       t.dtype in quants.TYPES and quants.TYPES[t.dtype].uses_imatrix,
                       requires_imatrix(t.name, t.dtype, file_type))
            for t in plan.tensors if len(t.shape) >= 2]


def parameter_count(plan: Plan) -> int:
    return sum(t.source.numel for t in plan.tensors)
