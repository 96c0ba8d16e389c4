"""The text GGUF's metadata: ``general.*`` and the architecture's hyper-parameters, as
llama.cpp's ``qwen3`` / ``qwen3moe`` loaders read them (the ``tokenizer.*`` keys come from
:mod:`mmconvert.formats.gguf_vocab`)."""

from __future__ import annotations

from typing import Any

from mmconvert.convert.errors import UnsupportedError
from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan_gguf import architecture
from mmconvert.formats.gguf_writer import Metadata

QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION
# llama.h's enum llama_ftype, by the type of the file's weights
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
              "BF16": 32}


def size_label(count: int) -> str:
    """A parameter count the way Hub names and llama.cpp's ``general.size_label`` show it:
    K/M/B/T with at least two significant digits (``124K``, ``6.5M``, ``596M``, ``1.7B``)."""
    scale, suffix = next(((s, x) for s, x in ((1e12, "T"), (1e9, "B"), (1e6, "M"))
                          if count > s), (1e3, "K"))
    value = count / scale
    whole = str(round(value)).lstrip("0")
    decimals = max(2 - len(whole), 0)
    return f"{value:.{decimals}f}{suffix}"


def _rope_scaling(model: CanonicalModel, arch: str, md: Metadata, notes: list[str]) -> None:
    scaling = model.text.rope_scaling
    if not scaling:
        return
    kind = str(scaling.get("rope_type") or scaling.get("type") or "default")
    if kind == "default":
        return
    if kind not in ("linear", "yarn"):
        raise UnsupportedError(f"rope scaling {kind!r} has no llama.cpp {arch} equivalent "
                               "(supported: linear, yarn)")
    md.string(f"{arch}.rope.scaling.type", kind)
    md.float32(f"{arch}.rope.scaling.factor", float(scaling.get("factor", 1.0)))
    if kind == "yarn":
        orig = scaling.get("original_max_position_embeddings")
        if orig:
            md.uint32(f"{arch}.rope.scaling.original_context_length", int(orig))
        for hf_key, suffix in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if scaling.get(hf_key) is not None:
                md.float32(f"{arch}.rope.scaling.{suffix}", float(scaling[hf_key]))
    known = {"rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "rope_theta"}
    ignored = sorted(set(scaling) - known)
    if ignored:
        notes.append(f"rope scaling fields without a llama.cpp key, ignored: {', '.join(ignored)}")


def _sampling(generation: dict[str, Any], md: Metadata) -> None:
    """Sampling defaults from ``generation_config.json`` as llama.cpp's ``general.sampling.*``
    keys; ``do_sample: false`` means greedy, which llama.cpp spells ``temp = 0``."""
    if generation.get("do_sample") is False:
        md.float32("general.sampling.temp", 0.0)
        return
    floats = {"temperature": "temp", "top_p": "top_p", "min_p": "min_p",
              "repetition_penalty": "penalty_repeat"}
    for hf_key, key in floats.items():
        value = generation.get(hf_key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            md.float32(f"general.sampling.{key}", float(value))
    top_k = generation.get("top_k")
    if isinstance(top_k, int) and not isinstance(top_k, bool):
        md.int32("general.sampling.top_k", top_k)


def text_metadata(model: CanonicalModel, ggml: str, name: str, label: str,
                  notes: list[str] | None = None) -> Metadata:
    """``general.*`` and ``qwen3.*`` keys (the tokenizer's come from :mod:`formats.gguf_vocab`)."""
    t = model.text
    arch = architecture(model)
    notes = notes if notes is not None else []
    md = Metadata()
    md.string("general.architecture", arch)
    md.string("general.type", "model")
    md.string("general.name", name)
    md.string("general.size_label", label)
    md.uint32("general.file_type", FILE_TYPES[ggml])
    md.uint32("general.quantization_version", QUANTIZATION_VERSION)
    _sampling(model.generation_config, md)
    md.uint32(f"{arch}.block_count", t.num_hidden_layers)
    md.uint32(f"{arch}.context_length", t.max_position_embeddings)
    md.uint32(f"{arch}.embedding_length", t.hidden_size)
    md.uint32(f"{arch}.feed_forward_length", t.intermediate_size)
    md.uint32(f"{arch}.attention.head_count", t.num_attention_heads)
    md.uint32(f"{arch}.attention.head_count_kv", t.num_key_value_heads)
    md.uint32(f"{arch}.attention.key_length", t.head_dim)
    md.uint32(f"{arch}.attention.value_length", t.head_dim)
    md.float32(f"{arch}.rope.freq_base", t.rope_theta)
    _rope_scaling(model, arch, md, notes)
    md.float32(f"{arch}.attention.layer_norm_rms_epsilon", t.rms_norm_eps)
    if t.is_moe:
        md.uint32(f"{arch}.expert_count", t.num_experts)
        md.uint32(f"{arch}.expert_used_count", t.num_experts_per_tok)
        md.uint32(f"{arch}.expert_feed_forward_length", t.moe_intermediate_size)
    return md
