"""The reference forward pass of a canonical model, in torch.

transformers' own ``Qwen3ForCausalLM`` runs the language model; the projectors are evaluated
from their :class:`ProjectorSpec` (the same data every writer exports). Weights come from the
canonical tensor table, so the reference sees exactly the source checkpoint's values.
"""

from __future__ import annotations

from typing import Any

import torch

from mmconvert.convert.model import CanonicalModel, ProjectorSpec, TextSpec
from mmconvert.formats.dtypes import to_torch
from mmconvert.verify.fusion import as_rows, fusion_positions


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":  # nn.GELU(): the exact erf form
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "tanh":
        return torch.tanh(x)
    if name == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"unknown activation {name}")


def project(spec: ProjectorSpec, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run one modality's projector; ``weights`` maps canonical names to tensors."""
    for layer in spec.layers:
        prefix = f"mm.{spec.modality}.{layer.name}."
        if layer.kind == "linear":
            x = torch.nn.functional.linear(x, weights[prefix + "weight"], weights.get(prefix + "bias"))
        elif layer.kind == "layer_norm":
            x = torch.nn.functional.layer_norm(x, (layer.out_dim,), weights[prefix + "weight"],
                                               weights.get(prefix + "bias"), layer.eps or 1e-5)
        elif layer.kind == "act":
            x = activation(layer.activation or spec.activation, x)
        else:
            raise ValueError(f"unknown projector layer kind {layer.kind}")
    return x


def qwen3_config(text: TextSpec, dtype: torch.dtype = torch.float32):
    from transformers import Qwen3Config

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": text.rope_theta}
    if text.rope_scaling:
        rope.update(text.rope_scaling)
        rope["rope_theta"] = text.rope_theta
    return Qwen3Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim, rms_norm_eps=text.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=text.tie_word_embeddings, attention_bias=text.attention_bias,
        hidden_act=text.hidden_act, dtype=dtype,
    )


class ReferenceModel:
    """The source checkpoint's exact semantics in torch (fp32 by default)."""

    def __init__(self, model: CanonicalModel, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import Qwen3ForCausalLM

        self.model = model
        self.device = device
        self.dtype = dtype
        config = qwen3_config(model.text, dtype)
        config._attn_implementation = "eager"
        with torch.device("meta"):
            lm = Qwen3ForCausalLM(config)
        state = {}
        for ref in model.tensors.refs():
            if ref.name.startswith("mm."):
                continue
            state[ref.name] = to_torch(ref.read(), ref.dtype).to(device=device, dtype=dtype)
        if model.tied:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        lm.load_state_dict(state, strict=True, assign=True)
        if model.tied:
            lm.tie_weights()
        # non-persistent buffers (rotary inv_freq) were created on meta: rebuild them
        lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config).to(device)
        self.lm = lm.eval()
        self.projector_weights = {
            ref.name: to_torch(ref.read(), ref.dtype).to(device=device, dtype=dtype)
            for ref in model.tensors.refs() if ref.name.startswith("mm.")
        }

    @torch.no_grad()
    def project(self, modality: str, item: torch.Tensor) -> torch.Tensor:
        spec = self.model.projectors[modality]
        x = as_rows(item).to(device=self.device, dtype=self.dtype)
        return project(spec, self.projector_weights, x)

    @torch.no_grad()
    def fused_embeddings(self, input_ids: list[int],
                         mm_inputs: dict[str, list[torch.Tensor]] | None = None
                         ) -> tuple[torch.Tensor, list[int], list[int | None]]:
        """(inputs_embeds [1, T, H], fused token ids, per-position projected row index)."""
        rows = []
        for modality in self.model.projectors:
            for item in (mm_inputs or {}).get(modality, []):
                rows.append(self.project(modality, item))
        unknown = set(mm_inputs or {}) - set(self.model.projectors)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; the model has "
                             f"{list(self.model.projectors)}")
        projected = torch.cat(rows) if rows else None
        ids, where = fusion_positions(input_ids, self.model.multimodal_token_id,
                                      0 if projected is None else projected.shape[0])
        embeds = self.lm.model.embed_tokens(torch.tensor([ids], device=self.device))
        if projected is not None:
            index = [i for i, r in enumerate(where) if r is not None]
            embeds[0, index] = projected[[where[i] for i in index]].to(embeds.dtype)
        return embeds, ids, where

    @torch.no_grad()
    def logits(self, input_ids: list[int], mm_inputs: dict[str, list[torch.Tensor]] | None = None
               ) -> torch.Tensor:
        """Logits ``[T, vocab]`` (fp32, CPU) for every position of the fused sequence."""
        embeds, _, _ = self.fused_embeddings(input_ids, mm_inputs)
        out = self.lm(inputs_embeds=embeds, use_cache=False)
        return out.logits[0].float().cpu()

