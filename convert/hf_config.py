"""The HF bundle's configs from the canonical model: ``config.json`` (a standard Qwen3 or
Qwen3-MoE config plus ``auto_map`` and the projector description) and
``generation_config.json``. :mod:`mmconvert.formats.hf_folder` writes them; the layout is
documented in ``docs/hf-bundle.md``.
"""

from __future__ import annotations

from typing import Any

from mmconvert.convert.model import LAYER_KINDS, CanonicalModel, ProjectorLayer, ProjectorSpec
from mmconvert.formats.hf_folder import (
    CONFIG_KEY,
    FUSION_RULE,
    MODEL_CLASS,
    MODELING_FILE,
    MOE_MODEL_CLASS,
    PROJECTOR_FORMAT,
    PROJECTOR_FORMAT_VERSION,
    PROJECTOR_FORMAT_VERSION_GATED,
)

# keys of the source Qwen3 config carried over unchanged when present (they change behaviour)
PASSTHROUGH_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
                    "attention_dropout", "initializer_range", "use_cache",
                    "router_aux_loss_coef", "output_router_logits")


def _layer_dict(layer: ProjectorLayer, spec: ProjectorSpec) -> dict[str, Any]:
    kind = LAYER_KINDS.get(layer.kind)
    if kind is not None and kind.hf_version:
        # the fields of convert/model.py's LayerKind.hf_fields, the spec's defaults filled in
        defaults = {"dim": layer.out_dim, "activation": layer.activation or spec.activation,
                    "eps": layer.eps if layer.eps is not None else spec.layer_norm_eps}
        out = {"kind": layer.kind, "name": layer.name}
        out.update((f, defaults[f] if f in defaults else getattr(layer, f))
                   for f in kind.hf_fields)
        if layer.folded_from:
            out["folded_from"] = list(layer.folded_from)
        return out
    raise ValueError(f"projector layer kind {layer.kind!r} has no HF bundle form")


def format_version(specs: dict[str, ProjectorSpec]) -> int:
    """The lowest ``multimodal_config`` version that describes these projectors, so bundles
    without the newer layer kinds stay readable by version-1 code."""
    newer = any(LAYER_KINDS[x.kind].hf_version > 1 or x.folded_from
                for spec in specs.values() for x in spec.layers)
    return PROJECTOR_FORMAT_VERSION_GATED if newer else PROJECTOR_FORMAT_VERSION


def projector_config(model: CanonicalModel, weights_file: str, tensor_prefix: str,
                     specs: dict[str, ProjectorSpec] | None = None) -> dict[str, Any]:
    """The self-describing projector + fusion description stored in ``config.json``.

    ``specs``: the projectors as the bundle stores them (e.g. with linear maps folded);
    default the checkpoint's. Modalities are a list (not an object) because their order is
    part of the fusion rule and not every JSON reader keeps object order.
    """
    specs = specs or model.projectors
    return {
        "format": PROJECTOR_FORMAT,
        "format_version": format_version(specs),
        "weights": weights_file,
        "tensor_prefix": tensor_prefix,
        "hidden_size": model.text.hidden_size,
        "placeholder_token": model.multimodal_token,
        "placeholder_token_id": model.multimodal_token_id,
        "fusion_strategy": model.fusion_strategy,
        "fusion_rule": FUSION_RULE,
        "max_multimodal_length": model.max_multimodal_length,
        "activations": {"relu": "max(x, 0)", "gelu": "exact erf GELU (torch.nn.GELU())",
                        "gelu_tanh": "tanh-approximated GELU", "tanh": "tanh(x)",
                        "silu": "x * sigmoid(x)"},
        "modalities": [
            {"name": name, "input_dim": spec.input_dim, "hidden_dim": spec.hidden_dim,
             "output_dim": spec.output_dim, "activation": spec.activation,
             "layer_norm": spec.layer_norm, "dropout": spec.dropout,
             "layers": [_layer_dict(layer, spec) for layer in spec.layers]}
            for name, spec in specs.items()
        ],
    }


def _rope_entries(model: CanonicalModel) -> dict[str, Any]:
    """Both spellings: ``rope_theta``/``rope_scaling`` (what Hub Qwen3 configs and older
    transformers read) and ``rope_parameters`` (what transformers 5 writes)."""
    t = model.text
    scaling = dict(t.rope_scaling) if t.rope_scaling else None
    params: dict[str, Any] = {"rope_type": "default"}
    if scaling:
        params.update(scaling)
        params["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
    params["rope_theta"] = t.rope_theta
    return {"rope_theta": t.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def _moe_entries(model: CanonicalModel) -> dict[str, Any]:
    """Qwen3-MoE keys as Hub configs spell them (``num_experts``; transformers 5 maps it to
    ``num_local_experts``); nothing for a dense model."""
    t = model.text
    if not t.is_moe:
        return {}
    return {"num_experts": t.num_experts, "num_experts_per_tok": t.num_experts_per_tok,
            "moe_intermediate_size": t.moe_intermediate_size,
            "norm_topk_prob": t.norm_topk_prob, "decoder_sparse_step": t.decoder_sparse_step,
            "mlp_only_layers": list(t.mlp_only_layers)}


def hf_config(model: CanonicalModel, config_dtype: str, projector: dict[str, Any]
              ) -> dict[str, Any]:
    """``config.json``: a standard Qwen3 (or Qwen3-MoE) config plus ``auto_map`` and the
    projector key."""
    t = model.text
    raw = t.raw_config or {}
    cfg: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM" if t.is_moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if t.is_moe else "qwen3",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        **_rope_entries(model),
        "attention_bias": t.attention_bias,
        **_moe_entries(model),
        "tie_word_embeddings": model.tied,
        **{k: raw[k] for k in PASSTHROUGH_KEYS if k in raw},
        "bos_token_id": model.special.bos_id,
        "eos_token_id": model.special.eos_id,
        "pad_token_id": model.special.pad_id,
        "torch_dtype": config_dtype,
        "dtype": config_dtype,
        "auto_map": {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}."
                                             f"{MOE_MODEL_CLASS if t.is_moe else MODEL_CLASS}"},
        CONFIG_KEY: projector,
    }
    return cfg


def generation_config(model: CanonicalModel) -> dict[str, Any]:
    """The source's generation config with the merged special ids (full eos list)."""
    gen = {k: v for k, v in model.generation_config.items() if k != "transformers_version"}
    special = model.special
    for key, value in (("bos_token_id", special.bos_id), ("pad_token_id", special.pad_id),
                       ("eos_token_id", special.eos if len(special.eos) > 1 else special.eos_id)):
        if value is None:
            gen.pop(key, None)
        else:
            gen[key] = value
    return gen
