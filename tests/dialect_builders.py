"""Checkpoints in other dialects, built from generated seed-layout checkpoints.

Each builder rewrites a seed checkpoint (``tests/conftest.py``'s ``make_checkpoint``) the way
another training setup would have saved the same weights, so tests can check that every
dialect reads to the same canonical model and converts and verifies like the original.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def rewrite_weights(src: Path, dst: Path, fn) -> Path:
    """Copy ``src`` to ``dst`` with ``model.safetensors`` passed through ``fn(state) -> state``."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    save_file(fn(state), str(dst / "model.safetensors"))
    return dst


def prefixed(src: Path, dst: Path, prefix: str = "module._orig_mod.") -> Path:
    """As saved from a DDP / torch.compile-wrapped model."""
    return rewrite_weights(src, dst, lambda s: {prefix + k: v for k, v in s.items()})


def fused_gate_up(src: Path, dst: Path, gate_first: bool = True) -> Path:
    """Dense MLPs with ``gate_up_proj [2I, H]`` (and the config flag when up comes first)."""
    def fuse(state):
        out = {}
        for k, v in state.items():
            if k.endswith("mlp.gate_proj.weight"):
                up = state[k.replace("gate_proj", "up_proj")]
                out[k.replace("gate_proj", "gate_up_proj")] = torch.cat([v, up] if gate_first else [up, v])
            elif not k.endswith("mlp.up_proj.weight"):
                out[k] = v
        return out

    rewrite_weights(src, dst, fuse)
    if not gate_first:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["gate_up_gate_first"] = False
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def llava(seed: Path, dst: Path, placeholder_id: int, layout: str = "new") -> Path:
    """LLaVA-style: ``seed`` must have one modality ``vision`` without layer norm."""
    shutil.copytree(seed, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({
        "model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
        "text_config": cfg["text_config"], "projector_hidden_act": cfg["projector_hidden_act"],
        "image_token_index": placeholder_id, "vision_config": {"model_type": "siglip_vision_model"}}))
    lm, proj, head, tower = (
        ("language_model.model.", "multi_modal_projector.", "language_model.lm_head.", "vision_tower.")
        if layout == "old" else
        ("model.language_model.", "model.multi_modal_projector.", "lm_head.", "model.vision_tower."))
    state = load_file(str(dst / "model.safetensors"))
    out = {}
    for k, v in state.items():
        if k.startswith("language_model.model."):
            out[lm + k[len("language_model.model."):]] = v
        elif k.startswith("language_model.lm_head."):
            out[head + k[len("language_model.lm_head."):]] = v
        else:
            index, part = k.split(".")[-2:]
            out[f"{proj}linear_{1 if index == '0' else 2}.{part}"] = v
    out[tower + "embeddings.patch_embedding.weight"] = torch.zeros(4, 3)
    save_file(out, str(dst / "model.safetensors"))
    return dst


def qwen3_with_projector(src: Path, dst: Path) -> tuple[Path, Path]:
    """A plain Qwen3 folder and a separate projector file (+ ``projector.json``)."""
    state = load_file(str(src / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    qwen = dst / "qwen3"
    qwen.mkdir(parents=True)
    (qwen / "config.json").write_text(json.dumps(cfg["text_config"]))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(src / f, qwen / f)
    save_file({k[len("language_model."):]: v for k, v in state.items()
               if k.startswith("language_model.")}, str(qwen / "model.safetensors"))
    projector = dst / "projector.safetensors"
    save_file({k[len("multimodal_projector."):]: v for k, v in state.items()
               if k.startswith("multimodal_projector.")}, str(projector))
    (dst / "projector.json").write_text(json.dumps(
        {k: cfg[k] for k in ("modality_configs", "projector_hidden_act", "use_layer_norm",
                             "multimodal_token")}))
    return qwen, projector


def lora_adapter(base: Path, dst: Path, seed: int = 0) -> Path:
    """A PEFT LoRA adapter (q/v/down_proj, random B so it changes the model) over ``base``."""
    import peft
    from torch import nn
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tests.independent_reference import _state_dict

    cfg = json.loads((base / "config.json").read_text())
    text = {k: v for k, v in cfg["text_config"].items() if k not in ("architectures", "model_type")}
    module = nn.Module()
    module.language_model = Qwen3ForCausalLM(Qwen3Config(**text))
    state = {k[len("language_model."):]: v.float() for k, v in _state_dict(base).items()
             if k.startswith("language_model.")}
    module.language_model.load_state_dict(state, strict=False)
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(module, peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]))
    wrapped.save_pretrained(dst)
    return dst
