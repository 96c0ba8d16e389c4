"""Facts a bundle declares (hyper-parameters, special ids, placeholder, projector layers),
compared with what the checkpoint says.

Some conversion bugs barely move logits on a random tiny model (an rms eps of 1e-5 instead of
1e-6, tanh-approximate GELU instead of erf) yet break real models; others (a wrong eos id)
never show in logits at all. Comparing the declared facts catches them exactly and names them.
Each backend reads the facts its bundle kind carries; keys a bundle does not carry are not
compared.
"""

from __future__ import annotations

import math
from typing import Any

from mmconvert.convert.model import CanonicalModel, ProjectorLayer, ProjectorSpec

TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
             "rope_theta", "max_position_embeddings", "tie_word_embeddings", "num_experts",
             "num_experts_per_tok", "moe_intermediate_size")
ACTIVATION_NAMES = {"gelu": "exact erf GELU (nn.GELU())", "gelu_tanh": "tanh-approximate GELU",
                    "relu": "ReLU", "silu": "SiLU", "tanh": "tanh"}


def _layer_facts(layer: ProjectorLayer) -> list[str]:
    """A layer as the checkpoint would describe it: a bundle's stored forms (a tanh gate kept
    applied as a ``scale``, linear maps folded into one) read as the layers they stand for,
    so only a real difference in the math differs here."""
    if layer.folded_from:
        return [f"linear:{name}" for name in layer.folded_from]
    if layer.kind in ("tanh_gate", "scale") and (layer.kind == "tanh_gate" or layer.gate):
        return [f"tanh_gate:{layer.name}(" + ("1 - tanh(g)" if layer.complementary else "tanh(g)")
                + (", per channel)" if layer.per_channel else ")")]
    if layer.kind == "layer_norm":
        return [f"layer_norm:{layer.name}(eps={layer.eps:g})"]
    if layer.kind == "glu":
        return [f"glu:{layer.name}({layer.activation})"]
    return [f"{layer.kind}:{layer.name}"]


def projector_facts(spec: ProjectorSpec) -> dict[str, Any]:
    return {
        "input_dim": spec.input_dim,
        "output_dim": spec.output_dim,
        "activation": spec.activation,
        "layer_norm": spec.layer_norm,
        "layers": [fact for layer in spec.layers for fact in _layer_facts(layer)],
    }


def source_facts(model: CanonicalModel) -> dict[str, Any]:
    """Every fact a bundle may declare, as the checkpoint says it."""
    text = model.text
    facts: dict[str, Any] = {f"text.{k}": getattr(text, k) for k in TEXT_KEYS}
    facts["text.tie_word_embeddings"] = model.tied
    facts["special.eos"] = list(model.special.eos)
    facts["special.bos"] = list(model.special.bos)
    facts["special.pad"] = list(model.special.pad)
    facts["special.eos_set"] = sorted(set(model.special.eos))  # HF stops on any of them
    facts["special.eos_id"] = model.special.eos_id
    facts["special.bos_id"] = model.special.bos_id
    facts["special.pad_id"] = model.special.pad_id
    facts["placeholder.token"] = model.multimodal_token
    facts["placeholder.id"] = model.multimodal_token_id
    facts["modalities"] = list(model.projectors)
    for name, spec in model.projectors.items():
        for key, value in projector_facts(spec).items():
            facts[f"projector.{name}.{key}"] = value
    return facts


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            # GGUF stores float32: 1e-6 comes back as 9.99999997e-07
            return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def _explain(key: str, bundle: Any, source: Any) -> str:
    if key.endswith(".activation"):
        b = ACTIVATION_NAMES.get(str(bundle), bundle)
        s = ACTIVATION_NAMES.get(str(source), source)
        return f"{key}: the bundle uses {b}, the checkpoint {s}"
    if key.endswith(".layer_norm"):
        return (f"{key}: the bundle has {bundle}, the checkpoint {source} (a projector layer "
                "norm added or dropped)")
    if key.endswith(".layers"):
        changed = [f"{b} instead of {s}" for b, s in zip(bundle, source) if b != s]
        detail = changed[0] if changed and len(bundle) == len(source) else \
            "a projector layer norm added or dropped" if len(bundle) != len(source) else ""
        return f"{key}: the bundle has {bundle}, the checkpoint {source} ({detail})"
    if key in ("special.eos", "special.eos_set", "special.eos_id"):
        return (f"eos ids: the bundle declares {bundle}, the checkpoint resolves {source} "
                "(generation would not stop, or stop on the wrong token)")
    if key == "placeholder.id":
        return (f"placeholder token id: the bundle uses {bundle}, the checkpoint's "
                f"{source} (projected rows would land on the wrong tokens)")
    return f"{key}: the bundle says {bundle!r}, the checkpoint {source!r}"


def compare_facts(source: dict[str, Any], bundle: dict[str, Any]) -> list[str]:
    """One message per fact the bundle declares differently (keys it lacks are skipped)."""
    messages = []
    for key, value in bundle.items():
        if key not in source:
            if key.startswith("projector."):
                messages.append(f"{key}: declared by the bundle for a modality the checkpoint "
                                "does not have")
            continue
        if not _same(value, source[key]):
            messages.append(_explain(key, value, source[key]))
    return messages
