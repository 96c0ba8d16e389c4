"""issue 9, item 5: the HF remote code never gives logits for inputs it did not understand.

Placeholders with no (or too few, or too many) projected rows, a misspelt keyword that
``**kwargs`` would swallow, an unknown ``multimodal_data`` key: each is a ``ValueError`` in
``forward`` and in ``generate``. The seed's own input format is accepted as an alias of
``mm_inputs`` and gives the same logits.
"""

from __future__ import annotations

import pytest
import torch

from mmconvert.convert.export_hf import export_hf
from mmconvert.convert.readers import read_checkpoint

ACCEPTED = ("mm_inputs", "multimodal_embeddings", "multimodal_data")


@pytest.fixture(scope="module")
def remote(example_ckpt, tmp_path_factory):
    """The example's HF bundle loaded through its remote code (fp32)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("remote") / "remote-inputs-hf"
    export_hf(read_checkpoint(example_ckpt), out)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                 dtype=torch.float32, local_files_only=True)
    return model.eval()


@pytest.fixture(scope="module")
def ph(remote) -> int:
    return remote.config.multimodal_config["placeholder_token_id"]


def items(seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Three projected rows: m1 one [2, 48] item, m2 one [80] item."""
    gen = torch.Generator().manual_seed(seed)
    return {"m1": [torch.randn(2, 48, generator=gen)], "m2": [torch.randn(80, generator=gen)]}


def logits(remote, ids: list[int], **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return remote(input_ids=torch.tensor([ids]), **kwargs).logits[0]


def generate(remote, ids: list[int], **kwargs) -> torch.Tensor:
    return remote.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, **kwargs)


@pytest.mark.parametrize("empty", [None, {}, {"m1": []}, {"m1": [], "m2": None}],
                         ids=["none", "empty-dict", "no-items", "no-items-2"])
def test_placeholders_without_inputs_raise(remote, ph, empty):
    ids = [5, ph, ph, ph, 6]
    with pytest.raises(ValueError, match="3 placeholder tokens for 0 projected rows"):
        logits(remote, ids, mm_inputs=empty)
    with pytest.raises(ValueError, match="3 placeholder tokens for 0 projected rows"):
        generate(remote, ids, mm_inputs=empty)


def test_placeholders_without_inputs_raise_in_a_batch_row(remote, ph):
    ids = torch.tensor([[5, ph, ph, ph, 6], [5, ph, ph, ph, 6]])
    with pytest.raises(ValueError, match="3 placeholder tokens for 0 projected rows"), \
            torch.no_grad():
        remote(input_ids=ids, mm_inputs=[items(), {}])


@pytest.mark.parametrize("count", [2, 4])
def test_placeholder_count_mismatch_raises(remote, ph, count):
    ids = [5] + [ph] * count + [6]
    message = f"{count} placeholder tokens for 3 projected rows"
    with pytest.raises(ValueError, match=message):
        logits(remote, ids, mm_inputs=items())
    with pytest.raises(ValueError, match=message):
        generate(remote, ids, mm_inputs=items())


def test_no_placeholder_still_prepends(remote):
    """The documented rule (docs/hf-bundle.md) is kept: rows go before the text."""
    out = logits(remote, [5, 6, 7], mm_inputs=items())
    assert out.shape[0] == 3 + 3
    assert torch.equal(logits(remote, [5, 6, 7]), logits(remote, [5, 6, 7], mm_inputs=None))


def test_the_seeds_input_format_is_an_alias(remote, ph):
    ids = [5, ph, ph, ph, 6]
    want = logits(remote, ids, mm_inputs=items())
    # the seed's dict, items as a list or as one tensor per modality
    single = {m: v[0] for m, v in items().items()}
    for kwargs in ({"multimodal_embeddings": items()}, {"multimodal_embeddings": single},
                   {"multimodal_data": {"multimodal_embeddings": items()}}):
        assert torch.equal(logits(remote, ids, **kwargs), want), kwargs
    tokens = generate(remote, ids, mm_inputs=items())
    assert torch.equal(generate(remote, ids, multimodal_embeddings=items()), tokens)
    assert torch.equal(generate(remote, ids, multimodal_data={"multimodal_embeddings": items()}),
                       tokens)


@pytest.mark.parametrize("name", ["mm_input", "multimodal_embedding", "multimodal_inputs",
                                  "image_embeddings", "mm", "m1"])
def test_a_misspelt_keyword_raises(remote, ph, name):
    ids = [5, ph, ph, ph, 6]
    for call in (logits, generate):
        with pytest.raises(ValueError, match=f"unknown multimodal keyword {name!r}") as info:
            call(remote, ids, **{name: items()})
        assert all(accepted in str(info.value) for accepted in ACCEPTED)


def test_multimodal_data_needs_its_key_and_one_spelling_only(remote, ph):
    ids = [5, ph, ph, ph, 6]
    with pytest.raises(ValueError, match="multimodal_data"):
        logits(remote, ids, multimodal_data={"embeddings": items()})
    with pytest.raises(ValueError, match="give the multimodal inputs once"):
        logits(remote, ids, mm_inputs=items(), multimodal_embeddings=items())
