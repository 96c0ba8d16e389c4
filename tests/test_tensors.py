"""Lazy tensor helpers: every way of reading gives the same numbers, and row reads stay row
reads (writers stream big tensors a slice of rows at a time)."""

from __future__ import annotations

import numpy as np
import pytest

from mmconvert.convert.tensors import (
    Origin,
    TensorRef,
    computed_tensor,
    concat_tensors,
    stack_tensors,
)

rng = np.random.default_rng(0)


def array_ref(name: str, data: np.ndarray, reads: list | None = None) -> TensorRef:
    """A file-like tensor that records the row ranges it is asked for."""

    def load(rows):
        if reads is not None:
            reads.append(rows)
        return data if rows is None else data[rows[0]:rows[1]]

    return TensorRef(name, "F32", data.shape, name, None, load)


def test_item_reads_one_expert_only():
    reads: list = []
    parts = [array_ref(f"e{i}", rng.standard_normal((3, 4)).astype(np.float32), reads)
             for i in range(4)]
    stacked = stack_tensors("experts", parts, "stack_experts", "e*")
    assert stacked.origin == Origin("stack", names=("e0", "e1", "e2", "e3"))
    two = stacked.item(2, "select_expert(2)")
    assert two.shape == (3, 4) and two.origin is None and not two.row_streamable
    assert np.array_equal(two.read(), parts[2].read())
    want = parts[2].read()[1:3]
    reads.clear()
    assert np.array_equal(two.read_rows(1, 3), want)
    assert reads == [None]  # expert 2 alone was read, once
    assert two.derivation == ("stack_experts", "select_expert(2)")


@pytest.mark.parametrize("axis", [0, 1])
def test_concat_reads_rows_across_parts(axis):
    a = rng.standard_normal((5, 3)).astype(np.float32)
    b = rng.standard_normal((2, 3) if axis == 0 else (5, 4)).astype(np.float32)
    fused = concat_tensors("fused", [array_ref("a", a), array_ref("b", b)], axis, "fuse")
    whole = np.concatenate([a, b], axis=axis)
    assert fused.shape == whole.shape and np.array_equal(fused.read(), whole)
    rows = whole.shape[0]
    for lo in range(rows):
        for hi in range(lo + 1, rows + 1):
            assert np.array_equal(fused.read_rows(lo, hi), whole[lo:hi]), (lo, hi)
    assert fused.row_streamable


def test_concat_refuses_mixed_dtypes():
    a = array_ref("a", np.zeros((2, 2), np.float32))
    b = TensorRef("b", "BF16", (2, 2), "b", None, lambda rows: np.zeros((2, 2), np.uint16))
    with pytest.raises(ValueError, match="different dtypes"):
        concat_tensors("x", [a, b], 0, "fuse")


def test_computed_tensor_combines_inputs_lazily():
    calls = []
    x = array_ref("x", np.arange(6, dtype=np.float32).reshape(2, 3))
    y = array_ref("y", np.ones((3, 2), np.float32))

    def product(a, b):
        calls.append(1)
        return a @ b

    out = computed_tensor("xy", [x, y], product, (2, 2), "F32", "product")
    assert not calls  # nothing computed until read
    assert np.array_equal(out.read(), x.read() @ y.read())
    assert np.array_equal(out.read_rows(1, 2), (x.read() @ y.read())[1:2])
    assert out.source_name == "x+y" and out.derivation == ("product",)
