"""PEFT LoRA adapters merged over a base checkpoint, checked against PEFT's own merge."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from mmconvert.convert.readers import ReadOptions, read_checkpoint
from mmconvert.errors import CheckpointError
from mmconvert.formats.dtypes import to_float32
from tests.independent_reference import _state_dict

peft = pytest.importorskip("peft")


class SeedLayout(nn.Module):
    """A module whose parameter names are the seed checkpoint's (what the adapter was trained on)."""

    def __init__(self, ckpt):
        super().__init__()
        from transformers import Qwen3Config, Qwen3ForCausalLM

        cfg = json.loads((ckpt / "config.json").read_text())
        text = {k: v for k, v in cfg["text_config"].items() if k not in ("architectures", "model_type")}
        self.language_model = Qwen3ForCausalLM(Qwen3Config(**text))
        self.multimodal_projector = nn.Module()
        hidden = text["hidden_size"]
        self.multimodal_projector.projectors = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(m["input_dim"], m.get("hidden_dim") or hidden),
                                nn.LayerNorm(m.get("hidden_dim") or hidden), nn.GELU(), nn.Dropout(0.0),
                                nn.Linear(m.get("hidden_dim") or hidden, hidden), nn.LayerNorm(hidden))
            for name, m in cfg["modality_configs"].items()})
        state = {k: v.float() for k, v in _state_dict(ckpt).items()}
        missing, unexpected = self.load_state_dict(state, strict=False)
        assert not unexpected and set(missing) <= {"language_model.lm_head.weight"}


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_merge_matches_peft(make_checkpoint, tmp_path, rslora):
    ckpt = make_checkpoint(dtype="float32")
    torch.manual_seed(0)
    module = SeedLayout(ckpt)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, init_lora_weights=False,
                             target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["m1"])
    wrapped = peft.get_peft_model(module, config)
    with torch.no_grad():  # a "trained" projector copy
        for name, p in wrapped.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    adapter = tmp_path / "adapter"
    wrapped.save_pretrained(adapter)
    expected = {k: v.detach() for k, v in wrapped.merge_and_unload().state_dict().items()}

    model = read_checkpoint(adapter, ReadOptions(base=ckpt))
    assert model.dialect == "peft-lora+multimodal_qwen3"
    checked = 0
    for ref in model.tensors.refs():
        if ref.source_name not in expected:
            continue
        got = to_float32(ref.read(), ref.dtype)
        want = expected[ref.source_name].numpy()
        assert np.allclose(got, want, rtol=0, atol=2e-6), ref.name
        checked += 1
    assert checked == len(model.tensors)
    q = model.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.derivation[0].startswith("lora_merge")
    assert model.tensors["mm.m1.fc1.weight"].derivation == ("modules_to_save",)
    base_q = read_checkpoint(ckpt).tensors["model.layers.0.self_attn.q_proj.weight"].read()
    assert not np.array_equal(q.read(), base_q)


def test_lora_without_base_is_a_clear_error(make_checkpoint, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": "Qwen/Qwen3-0.6B"}))
    with pytest.raises(CheckpointError, match="--base"):
        read_checkpoint(adapter)
