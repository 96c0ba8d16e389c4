"""Pieces every reader shares: weight files, the Qwen3 text spec, the tokenizer, the projector."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mmconvert.convert.config_values import (
    INT32_MAX,
    check_float,
    check_int,
    config_bool,
    config_dict,
    config_float,
    config_int,
    config_int_list,
    config_str,
    shown,
)
from mmconvert.convert.ids import resolve_special_ids
from mmconvert.convert.model import (
    ACTIVATIONS,
    SpecialIds,
    TextSpec,
    TokenizerSpec,
)
from mmconvert.convert.tensors import TensorRef, array_tensor, file_tensor
from mmconvert.errors import CheckpointError, UnsafePathError
from mmconvert.formats.dtypes import from_torch
from mmconvert.formats.safe_json import JSONTooDeep, loads_limited
from mmconvert.formats.safe_paths import checked_path, plain_file_name, resolve_inside
from mmconvert.formats.safetensors_io import read_safetensors_header

# files never opened: optimizer state is a pickle and may execute code
IGNORED_FILES = ("training_state.pt", "optimizer.pt", "scheduler.pt", "rng_state.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")


def load_json(path: Path, what: str = "file", *, user_named: bool = False) -> dict[str, Any]:
    """The JSON object in ``path``. Unless the user named the file with a flag, it must
    resolve inside its own folder (:mod:`mmconvert.formats.safe_paths`); nesting is bounded
    as the Rust readers bound it, so a file nested thousands deep is one error, not a
    RecursionError."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing {what}")
    real = path if user_named else resolve_inside(path.parent, path.name)
    try:
        data = loads_limited(real.read_text(encoding="utf-8"))
    except JSONTooDeep as exc:
        raise CheckpointError(f"{path}: {what} is {exc}") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an int of 5000 digits
        raise CheckpointError(f"{path}: cannot parse {what} as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: {what} is not a JSON object")
    return data


# ---------------------------------------------------------------------------------------------
# weights


# what each kind of index may name: a safetensors index never leads to torch.load
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def find_weight_files(directory: Path, stem: str = "model") -> list[Path]:
    """The weight files of a checkpoint folder, preferring safetensors over pickles.

    Every file resolves inside ``directory`` (symlinks included); an index may only name
    plain file names of its own kind."""
    for index_name, single, suffixes in (
            (f"{stem}.safetensors.index.json", f"{stem}.safetensors", SAFETENSORS_SUFFIXES),
            ("pytorch_model.bin.index.json", "pytorch_model.bin", PICKLE_SUFFIXES)):
        index = directory / index_name
        if index.is_file():
            return _indexed_files(directory, index, suffixes)
        if (directory / single).is_file():
            return [checked_path(directory, single)]
    return []


def _indexed_files(directory: Path, index: Path, suffixes: tuple[str, ...]) -> list[Path]:
    weight_map = load_json(index, "weight index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no weight_map")
    names = set()
    for tensor, value in weight_map.items():
        where = f"{index.name}: weight_map[{shown(tensor, 60)}]"
        name = plain_file_name(value, where)
        if not name.endswith(suffixes):
            raise UnsafePathError(f"{where} is {shown(name, 60)}, not a "
                                  f"{' / '.join(suffixes)} file\nin {index}")
        names.add(name)
    files = [checked_path(directory, name) for name in sorted(names)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
    return files


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
    """Qwen3 hyper-parameters from a Qwen3 ``config.json`` (old or transformers-5 style).

    Every value is type- and range-checked (:mod:`mmconvert.convert.config_values`); the
    counts are bound by the tensors later (:func:`check_lm_tensors`), before anything loops
    over them."""
    hidden = config_int(cfg, "hidden_size", where)
    heads = config_int(cfg, "num_attention_heads", where)
    kv_heads = config_int(cfg, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        raise CheckpointError(f"{where}: num_attention_heads ({heads}) is not a multiple of "
                              f"num_key_value_heads ({kv_heads})")
    head_dim = config_int(cfg, "head_dim", where, default=hidden // heads)
    if head_dim < 1:
        raise CheckpointError(f"{where}: hidden_size // num_attention_heads is 0; set head_dim")
    experts = config_int(cfg, "num_experts", where, minimum=0,
                         default=config_int(cfg, "num_local_experts", where, minimum=0,
                                            default=0))
    moe: dict[str, Any] = {}
    if experts:  # the MoE keys mean nothing to a dense model (and are not read there)
        moe = dict(
            num_experts=experts,
            num_experts_per_tok=config_int(cfg, "num_experts_per_tok", where, maximum=experts),
            moe_intermediate_size=config_int(cfg, "moe_intermediate_size", where),
            norm_topk_prob=config_bool(cfg, "norm_topk_prob", where, default=False),
            decoder_sparse_step=config_int(cfg, "decoder_sparse_step", where, default=1),
            mlp_only_layers=config_int_list(cfg, "mlp_only_layers", where))
    rope_theta, rope_scaling = _rope_config(cfg, where)
    dtype = config_str(cfg, "dtype", where, default=None)
    hidden_act = config_str(cfg, "hidden_act", where, default="silu")
    if hidden_act != "silu":
        raise CheckpointError(f"{where}: hidden_act {shown(hidden_act)} is not Qwen3's silu")
    return TextSpec(
        vocab_size=config_int(cfg, "vocab_size", where),
        config_vocab_size=config_int(cfg, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=config_int(cfg, "intermediate_size", where),
        num_hidden_layers=config_int(cfg, "num_hidden_layers", where),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=config_float(cfg, "rms_norm_eps", where, default=1e-6, above=0.0,
                                  below=1.0),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=config_int(cfg, "max_position_embeddings", where,
                                           default=40960),
        tie_word_embeddings=config_bool(cfg, "tie_word_embeddings", where, default=False),
        attention_bias=config_bool(cfg, "attention_bias", where, default=False),
        hidden_act=hidden_act,
        torch_dtype=dtype or config_str(cfg, "torch_dtype", where, default="bfloat16"),
        **moe,
        raw_config=dict(cfg),
    )


# rope_scaling numbers mmconvert reads (GGUF keys, HF config) -> their bounds
_ROPE_SCALING_NUMBERS = {"factor": dict(above=0.0), "beta_fast": {}, "beta_slow": {}}


def _rope_config(cfg: dict[str, Any], where: str) -> tuple[float, dict[str, Any] | None]:
    """``rope_theta`` (top level, else ``rope_parameters``) and the scaling dict, checked."""
    rope = config_dict(cfg, "rope_parameters", where, default={})
    theta = cfg.get("rope_theta")
    key = "rope_theta"
    if theta is None:
        theta, key = rope.get("rope_theta"), "rope_parameters.rope_theta"
    rope_theta = 1_000_000.0 if theta is None else \
        check_float(theta, key, where, above=0.0)
    scaling = config_dict(cfg, "rope_scaling", where, default=None)
    if scaling is None and config_str(rope, "rope_type", where, default="default",
                                      label="rope_parameters.rope_type") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling:
        name = "rope_scaling" if cfg.get("rope_scaling") is not None else "rope_parameters"
        for field_name in ("rope_type", "type"):
            config_str(scaling, field_name, where, default=None, label=f"{name}.{field_name}")
        for field_name, bounds in _ROPE_SCALING_NUMBERS.items():
            config_float(scaling, field_name, where, default=None, label=f"{name}.{field_name}",
                         **bounds)
        config_int(scaling, "original_max_position_embeddings", where, default=None,
                   label=f"{name}.original_max_position_embeddings")
    return rope_theta, scaling


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


LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


def check_layer_count(text: TextSpec, lm: dict[str, TensorRef], where: str) -> None:
    """``num_hidden_layers`` bound by the layers the weights hold, before anything loops over
    it: a config claiming 10**9 layers is one error line, not a hang."""
    present = {m.group(1) for m in map(LAYER_INDEX.match, lm) if m}
    if text.num_hidden_layers > len(present):
        raise CheckpointError(f"{where}: num_hidden_layers = {text.num_hidden_layers} but the "
                              f"weights hold {len(present)} layers")
    if text.is_moe:
        for layer in text.mlp_only_layers:
            if layer >= text.num_hidden_layers:
                raise CheckpointError(f"{where}: mlp_only_layers names layer {layer} of "
                                      f"{text.num_hidden_layers}")


def _name_list(names: list[str], what: str) -> str:
    """``what: first (and N more)`` on the line, every name on the detail lines after it."""
    head = f"{len(names)} {what}: {names[0]}" if len(names) > 1 else f"{what}: {names[0]}"
    if len(names) == 1:
        return head
    listed = names[:20]
    rest = f"\n... and {len(names) - 20} more" if len(names) > 20 else ""
    return f"{head} (and {len(names) - 1} more)\n" + "\n".join(listed) + rest


def check_lm_tensors(text: TextSpec, lm: dict[str, TensorRef], where: str) -> None:
    """Missing, extra or mis-shaped language-model tensors -> one clear error."""
    check_layer_count(text, lm, where)
    tied = "lm_head.weight" not in lm
    expected = lm_tensor_names(text, tied)
    missing = [n for n in expected if n not in lm]
    expected_set = set(expected)
    extra = sorted(n for n in lm if n not in expected_set)
    if missing:
        raise CheckpointError(f"{where}: " + _name_list(missing, "tensors missing against the "
                                                        "config"))
    if extra:
        raise CheckpointError(f"{where}: " + _name_list(extra, "tensors not expected by the "
                                                        "config"))
    shapes = expected_lm_shapes(text)
    for name, shape in shapes.items():
        if name in lm and tuple(lm[name].shape) != shape:
            raise CheckpointError(f"{where}: tensor {shown(lm[name].source_name)} has shape "
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
    where = str(tok_path)
    model = config_dict(tok, "model", where, default={})
    vocab = dict(config_dict(model, "vocab", where, default={}, label="model.vocab"))
    ids = vocab.values()
    # C-speed checks of 150 k ids first (json gives only int, never a subclass, for numbers);
    # the loop only to name the first bad one
    if vocab and not (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) <= INT32_MAX):
        for content, tid in vocab.items():
            if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid <= INT32_MAX:
                raise CheckpointError(f"{where}: model.vocab gives {shown(content)} the id "
                                      f"{shown(tid)}; ids are integers 0..{INT32_MAX}")
    added = _tokenizer_json_added_tokens(tok.get("added_tokens"), where)
    for t in added:
        vocab[t["content"]] = t["id"]
    if not vocab:
        raise CheckpointError(f"{tok_path}: tokenizer has an empty vocabulary")
    cfg_path = directory / "tokenizer_config.json"
    cfg = load_json(cfg_path, "tokenizer config") if cfg_path.is_file() else {}
    known = {t["id"] for t in added}
    for t in _added_tokens_decoder(cfg, str(cfg_path)):
        if t["id"] not in known:
            added.append(t)
            vocab[t["content"]] = t["id"]
    size = max(vocab.values()) + 1
    for flag in ("add_bos_token", "add_eos_token"):
        config_bool(cfg, flag, str(cfg_path), default=None)
    for kind in ("bos", "eos", "pad"):
        _token_content(cfg.get(f"{kind}_token"), f"{kind}_token", str(cfg_path))
    template = cfg.get("chat_template")
    if template is not None and not isinstance(template, (str, list)):
        raise CheckpointError(f"{cfg_path}: chat_template must be a string or a list of named "
                              f"templates, got {shown(template)}")
    if (directory / "chat_template.jinja").is_file():
        jinja = resolve_inside(directory, "chat_template.jinja")
        try:
            template = jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"{directory / 'chat_template.jinja'}: not UTF-8 text") from exc
    files = [f for f in TOKENIZER_FILES if (directory / f).is_file()]
    for name in files:  # each is copied into bundles: none may lead outside the folder
        resolve_inside(directory, name)
    spec = TokenizerSpec(directory=directory, files=files, size=size,
                         added_tokens=sorted(added, key=lambda t: t["id"]),
                         chat_template=template if isinstance(template, str) else None,
                         tokenizer_config=cfg, document=tok)
    return spec, vocab


def _added_token(entry: Any, tid: Any, where: str, label: str) -> dict[str, Any]:
    """One added token as ``{id, content, special}``, every field checked."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: {label} must be an object with content and special, "
                              f"got {shown(entry)}")
    return {"id": check_int(tid, f"{label} id", where, minimum=0),
            "content": config_str(entry, "content", where, label=f"{label}.content"),
            "special": config_bool(entry, "special", where, default=False,
                                   label=f"{label}.special")}


def _tokenizer_json_added_tokens(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise CheckpointError(f"{where}: added_tokens must be a list, got {shown(value)}")
    return [_added_token(t, t.get("id") if isinstance(t, dict) else None, where,
                         f"added_tokens[{i}]") for i, t in enumerate(value)]


def _added_tokens_decoder(cfg: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """``tokenizer_config.json``'s ``added_tokens_decoder``: ``{"<id>": {content, special}}``."""
    table = config_dict(cfg, "added_tokens_decoder", where, default={})
    tokens = []
    for key, entry in table.items():
        label = f"added_tokens_decoder[{shown(key, 24)}]"
        if not (key.isascii() and key.isdigit()):
            raise CheckpointError(f"{where}: {label}: a token id must be a non-negative "
                                  "integer")
        tokens.append(_added_token(entry, int(key) if len(key) < 20 else 2**63, where, label))
    return tokens


def _token_content(value: Any, key: str = "token", where: str = "") -> str | None:
    """A token as ``tokenizer_config.json`` names it: a string, ``{"content": ...}`` or null."""
    if isinstance(value, dict):
        return config_str(value, "content", where, label=f"{key}.content")
    if value is None or isinstance(value, str):
        return value
    raise CheckpointError(f"{where}: {key} must be a string or an object with content, "
                          f"got {shown(value)}")


def tokenizer_special_ids(spec: TokenizerSpec, vocab: dict[str, int]) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    where = str(spec.directory / "tokenizer_config.json")
    for kind in ("bos", "eos", "pad"):
        content = _token_content(spec.tokenizer_config.get(f"{kind}_token"), f"{kind}_token",
                                 where)
        out[kind] = vocab.get(content) if content else None
    return out


def resolve_ids(configs: list[tuple[str, dict]], generation: tuple[str, dict] | None,
                tokenizer: TokenizerSpec, vocab: dict[str, int]) -> SpecialIds:
    return resolve_special_ids(configs, generation, tokenizer_special_ids(tokenizer, vocab),
                               str(tokenizer.directory / "tokenizer_config.json"))


# ---------------------------------------------------------------------------------------------
# projectors (their layouts live in :mod:`mmconvert.convert.readers.projectors`)


def parse_activation(value: Any, where: str, key: str = "projector_hidden_act") -> str:
    """An activation name (``null``: the seed's gelu) as one of :data:`ACTIVATIONS`."""
    if value is None:
        return "gelu"
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: {key} must be a string, got {shown(value)}")
    aliases = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu"}
    act = aliases.get(value.lower(), value.lower())
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{where}: {key} {shown(value, 32)} is not one of "
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
