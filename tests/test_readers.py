import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmconvert.convert.readers import ReadOptions, read_checkpoint
from mmconvert.errors import CheckpointError
from mmconvert.verify.reference import ReferenceModel
from testkit.variants import VARIANTS
from tests import dialect_builders as build
from tests.independent_reference import SeedModel


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_matches_independent_seed_model(make_checkpoint, variant):
    ckpt = make_checkpoint(**VARIANTS[variant])
    model = read_checkpoint(ckpt)
    ref = ReferenceModel(model)
    seed = SeedModel(ckpt)
    gen = torch.Generator().manual_seed(1)
    mm = {"m1": [torch.randn(48, generator=gen)], "m2": [torch.randn(2, 80, generator=gen)]}
    ph = model.multimodal_token_id
    for ids, inputs in (([5, 6, 7, 8], None), ([5, ph, 6, ph, ph, 7], mm), ([9, 10], mm)):
        a = ref.logits(ids, inputs)
        b = seed.logits(ids, inputs)
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5


def test_text_config_from_base_dir(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(embed_text_config=False)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert "text_config" not in cfg
    base = Path(cfg["base_model_name"])
    model = read_checkpoint(ckpt, ReadOptions(base=base))
    assert model.text.hidden_size == 64
    assert model.tokenizer.directory == base
    # base_model_name pointing at the local folder also works without --base
    assert read_checkpoint(ckpt).text.num_hidden_layers == 2


def test_missing_base_is_a_clear_error(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(embed_text_config=False)
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for f in ckpt.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((copy / "config.json").read_text())
    cfg["base_model_name"] = "Qwen/Qwen3-0.6B"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="--base"):
        read_checkpoint(copy)


def test_special_ids_are_merged(example_ckpt):
    model = read_checkpoint(example_ckpt)
    tok = json.loads((example_ckpt / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    # tokenizer eos (<|im_end|>) first, then the generation config's other id
    assert model.special.eos == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert model.special.pad == [ids["<|endoftext|>"]]
    assert model.multimodal_token_id == ids["<|multimodal|>"]


def test_lazy_table_reads_rows(example_ckpt):
    model = read_checkpoint(example_ckpt)
    emb = model.tensors["model.embed_tokens.weight"]
    whole = emb.read()
    assert np.array_equal(emb.read_rows(10, 20), whole[10:20])


def test_training_state_never_opened(make_checkpoint, monkeypatch):
    ckpt = make_checkpoint(training_state=True)
    opened = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda p, *a, **k: opened.append(Path(p).name) or real(p, *a, **k))
    model = read_checkpoint(ckpt)
    assert "training_state.pt" not in opened
    assert any("training_state.pt" in w for w in model.warnings)


def test_plain_qwen3_with_projector_file(example_ckpt, tmp_path):
    qwen, proj = build.qwen3_with_projector(example_ckpt, tmp_path)
    with pytest.raises(CheckpointError, match="--projector"):
        read_checkpoint(qwen)
    model = read_checkpoint(qwen, ReadOptions(projector=proj))
    original = read_checkpoint(example_ckpt)
    assert model.tensors.names() == original.tensors.names()
    for name in model.tensors:
        assert np.array_equal(model.tensors[name].read(), original.tensors[name].read())
