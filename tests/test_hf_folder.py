"""The HF bundle's small pure pieces: config, generation config, card, remote-code helpers."""

from __future__ import annotations

import ast
import importlib.util
import json

import pytest

from mmconvert.convert.hf_config import generation_config, hf_config, projector_config
from mmconvert.convert.model import SpecialIds
from mmconvert.convert.plan_hf import hf_config_dtype
from mmconvert.convert.readers import read_checkpoint
from mmconvert.formats.hf_folder import CONFIG_KEY, TEMPLATE_DIR
from mmconvert.publish.model_card import hub_model_id as base_model_id


@pytest.fixture(scope="module")
def model(example_ckpt):
    return read_checkpoint(example_ckpt)


@pytest.fixture(scope="module")
def remote_code():
    """The remote-code template imported as a module of its own (as transformers does)."""
    path = TEMPLATE_DIR / "modeling_mmqwen3.py"
    spec = importlib.util.spec_from_file_location("mmqwen3_template", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_remote_code_imports_only_torch_and_transformers():
    tree = ast.parse((TEMPLATE_DIR / "modeling_mmqwen3.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports in remote code"
            roots.add(node.module.split(".")[0])
    # safetensors is a hard dependency of transformers
    assert roots <= {"__future__", "os", "collections", "typing", "torch", "transformers",
                     "safetensors"}


@pytest.mark.parametrize(("text", "rows", "want"), [
    ("<p> a <p>", [1, 3], "<p> a <p><p><p>"),  # one per item -> one per row
    ("<p><p><p><p> a", [1, 3], "<p><p><p><p> a"),  # already one per row
    ("no placeholder", [2, 2], "no placeholder"),  # prepend
    ("<p> x", [], "<p> x"),  # no items: text unchanged
])
def test_expand_placeholders(remote_code, text, rows, want):
    assert remote_code.expand_placeholders(text, "<p>", rows) == want


def test_expand_placeholders_rejects_other_counts(remote_code):
    with pytest.raises(ValueError, match="one per item"):
        remote_code.expand_placeholders("<p><p> a", "<p>", [1, 1, 3])


def test_activations_follow_the_config_names(remote_code):
    import torch

    x = torch.linspace(-3, 3, 13)
    assert torch.equal(remote_code.make_activation("gelu")(x), torch.nn.functional.gelu(x))
    tanh = torch.nn.functional.gelu(x, approximate="tanh")
    assert torch.equal(remote_code.make_activation("gelu_tanh")(x), tanh)
    assert not torch.equal(tanh, torch.nn.functional.gelu(x))
    with pytest.raises(ValueError, match="unknown projector activation"):
        remote_code.make_activation("swish")


def test_projector_config_is_ordered_and_self_describing(model):
    cfg = projector_config(model, "multimodal_projector/model.safetensors", "multimodal_projector.")
    assert [m["name"] for m in cfg["modalities"]] == list(model.projectors) == ["m1", "m2"]
    m2 = cfg["modalities"][1]
    assert (m2["input_dim"], m2["hidden_dim"], m2["output_dim"]) == (80, 96, 64)
    assert [layer["kind"] for layer in m2["layers"]] == [
        "linear", "layer_norm", "act", "linear", "layer_norm"]
    assert m2["layers"][2]["activation"] == "gelu" and m2["layers"][1]["eps"] == 1e-5
    assert cfg["placeholder_token_id"] == model.multimodal_token_id
    json.dumps(cfg)  # JSON-ready


def test_hf_config_is_a_loadable_qwen3_config(model):
    from transformers import Qwen3Config

    cfg = hf_config(model, "bfloat16", {"modalities": []})
    loaded = Qwen3Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    assert loaded.rope_parameters["rope_theta"] == model.text.rope_theta
    assert loaded.head_dim == model.text.head_dim and loaded.tie_word_embeddings is False
    assert getattr(loaded, CONFIG_KEY) == {"modalities": []}
    assert cfg["auto_map"] == {"AutoModelForCausalLM":
                               "modeling_mmqwen3.MultimodalQwen3ForCausalLM"}
    assert cfg["eos_token_id"] == model.special.eos[0]


def test_rope_scaling_is_written_both_ways(model):
    from dataclasses import replace

    from transformers import Qwen3Config

    scaled = replace(model, text=replace(model.text, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}))
    cfg = hf_config(scaled, "bfloat16", {})
    assert cfg["rope_scaling"]["factor"] == 4.0
    assert cfg["rope_parameters"] == {"rope_type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 1024,
                                      "rope_theta": model.text.rope_theta}
    loaded = Qwen3Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    assert loaded.rope_parameters["rope_type"] == "yarn"


def test_generation_config_carries_merged_ids(model):
    from dataclasses import replace

    gen = generation_config(model)
    assert gen["eos_token_id"] == model.special.eos and gen["temperature"] == 0.6
    single = replace(model, special=SpecialIds(bos=[], eos=[7], pad=[]),
                     generation_config={"bos_token_id": 1, "transformers_version": "4.0"})
    assert generation_config(single) == {"eos_token_id": 7}


@pytest.mark.parametrize(("name", "want"), [
    ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"), ("qwen3", None), ("/models/qwen3", None),
    ("./a/b", None), (None, None)])
def test_base_model_id(name, want):
    assert base_model_id(name) == want


def test_model_card_embeds_parity_table_and_escapes_pipes(model, tmp_path):
    from huggingface_hub import ModelCard

    from mmconvert.convert.export_hf import export_hf
    from mmconvert.publish.bundle_summary import VERIFY_MARKDOWN, summarize_bundle
    from mmconvert.publish.model_card import merge_card

    table = "| metric | value |\n|---|---|\n| max abs dlogit | 1e-6 |"
    export_hf(model, tmp_path / "b")  # the card of an HF bundle, as push writes it
    (tmp_path / "b" / VERIFY_MARKDOWN).write_text(table)
    text = merge_card(None, summarize_bundle(tmp_path / "b"), "me/mm-qwen3")
    card = ModelCard(text)
    assert card.data.base_model == "Qwen/Qwen3-0.6B" and "qwen3" in card.data.tags
    assert "## Logit parity" in text and table in text
    assert 'from_pretrained("me/mm-qwen3", trust_remote_code=True)' in text
    row = next(line for line in text.splitlines() if line.startswith("| `m1`"))
    cells = row.replace("\\|", "").split("|")[1:-1]
    assert len(cells) == 5 and "48" in cells[1]
    # one placeholder per item in the usage prompt: 2 items of m1 + 1 of m2
    assert text.count(f"{model.multimodal_token} ") >= 3


def test_config_dtype(model):
    assert hf_config_dtype(model, "auto") == "bfloat16"
    assert hf_config_dtype(model, "float16") == "float16"
