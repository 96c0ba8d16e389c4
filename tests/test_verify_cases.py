import json

import pytest
import torch
from safetensors.torch import save_file

from mmconvert.convert.readers import read_checkpoint
from mmconvert.runtime.fusion import fusion_positions
from mmconvert.verify.cases import (
    CASES_KEY,
    LONG_PROMPT_TOKENS,
    CasesError,
    default_cases,
    load_cases_file,
    load_tokenizer,
    render_chat,
    write_cases_file,
)


def test_default_cases_cover_the_issue(example_ckpt):
    model = read_checkpoint(example_ckpt)
    cases = default_cases(model)
    names = [c.name for c in cases]
    assert names == ["text", "m1-alone", "m2-alone", "mixed", "prepend", "chat", "long"]
    ph = model.multimodal_token_id
    by = {c.name: c for c in cases}
    assert not by["text"].mm_inputs
    for m, spec in model.projectors.items():
        # each modality alone, at its declared input dim
        assert list(by[f"{m}-alone"].mm_inputs) == [m]
        assert by[f"{m}-alone"].mm_inputs[m][0].shape[-1] == spec.input_dim
    mixed = by["mixed"]
    assert set(mixed.mm_inputs) == set(model.projectors)
    assert all(len(items) == 2 for items in mixed.mm_inputs.values())
    assert {t.dim() for items in mixed.mm_inputs.values() for t in items} == {1, 2}
    assert mixed.input_ids.count(ph) == mixed.n_rows
    assert ph not in by["prepend"].input_ids and by["prepend"].n_rows > 0
    assert len(by["long"].input_ids) >= LONG_PROMPT_TOKENS
    # every case fuses under the seed's rule
    for c in cases:
        ids, where = fusion_positions(c.input_ids, ph, c.n_rows)
        assert sum(r is not None for r in where) == c.n_rows


def test_chat_case_renders_the_template(example_ckpt):
    model = read_checkpoint(example_ckpt)
    chat = next(c for c in default_cases(model) if c.name == "chat")
    tok = load_tokenizer(model)
    text = tok.decode(chat.input_ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    rendered = render_chat(model.tokenizer.chat_template,
                           [{"role": "user", "content": "hi"}], model, False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"


def test_cases_are_deterministic(example_ckpt):
    model = read_checkpoint(example_ckpt)
    a, b = default_cases(model), default_cases(model)
    for x, y in zip(a, b):
        assert x.input_ids == y.input_ids
        for m in x.mm_inputs:
            assert all(torch.equal(p, q) for p, q in zip(x.mm_inputs[m], y.mm_inputs[m]))
    other = default_cases(model, seed=1)
    assert not torch.equal(other[1].mm_inputs["m1"][0], a[1].mm_inputs["m1"][0])


def test_cases_file_round_trip(example_ckpt, tmp_path):
    model = read_checkpoint(example_ckpt)
    cases = default_cases(model)
    cases[0].continuation = [5, 6]
    path = tmp_path / "cases.safetensors"
    write_cases_file(path, cases)
    back = load_cases_file(path, model)
    assert [c.name for c in back] == [c.name for c in cases]
    assert back[0].continuation == [5, 6]
    assert torch.equal(back[3].mm_inputs["m2"][1], cases[3].mm_inputs["m2"][1])


def test_user_cases_from_prompts_and_messages(example_ckpt, tmp_path):
    model = read_checkpoint(example_ckpt)
    doc = {"version": 1, "cases": [
        {"name": "photo", "prompt": "Look: <|multimodal|><|multimodal|> ok", "generate": 3,
         "mm": {"m1": ["x"]}},
        {"name": "talk", "messages": [{"role": "user", "content": "<|multimodal|>hey"}],
         "mm": {"m2": ["y"]}},
    ]}
    path = tmp_path / "mine.safetensors"
    save_file({"x": torch.randn(2, 48), "y": torch.randn(80).to(torch.bfloat16)}, str(path),
              metadata={CASES_KEY: json.dumps(doc)})
    photo, talk = load_cases_file(path, model)
    assert photo.generate == 3 and photo.input_ids.count(model.multimodal_token_id) == 2
    assert talk.mm_inputs["m2"][0].dtype == torch.float32
    tok = load_tokenizer(model)
    assert tok.decode(talk.input_ids, skip_special_tokens=False).endswith("assistant\n")


@pytest.mark.parametrize("doc, tensors, message", [
    ({"cases": []}, {"x": torch.zeros(48)}, "non-empty 'cases'"),
    ({"cases": [{"name": "a", "prompt": "hi", "mm": {"m9": ["x"]}}]}, {"x": torch.zeros(48)},
     "modality 'm9'"),
    ({"cases": [{"name": "a", "prompt": "hi", "mm": {"m1": ["z"]}}]}, {"x": torch.zeros(48)},
     "names tensor 'z'"),
    ({"cases": [{"name": "a", "prompt": "hi", "mm": {"m1": ["x"]}}]}, {"x": torch.zeros(47)},
     "takes input_dim 48"),
    ({"cases": [{"name": "a"}]}, {"x": torch.zeros(48)}, "none of input_ids"),
    ({"cases": [{"name": "a", "prompt": "see <|multimodal|>", "mm": {"m1": ["x"]}}]},
     {"x": torch.zeros(3, 48)}, "1 placeholder tokens for 3 projected rows"),
])
def test_bad_cases_files_are_clear_errors(example_ckpt, tmp_path, doc, tensors, message):
    model = read_checkpoint(example_ckpt)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={CASES_KEY: json.dumps(doc)})
    with pytest.raises(CasesError, match=message):
        load_cases_file(path, model)
    save_file(tensors, str(path))
    with pytest.raises(CasesError, match="no 'mmconvert.cases'"):
        load_cases_file(path, model)
