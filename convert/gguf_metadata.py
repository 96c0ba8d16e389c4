"""The text GGUF's metadata: ``general.*`` and the architecture's hyper-parameters, as
llama.cpp's ``qwen3`` / ``qwen3moe`` loaders read them (the ``tokenizer.*`` keys come from
:mod:`mmconvert.formats.gguf_vocab`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmconvert.convert.config_values import INT32_MAX, UINT32_MAX, shown
from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan_gguf import architecture
from mmconvert.errors import CheckpointError, UnsupportedError
from mmconvert.formats.gguf_writer import Metadata

QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION
# llama.h's enum llama_ftype, by the type of the file's weights
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
              "BF16": 32}


FLOAT32_MAX = float(np.finfo(np.float32).max)


class _Checked:
    """``Metadata`` setters that refuse, naming the config key, a value the GGUF type cannot
    hold (a negative UINT32, a float32 overflowing to inf) instead of failing in the writer."""

    def __init__(self, md: Metadata, where: str):
        self.md, self.where = md, where

    def _refuse(self, value: Any, source_key: str, key: str, gguf_type: str) -> None:
        raise CheckpointError(f"{self.where}: {source_key} = {shown(value)} does not fit "
                              f"GGUF {key} ({gguf_type})")

    def uint32(self, key: str, value: Any, source_key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or \
                not 0 <= value <= UINT32_MAX:
            self._refuse(value, source_key, key, "UINT32")
        self.md.uint32(key, value)

    def int32(self, key: str, value: Any, source_key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or \
                not -INT32_MAX - 1 <= value <= INT32_MAX:
            self._refuse(value, source_key, key, "INT32")
        self.md.int32(key, value)

    def float32(self, key: str, value: Any, source_key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not abs(float(value)) <= FLOAT32_MAX:
            self._refuse(value, source_key, key, "FLOAT32")
        self.md.float32(key, float(value))


def size_label(count: int) -> str:
    """A parameter count the way Hub names and llama.cpp's ``general.size_label`` show it:
    K/M/B/T with at least two significant digits (``124K``, ``6.5M``, ``596M``, ``1.7B``)."""
    scale, suffix = next(((s, x) for s, x in ((1e12, "T"), (1e9, "B"), (1e6, "M"))
                          if count > s), (1e3, "K"))
    value = count / scale
    whole = str(round(value)).lstrip("0")
    decimals = max(2 - len(whole), 0)
    return f"{value:.{decimals}f}{suffix}"


def _rope_scaling(model: CanonicalModel, arch: str, md: _Checked, notes: list[str]) -> None:
    scaling = model.text.rope_scaling
    if not scaling:
        return
    kind = str(scaling.get("rope_type") or scaling.get("type") or "default")
    if kind == "default":
        return
    if kind not in ("linear", "yarn"):
        raise UnsupportedError(f"rope scaling {kind!r} has no llama.cpp {arch} equivalent "
                               "(supported: linear, yarn)")
    md.md.string(f"{arch}.rope.scaling.type", kind)
    factor = scaling.get("factor")
    md.float32(f"{arch}.rope.scaling.factor", 1.0 if factor is None else factor,
               "rope_scaling.factor")
    if kind == "yarn":
        orig = scaling.get("original_max_position_embeddings")
        if orig:
            md.uint32(f"{arch}.rope.scaling.original_context_length", orig,
                      "rope_scaling.original_max_position_embeddings")
        for hf_key, suffix in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if scaling.get(hf_key) is not None:
                md.float32(f"{arch}.rope.scaling.{suffix}", scaling[hf_key],
                           f"rope_scaling.{hf_key}")
    known = {"rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "rope_theta"}
    ignored = sorted(set(scaling) - known)
    if ignored:
        notes.append(f"rope scaling fields without a llama.cpp key, ignored: {', '.join(ignored)}")


def _sampling(generation: dict[str, Any], md: _Checked) -> None:
    """Sampling defaults from ``generation_config.json`` as llama.cpp's ``general.sampling.*``
    keys; ``do_sample: false`` means greedy, which llama.cpp spells ``temp = 0``."""
    if generation.get("do_sample") is False:
        md.md.float32("general.sampling.temp", 0.0)
        return
    floats = {"temperature": "temp", "top_p": "top_p", "min_p": "min_p",
              "repetition_penalty": "penalty_repeat"}
    for hf_key, key in floats.items():
        value = generation.get(hf_key)
        if value is not None:  # type and range checked by the reader
            md.float32(f"general.sampling.{key}", value, f"generation_config {hf_key}")
    top_k = generation.get("top_k")
    if top_k is not None:
        md.int32("general.sampling.top_k", top_k, "generation_config top_k")


def text_metadata(model: CanonicalModel, ggml: str, name: str, label: str,
                  notes: list[str] | None = None) -> Metadata:
    """``general.*`` and ``qwen3.*`` keys (the tokenizer's come from :mod:`formats.gguf_vocab`)."""
    t = model.text
    arch = architecture(model)
    notes = notes if notes is not None else []
    md = Metadata()
    checked = _Checked(md, str(model.source))
    md.string("general.architecture", arch)
    md.string("general.type", "model")
    md.string("general.name", name)
    md.string("general.size_label", label)
    md.uint32("general.file_type", FILE_TYPES[ggml])
    md.uint32("general.quantization_version", QUANTIZATION_VERSION)
    _sampling(model.generation_config, checked)
    counts = (("block_count", t.num_hidden_layers, "num_hidden_layers"),
              ("context_length", t.max_position_embeddings, "max_position_embeddings"),
              ("embedding_length", t.hidden_size, "hidden_size"),
              ("feed_forward_length", t.intermediate_size, "intermediate_size"),
              ("attention.head_count", t.num_attention_heads, "num_attention_heads"),
              ("attention.head_count_kv", t.num_key_value_heads, "num_key_value_heads"),
              ("attention.key_length", t.head_dim, "head_dim"),
              ("attention.value_length", t.head_dim, "head_dim"))
    for key, value, source_key in counts:
        checked.uint32(f"{arch}.{key}", value, source_key)
    checked.float32(f"{arch}.rope.freq_base", t.rope_theta, "rope_theta")
    _rope_scaling(model, arch, checked, notes)
    checked.float32(f"{arch}.attention.layer_norm_rms_epsilon", t.rms_norm_eps, "rms_norm_eps")
    if t.is_moe:
        checked.uint32(f"{arch}.expert_count", t.num_experts, "num_experts")
        checked.uint32(f"{arch}.expert_used_count", t.num_experts_per_tok, "num_experts_per_tok")
        checked.uint32(f"{arch}.expert_feed_forward_length", t.moe_intermediate_size,
                       "moe_intermediate_size")
    return md
