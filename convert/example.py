"""``mmconvert example OUT``: the small deterministic checkpoint in the seed's layout that the
README's commands convert (two modalities, the seed's MLP projector with layer norm, a real
byte-level BPE tokenizer with Qwen2's pre-tokenizer, trained on a small built-in corpus, with
Qwen's special tokens and the multimodal token added). Weights are random but seeded. Beside
it, ``example_inputs.safetensors``: one seeded item of embeddings per modality for
``mmconvert run --embeddings`` (and the snippets of the README and the docs).

The test matrix (every dialect, MoE, projector kinds, pickles, shards, ...) is not here: it is
``testkit/checkpoints.py``, which builds on the pieces below.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmconvert.formats.bundle import follow_umask
from mmconvert.formats.gguf_vocab import QWEN2_SPLIT_REGEX

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
class ExampleShape:
    """The example's sizes and projector settings (defaults: the README's example)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    bpe_vocab_size: int = 384  # learned byte-level BPE tokens before the special ones
    modalities: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"m1": {"input_dim": 48}, "m2": {"input_dim": 80, "hidden_dim": 96}})
    activation: str = "gelu"
    layer_norm: bool = True
    tied: bool = False
    dtype: str = "bfloat16"
    seed: int = 0
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    multimodal_token: str = "<|multimodal|>"


# beside the weights: the embeddings `mmconvert run --embeddings` takes (readers open only
# model.safetensors or an index's shards, so this file is never mistaken for weights)
EXAMPLE_INPUTS = "example_inputs.safetensors"


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


def write_tokenizer(directory: Path, opts: ExampleShape) -> dict[str, int]:
    tok = build_tokenizer(opts.bpe_vocab_size, opts.multimodal_token)
    tok.save(str(directory / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + [opts.multimodal_token]}
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for t, i in ids.items()}
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": decoder, "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
        "model_max_length": 4096, "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    })
    ids["size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def text_config(opts: ExampleShape, vocab_rows: int, ids: dict[str, int]) -> dict:
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
    return config


def random_state_dict(opts: ExampleShape, vocab_rows: int, *,
                      mlp: Callable[..., dict] | None = None,
                      projector: Callable[..., dict] | None = None,
                      modality: Callable[[Any, str], dict] | None = None,
                      rng: str = "torch") -> dict:
    """Seeded random weights in the seed's names (``language_model.*``, ``multimodal_projector.*``).

    ``mlp(prefix, opts, matrix)``, ``projector(prefix, modality_config, opts, gen, matrix)`` and
    ``modality(opts, name)`` replace the dense MLP, the seed's projector and the modality's
    config (the test matrix plugs MoE layers and other projector kinds in here).

    ``rng="numpy"``: float32 numpy arrays from a numpy generator (what ``mmconvert example``
    writes: the base install has no torch); ``"torch"``: torch tensors in ``opts.dtype`` from a
    torch generator (the test kit's variants, whose callbacks take a torch generator).
    """
    gen = _generator(rng, opts.seed)
    h, d = opts.hidden_size, opts.head_dim
    nq, nkv = opts.num_attention_heads, opts.num_key_value_heads

    def matrix(rows: int, cols: int):
        return randn(gen, rows, cols) / math.sqrt(cols)

    def norm(n: int):
        return 1.0 + 0.2 * randn(gen, n)

    state: dict[str, Any] = {}
    lm = "language_model.model."
    state[lm + "embed_tokens.weight"] = randn(gen, vocab_rows, h)
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
        state.update((mlp or dense_mlp)(p + "mlp.", opts, matrix))
    state[lm + "norm.weight"] = norm(h)
    if not opts.tied:
        state["language_model.lm_head.weight"] = matrix(vocab_rows, h)
    for name in opts.modalities:
        m = (modality or (lambda o, n: dict(o.modalities[n])))(opts, name)
        p = f"multimodal_projector.projectors.{name}."
        state.update((projector or seed_projector)(p, m, opts, gen, matrix))
        if m.get("gate"):
            width = h if m["gate"].get("per_channel") else 1
            state[p + "gate"] = 0.8 * randn(gen, width)
    if rng == "numpy":
        return state
    import torch

    dtype = getattr(torch, opts.dtype)
    return {k: v.to(dtype).contiguous() for k, v in state.items()}


def _generator(rng: str, seed: int):
    if rng == "numpy":
        import numpy as np

        return np.random.default_rng(seed)
    import torch

    return torch.Generator().manual_seed(seed)


def randn(gen, *shape: int):
    """Standard normals from ``gen``: float32 numpy from a numpy generator, else torch."""
    import numpy as np

    if isinstance(gen, np.random.Generator):
        return gen.standard_normal(shape, dtype=np.float32)
    import torch

    return torch.randn(*shape, generator=gen)


def dense_mlp(prefix: str, opts: ExampleShape, matrix) -> dict:
    """Qwen3's SwiGLU MLP of one layer."""
    h, i = opts.hidden_size, opts.intermediate_size
    return {prefix + "gate_proj.weight": matrix(i, h), prefix + "up_proj.weight": matrix(i, h),
            prefix + "down_proj.weight": matrix(h, i)}


def seed_projector(p: str, m: dict, opts: ExampleShape, gen, matrix) -> dict:
    """The seed's nn.Sequential: Linear, [LayerNorm], act, Dropout, Linear, [LayerNorm]."""
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
            state[f"{p}{index}.weight"] = 1.0 + 0.2 * randn(gen, fan_out)
        state[f"{p}{index}.bias"] = 0.1 * randn(gen, fan_out)
    return state


def write_weights_numpy(path: Path, state: dict, dtype: str) -> None:
    """float32 arrays stored as ``dtype`` (a torch dtype name) in one safetensors file, torch not
    needed (bfloat16 rounded as torch rounds it). The layout is the format's own: 8-byte header
    length, JSON header padded with spaces to 8 bytes, the data back to back in name order."""
    from mmconvert.formats.dtypes import convert

    stored = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name in sorted(state):
        data = convert(state[name], "F32", stored).tobytes()
        header[name] = {"dtype": stored, "shape": list(state[name].shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.writelines(blobs)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def generation_config(ids: dict[str, int]) -> dict:
    return {"bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "do_sample": True,
            "temperature": 0.6, "top_k": 20, "top_p": 0.95}


def multimodal_config(opts: ExampleShape, modality_configs: dict[str, dict],
                      base_model_name: str = "Qwen/Qwen3-0.6B") -> dict:
    """The seed's ``config.json`` (without ``text_config``)."""
    return {
        "model_type": "multimodal_qwen3", "architectures": ["MultimodalQwen3Model"],
        "base_model_name": base_model_name, "modality_configs": modality_configs,
        "projector_hidden_act": opts.activation,
        "use_layer_norm": opts.layer_norm, "projector_dropout": 0.1, "fusion_strategy": "early",
        "multimodal_token": opts.multimodal_token, "max_multimodal_length": 32,
    }


def write_example(out: Path, shape: ExampleShape | None = None) -> Path:
    """Write the example checkpoint into ``out`` (created); return ``out``."""
    shape = shape or ExampleShape()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(out, shape)
    write_json(out / "generation_config.json", generation_config(ids))
    mm = multimodal_config(shape, {name: dict(m) for name, m in shape.modalities.items()})
    mm["text_config"] = text_config(shape, ids["size"], ids)
    write_json(out / "config.json", mm)
    write_weights_numpy(out / "model.safetensors",
                        random_state_dict(shape, ids["size"], rng="numpy"), shape.dtype)
    follow_umask(out / "model.safetensors")  # the safetensors library writes 0600
    write_example_inputs(out / EXAMPLE_INPUTS, shape)
    return out


def example_inputs(shape: ExampleShape, rows: int = 3) -> dict[str, Any]:
    """Seeded float32 embeddings, one item per modality (``rows``, ``rows - 1``, ... rows, at
    least one, each of its modality's ``input_dim``), named as ``mmconvert run --embeddings``
    reads them: ``{modality: [n, input_dim]}``."""
    import numpy as np

    rng = np.random.default_rng(shape.seed)
    return {name: rng.standard_normal((max(rows - i, 1), int(m["input_dim"])), dtype=np.float32)
            for i, (name, m) in enumerate(shape.modalities.items())}


def write_example_inputs(path: Path, shape: ExampleShape) -> Path:
    """The embeddings file the README's ``mmconvert run`` uses: one item per modality, so a
    prompt takes one placeholder per modality (or one per row, or none)."""
    from safetensors.numpy import save_file

    save_file(example_inputs(shape), str(path))
    follow_umask(path)
    return path
