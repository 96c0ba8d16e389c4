"""Pieces every reader shares: weight files, the Qwen3 text spec, the tokenizer, the projector."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mmconvert.convert.errors import CheckpointError
from mmconvert.convert.ids import resolve_special_ids
from mmconvert.convert.model import (
    ACTIVATIONS,
    SpecialIds,
    TextSpec,
    TokenizerSpec,
)
from mmconvert.convert.tensors import TensorRef, array_tensor, file_tensor
from mmconvert.formats.dtypes import from_torch
from mmconvert.formats.safetensors_io import read_safetensors_header

# files never opened: optimizer state is a pickle and may execute code
IGNORED_FILES = ("training_state.pt", "optimizer.pt", "scheduler.pt", "rng_state.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def load_json(path: Path, what: str = "file") -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot parse {what} as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# weights


def find_weight_files(directory: Path, stem: str = "model") -> list[Path]:
    """The weight files of a checkpoint folder, preferring safetensors over pickles."""
    for index_name, single in ((f"{stem}.safetensors.index.json", f"{stem}.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = directory / index_name
        if index.is_file():
            weight_map = load_json(index, "weight index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map")
            files = sorted({directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
            return files
        if (directory / single).is_file():
            return [directory / single]
    return []


def open_weight_files(files: list[Path]) -> dict[str, TensorRef]:
    """Lazy references to every tensor of ``files``, named as in the files."""
    refs: dict[str, TensorRef] = {}
    for path in files:
        if path.name in IGNORED_FILES:
            continue
        if path.suffix == ".safetensors":
            entries, _ = read_safetensors_header(path)
            new = {name: file_tensor(name, entry) for name, entry in entries.items()}
        else:
            new = _pickle_refs(path)
        clash = set(new) & set(refs)
        if clash:
            raise CheckpointError(f"{path}: tensor {sorted(clash)[0]!r} appears in two files")
        refs.update(new)
    return refs


def _pickle_refs(path: Path) -> dict[str, TensorRef]:
    from mmconvert.formats.torch_pickle import load_state_dict

    state = load_state_dict(path)
    refs = {}
    for name, tensor in state.items():
        def get(t=tensor):
            return from_torch(t)
        _, dtype = from_torch(tensor[:0] if tensor.dim() else tensor)
        refs[name] = array_tensor(name, name, path, get, tuple(tensor.shape), dtype)
    return refs


# ---------------------------------------------------------------------------------------------
# Qwen3 text config


def text_spec_from_config(cfg: dict[str, Any], where: str) -> TextSpec:
    """Qwen3 hyper-parameters from a Qwen3 ``config.json`` (old or transformers-5 style)."""
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        rope = cfg.get("rope_parameters") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        rope_scaling = cfg.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        return TextSpec(
            vocab_size=int(cfg["vocab_size"]),
            config_vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 40960)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            hidden_act=str(cfg.get("hidden_act", "silu")),
            torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
            num_experts=int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0),
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=int(cfg.get("decoder_sparse_step") or 1),
            mlp_only_layers=[int(i) for i in cfg.get("mlp_only_layers") or []],
            raw_config=dict(cfg),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: not a usable Qwen3 text config ({exc!r} missing or bad)") from exc


def lm_tensor_names(text: TextSpec, tied: bool) -> list[str]:
    """Every canonical language-model tensor a dense Qwen3 of this shape has, in file order."""
    names = ["model.embed_tokens.weight"]
    for i in range(text.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight"]
        for proj in ("q", "k", "v", "o"):
            names.append(f"{p}self_attn.{proj}_proj.weight")
            if text.attention_bias:
                names.append(f"{p}self_attn.{proj}_proj.bias")
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight",
                  p + "post_attention_layernorm.weight"]
        names += [p + f"mlp.{n}" for n in mlp_tensor_suffixes(text, i)]
    names.append("model.norm.weight")
    if not tied:
        names.append("lm_head.weight")
    return names


MOE_SUFFIXES = ("gate.weight", "experts.gate_proj", "experts.up_proj", "experts.down_proj")
DENSE_SUFFIXES = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def mlp_tensor_suffixes(text: TextSpec, layer: int) -> tuple[str, ...]:
    """Canonical names under ``model.layers.{layer}.mlp.`` (see convert/model.py)."""
    return MOE_SUFFIXES if text.layer_is_moe(layer) else DENSE_SUFFIXES


def expected_lm_shapes(text: TextSpec) -> dict[str, tuple[int, ...]]:
    h, i, d = text.hidden_size, text.intermediate_size, text.head_dim
    e, mi = text.num_experts, text.moe_intermediate_size
    q, kv = text.num_attention_heads * d, text.num_key_value_heads * d
    per_layer = {
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (h,),
        "self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,),
    }
    dense = {"gate_proj.weight": (i, h), "up_proj.weight": (i, h), "down_proj.weight": (h, i)}
    moe = {"gate.weight": (e, h), "experts.gate_proj": (e, mi, h), "experts.up_proj": (e, mi, h),
           "experts.down_proj": (e, h, mi)}
    shapes = {"model.norm.weight": (h,)}
    for layer in range(text.num_hidden_layers):
        for suffix, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{suffix}"] = shape
        for suffix, shape in (moe if text.layer_is_moe(layer) else dense).items():
            shapes[f"model.layers.{layer}.mlp.{suffix}"] = shape
    return shapes


def check_lm_tensors(text: TextSpec, lm: dict[str, TensorRef], where: str) -> None:
    """Missing, extra or mis-shaped language-model tensors -> one clear error."""
    tied = "lm_head.weight" not in lm
    expected = lm_tensor_names(text, tied)
    missing = [n for n in expected if n not in lm]
    extra = sorted(set(lm) - set(expected))
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{where}: tensors missing against the config: "
                              f"{', '.join(missing[:3])}{more}")
    if extra:
        more = f" (and {len(extra) - 3} more)" if len(extra) > 3 else ""
        raise CheckpointError(f"{where}: tensors not expected by the config: "
                              f"{', '.join(extra[:3])}{more}")
    shapes = expected_lm_shapes(text)
    for name, shape in shapes.items():
        if name in lm and tuple(lm[name].shape) != shape:
            raise CheckpointError(f"{where}: tensor {lm[name].source_name} has shape "
                                  f"{list(lm[name].shape)}, the config implies {list(shape)}")
    emb = lm["model.embed_tokens.weight"]
    if len(emb.shape) != 2 or emb.shape[1] != text.hidden_size:
        raise CheckpointError(f"{where}: embedding shape {list(emb.shape)} does not match "
                              f"hidden_size {text.hidden_size}")
    if not tied and lm["lm_head.weight"].shape != emb.shape:
        raise CheckpointError(f"{where}: lm_head shape {list(lm['lm_head.weight'].shape)} "
                              f"differs from the embedding's {list(emb.shape)}")


# ---------------------------------------------------------------------------------------------
# tokenizer


def load_tokenizer_spec(directory: Path) -> tuple[TokenizerSpec, dict[str, int]]:
    """The tokenizer in ``directory`` and a content -> id map of its whole vocabulary."""
    tok_path = directory / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(
            f"{directory}: missing tokenizer (tokenizer.json); save the tokenizer beside the "
            "checkpoint or pass --base DIR with the base model's files")
    tok = load_json(tok_path, "tokenizer")
    vocab = dict((tok.get("model") or {}).get("vocab") or {})
    added = [{"id": int(t["id"]), "content": t["content"], "special": bool(t.get("special"))}
             for t in tok.get("added_tokens") or []]
    for t in added:
        vocab[t["content"]] = t["id"]
    if not vocab:
        raise CheckpointError(f"{tok_path}: tokenizer has an empty vocabulary")
    size = max(vocab.values()) + 1
    cfg_path = directory / "tokenizer_config.json"
    cfg = load_json(cfg_path, "tokenizer config") if cfg_path.is_file() else {}
    for tid, info in (cfg.get("added_tokens_decoder") or {}).items():
        if int(tid) not in {t["id"] for t in added}:
            added.append({"id": int(tid), "content": info["content"],
                          "special": bool(info.get("special"))})
            vocab[info["content"]] = int(tid)
    size = max(size, max(vocab.values()) + 1)
    template = cfg.get("chat_template")
    if (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    files = [f for f in TOKENIZER_FILES if (directory / f).is_file()]
    spec = TokenizerSpec(directory=directory, files=files, size=size,
                         added_tokens=sorted(added, key=lambda t: t["id"]),
                         chat_template=template if isinstance(template, str) else None,
                         tokenizer_config=cfg)
    return spec, vocab


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_special_ids(spec: TokenizerSpec, vocab: dict[str, int]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for kind in ("bos", "eos", "pad"):
        content = _token_content(spec.tokenizer_config.get(f"{kind}_token"))
        out[kind] = vocab.get(content) if content else None
    return out


def resolve_ids(configs: list[tuple[str, dict]], generation: tuple[str, dict] | None,
                tokenizer: TokenizerSpec, vocab: dict[str, int]) -> SpecialIds:
    return resolve_special_ids(configs, generation, tokenizer_special_ids(tokenizer, vocab),
                               str(tokenizer.directory / "tokenizer_config.json"))


# ---------------------------------------------------------------------------------------------
# projectors (their layouts live in :mod:`mmconvert.convert.readers.projectors`)


def parse_activation(value: Any, where: str) -> str:
    act = str(value or "gelu").lower()
    aliases = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu"}
    act = aliases.get(act, act)
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: projector_hidden_act {value!r} is not one of "
                              f"{', '.join(ACTIVATIONS)}")
    return act


def hub_cache_snapshot(repo_id: str) -> Path | None:
    """A local Hugging Face cache snapshot of ``repo_id`` (never downloads)."""
    if not repo_id or "/" not in repo_id:
        return None
    cache = Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or
                 Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return None
    candidates = sorted((p for p in snapshots.iterdir() if (p / "config.json").is_file()),
                        key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None
