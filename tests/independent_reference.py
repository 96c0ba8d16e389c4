"""An independent reference of the seed's model, written from the checkpoint's semantics.

It reads the checkpoint files directly (safetensors or a weights-only pickle), builds the
projectors as the seed's ``nn.Sequential`` (Linear, [LayerNorm], act, Dropout, Linear,
[LayerNorm]) -- or, for the other ``projector_type`` s of ``docs/dialects.md``, as plain torch
modules written from that document (SwiGLU, low-rank, a tanh gate on the output) -- and runs
transformers' Qwen3ForCausalLM in fp32. It shares no code with mmconvert's readers or its
verify reference, so a bug there cannot hide here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class SwiGLUProjector(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``, then ``norm`` when asked."""

    def __init__(self, fan_in: int, hidden: int, out: int, act: type, norm: bool, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(fan_in, hidden, bias=bias)
        self.up_proj = nn.Linear(fan_in, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, out, bias=bias)
        self.act = act()
        self.norm = nn.LayerNorm(out) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


class LowRankProjector(nn.Module):
    """``up(act(norm(down(x))))`` with the norm and the activation optional."""

    def __init__(self, fan_in: int, rank: int, out: int, act: type | None, norm: bool, bias: bool):
        super().__init__()
        self.down = nn.Linear(fan_in, rank, bias=bias)
        self.norm = nn.LayerNorm(rank) if norm else nn.Identity()
        self.act = act() if act else nn.Identity()
        self.up = nn.Linear(rank, out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.norm(self.down(x))))


class TanhGated(nn.Module):
    """``tanh(gate) * inner(x)`` (``1 - tanh`` when complementary), gate scalar or per channel."""

    def __init__(self, inner: nn.Module, width: int, complementary: bool):
        super().__init__()
        self.inner = inner
        self.gate = nn.Parameter(torch.zeros(width))
        self.complementary = complementary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.tanh(self.gate)
        return self.inner(x) * (1 - g if self.complementary else g)


def _projector(m: dict, cfg: dict, hidden: int, weights: dict[str, torch.Tensor]) -> nn.Module:
    """One modality's projector from its config entry and its tensors (prefix removed)."""
    kind = m.get("projector_type", "mlp")
    act = ACTS[m.get("activation") or cfg.get("projector_hidden_act", "gelu")]
    norm = m.get("layer_norm", cfg.get("use_layer_norm", True))
    bias = m.get("bias", True)
    weights = dict(weights)
    if kind == "mlp":
        mid = m.get("hidden_dim") or hidden
        if norm:
            module = nn.Sequential(nn.Linear(m["input_dim"], mid), nn.LayerNorm(mid), act(),
                                   nn.Dropout(cfg.get("projector_dropout", 0.0)),
                                   nn.Linear(mid, hidden), nn.LayerNorm(hidden))
        else:
            module = nn.Sequential(nn.Linear(m["input_dim"], mid), act(),
                                   nn.Dropout(cfg.get("projector_dropout", 0.0)),
                                   nn.Linear(mid, hidden))
    elif kind == "swiglu":
        module = SwiGLUProjector(m["input_dim"], m.get("hidden_dim") or hidden, hidden, act,
                                 norm, bias)
        for part in ("weight", "bias"):
            fused = weights.pop(f"gate_up_proj.{part}", None)
            if fused is not None:
                first, second = fused.chunk(2)
                gate_first = m.get("gate_up_gate_first", True)
                weights[f"gate_proj.{part}"] = first if gate_first else second
                weights[f"up_proj.{part}"] = second if gate_first else first
    elif kind == "low_rank":
        low_act = ACTS[m["activation"]] if m.get("activation") else None
        module = LowRankProjector(m["input_dim"], m["rank"], hidden, low_act,
                                  m.get("layer_norm", False), bias)
    else:
        raise ValueError(f"projector_type {kind}")
    if m.get("gate"):
        width = hidden if m["gate"].get("per_channel") else 1
        module = TanhGated(module, width, m["gate"].get("complementary", False))
        weights = {("gate" if k == "gate" else f"inner.{k}"): v for k, v in weights.items()}
    module.load_state_dict(weights)
    return module


def _state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (ckpt / index).is_file():
            files = sorted(set(json.loads((ckpt / index).read_text())["weight_map"].values()))
            break
    else:
        files = ["model.safetensors"] if (ckpt / "model.safetensors").is_file() else ["pytorch_model.bin"]
    for f in files:
        if f.endswith(".safetensors"):
            state.update(load_file(str(ckpt / f)))
        else:
            state.update(torch.load(ckpt / f, weights_only=True))
    return state


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert weights (as saved) -> transformers 5's in-memory fused experts."""
    import re

    out, experts = {}, {}
    for k, v in state.items():
        m = re.match(r"(.*\.mlp\.experts\.)(\d+)\.(gate|up|down)_proj\.weight$", k)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = v
        else:
            out[k] = v
    for prefix, parts in experts.items():
        n = len(parts["gate"])
        out[prefix + "gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate"][e], parts["up"][e]]) for e in range(n)])
        out[prefix + "down_proj"] = torch.stack([parts["down"][e] for e in range(n)])
    return out


class SeedModel(nn.Module):
    def __init__(self, ckpt: Path, base: Path | None = None):
        super().__init__()
        from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

        cfg = json.loads((ckpt / "config.json").read_text())
        text = cfg.get("text_config") or json.loads(((base or Path(cfg["base_model_name"])) /
                                                     "config.json").read_text())
        moe = text.get("model_type") == "qwen3_moe"
        text = {k: v for k, v in text.items() if k not in ("architectures", "model_type")}
        qcfg = (Qwen3MoeConfig if moe else Qwen3Config)(**text)
        qcfg._attn_implementation = "eager"
        state = {k: v.float() for k, v in _state_dict(ckpt).items()}
        self.lm = (Qwen3MoeForCausalLM if moe else Qwen3ForCausalLM)(qcfg).float()
        lm_state = {k[len("language_model."):]: v for k, v in state.items()
                    if k.startswith("language_model.")}
        if moe:
            lm_state = fuse_experts(lm_state)
        if "lm_head.weight" not in lm_state:
            lm_state["lm_head.weight"] = lm_state["model.embed_tokens.weight"]
        self.lm.load_state_dict(lm_state, strict=True)
        hidden = qcfg.hidden_size
        self.projectors = nn.ModuleDict()
        for name, m in cfg["modality_configs"].items():
            prefix = f"multimodal_projector.projectors.{name}."
            self.projectors[name] = _projector(
                m, cfg, hidden, {k[len(prefix):]: v for k, v in state.items()
                                 if k.startswith(prefix)})
        tok = json.loads((ckpt / "tokenizer.json").read_text()) if (ckpt / "tokenizer.json").is_file() \
            else json.loads(((base or Path(cfg["base_model_name"])) / "tokenizer.json").read_text())
        token = cfg.get("multimodal_token", "<|multimodal|>")
        self.placeholder_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == token)
        self.eval()

    @torch.no_grad()
    def logits(self, input_ids: list[int], mm: dict[str, list[torch.Tensor]] | None = None
               ) -> torch.Tensor:
        rows = []
        for name in self.projectors:
            for item in (mm or {}).get(name, []):
                x = item.float().reshape(-1, item.shape[-1])
                rows.append(self.projectors[name](x))
        ids = list(input_ids)
        n_ph = sum(1 for t in ids if t == self.placeholder_id)
        if rows and n_ph == 0:
            ids = [self.placeholder_id] * sum(r.shape[0] for r in rows) + ids
        emb = self.lm.model.embed_tokens(torch.tensor([ids]))
        if rows:
            proj = torch.cat(rows)
            pos = [i for i, t in enumerate(ids) if t == self.placeholder_id]
            assert len(pos) == proj.shape[0], "one placeholder per projected row"
            emb[0, pos] = proj
        return self.lm(inputs_embeds=emb, use_cache=False).logits[0]
