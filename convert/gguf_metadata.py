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
from mmconvert.formats.gguf_constants import QUANTIZATION_VERSION, Keys, file_type
from mmconvert.formats.gguf_writer import Metadata

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
    md.md.string(Keys.Rope.SCALING_TYPE.format(arch=arch), kind)
    factor = scaling.get("factor")
    md.float32(Keys.Rope.SCALING_FACTOR.format(arch=arch), 1.0 if factor is None else factor,
               "rope_scaling.factor")
    if kind == "yarn":
        orig = scaling.get("original_max_position_embeddings")
        if orig:
            md.uint32(Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch), orig,
                      "rope_scaling.original_max_position_embeddings")
        for hf_key, key in (("beta_fast", Keys.Rope.SCALING_YARN_BETA_FAST),
                            ("beta_slow", Keys.Rope.SCALING_YARN_BETA_SLOW)):
            if scaling.get(hf_key) is not None:
                md.float32(key.format(arch=arch), scaling[hf_key], f"rope_scaling.{hf_key}")
    known = {"rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast",
             "beta_slow", "rope_theta"}
    ignored = sorted(set(scaling) - known)
    if ignored:
        notes.append(f"rope scaling fields without a llama.cpp key, ignored: {', '.join(ignored)}")


def _sampling(generation: dict[str, Any], md: _Checked) -> None:
    """Sampling defaults from ``generation_config.json`` as llama.cpp's ``general.sampling.*``
    keys; ``do_sample: false`` means greedy, which llama.cpp spells ``temp = 0``."""
    if generation.get("do_sample") is False:
        md.md.float32(Keys.General.SAMPLING_TEMP, 0.0)
        return
    g = Keys.General
    floats = {"temperature": g.SAMPLING_TEMP, "top_p": g.SAMPLING_TOP_P,
              "min_p": g.SAMPLING_MIN_P, "repetition_penalty": g.SAMPLING_PENALTY_REPEAT}
    for hf_key, key in floats.items():
        value = generation.get(hf_key)
        if value is not None:  # type and range checked by the reader
            md.float32(key, value, f"generation_config {hf_key}")
    top_k = generation.get("top_k")
    if top_k is not None:
        md.int32(Keys.General.SAMPLING_TOP_K, top_k, "generation_config top_k")


def text_metadata(model: CanonicalModel, ggml: str, name: str, label: str,
                  notes: list[str] | None = None) -> Metadata:
    """``general.*`` and ``qwen3.*`` keys (the tokenizer's come from :mod:`formats.gguf_vocab`)."""
    t = model.text
    arch = architecture(model)
    notes = notes if notes is not None else []
    md = Metadata()
    checked = _Checked(md, str(model.source))
    md.string(Keys.General.ARCHITECTURE, arch)
    md.string(Keys.General.TYPE, "model")
    md.string(Keys.General.NAME, name)
    md.string(Keys.General.SIZE_LABEL, label)
    md.uint32(Keys.General.FILE_TYPE, int(file_type(ggml)))
    md.uint32(Keys.General.QUANTIZATION_VERSION, QUANTIZATION_VERSION)
    _sampling(model.generation_config, checked)
    llm, att = Keys.LLM, Keys.Attention
    counts = ((llm.BLOCK_COUNT, t.num_hidden_layers, "num_hidden_layers"),
              (llm.CONTEXT_LENGTH, t.max_position_embeddings, "max_position_embeddings"),
              (llm.EMBEDDING_LENGTH, t.hidden_size, "hidden_size"),
              (llm.FEED_FORWARD_LENGTH, t.intermediate_size, "intermediate_size"),
              (att.HEAD_COUNT, t.num_attention_heads, "num_attention_heads"),
              (att.HEAD_COUNT_KV, t.num_key_value_heads, "num_key_value_heads"),
              (att.KEY_LENGTH, t.head_dim, "head_dim"),
              (att.VALUE_LENGTH, t.head_dim, "head_dim"))
    for key, value, source_key in counts:
        checked.uint32(key.format(arch=arch), value, source_key)
    checked.float32(Keys.Rope.FREQ_BASE.format(arch=arch), t.rope_theta, "rope_theta")
    _rope_scaling(model, arch, checked, notes)
    checked.float32(att.LAYERNORM_RMS_EPS.format(arch=arch), t.rms_norm_eps, "rms_norm_eps")
    if t.is_moe:
        moe = ((llm.EXPERT_COUNT, t.num_experts, "num_experts"),
               (llm.EXPERT_USED_COUNT, t.num_experts_per_tok, "num_experts_per_tok"),
               (llm.EXPERT_FEED_FORWARD_LENGTH, t.moe_intermediate_size,
                "moe_intermediate_size"))
        for key, value, source_key in moe:
            checked.uint32(key.format(arch=arch), value, source_key)
    return md
