"""The canonical model: what every reader produces and every writer and the verifier consume.

Canonical tensor names
----------------------
Language model: the Hugging Face Qwen3 names, e.g. ``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, ``model.layers.{i}.mlp.gate_proj.weight``,
``model.norm.weight`` and ``lm_head.weight`` (absent when the embeddings are tied).
Qwen3-MoE layers have the router ``model.layers.{i}.mlp.gate.weight [E, H]`` and experts
stacked as transformers 5 holds them in memory, but with gate and up apart:
``model.layers.{i}.mlp.experts.{gate_proj,up_proj} [E, I, H]`` and
``model.layers.{i}.mlp.experts.down_proj [E, H, I]``.

Projectors: ``mm.{modality}.{layer}.{param}`` where ``layer`` is the ``name`` of a
:class:`ProjectorLayer` of that modality's :class:`ProjectorSpec` (``fc1``, ``norm1``, ``fc2``,
``norm2`` for the seed's MLP) and ``param`` one of :meth:`ProjectorLayer.params`
(``weight``/``bias``; ``gate.weight``... for a gated layer; ``gate`` for a tanh gate). A
projector is an ordered list of layers so that the reference forward pass, the HF remote code
and the projector GGUF all interpret the same data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mmconvert.convert.tensors import TensorTable

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "tanh", "silu")
DEFAULT_MULTIMODAL_TOKEN = "<|multimodal|>"


@dataclass
class TextSpec:
    """Qwen3 text hyper-parameters, read from the Qwen3 ``config.json``."""

    vocab_size: int  # embedding rows actually present in the weights
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    # "neox" (rotate-half, what HF Qwen3 and llama.cpp use) or "interleaved" (pairs)
    rope_layout: str = "neox"
    config_vocab_size: int | None = None  # vocab_size as the config says it
    # Qwen3-MoE (num_experts == 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    raw_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_is_moe(self, layer: int) -> bool:
        """Which layers route through experts (transformers' Qwen3-MoE rule)."""
        return (self.is_moe and layer not in self.mlp_only_layers
                and (layer + 1) % max(1, self.decoder_sparse_step) == 0)


@dataclass(frozen=True)
class LayerKind:
    """The facts of one projector layer kind, the one place that lists them. Every consumer
    reads them from :data:`LAYER_KINDS`; only the math is written once per runtime (the torch
    reference in ``verify/reference.py``, the HF remote code in
    ``formats/templates/modeling_mmqwen3.py``, the projector GGUF runtime, which runs the kinds
    of :data:`mmconvert.formats.gguf_constants.PROJECTOR_LAYER_KINDS`)."""

    name: str
    computes: str  # the math, with its tensors: x the input
    params: tuple[str, ...] = ()  # tensor names relative to mm.{modality}.{layer}., in order
    bias_params: tuple[str, ...] = ()  # those of ``params`` present only when ``bias``
    resizes: bool = False  # out_dim may differ from in_dim (weights are [out, in])
    uses_activation: bool = False  # ProjectorLayer.activation, else the spec's
    uses_eps: bool = False  # ProjectorLayer.eps, else the spec's layer_norm_eps
    per_channel: bool = False  # one tensor of one value, or one per channel (``per_channel``)
    hf_version: int = 1  # the multimodal_config format version that added it (0: not stored)
    hf_fields: tuple[str, ...] = ()  # its multimodal_config entry after kind and name, in order

    @property
    def has_bias(self) -> bool:
        return bool(self.bias_params)


LAYER_KINDS: dict[str, LayerKind] = {kind.name: kind for kind in (
    LayerKind("linear", "x W^T + b", ("weight", "bias"), ("bias",), resizes=True,
              hf_fields=("in_dim", "out_dim", "bias")),
    LayerKind("layer_norm", "LayerNorm over the last axis (weight, bias)", ("weight", "bias"),
              ("bias",), uses_eps=True, hf_fields=("dim", "eps", "bias")),
    LayerKind("act", "activation(x)", uses_activation=True, hf_fields=("activation",)),
    LayerKind("glu", "act(x G^T + bg) * (x U^T + bu)",
              ("gate.weight", "gate.bias", "up.weight", "up.bias"), ("gate.bias", "up.bias"),
              resizes=True, uses_activation=True, hf_version=2,
              hf_fields=("in_dim", "out_dim", "activation", "bias")),
    # the raw learned g; the projector GGUF stores it applied, as a scale
    # (convert/projector_export.py)
    LayerKind("tanh_gate", "x * tanh(g), or x * (1 - tanh(g)) (complementary)", ("gate",),
              per_channel=True, hf_version=2, hf_fields=("dim", "per_channel", "complementary")),
    LayerKind("scale", "x * s (a tanh gate applied)", ("scale",), per_channel=True,
              hf_version=0),
)}


@dataclass
class ProjectorLayer:
    """One step of a projector; ``kind`` is one of :data:`LAYER_KINDS`."""

    kind: str
    name: str
    in_dim: int
    out_dim: int
    activation: str | None = None  # kinds that use an activation (act, glu)
    eps: float | None = None  # kinds that use an epsilon (layer_norm)
    bias: bool = True
    per_channel: bool = False  # tanh_gate / scale: one value per channel, else one scalar
    complementary: bool = False  # tanh_gate: 1 - tanh(g); scale: the gate it came from
    gate: str = ""  # scale: "tanh" when it is a learned tanh gate already applied
    folded_from: tuple[str, ...] = ()  # linear: the adjacent linear layers it replaces

    def params(self) -> list[str]:
        """Tensor names of this layer, relative to ``mm.{modality}.{name}.``."""
        kind = LAYER_KINDS.get(self.kind)
        if kind is None:
            return []
        return [p for p in kind.params if self.bias or p not in kind.bias_params]

    def param_shape(self, param: str) -> tuple[int, ...]:
        """The shape of one of :meth:`params` (numpy order)."""
        kind = LAYER_KINDS[self.kind]
        if param.endswith("weight") and kind.resizes:
            return (self.out_dim, self.in_dim)
        if kind.per_channel:
            return (self.out_dim if self.per_channel else 1,)
        return (self.out_dim,)


@dataclass
class ProjectorSpec:
    """The MLP that maps one modality's precomputed embeddings into the LM's hidden size."""

    modality: str
    input_dim: int
    hidden_dim: int
    output_dim: int
    activation: str
    layer_norm: bool
    layers: list[ProjectorLayer]
    layer_norm_eps: float = 1e-5
    dropout: float = 0.0  # identity at inference; kept for the record
    projector_type: str = "mlp"  # mlp | swiglu | low_rank (how the checkpoint described it)

    def tensor_names(self) -> list[str]:
        return [f"mm.{self.modality}.{layer.name}.{param}"
                for layer in self.layers for param in layer.params()]


@dataclass
class SpecialIds:
    """Resolved special token ids: ordered, de-duplicated; the first is the primary."""

    bos: list[int] = field(default_factory=list)
    eos: list[int] = field(default_factory=list)
    pad: list[int] = field(default_factory=list)
    # where each value came from: kind -> [(file, value as written)]
    provenance: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)

    @property
    def bos_id(self) -> int | None:
        return self.bos[0] if self.bos else None

    @property
    def eos_id(self) -> int | None:
        return self.eos[0] if self.eos else None

    @property
    def pad_id(self) -> int | None:
        return self.pad[0] if self.pad else None


@dataclass
class TokenizerSpec:
    """The tokenizer files of the checkpoint (or its base), with the facts writers need."""

    directory: Path
    files: list[str]  # file names inside ``directory`` to carry into bundles
    size: int  # len(tokenizer): base vocab + added tokens
    added_tokens: list[dict[str, Any]]  # {id, content, special}
    chat_template: str | None
    tokenizer_config: dict[str, Any] = field(default_factory=dict, repr=False)
    # tokenizer.json as parsed by the reader (depth-checked): the GGUF vocabulary is built
    # from it instead of parsing the 5-10 MB file a second time
    document: dict[str, Any] | None = field(default=None, repr=False, compare=False)


@dataclass
class CanonicalModel:
    """A multimodal Qwen3 checkpoint, as one dialect-free description plus a lazy tensor table."""

    dialect: str
    source: Path
    text: TextSpec
    projectors: dict[str, ProjectorSpec]
    tokenizer: TokenizerSpec
    special: SpecialIds
    tensors: TensorTable
    multimodal_token: str = DEFAULT_MULTIMODAL_TOKEN
    multimodal_token_id: int | None = None
    fusion_strategy: str = "early"
    max_multimodal_length: int | None = None
    base_model_name: str | None = None
    generation_config: dict[str, Any] = field(default_factory=dict)
    source_files: list[Path] = field(default_factory=list)
    source_files_from: dict[str, str] = field(default_factory=dict)  # role -> file
    mm_config: dict[str, Any] = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)

    @property
    def tied(self) -> bool:
        return "lm_head.weight" not in self.tensors

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (what ``mmconvert inspect --json`` prints)."""
        text = asdict(self.text)
        text.pop("raw_config")
        dtypes: dict[str, int] = {}
        for ref in self.tensors.refs():
            dtypes[ref.dtype] = dtypes.get(ref.dtype, 0) + 1
        lm_params = sum(r.numel for r in self.tensors.refs() if not r.name.startswith("mm."))
        transforms: dict[str, int] = {}
        for ref in self.tensors.refs():
            for step in ref.derivation:
                transforms[step] = transforms.get(step, 0) + 1
        return {
            "dialect": self.dialect,
            "source": str(self.source),
            "base_model_name": self.base_model_name,
            "text": text,
            "modalities": {
                name: {
                    "input_dim": p.input_dim,
                    "hidden_dim": p.hidden_dim,
                    "output_dim": p.output_dim,
                    "activation": p.activation,
                    "layer_norm": p.layer_norm,
                    "projector_type": p.projector_type,
                    "layers": [asdict(layer) for layer in p.layers],
                    "parameters": sum(self.tensors[n].numel for n in p.tensor_names()),
                }
                for name, p in self.projectors.items()
            },
            "multimodal_token": self.multimodal_token,
            "multimodal_token_id": self.multimodal_token_id,
            "fusion_strategy": self.fusion_strategy,
            "vocab": {"embedding_rows": self.text.vocab_size, "tokenizer_size": self.tokenizer.size,
                      "config_vocab_size": self.text.config_vocab_size},
            "special_ids": {
                "bos": self.special.bos, "eos": self.special.eos, "pad": self.special.pad,
                "provenance": {k: [list(x) for x in v] for k, v in self.special.provenance.items()},
            },
            "tied_embeddings": self.tied,
            "dtypes": dtypes,
            "parameters": {"language_model": lm_params,
                           "projectors": self.tensors.total_params() - lm_params},
            "tensors": len(self.tensors),
            "read_transforms": transforms,
            "files": {role: path for role, path in self.source_files_from.items()},
            "warnings": list(self.warnings),
        }
