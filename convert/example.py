"""``mmconvert example OUT``: a small deterministic checkpoint in the seed's layout.

It is what the README's main command converts, and what the tests generate in every variant
(layer norm on/off, each activation, hidden_dim given or defaulted, text config embedded or in
a separate base folder, single/sharded safetensors or a pickle, vocab resized or padded, tied or
untied, a training_state.pt beside it, Qwen3-MoE, and the projector types of
``docs/dialects.md``: SwiGLU fused or split, low-rank, tanh-gated). Weights are random but seeded; the tokenizer is a real
byte-level BPE with Qwen2's pre-tokenizer, trained on a small built-in corpus, with Qwen's
special tokens and the multimodal token added.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS = """\
The quick brown fox jumps over the lazy dog. A multimodal model reads images, audio and text.
Projectors map precomputed embeddings into the hidden size of the language model.
def forward(self, x):\n    return self.fc2(self.act(self.fc1(x)))\n
for i in range(10):\n\tprint(i * 2, "value", [1, 2, 3])\n
Numbers 0 1 2 3 4 5 6 7 8 9 10 42 3.14159 2026-11-21 and 1,000,000 tokens.
Qwen3 uses rotary position embeddings, RMSNorm and grouped query attention.
你好，世界！多模态模型可以理解图像和声音。今天天气很好。
Bonjour le monde, ça va? Grüße aus München. ¿Dónde está la biblioteca?
Emoji: 🙂 🚀 🎉 — and whitespace runs:    four spaces, tabs\t\tand newlines\n\n\n.
The tokenizer splits digits one at a time: 12345 becomes 1 2 3 4 5.
"""


@dataclass
class ExampleOptions:
    """What the generated checkpoint looks like (defaults: the README's example)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    bpe_vocab_size: int = 384  # learned byte-level BPE tokens before the special ones
    modalities: dict[str, dict[str, int]] = field(
        default_factory=lambda: {"m1": {"input_dim": 48}, "m2": {"input_dim": 80, "hidden_dim": 96}})
    activation: str = "gelu"
    layer_norm: bool = True
    tied: bool = False
    embed_text_config: bool = True  # else the Qwen3 files go to ``base_dir``
    base_dir: Path | None = None
    weights_format: str = "safetensors"  # safetensors | pickle
    shards: int = 1
    resize_vocab: bool = True  # embedding rows == len(tokenizer); else padded to a multiple of 64
    training_state: bool = False
    dtype: str = "bfloat16"
    seed: int = 0
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    multimodal_token: str = "<|multimodal|>"
    # Qwen3-MoE text model when num_experts > 0
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    experts_format: str = "per_expert"  # per_expert (save_pretrained) | fused (transformers-5 memory)
    # projectors (docs/dialects.md); a modality's own dict in ``modalities`` may override any
    # of these per modality, with the config's keys (projector_type, rank, gate, activation,
    # layer_norm, gate_up_gate_first) plus ``fused_gate_up``
    projector_type: str = "mlp"  # mlp | swiglu | low_rank
    rank: int = 16  # low_rank
    gate: dict | None = None  # e.g. {"kind": "tanh", "complementary": False, "per_channel": False}
    fused_gate_up: bool = False  # swiglu: store gate_up_proj [2h, in] instead of two tensors
    gate_up_gate_first: bool = True  # swiglu, fused: the gate is the first half


def build_tokenizer(bpe_vocab_size: int, multimodal_token: str):
    """A byte-level BPE like Qwen2's (split regex, NFC, byte-level), trained on CORPUS."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS + [multimodal_token])
    return tok


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(directory: Path, opts: ExampleOptions) -> dict[str, int]:
    tok = build_tokenizer(opts.bpe_vocab_size, opts.multimodal_token)
    tok.save(str(directory / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + [opts.multimodal_token]}
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in ids.items()}
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": decoder, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
        "model_max_length": 4096, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    ids["size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def text_config(opts: ExampleOptions, vocab_rows: int, ids: dict[str, int]) -> dict:
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": vocab_rows, "hidden_size": opts.hidden_size,
        "intermediate_size": opts.intermediate_size, "num_hidden_layers": opts.num_hidden_layers,
        "num_attention_heads": opts.num_attention_heads,
        "num_key_value_heads": opts.num_key_value_heads, "head_dim": opts.head_dim,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": opts.rms_norm_eps,
        "rope_theta": opts.rope_theta, "rope_scaling": None, "attention_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": opts.tied, "use_cache": True,
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
        "torch_dtype": opts.dtype, "sliding_window": None, "use_sliding_window": False,
        "max_window_layers": opts.num_hidden_layers,
    }
    if opts.num_experts:
        config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                      num_experts=opts.num_experts, num_experts_per_tok=opts.num_experts_per_tok,
                      moe_intermediate_size=opts.moe_intermediate_size, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001)
    return config


def random_state_dict(opts: ExampleOptions, vocab_rows: int) -> dict:
    """Seeded random weights in the seed's names (``language_model.*``, ``multimodal_projector.*``)."""
    import torch

    gen = torch.Generator().manual_seed(opts.seed)
    h, i, d = opts.hidden_size, opts.intermediate_size, opts.head_dim
    nq, nkv = opts.num_attention_heads, opts.num_key_value_heads

    def matrix(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, generator=gen) / math.sqrt(cols)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.2 * torch.randn(n, generator=gen)

    state: dict[str, torch.Tensor] = {}
    lm = "language_model.model."
    state[lm + "embed_tokens.weight"] = torch.randn(vocab_rows, h, generator=gen)
    for layer in range(opts.num_hidden_layers):
        p = f"{lm}layers.{layer}."
        state[p + "input_layernorm.weight"] = norm(h)
        state[p + "self_attn.q_proj.weight"] = matrix(nq * d, h)
        state[p + "self_attn.k_proj.weight"] = matrix(nkv * d, h)
        state[p + "self_attn.v_proj.weight"] = matrix(nkv * d, h)
        state[p + "self_attn.o_proj.weight"] = matrix(h, nq * d)
        state[p + "self_attn.q_norm.weight"] = norm(d)
        state[p + "self_attn.k_norm.weight"] = norm(d)
        state[p + "post_attention_layernorm.weight"] = norm(h)
        if opts.num_experts:
            state.update(moe_layer(p + "mlp.", opts, matrix))
        else:
            state[p + "mlp.gate_proj.weight"] = matrix(i, h)
            state[p + "mlp.up_proj.weight"] = matrix(i, h)
            state[p + "mlp.down_proj.weight"] = matrix(h, i)
    state[lm + "norm.weight"] = norm(h)
    if not opts.tied:
        state["language_model.lm_head.weight"] = matrix(vocab_rows, h)
    for name in opts.modalities:
        m = modality_config(opts, name)
        p = f"multimodal_projector.projectors.{name}."
        kind = m.get("projector_type", "mlp")
        if kind != "mlp":
            state.update(other_projector(p, m, opts, gen, matrix))
        else:
            state.update(seed_projector(p, m, opts, gen, matrix))
        if m.get("gate"):
            width = h if m["gate"].get("per_channel") else 1
            state[p + "gate"] = 0.8 * torch.randn(width, generator=gen)
    dtype = getattr(torch, opts.dtype)
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


def modality_config(opts: ExampleOptions, name: str) -> dict:
    """What ``modality_configs[name]`` says: the modality's dict over the options' defaults
    (only keys that differ from the seed's are written, so the default stays the seed's)."""
    m = dict(opts.modalities[name])
    defaults = {"projector_type": opts.projector_type, "gate": opts.gate}
    if m.get("projector_type", opts.projector_type) == "low_rank":
        defaults["rank"] = opts.rank
    if m.get("projector_type", opts.projector_type) == "swiglu":
        defaults["fused_gate_up"] = opts.fused_gate_up
        defaults["gate_up_gate_first"] = opts.gate_up_gate_first
    for key, value in defaults.items():
        m.setdefault(key, value)
    return {k: v for k, v in m.items()
            if not (k == "projector_type" and v == "mlp") and v is not None}


def seed_projector(p: str, m: dict, opts: ExampleOptions, gen, matrix) -> dict:
    """The seed's nn.Sequential: Linear, [LayerNorm], act, Dropout, Linear, [LayerNorm]."""
    import torch

    h = opts.hidden_size
    hidden = m.get("hidden_dim") or h
    layers = ([("linear", m["input_dim"], hidden), ("norm", hidden, hidden), None, None,
               ("linear", hidden, h), ("norm", h, h)] if m.get("layer_norm", opts.layer_norm)
              else [("linear", m["input_dim"], hidden), None, None, ("linear", hidden, h)])
    state = {}
    for index, layer in enumerate(layers):
        if layer is None:
            continue
        kind, fan_in, fan_out = layer
        if kind == "linear":
            state[f"{p}{index}.weight"] = matrix(fan_out, fan_in)
        else:
            state[f"{p}{index}.weight"] = 1.0 + 0.2 * torch.randn(fan_out, generator=gen)
        state[f"{p}{index}.bias"] = 0.1 * torch.randn(fan_out, generator=gen)
    return state


def other_projector(p: str, m: dict, opts: ExampleOptions, gen, matrix) -> dict:
    """SwiGLU (gate_proj/up_proj or fused gate_up_proj, down_proj, [norm]) or low-rank
    (down, [norm], up) tensors, named as docs/dialects.md describes them."""
    import torch

    h, fan_in = opts.hidden_size, m["input_dim"]
    bias = m.get("bias", True)
    state = {}

    def linear(name: str, rows: int, cols: int) -> None:
        state[f"{p}{name}.weight"] = matrix(rows, cols)
        if bias:
            state[f"{p}{name}.bias"] = 0.1 * torch.randn(rows, generator=gen)

    def norm(name: str, n: int) -> None:
        state[f"{p}{name}.weight"] = 1.0 + 0.2 * torch.randn(n, generator=gen)
        state[f"{p}{name}.bias"] = 0.1 * torch.randn(n, generator=gen)

    if m["projector_type"] == "swiglu":
        hidden = m.get("hidden_dim") or h
        linear("gate_proj", hidden, fan_in)
        linear("up_proj", hidden, fan_in)
        linear("down_proj", h, hidden)
        if m.get("layer_norm", opts.layer_norm):
            norm("norm", h)
        if m.get("fused_gate_up"):
            for part in ("weight", "bias") if bias else ("weight",):
                gate, up = state.pop(f"{p}gate_proj.{part}"), state.pop(f"{p}up_proj.{part}")
                halves = [gate, up] if m.get("gate_up_gate_first", True) else [up, gate]
                state[f"{p}gate_up_proj.{part}"] = torch.cat(halves)
    else:
        rank = m["rank"]
        linear("down", rank, fan_in)
        if m.get("layer_norm", False):
            norm("norm", rank)
        linear("up", h, rank)
    return state


def moe_layer(prefix: str, opts: ExampleOptions, matrix) -> dict:
    """Router and experts of one Qwen3-MoE layer, per expert or fused as transformers 5 holds them."""
    import torch

    h, mi, n = opts.hidden_size, opts.moe_intermediate_size, opts.num_experts
    state = {prefix + "gate.weight": matrix(n, h)}
    gates = [matrix(mi, h) for _ in range(n)]
    ups = [matrix(mi, h) for _ in range(n)]
    downs = [matrix(h, mi) for _ in range(n)]
    if opts.experts_format == "fused":
        state[prefix + "experts.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(gates, ups)])
        state[prefix + "experts.down_proj"] = torch.stack(downs)
    else:
        for e in range(n):
            state[f"{prefix}experts.{e}.gate_proj.weight"] = gates[e]
            state[f"{prefix}experts.{e}.up_proj.weight"] = ups[e]
            state[f"{prefix}experts.{e}.down_proj.weight"] = downs[e]
    return state


def write_weights(directory: Path, state: dict, opts: ExampleOptions) -> None:
    import torch
    from safetensors.torch import save_file

    names = list(state)
    shards = max(1, opts.shards)
    per = math.ceil(len(names) / shards)
    groups = [names[k:k + per] for k in range(0, len(names), per)]
    if opts.weights_format == "pickle":
        if len(groups) == 1:
            torch.save(state, directory / "pytorch_model.bin")
            return
        files = [f"pytorch_model-{n + 1:05d}-of-{len(groups):05d}.bin" for n in range(len(groups))]
        for file, group in zip(files, groups):
            torch.save({k: state[k] for k in group}, directory / file)
        index_name = "pytorch_model.bin.index.json"
    else:
        if len(groups) == 1:
            save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
            return
        files = [f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors" for n in range(len(groups))]
        for file, group in zip(files, groups):
            save_file({k: state[k] for k in group}, str(directory / file), metadata={"format": "pt"})
        index_name = "model.safetensors.index.json"
    total = sum(t.numel() * t.element_size() for t in state.values())
    weight_map = {k: f for f, g in zip(files, groups) for k in g}
    _write_json(directory / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_example(out: Path, opts: ExampleOptions | None = None) -> Path:
    """Write the example checkpoint into ``out`` (created); return ``out``."""
    import torch

    opts = opts or ExampleOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out if opts.embed_text_config else Path(opts.base_dir or out.parent / (out.name + "-base"))
    tok_dir.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(tok_dir, opts)
    rows = ids["size"] if opts.resize_vocab else 64 * math.ceil(ids["size"] / 64)
    tcfg = text_config(opts, rows, ids)
    generation = {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
                  "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": True,
                  "temperature": 0.6, "top_k": 20, "top_p": 0.95}
    _write_json(tok_dir / "generation_config.json", generation)
    mm = {
        "model_type": "multimodal_qwen3", "architectures": ["MultimodalQwen3Model"],
        "base_model_name": str(tok_dir) if not opts.embed_text_config else "Qwen/Qwen3-0.6B",
        "modality_configs": {name: {k: v for k, v in modality_config(opts, name).items()
                                    if k != "fused_gate_up"} for name in opts.modalities},
        "projector_hidden_act": opts.activation,
        "use_layer_norm": opts.layer_norm, "projector_dropout": 0.1, "fusion_strategy": "early",
        "multimodal_token": opts.multimodal_token, "max_multimodal_length": 32,
    }
    if opts.embed_text_config:
        mm["text_config"] = tcfg
    else:
        _write_json(tok_dir / "config.json", tcfg)
    _write_json(out / "config.json", mm)
    write_weights(out, random_state_dict(opts, rows), opts)
    if opts.training_state:
        # a real optimizer-state pickle: it must never be opened by the converter
        torch.save({"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "step": 10},
                   out / "training_state.pt")
    return out
