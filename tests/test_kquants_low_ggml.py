"""formats/kquants_low.py (Q2_K, Q3_K): bytes equal libggml's ``ggml_quantize_chunk`` block for
block (``quantize_row_q{2,3}_K_ref`` without importance weights, ``_impl`` with them); decoded
values equal libggml's ``dequantize_row_*`` and gguf-py's ``dequantize`` bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from mmconvert.formats import quants
from mmconvert.formats.dtypes import bf16_to_f32
from tests.ggml_c import libggml
from tests.test_iquants_ggml import (
    IMATRIX_KINDS,
    assert_same_blocks,
    check_decode,
    check_type,
    imatrix,
    weight_like_rows,
)

TYPES = ["Q2_K", "Q3_K"]


@pytest.mark.parametrize("kind", IMATRIX_KINDS)
@pytest.mark.parametrize("ggml_type", TYPES)
def test_bytes_equal_libggml(ggml_type: str, kind: str) -> None:
    check_type(ggml_type, kind, seed=100 + TYPES.index(ggml_type) * 10 + IMATRIX_KINDS.index(kind))


@pytest.mark.parametrize("ggml_type", TYPES)
def test_decode_equals_libggml_and_gguf(ggml_type: str) -> None:
    check_decode(ggml_type)


@pytest.mark.parametrize("kind", ["none", "positive"])
@pytest.mark.parametrize("ggml_type", [*TYPES, "IQ4_NL", "IQ4_XS"])
def test_bf16_storage_rows_encode_as_their_f32_values(ggml_type: str, kind: str) -> None:
    """encoder_for("BF16", ...) (what conversion calls) gives libggml's bytes of the widened rows."""
    rng = np.random.default_rng(3)
    rows = weight_like_rows(rng, 8, 1024)
    bits = (rows.view(np.uint32) >> 16).astype(np.uint16)
    w = imatrix(kind, rows.shape[1], rng)
    ours = quants.encoder_for("BF16", ggml_type, w)(bits)
    ref = libggml().quantize(bf16_to_f32(bits), ggml_type, w)
    assert_same_blocks(ours, ref, quants.TYPES[ggml_type].type_size)
