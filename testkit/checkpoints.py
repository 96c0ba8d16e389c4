"""Generated checkpoints in every variant the tests (and the benchmarks) need.

``write_checkpoint(out, ExampleOptions(...))`` builds on the example of ``mmconvert example``
(``convert/example.py``: tokenizer, text config, dense layers, the seed's projector) and adds
the test matrix: layer norm on/off, each activation, hidden_dim given or defaulted, the text
config embedded or in a separate base folder, single or sharded safetensors or a pickle, vocab
resized or padded, tied or untied, a ``training_state.pt`` beside it, Qwen3-MoE (per expert or
fused as transformers 5 holds them) and the projector kinds of ``docs/dialects.md`` (SwiGLU
fused or split, low-rank, tanh-gated). ``testkit/variants.py`` names the variants the tests
iterate over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from mmconvert.convert.example import (
    ExampleShape,
    generation_config,
    multimodal_config,
    random_state_dict,
    seed_projector,
    text_config,
    write_json,
    write_tokenizer,
)


@dataclass
class ExampleOptions(ExampleShape):
    """What the generated checkpoint looks like (defaults: the README's example)."""

    embed_text_config: bool = True  # else the Qwen3 files go to ``base_dir``
    base_dir: Path | None = None
    weights_format: str = "safetensors"  # safetensors | pickle
    shards: int = 1
    resize_vocab: bool = True  # embedding rows == len(tokenizer); else padded to a multiple of 64
    training_state: bool = False
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


def moe_text_config(opts: ExampleOptions, vocab_rows: int, ids: dict[str, int]) -> dict:
    config = text_config(opts, vocab_rows, ids)
    if opts.num_experts:
        config.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                      num_experts=opts.num_experts, num_experts_per_tok=opts.num_experts_per_tok,
                      moe_intermediate_size=opts.moe_intermediate_size, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001)
    return config


def variant_state_dict(opts: ExampleOptions, vocab_rows: int) -> dict:
    """The example's weights with this variant's MLP layers and projector kinds."""
    from mmconvert.convert.example import dense_mlp

    return random_state_dict(
        opts, vocab_rows, modality=modality_config,
        mlp=moe_layer if opts.num_experts else dense_mlp,
        projector=lambda p, m, o, gen, matrix: (other_projector if m.get("projector_type", "mlp")
                                                != "mlp" else seed_projector)(p, m, o, gen, matrix))


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
    write_json(directory / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_checkpoint(out: Path, opts: ExampleOptions | None = None) -> Path:
    """Write the checkpoint ``opts`` describes into ``out`` (created); return ``out``."""
    import torch

    opts = opts or ExampleOptions()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out if opts.embed_text_config else Path(opts.base_dir or out.parent / (out.name + "-base"))
    tok_dir.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(tok_dir, opts)
    rows = ids["size"] if opts.resize_vocab else 64 * math.ceil(ids["size"] / 64)
    tcfg = moe_text_config(opts, rows, ids)
    write_json(tok_dir / "generation_config.json", generation_config(ids))
    mm = multimodal_config(
        opts, {name: {k: v for k, v in modality_config(opts, name).items()
                      if k != "fused_gate_up"} for name in opts.modalities},
        str(tok_dir) if not opts.embed_text_config else "Qwen/Qwen3-0.6B")
    if opts.embed_text_config:
        mm["text_config"] = tcfg
    else:
        write_json(tok_dir / "config.json", tcfg)
    write_json(out / "config.json", mm)
    write_weights(out, variant_state_dict(opts, rows), opts)
    if opts.training_state:
        # a real optimizer-state pickle: it must never be opened by the converter
        torch.save({"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "step": 10},
                   out / "training_state.pt")
    return out
