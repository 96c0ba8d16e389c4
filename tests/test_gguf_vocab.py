"""The tokenizer as a llama.cpp gpt2 vocabulary: pre-tokenizer detection, token types, padding
rows, merges, special ids and the end-of-generation keys."""

import json
import shutil
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer

from mmconvert.convert.model import SpecialIds
from mmconvert.convert.readers import read_checkpoint
from mmconvert.convert.readers.common import load_tokenizer_spec
from mmconvert.errors import CheckpointError, UnsupportedError
from mmconvert.formats.gguf_vocab import (
    KNOWN_PRE_HASHES,
    PRE_CHECK_TEXT,
    TokenType,
    build_vocab,
    check_text_tokenizer,
    pre_check_hash,
)
from mmconvert.formats.gguf_writer import Metadata
from testkit.qwen_vocab import ENDOFTEXT_ID, IM_END_ID, build_qwen_tokenizer, qwen_vocab_size


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_qwen_tokenizer(tmp_path_factory.mktemp("qwen-tok"))


def vocab_model(directory, eos=(IM_END_ID, ENDOFTEXT_ID), bos=(ENDOFTEXT_ID,),
                pad=(ENDOFTEXT_ID,)):
    """What build_vocab reads of a CanonicalModel, for a bare tokenizer folder."""
    spec, _ = load_tokenizer_spec(directory)
    return SimpleNamespace(tokenizer=spec, source=directory,
                           special=SpecialIds(bos=list(bos), eos=list(eos), pad=list(pad)))


def edit_tokenizer(src_dir, dst_dir, edit):
    shutil.copytree(src_dir, dst_dir)
    path = dst_dir / "tokenizer.json"
    tok = json.loads(path.read_text(encoding="utf-8"))
    edit(tok)
    path.write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    return dst_dir


def test_real_qwen_vocabulary_is_recognised_by_hash(qwen_dir):
    tok = json.loads((qwen_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert KNOWN_PRE_HASHES.get(pre_check_hash(tok)) == "qwen2"
    vocab = build_vocab(vocab_model(qwen_dir), qwen_vocab_size())
    assert vocab.pre == "qwen2" and "is known" in vocab.pre_reason


def test_structurally_qwen2_tokenizer_gets_qwen2_with_a_reason(example_ckpt):
    model = read_checkpoint(example_ckpt)
    vocab = build_vocab(model, model.text.vocab_size)
    assert vocab.pre == "qwen2"
    assert "not in the table" in vocab.pre_reason and "Qwen2's" in vocab.pre_reason


@pytest.mark.parametrize("which", ["qwen", "example"])
def test_cut_down_tokenizer_gives_the_same_ids(which, qwen_dir, example_ckpt):
    directory = qwen_dir if which == "qwen" else example_ckpt
    full = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tok = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    reduced = check_text_tokenizer(tok)
    assert len(reduced["model"]["vocab"]) < len(tok["model"]["vocab"])
    small = Tokenizer.from_str(json.dumps(reduced))
    assert (small.encode(PRE_CHECK_TEXT, add_special_tokens=False).ids
            == full.encode(PRE_CHECK_TEXT, add_special_tokens=False).ids)


def test_unknown_pre_tokenizer_is_refused_and_can_be_overridden(example_ckpt, tmp_path):
    def gpt2_style(tok):  # byte-level BPE with GPT-2's own regex: not Qwen2's splitting
        tok["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False,
                                "trim_offsets": True, "use_regex": True}

    folder = edit_tokenizer(example_ckpt, tmp_path / "ckpt", gpt2_style)
    model = read_checkpoint(folder)
    with pytest.raises(UnsupportedError, match="--pre-tokenizer NAME"):
        build_vocab(model, model.text.vocab_size)
    vocab = build_vocab(model, model.text.vocab_size, pre_override="gpt2")
    assert vocab.pre == "gpt2" and "--pre-tokenizer" in vocab.pre_reason


def test_token_types_and_padding_rows(qwen_dir):
    rows = qwen_vocab_size() + 266  # the Qwen3 config's padded 151 936 rows
    vocab = build_vocab(vocab_model(qwen_dir), rows)
    assert len(vocab.tokens) == len(vocab.token_types) == rows
    assert vocab.tokens[9707] == "Hello" and vocab.token_types[9707] == TokenType.NORMAL
    assert vocab.tokens[IM_END_ID] == "<|im_end|>"
    assert vocab.token_types[IM_END_ID] == TokenType.CONTROL
    think = vocab.tokens.index("<think>")
    assert vocab.token_types[think] == TokenType.USER_DEFINED  # added, not special
    mm = vocab.tokens.index("<|multimodal|>")
    assert mm == qwen_vocab_size() - 1 and vocab.token_types[mm] == TokenType.CONTROL
    assert vocab.tokens[-1] == f"[PAD{rows - 1}]" and vocab.token_types[-1] == TokenType.UNUSED
    assert sum(vocab.token_types == TokenType.UNUSED) == 266
    assert len(vocab.merges) == 151_643 - 256 and vocab.merges[0] == "Ġ Ġ"


def test_merges_in_either_json_form(example_ckpt, tmp_path):
    model = read_checkpoint(example_ckpt)
    pairs = build_vocab(model, model.text.vocab_size).merges

    def as_strings(tok):
        tok["model"]["merges"] = [" ".join(m) for m in tok["model"]["merges"]]

    folder = edit_tokenizer(example_ckpt, tmp_path / "ckpt", as_strings)
    model2 = read_checkpoint(folder)
    assert build_vocab(model2, model2.text.vocab_size).merges == pairs


def test_special_ids_and_eog_keys(qwen_dir):
    # im_end and endoftext are found by llama.cpp from their text; 100 and 101 are not
    model = vocab_model(qwen_dir, eos=(IM_END_ID, ENDOFTEXT_ID, 100, 101, 102))
    vocab = build_vocab(model, qwen_vocab_size())
    md = Metadata()
    vocab.add_to(md)
    assert md["tokenizer.ggml.eos_token_id"].value == IM_END_ID
    assert list(md["tokenizer.ggml.eos_token_ids"].value) == [IM_END_ID, ENDOFTEXT_ID, 100, 101,
                                                               102]
    assert md["tokenizer.ggml.eot_token_id"].value == 100
    assert md["tokenizer.ggml.eom_token_id"].value == 101
    assert any("[102]" in n for n in vocab.notes)
    assert md["tokenizer.ggml.bos_token_id"].value == ENDOFTEXT_ID
    assert md["tokenizer.ggml.padding_token_id"].value == ENDOFTEXT_ID
    assert md["tokenizer.ggml.add_bos_token"].value is False
    assert md["tokenizer.ggml.model"].value == "gpt2"
    assert "<|im_start|>" in md["tokenizer.chat_template"].value


def test_qwen_default_eos_needs_no_eot(qwen_dir):
    vocab = build_vocab(vocab_model(qwen_dir), qwen_vocab_size())
    assert vocab.eos_ids == [IM_END_ID, ENDOFTEXT_ID]
    assert vocab.eot_id is None and vocab.eom_id is None


def test_ids_outside_the_vocabulary_are_refused(qwen_dir):
    with pytest.raises(CheckpointError, match="outside the vocabulary"):
        build_vocab(vocab_model(qwen_dir, eos=(IM_END_ID, 999_999)), qwen_vocab_size())
    with pytest.raises(CheckpointError, match="rows"):
        build_vocab(vocab_model(qwen_dir), 1000)


def test_non_bpe_tokenizer_is_refused(example_ckpt, tmp_path):
    def wordlevel(tok):
        tok["model"] = {"type": "WordLevel", "vocab": tok["model"]["vocab"], "unk_token": "a"}

    folder = edit_tokenizer(example_ckpt, tmp_path / "ckpt", wordlevel)
    model = read_checkpoint(folder)
    with pytest.raises(UnsupportedError, match="byte-level BPE"):
        build_vocab(model, model.text.vocab_size)
