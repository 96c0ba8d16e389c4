"""Checkpoint dialects that map onto the same canonical model."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mmconvert.convert.readers import read_checkpoint
from mmconvert.convert.readers.names import strip_wrapper_prefixes

ROOTS = ("language_model.", "multimodal_projector.")


def _rewrite(src, dst, fn):
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    save_file(fn(state), str(dst / "model.safetensors"))
    return dst


def _assert_same_model(a, b):
    assert a.tensors.names() == b.tensors.names()
    for name in a.tensors:
        assert a.tensors[name].shape == b.tensors[name].shape, name
        assert np.array_equal(a.tensors[name].read(), b.tensors[name].read()), name


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod.",
                                    "model.module._orig_mod."])
def test_wrapper_prefixes_are_stripped(example_ckpt, tmp_path, prefix):
    ckpt = _rewrite(example_ckpt, tmp_path / "c", lambda s: {prefix + k: v for k, v in s.items()})
    model = read_checkpoint(ckpt)
    _assert_same_model(model, read_checkpoint(example_ckpt))
    assert any("training-wrapper prefixes" in w for w in model.warnings)


def test_genuine_model_prefix_is_kept():
    assert strip_wrapper_prefixes("language_model.model.layers.0.x", ROOTS)[0] == \
        "language_model.model.layers.0.x"
    assert strip_wrapper_prefixes("model.language_model.model.norm.weight", ROOTS) == \
        ("language_model.model.norm.weight", ["model."])
    assert strip_wrapper_prefixes("other.thing", ROOTS) == ("other.thing", [])


@pytest.mark.parametrize("gate_first", [True, False])
def test_fused_dense_gate_up_is_split(example_ckpt, tmp_path, gate_first):
    def fuse(state):
        out = {}
        for k, v in state.items():
            if k.endswith("mlp.gate_proj.weight"):
                up = state[k.replace("gate_proj", "up_proj")]
                out[k.replace("gate_proj", "gate_up_proj")] = torch.cat([v, up] if gate_first else [up, v])
            elif not k.endswith("mlp.up_proj.weight"):
                out[k] = v
        return out

    ckpt = _rewrite(example_ckpt, tmp_path / "c", fuse)
    if not gate_first:
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["gate_up_gate_first"] = False
        (ckpt / "config.json").write_text(json.dumps(cfg))
    model = read_checkpoint(ckpt)
    _assert_same_model(model, read_checkpoint(example_ckpt))
    gate = model.tensors["model.layers.0.mlp.gate_proj.weight"]
    assert gate.derivation and gate.derivation[0].startswith("split_gate_up")
    assert np.array_equal(gate.read_rows(3, 9), gate.read()[3:9])


@pytest.mark.parametrize("layout", ["old", "new"])
def test_llava_style_checkpoint(make_checkpoint, tmp_path, layout):
    seed = make_checkpoint(layer_norm=False, modalities={"vision": {"input_dim": 40, "hidden_dim": 72}})
    ckpt = tmp_path / "llava"
    shutil.copytree(seed, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    ph = read_checkpoint(seed).multimodal_token_id
    llava_cfg = {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                 "text_config": cfg["text_config"], "projector_hidden_act": "gelu",
                 "image_token_index": ph, "vision_config": {"model_type": "siglip_vision_model"}}
    (ckpt / "config.json").write_text(json.dumps(llava_cfg))
    state = load_file(str(ckpt / "model.safetensors"))
    lm_prefix, proj_prefix, head, tower = (
        ("language_model.model.", "multi_modal_projector.", "language_model.lm_head.", "vision_tower.")
        if layout == "old" else
        ("model.language_model.", "model.multi_modal_projector.", "lm_head.", "model.vision_tower."))
    out = {}
    for k, v in state.items():
        if k.startswith("language_model.model."):
            out[lm_prefix + k[len("language_model.model."):]] = v
        elif k.startswith("language_model.lm_head."):
            out[head + k[len("language_model.lm_head."):]] = v
        else:
            index, part = k.split(".")[-2:]
            out[f"{proj_prefix}linear_{1 if index == '0' else 2}.{part}"] = v
    out[tower + "embeddings.patch_embedding.weight"] = torch.zeros(4, 3)
    save_file(out, str(ckpt / "model.safetensors"))
    model = read_checkpoint(ckpt)
    assert model.dialect == "llava"
    assert model.multimodal_token_id == ph
    assert any("vision tower not exported" in w for w in model.warnings)
    _assert_same_model(model, read_checkpoint(seed))
    assert model.projectors["vision"].layers == read_checkpoint(seed).projectors["vision"].layers


@pytest.mark.parametrize("experts_format", ["per_expert", "fused"])
def test_qwen3_moe_experts_are_stacked(make_checkpoint, experts_format):
    ckpt = make_checkpoint(num_experts=4, experts_format=experts_format)
    model = read_checkpoint(ckpt)
    assert model.text.is_moe and model.text.num_experts == 4
    gate = model.tensors["model.layers.1.mlp.experts.gate_proj"]
    up = model.tensors["model.layers.1.mlp.experts.up_proj"]
    down = model.tensors["model.layers.1.mlp.experts.down_proj"]
    assert gate.shape == up.shape == (4, 32, 64) and down.shape == (4, 64, 32)
    assert np.array_equal(gate.read_rows(1, 3), gate.read()[1:3])
    # the same numbers transformers' Qwen3-MoE holds in memory (gate half first)
    from tests.independent_reference import SeedModel

    seed = SeedModel(ckpt)
    experts = seed.lm.model.layers[1].mlp.experts
    fused = np.concatenate([to_f32(gate), to_f32(up)], axis=1)
    assert np.array_equal(fused, experts.gate_up_proj.detach().numpy())
    assert np.array_equal(to_f32(down), experts.down_proj.detach().numpy())


def to_f32(ref):
    from mmconvert.formats.dtypes import to_float32

    return to_float32(ref.read(), ref.dtype)


def test_moe_reference_matches_independent_model(make_checkpoint):
    from mmconvert.verify.reference import ReferenceModel
    from tests.independent_reference import SeedModel

    ckpt = make_checkpoint(num_experts=4)
    model = read_checkpoint(ckpt)
    ref = ReferenceModel(model)
    seed = SeedModel(ckpt)
    ids = [5, 6, model.multimodal_token_id, 8]
    mm = {"m1": [torch.randn(48)]}
    assert (ref.logits(ids, mm) - seed.logits(ids, mm)).abs().max() <= 1e-5
