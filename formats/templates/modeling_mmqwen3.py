"""Multimodal Qwen3 for transformers: per-modality projectors over ``Qwen3ForCausalLM`` (or
``Qwen3MoeForCausalLM`` for a Qwen3-MoE language model).

This file is copied into Hugging Face bundles written by mmconvert and is loaded through
``auto_map`` with ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.
It is self-contained (torch, transformers and safetensors, which transformers requires).

What it reads:
- ``config.multimodal_config``: the projector description (modalities in fusion order, each an
  ordered list of layers ``linear | layer_norm | act | glu | tanh_gate``), the placeholder
  token and its id;
- ``multimodal_projector/model.safetensors`` (``multimodal_config.weights``, a path relative to
  the bundle: a subfolder, so that loaders reading every ``*.safetensors`` at the root, vLLM's
  among them, see only the language model): tensors
  ``multimodal_projector.<modality>.<layer>.<param>``.

Inputs: ``mm_inputs = {"m1": [tensor, ...], "m2": [...]}``; an item is ``[input_dim]`` (one
row) or ``[n, input_dim]``. The seed model's spellings are aliases: ``multimodal_embeddings=``
(the same dict; a tensor instead of a list is one item) and
``multimodal_data={"multimodal_embeddings": ...}``. Early fusion: the projected rows
(modalities in config order, items in list order) replace the placeholder tokens one row per
placeholder; a prompt without any placeholder gets all rows prepended; any other placeholder
count is an error, zero rows included (a prompt with placeholders and no inputs). A keyword
that looks multimodal but is none of these is an error too: ``**kwargs`` would swallow it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

CONFIG_KEY = "multimodal_config"
PROJECTOR_FORMAT = "mmconvert.multimodal_projector"
SUPPORTED_VERSIONS = (1, 2)  # 2 adds the glu and tanh_gate layer kinds
PROJECTOR_WEIGHTS = "multimodal_projector/model.safetensors"  # multimodal_config.weights default
IGNORE_INDEX = -100
# the keywords that carry multimodal inputs: ours, then the seed model's (an alias each)
INPUT_KEYWORD = "mm_inputs"
SEED_KEYWORD = "multimodal_embeddings"
SEED_DATA_KEYWORD = "multimodal_data"  # {"multimodal_embeddings": {...}}, as vLLM passes it
ACCEPTED_INPUTS = (f"{INPUT_KEYWORD}={{modality: [item, ...]}}, {SEED_KEYWORD}= (the same "
                   f"dict), {SEED_DATA_KEYWORD}={{{SEED_KEYWORD!r}: ...}}")
# keyword shapes that mean "multimodal input" when misspelt (**kwargs would swallow them) ...
LOOKS_MULTIMODAL_PREFIXES = ("mm_", "multimodal", "multi_modal", "modality", "modalities")
LOOKS_MULTIMODAL_SUFFIXES = ("_embeddings", "_embedding")
# ... except the language model's own keywords of those shapes
LANGUAGE_MODEL_KEYWORDS = ("mm_token_type_ids", "moe_mm_token_type_ids")


def make_activation(name: str) -> nn.Module:
    """The activation named in the config (``gelu`` is the exact erf form, as ``nn.GELU()``)."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "tanh":
        return nn.Tanh()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown projector activation {name!r} (relu, gelu, gelu_tanh, tanh, silu)")


class GatedLinear(nn.Module):
    """``act(gate(x)) * up(x)`` (SwiGLU with SiLU): parameters ``gate.*`` and ``up.*``."""

    def __init__(self, in_dim: int, out_dim: int, activation: str, bias: bool = True):
        super().__init__()
        self.gate = nn.Linear(in_dim, out_dim, bias=bias)
        self.up = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.gate(x)) * self.up(x)


class TanhGate(nn.Module):
    """A learned gate ``g`` (one value, or one per channel) stored raw: ``x * tanh(g)``, or
    ``x * (1 - tanh(g))`` when complementary (Flamingo / mllama style)."""

    def __init__(self, dim: int, per_channel: bool = False, complementary: bool = False):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim if per_channel else 1))
        self.complementary = complementary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(self.gate)
        return x * ((1 - t) if self.complementary else t)


class ModalityProjector(nn.ModuleDict):
    """One modality's projector: its layers in order, each a submodule named as in the config
    (so tensor names are ``<layer>.weight``, ``<layer>.gate.weight``, ``<layer>.gate``...)."""

    def __init__(self, spec: Mapping[str, Any]):
        super().__init__()
        self.input_dim = int(spec["input_dim"])
        for layer in spec["layers"]:
            kind = layer["kind"]
            if kind == "linear":
                module: nn.Module = nn.Linear(layer["in_dim"], layer["out_dim"],
                                              bias=layer.get("bias", True))
            elif kind == "layer_norm":
                module = nn.LayerNorm(layer["dim"], eps=layer["eps"], bias=layer.get("bias", True))
            elif kind == "act":
                module = make_activation(layer["activation"])
            elif kind == "glu":
                module = GatedLinear(layer["in_dim"], layer["out_dim"], layer["activation"],
                                     bias=layer.get("bias", True))
            elif kind == "tanh_gate":
                module = TanhGate(layer["dim"], layer.get("per_channel", False),
                                  layer.get("complementary", False))
            else:
                raise ValueError(f"unknown projector layer kind {kind!r} (linear, layer_norm, "
                                 "act, glu, tanh_gate)")
            self[layer["name"]] = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.values():
            x = module(x)
        return x


def projector_spec(config: Qwen3Config | Qwen3MoeConfig) -> dict[str, Any]:
    """``config.multimodal_config``, checked to be a version this code understands."""
    spec = getattr(config, CONFIG_KEY, None)
    if not isinstance(spec, Mapping) or not spec.get("modalities"):
        raise ValueError(f"config.json has no {CONFIG_KEY!r} with modalities: this folder is not "
                         "a multimodal bundle written by mmconvert")
    if spec.get("format") != PROJECTOR_FORMAT or \
            spec.get("format_version") not in SUPPORTED_VERSIONS:
        raise ValueError(f"{CONFIG_KEY} format {spec.get('format')!r} version "
                         f"{spec.get('format_version')!r} is not {PROJECTOR_FORMAT!r} version "
                         f"{' or '.join(map(str, SUPPORTED_VERSIONS))}: update the bundle's "
                         "modeling_mmqwen3.py")
    return dict(spec)


def weights_location(spec: Mapping[str, Any]) -> tuple[str, str]:
    """(subfolder, file name) of the projector weights, from ``multimodal_config.weights``: a
    relative path inside the bundle (``/``-separated), never absolute and never with ``..``."""
    weights = spec.get("weights", PROJECTOR_WEIGHTS)
    parts = weights.split("/") if isinstance(weights, str) else []
    if not parts or weights.startswith("/") or "\\" in weights or \
            any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{CONFIG_KEY}.weights {weights!r} is not a relative path inside the "
                         f"bundle (e.g. {PROJECTOR_WEIGHTS!r})")
    return "/".join(parts[:-1]), parts[-1]


def as_rows(item: Any, input_dim: int, modality: str) -> torch.Tensor:
    """An item as ``[n, input_dim]`` (``[input_dim]`` is one row), as the seed model reshapes."""
    x = torch.as_tensor(item)
    if x.dim() == 0 or x.shape[-1] != input_dim:
        raise ValueError(f"modality {modality!r}: items must be [input_dim] or [n, input_dim] "
                         f"with input_dim={input_dim}, got shape {list(x.shape)}")
    return x.reshape(-1, input_dim)


def expand_placeholders(text: str, token: str, rows_per_item: Sequence[int]) -> str:
    """Let a prompt name each item once: with one ``token`` per item, each is repeated to the
    item's row count. A prompt already holding one token per row, or none (prepend), is kept."""
    count = text.count(token)
    total = sum(rows_per_item)
    if not rows_per_item or count in (0, total):
        return text
    if count != len(rows_per_item):
        raise ValueError(f"the prompt has {count} {token} placeholders for {len(rows_per_item)} "
                         f"items ({total} rows): use one per item, one per row, or none")
    parts = text.split(token)
    return parts[0] + "".join(token * n + part for n, part in zip(rows_per_item, parts[1:]))


def _has_items(mm_inputs: Any) -> bool:
    if mm_inputs is None:
        return False
    rows = mm_inputs if isinstance(mm_inputs, Sequence) else [mm_inputs]
    return any(len(_items(v)) for row in rows for v in row.values())


def _items(value: Any) -> list[Any]:
    """A modality's items: a list/tuple of tensors, or one tensor meaning one item."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _looks_multimodal(name: str, modalities: Sequence[str]) -> bool:
    if name in LANGUAGE_MODEL_KEYWORDS:
        return False
    return (name == "mm" or name in modalities or name.startswith(LOOKS_MULTIMODAL_PREFIXES)
            or name.endswith(LOOKS_MULTIMODAL_SUFFIXES))


def _from_multimodal_data(data: Any) -> Any:
    """``multimodal_data={"multimodal_embeddings": {...}}`` (or a list of those, one per row)."""
    if data is None:
        return None
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        return [_from_multimodal_data(row) for row in data]
    if not isinstance(data, Mapping) or set(data) != {SEED_KEYWORD}:
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{SEED_DATA_KEYWORD} must be {{{SEED_KEYWORD!r}: {{modality: items}}}}"
                         f", got {keys}; accepted: {ACCEPTED_INPUTS}")
    return data[SEED_KEYWORD]


def take_multimodal_inputs(mm_inputs: Any, kwargs: dict[str, Any],
                           modalities: Sequence[str]) -> Any:
    """The call's multimodal inputs under whichever accepted keyword carried them (the aliases
    are popped from ``kwargs``). A keyword that looks multimodal but is not accepted, or inputs
    given under two spellings, is an error: silently ignored, it would give text-only logits."""
    given = {INPUT_KEYWORD: mm_inputs, SEED_KEYWORD: kwargs.pop(SEED_KEYWORD, None),
             SEED_DATA_KEYWORD: _from_multimodal_data(kwargs.pop(SEED_DATA_KEYWORD, None))}
    unknown = sorted(k for k in kwargs if _looks_multimodal(k, modalities))
    if unknown:
        raise ValueError(f"unknown multimodal keyword {unknown[0]!r}; accepted: {ACCEPTED_INPUTS}")
    present = [k for k, v in given.items() if v is not None]
    if len(present) > 1:
        raise ValueError(f"give the multimodal inputs once, got {' and '.join(present)}; "
                         f"accepted: {ACCEPTED_INPUTS}")
    return given[present[0]] if present else None


def placeholder_mismatch(count: int, n_rows: int) -> ValueError:
    if n_rows == 0:
        return ValueError(f"the prompt has {count} placeholder tokens for 0 projected rows: pass "
                          f"the items ({ACCEPTED_INPUTS}), one placeholder per row, or remove "
                          "the placeholders")
    return ValueError(f"the prompt has {count} placeholder tokens for {n_rows} projected rows: "
                      "use one placeholder per row, or none to prepend")


def _is_prompt_step(past_key_values: Any) -> bool:
    """Whether a forward call starts from an empty cache (a prompt, not generated tokens)."""
    if past_key_values is None:
        return True
    length = getattr(past_key_values, "get_seq_length", None)
    return callable(length) and length() == 0


class MultimodalMixin:
    """Adds ``multimodal_projector`` to a transformers causal LM; ``forward`` and ``generate``
    take ``mm_inputs`` (a dict for one prompt, or a list of dicts, one per row of the batch).
    Mixed into the dense and the MoE Qwen3 classes below, ahead of them in the MRO."""

    # the projector is not in the language-model shards: it is loaded from its own file below
    _keys_to_ignore_on_load_missing = [r"^multimodal_projector\."]

    def __init__(self, config):
        super().__init__(config)
        spec = projector_spec(config)
        self.placeholder_token = spec.get("placeholder_token")
        self.placeholder_token_id = spec.get("placeholder_token_id")
        self.multimodal_projector = nn.ModuleDict(
            {m["name"]: ModalityProjector(m) for m in spec["modalities"]})
        self.post_init()

    # --- loading and saving --------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load the language model as transformers does, then the projector file."""
        want_info = kwargs.pop("output_loading_info", False)
        hub = {k: kwargs[k] for k in ("cache_dir", "force_download", "proxies", "token",
                                      "revision", "local_files_only", "subfolder") if k in kwargs}
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                              output_loading_info=True, **kwargs)
        model.load_projector(pretrained_model_name_or_path, **hub)
        return (model, info) if want_info else model

    def load_projector(self, name_or_path: str | os.PathLike, **hub_kwargs) -> None:
        """Copy the projector weights (``multimodal_projector/model.safetensors``) into the
        projector, from the folder or the Hub repo (``hf_hub_download`` with its subfolder);
        every tensor must be there with the right shape (a silently random projector would be
        worse than an error)."""
        from safetensors.torch import load_file
        from transformers.utils import cached_file

        spec = projector_spec(self.config)
        folder, name = weights_location(spec)
        filename = f"{folder}/{name}" if folder else name
        prefix = spec.get("tensor_prefix", "multimodal_projector.")
        subfolder = "/".join(p for p in (hub_kwargs.pop("subfolder", ""), folder) if p)
        path = cached_file(name_or_path, name, subfolder=subfolder,
                           _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is None:
            raise OSError(f"{name_or_path}: missing {filename} (the projector weights)")
        state = load_file(path)
        own = self.multimodal_projector.state_dict()
        wanted = {prefix + k for k in own}
        missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
        if missing or extra:
            raise ValueError(f"{filename}: missing tensors {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            for key, param in own.items():
                source = state[prefix + key]
                if source.shape != param.shape:
                    raise ValueError(f"{filename}: {prefix + key} has shape {list(source.shape)}, "
                                     f"the config implies {list(param.shape)}")
                param.copy_(source)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as the bundle is laid out: the language model in the usual shards, the
        projector in its own file (so the folder still loads as a plain Qwen3 model)."""
        from safetensors.torch import save_file

        spec = projector_spec(self.config)
        state = kwargs.pop("state_dict", None) or self.state_dict()
        lm_state = {k: v for k, v in state.items() if not k.startswith("multimodal_projector.")}
        super().save_pretrained(save_directory, *args, state_dict=lm_state, **kwargs)
        prefix = spec.get("tensor_prefix", "multimodal_projector.")
        projector = {prefix + k[len("multimodal_projector."):]: v.detach().contiguous().cpu()
                     for k, v in state.items() if k.startswith("multimodal_projector.")}
        folder, name = weights_location(spec)
        os.makedirs(os.path.join(save_directory, folder), exist_ok=True)
        save_file(projector, os.path.join(save_directory, folder, name),
                  metadata={"format": "pt"})

    # --- projection and fusion -----------------------------------------------------------

    def project(self, modality: str, item: Any) -> torch.Tensor:
        """One item's projected rows ``[n, hidden]``."""
        if modality not in self.multimodal_projector:
            raise ValueError(f"unknown modality {modality!r}; this model has "
                             f"{list(self.multimodal_projector)}")
        projector = self.multimodal_projector[modality]
        weight = next(projector.parameters())
        x = as_rows(item, projector.input_dim, modality)
        return projector(x.to(device=weight.device, dtype=weight.dtype))

    def rows_per_item(self, mm_inputs: Mapping[str, Any] | None) -> list[int]:
        """Projected row counts of the items, in fusion order."""
        counts = []
        for name, projector in self.multimodal_projector.items():
            for item in _items((mm_inputs or {}).get(name)):
                counts.append(as_rows(item, projector.input_dim, name).shape[0])
        return counts

    def _project_prompt(self, mm_inputs: Mapping[str, Any]) -> torch.Tensor | None:
        unknown = sorted(set(mm_inputs) - set(self.multimodal_projector))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; this model has "
                             f"{list(self.multimodal_projector)}")
        rows = [self.project(name, item) for name in self.multimodal_projector
                for item in _items(mm_inputs.get(name))]
        return torch.cat(rows) if rows else None

    def _fuse_row(self, ids: torch.Tensor, mm_inputs: Mapping[str, Any]
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(embeddings [T', H], token ids [T'], rows prepended) for one prompt."""
        embed = self.get_input_embeddings()
        projected = self._project_prompt(mm_inputs)
        text = embed(ids)
        ph = self.placeholder_token_id
        is_ph = ids == ph if ph is not None else torch.zeros_like(ids, dtype=torch.bool)
        count = int(is_ph.sum())
        if projected is None:
            if count:
                raise placeholder_mismatch(count, 0)
            return text, ids, 0
        projected = projected.to(dtype=text.dtype, device=text.device)
        n_rows = projected.shape[0]
        if count == 0:
            nominal = torch.full((n_rows,), ph if ph is not None else 0, dtype=ids.dtype,
                                 device=ids.device)
            return torch.cat([projected, text]), torch.cat([nominal, ids]), n_rows
        if count != n_rows:
            raise placeholder_mismatch(count, n_rows)
        return text.masked_scatter(is_ph.unsqueeze(-1), projected), ids, 0

    def fuse(self, input_ids: torch.Tensor, mm_inputs: Any, attention_mask: torch.Tensor | None = None,
             labels: torch.Tensor | None = None):
        """(inputs_embeds [B, T', H], fused ids [B, T'], attention mask, labels), the last two
        extended over prepended rows (mask 1, label -100) when given."""
        if input_ids is None:
            raise ValueError("mm_inputs need input_ids (the text prompt, with or without "
                             "placeholders)")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        batch = input_ids.shape[0]
        if isinstance(mm_inputs, Mapping):
            if batch != 1:
                raise ValueError(f"a batch of {batch} prompts needs a list of {batch} mm_inputs "
                                 "dicts, one per prompt")
            mm_inputs = [mm_inputs]
        if len(mm_inputs) != batch:
            raise ValueError(f"{len(mm_inputs)} mm_inputs dicts for {batch} prompts")
        fused = [self._fuse_row(input_ids[b], mm_inputs[b] or {}) for b in range(batch)]
        lengths = {f[1].shape[0] for f in fused}
        if len(lengths) != 1:
            raise ValueError(f"the prompts of the batch fuse to different lengths {sorted(lengths)}: "
                             "use placeholders (one per row) and pad the prompts to one length")
        embeds = torch.stack([f[0] for f in fused])
        ids = torch.stack([f[1] for f in fused])
        pre = [f[2] for f in fused]
        if attention_mask is not None:
            attention_mask = torch.stack([
                torch.cat([attention_mask.new_ones(n), attention_mask[b]]) for b, n in enumerate(pre)])
        if labels is not None:
            labels = torch.stack([
                torch.cat([labels.new_full((n,), IGNORE_INDEX), labels[b]]) for b, n in enumerate(pre)])
        return embeds, ids, attention_mask, labels

    def embed_multimodal(self, input_ids: torch.Tensor, mm_inputs: Any) -> torch.Tensor:
        """The fused prompt embeddings ``[B, T', H]`` (e.g. for vLLM ``prompt_embeds``)."""
        return self.fuse(input_ids, mm_inputs)[0]

    def tokenize_prompt(self, tokenizer, text: str, mm_inputs: Mapping[str, Any] | None = None,
                        **tokenizer_kwargs) -> torch.Tensor:
        """``input_ids [1, T]`` for ``text`` (apply a chat template first if you want one): each
        placeholder token may stand for a whole item and is expanded to its row count."""
        if self.placeholder_token:
            text = expand_placeholders(text, self.placeholder_token, self.rows_per_item(mm_inputs))
        tokenizer_kwargs.setdefault("add_special_tokens", False)
        return tokenizer(text, return_tensors="pt", **tokenizer_kwargs)["input_ids"]

    # --- the language-model entry points ------------------------------------------------

    def check_no_placeholders(self, input_ids: torch.Tensor | None) -> None:
        """A prompt without multimodal inputs must not hold placeholders: the model would read
        the placeholder token's own embedding where the rows were meant to be."""
        ph = self.placeholder_token_id
        if input_ids is None or ph is None:
            return
        count = int((torch.as_tensor(input_ids) == ph).sum(-1).max())
        if count:
            raise placeholder_mismatch(count, 0)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, *, mm_inputs=None, **kwargs):
        """``Qwen3ForCausalLM.forward`` plus ``mm_inputs`` (or its aliases, see the module
        docstring); logits cover the fused sequence (prepended rows included)."""
        mm_inputs = take_multimodal_inputs(mm_inputs, kwargs, list(self.multimodal_projector))
        if _has_items(mm_inputs):
            if inputs_embeds is not None:
                raise ValueError("pass input_ids with mm_inputs, not inputs_embeds")
            inputs_embeds, _, attention_mask, labels = self.fuse(input_ids, mm_inputs,
                                                                 attention_mask, labels)
            if position_ids is not None and position_ids.shape[-1] != inputs_embeds.shape[1]:
                raise ValueError("position_ids do not cover the prepended multimodal rows; "
                                 "leave them out or use placeholders")
            input_ids = None
        elif not self._generating and _is_prompt_step(past_key_values):
            self.check_no_placeholders(input_ids)  # generated tokens may be the placeholder
        return super().forward(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, past_key_values=past_key_values,
                               inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep, **kwargs)

    _generating = False  # inside our generate(): the prompt was checked (and fused) already

    def generate(self, inputs=None, *args, mm_inputs=None, **kwargs):
        """``generate`` plus ``mm_inputs`` (or its aliases). The returned sequences start with
        the fused prompt ids (prepended rows appear as placeholder ids), then the new tokens."""
        mm_inputs = take_multimodal_inputs(mm_inputs, kwargs, list(self.multimodal_projector))
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if not _has_items(mm_inputs):
            self.check_no_placeholders(input_ids)
            return self._generate(input_ids, *args, **kwargs)
        config = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("use_cache", getattr(config, "use_cache", True)) is False:
            raise ValueError("generate with multimodal inputs needs use_cache=True: the "
                             "projected rows are only in the first step's inputs_embeds")
        with torch.no_grad():
            embeds, ids, mask, _ = self.fuse(input_ids, mm_inputs, kwargs.pop("attention_mask", None))
        if mask is None:
            mask = torch.ones_like(ids)
        return self._generate(ids, *args, inputs_embeds=embeds, attention_mask=mask, **kwargs)

    def _generate(self, *args, **kwargs):
        self._generating = True
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._generating = False


class MultimodalQwen3ForCausalLM(MultimodalMixin, Qwen3ForCausalLM):
    """``Qwen3ForCausalLM`` with the projectors (``model_type: qwen3``)."""

    config_class = Qwen3Config


class MultimodalQwen3MoeForCausalLM(MultimodalMixin, Qwen3MoeForCausalLM):
    """``Qwen3MoeForCausalLM`` with the projectors (``model_type: qwen3_moe``)."""

    config_class = Qwen3MoeConfig
