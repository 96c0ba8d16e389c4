"""Checkpoint dialects that map onto the same canonical model."""


import numpy as np
import pytest
import torch

from mmconvert.convert.readers import read_checkpoint
from mmconvert.convert.readers.names import strip_wrapper_prefixes
from tests import dialect_builders as build

ROOTS = ("language_model.", "multimodal_projector.")


def _assert_same_model(a, b):
    assert a.tensors.names() == b.tensors.names()
    for name in a.tensors:
        assert a.tensors[name].shape == b.tensors[name].shape, name
        assert np.array_equal(a.tensors[name].read(), b.tensors[name].read()), name


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod.",
                                    "model.module._orig_mod."])
def test_wrapper_prefixes_are_stripped(example_ckpt, tmp_path, prefix):
    ckpt = build.prefixed(example_ckpt, tmp_path / "c", prefix)
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
    ckpt = build.fused_gate_up(example_ckpt, tmp_path / "c", gate_first)
    model = read_checkpoint(ckpt)
    _assert_same_model(model, read_checkpoint(example_ckpt))
    gate = model.tensors["model.layers.0.mlp.gate_proj.weight"]
    assert gate.derivation and gate.derivation[0].startswith("split_gate_up")
    assert np.array_equal(gate.read_rows(3, 9), gate.read()[3:9])


@pytest.mark.parametrize("layout", ["old", "new"])
def test_llava_style_checkpoint(make_checkpoint, tmp_path, layout):
    seed = make_checkpoint(layer_norm=False, modalities={"vision": {"input_dim": 40, "hidden_dim": 72}})
    ph = read_checkpoint(seed).multimodal_token_id
    ckpt = build.llava(seed, tmp_path / "llava", ph, layout)
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
