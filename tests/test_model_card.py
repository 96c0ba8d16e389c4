"""The pushed model card: reading a bundle (publish/bundle_summary.py) and merging the card
(publish/model_card.py) without losing a user's text. No network."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from mmconvert.cli import main
from mmconvert.errors import BundleError
from mmconvert.publish.bundle_summary import summarize_bundle
from mmconvert.publish.hub import _card_base
from mmconvert.publish.model_card import BEGIN, END, CardError, hub_model_id, merge_card

REPO = "alice/tiny-mm"


@pytest.fixture(scope="module")
def bundle(example_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "st"
    assert CliRunner().invoke(main, ["to-safetensors", str(example_ckpt), "-o", str(out)]
                              ).exit_code == 0
    return out


@pytest.fixture
def summary(bundle):
    return summarize_bundle(bundle)


def test_new_card_has_front_matter_files_modalities_usage(summary):
    card = merge_card(None, summary, REPO)
    parsed = ModelCard(card)
    assert parsed.data.base_model == "Qwen/Qwen3-0.6B"
    assert parsed.data.library_name == "safetensors"
    assert parsed.text.startswith("\n# tiny-mm\n")
    for heading in ("## Files", "## Modalities", "### transformers", "### vLLM",
                    "### mmconvert run", "## Provenance"):
        assert heading in card
    assert "| `m2` | 80 | 64 |" in card
    assert "## Logit parity" not in card  # no report in the bundle: no table


def test_merge_is_idempotent_and_keeps_text_around_the_section(summary):
    user = ("---\nlicense: apache-2.0\nlanguage: [en]\ntags: mine\n---\nIntro by the user.\n\n"
            f"{BEGIN}\nstale generated text\n{END}\n\nOutro by the user.\n")
    once = merge_card(user, summary, REPO)
    assert merge_card(once, summary, REPO) == once
    assert "stale generated text" not in once
    assert once.index("Intro by the user.") < once.index(BEGIN) < once.index(END) \
        < once.index("Outro by the user.")
    data = ModelCard(once).data.to_dict()
    assert data["license"] == "apache-2.0" and data["language"] == ["en"]
    assert data["tags"][0] == "mine" and "qwen3" in data["tags"]


def test_card_without_front_matter_gets_one_and_keeps_its_body(summary):
    merged = merge_card("# Mine\n\nNo metadata here.\n", summary, REPO)
    assert merged.startswith("---\nbase_model: Qwen/Qwen3-0.6B\n")
    assert "# Mine\n\nNo metadata here.\n\n" + BEGIN in merged


def test_a_lone_begin_marker_is_not_taken_as_our_section(summary):
    user = f"Keep me.\n{BEGIN}\nand me too.\n"
    merged = merge_card(user, summary, REPO)
    assert "Keep me." in merged and "and me too." in merged
    assert merge_card(merged, summary, REPO) == merged


def test_invalid_front_matter_is_refused(summary):
    with pytest.raises(CardError):
        merge_card("---\n[not: a mapping\n---\nbody\n", summary, REPO)
    with pytest.raises(CardError):
        merge_card("---\n- a\n- list\n---\nbody\n", summary, REPO)


def test_local_paths_are_not_base_models():
    assert hub_model_id("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"
    for name in ("/data/qwen3", "./base", "base", None, "a/b/c"):
        assert hub_model_id(name) is None


def test_verify_report_becomes_the_parity_table(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    report = {"passed": True, "cases": [{"name": "text"}],
              "targets": [{"label": "b (safetensors)", "backend": "safetensors",
                           "output_type": "same", "status": "pass",
                           "overall": {"max_abs": 0.0, "top1": 1.0}}]}
    (copy / "verify-report.json").write_text(json.dumps(report))
    card = merge_card(None, summarize_bundle(copy), REPO)
    assert "| bundle | backend | type | max_abs | top1 | result |" in card
    assert "| b (safetensors) | safetensors | same | 0 | 1 | pass |" in card
    (copy / "verify-report.md").write_text("### Logit parity (`mmconvert verify`)\n\nAll good.\n")
    card = merge_card(None, summarize_bundle(copy), REPO)  # markdown wins over JSON
    assert "## Logit parity\n\nFrom the `mmconvert verify` report in this repo:\n\nAll good." in card


def test_generated_bundle_card_is_replaced_but_an_edited_one_is_kept(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "mmconvert.json").read_text())
    writer_card = "# Written by the bundle writer\n"
    (copy / "README.md").write_text(writer_card)
    manifest["outputs"] = [o for o in manifest["outputs"] if o["path"] != "README.md"]
    manifest["outputs"].append({"path": "README.md", "bytes": len(writer_card),
                                "sha256": hashlib.sha256(writer_card.encode()).hexdigest()})
    (copy / "mmconvert.json").write_text(json.dumps(manifest))
    summary = summarize_bundle(copy)
    assert _card_base(None, summary) is None  # exactly as generated: regenerated whole
    assert _card_base(writer_card, summary) is None  # also when it is what the repo holds
    (copy / "README.md").write_text(writer_card + "\nMy notes.\n")
    assert _card_base(None, summary) == writer_card + "\nMy notes.\n"
    assert _card_base("# Hub text\n", summary) == "# Hub text\n"  # the repo's card wins


@pytest.mark.parametrize("damage, message", [
    (lambda b: (b / "mmconvert.json").unlink(), "not an mmconvert bundle"),
    (lambda b: (b / "mmconvert.json").write_text("{oops"), "cannot read it"),
    (lambda b: (b / "model.safetensors").unlink(), "model.safetensors is listed"),
    (lambda b: (b / "tokenizer.json").write_text("{}"), "tokenizer.json has 2 bytes"),
    (lambda b: (b / "mmconvert.json").write_text('{"kind": "onnx"}'), "unknown bundle kind"),
])
def test_not_a_bundle(bundle, tmp_path, damage, message):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    damage(copy)
    with pytest.raises(BundleError, match=message):
        summarize_bundle(copy)


# the GGUF card's transformers snippet, against the real transformers: shown only when it loads
TRANSFORMERS_GGUF_VARIANTS = {
    "example (head_dim 16)": {},
    "head_dim 128": {"head_dim": 128},
    "moe, expert ffn 32": {"num_experts": 2},
    "moe, expert ffn 768": {"num_experts": 2, "moe_intermediate_size": 768},
}


def _python_blocks(card: str) -> list[str]:
    import re

    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


@pytest.mark.parametrize("variant", sorted(TRANSFORMERS_GGUF_VARIANTS))
def test_gguf_card_shows_the_transformers_snippet_only_when_it_loads(variant, make_checkpoint,
                                                                     tmp_path, monkeypatch):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from mmconvert import api

    ckpt = make_checkpoint(**TRANSFORMERS_GGUF_VARIANTS[variant])
    gguf = api.to_gguf(ckpt, tmp_path / "gguf", outtypes=["f32"]).out
    card = (gguf / "README.md").read_text(encoding="utf-8")
    hf = api.to_hf(ckpt, tmp_path / "hf").out
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    reference = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(ids).logits
    snippets = [b for b in _python_blocks(card) if "gguf_file=" in b]
    monkeypatch.chdir(tmp_path)  # the card names the bundle by its folder name
    transformers.logging.set_verbosity_error()
    if snippets:
        scope: dict = {}
        exec(snippets[0], scope)
        logits = scope["model"].to(torch.float32)(ids).logits
        assert torch.allclose(logits, reference, atol=1e-4), variant
    else:
        assert "transformers cannot load this text GGUF: its GGUF loader does not read" in card
        gguf_file = next(p.name for p in gguf.iterdir() if p.name.endswith("-F32.gguf"))
        with pytest.raises(Exception, match="mismatch|size"):
            AutoModelForCausalLM.from_pretrained("gguf", gguf_file=gguf_file)
    expected = variant in ("head_dim 128", "moe, expert ffn 768")
    assert bool(snippets) == expected, card


def test_publishing_doc_lists_the_front_matter_each_card_has(example_ckpt, tmp_path):
    """docs/publishing.md's table of library_name, base_model_relation and tags per bundle kind
    is what the cards carry."""
    import re
    from pathlib import Path

    from mmconvert import api

    doc = (Path(__file__).parents[1] / "docs" / "publishing.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `to-(\w+)` \| `(\w+)` \| `(\w+)` \| (.+) \|$", doc, flags=re.M)
    assert sorted(r[0] for r in rows) == ["gguf", "hf", "safetensors"]
    writers = {"gguf": api.to_gguf, "hf": api.to_hf, "safetensors": api.to_safetensors}
    for kind, library, relation, tags in rows:
        out = writers[kind](example_ckpt, tmp_path / kind).out
        meta = ModelCard((out / "README.md").read_text(encoding="utf-8")).data
        assert (meta.library_name, meta.base_model_relation) == (library, relation), kind
        assert list(meta.tags) == re.findall(r"`([\w-]+)`", tags), kind
    assert "once wired" not in doc
    for command in ("to-gguf", "to-hf", "to-safetensors"):
        assert "--push-to" in CliRunner().invoke(main, [command, "--help"]).output
