"""formats.gguf_reader on files gguf-py writes: string arrays skipped by their lengths alone
(the vocabulary's 150 k tokens) read back right, and damaged ones are refused."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from mmconvert.formats.gguf_reader import GGUFReader

TOKENS = [f"tok{i}" * (i % 5) for i in range(3000)] + ["Ġé漢", ""]


@pytest.fixture
def vocab_gguf(tmp_path):
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_array("tokenizer.ggml.tokens", TOKENS)
    writer.add_array("tokenizer.ggml.merges", ["a b", "c d"])
    writer.add_uint32("after.the.arrays", 7)
    writer.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tokens_field(path):
    """(offset of the tokens array's item count, offset just past the array)."""
    field = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]
    count_at = field.offset + 8 + len("tokenizer.ggml.tokens") + 4 + 4
    end = count_at + 8 + sum(8 + len(t.encode()) for t in TOKENS)
    return count_at, end


def test_string_arrays_are_skipped_to_the_right_place(vocab_gguf):
    reader = GGUFReader(vocab_gguf)
    assert reader.value("tokenizer.ggml.tokens") == TOKENS
    assert reader.value("tokenizer.ggml.merges") == ["a b", "c d"]
    assert reader.value("after.the.arrays") == 7  # parsed after skipping both arrays
    assert reader.tensors["w"].shape == (3, 4)
    np.testing.assert_array_equal(reader.tensor_array("w"), np.arange(12).reshape(3, 4))


def test_a_file_cut_inside_a_string_array_is_refused(vocab_gguf, tmp_path):
    _, end = _tokens_field(vocab_gguf)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(vocab_gguf.read_bytes()[:end - 1000])
    with pytest.raises(ValueError, match="truncated"):
        GGUFReader(cut)


def test_a_string_length_past_the_end_is_refused(vocab_gguf, tmp_path):
    count_at, _ = _tokens_field(vocab_gguf)
    data = bytearray(vocab_gguf.read_bytes())
    first_length = count_at + 8
    data[first_length:first_length + 8] = struct.pack("<Q", 1 << 40)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated"):
        GGUFReader(bad)
