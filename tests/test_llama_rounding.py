"""The dequantized reference rounds matmul inputs exactly as llama.cpp's CPU backend does.

Compared with the real thing: ``libggml-cpu.so`` from the llama-cpp-python wheel tells which
type each weight type's matmul converts its input to (``vec_dot_type``) and converts it
(``from_float``, what a matmul runs; the wheel is built for this machine's AVX, whose Q8_0
path rounds ties to even). Every bundle type mmconvert writes is covered, on random rows and
on edge blocks (all zeros, tiny, a lone outlier, negative maxima, ±0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmconvert.verify.llama_rounding import input_rounding, round_matmul_inputs
from tests.ggml_c import libggml_cpu

ROUNDED = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL",
           "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]


def _rows() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((24, 512)).astype(np.float32)
    x[1] = 0.0
    x[2, :256] = -0.0
    x[3] *= np.float32(1e-30)  # subnormal products
    x[4, :] = 0.0
    x[4, 300] = -7.0  # a lone negative outlier: the Q8_K scale's sign
    x[5] *= 1e4
    x[6, :32] = 1.0  # a constant block: every value on the maximum
    x[7, ::2] = -x[7, 1::2]  # equal magnitudes of both signs: the first one sets Q8_K's sign
    x[8] = np.round(x[8] * 4) / 4 * np.float32(127 / 3.0)  # values on rounding edges
    return x


@pytest.mark.llama
def test_the_input_type_of_every_weight_type_is_ggmls():
    cpu = libggml_cpu()
    expected = {"F16": "F16", "BF16": "BF16", "F32": "F32"}
    for t in ROUNDED:
        got = cpu.vec_dot_type(t)
        want = expected.get(t, "Q8_K" if t.endswith("_K") or t == "IQ4_XS" else "Q8_")
        assert got.startswith(want), (t, got)
    assert input_rounding("F32") is None and cpu.vec_dot_type("F32") == "F32"


@pytest.mark.llama
@pytest.mark.parametrize("weight_type", ROUNDED)
def test_rounding_is_the_cpu_kernels_bit_for_bit(weight_type):
    x = _rows()
    want = libggml_cpu().convert_input(x, weight_type)
    got = input_rounding(weight_type)(torch.from_numpy(x)).numpy()
    differ = got.view(np.uint32) != want.view(np.uint32)
    assert not differ.any(), (f"{int(differ.sum())} values differ, first at "
                              f"{np.argwhere(differ)[0].tolist()}")


def test_hooks_round_each_linear_by_its_weight_type(example_ckpt):
    """Each nn.Linear computes with its input rounded for its own weight's type; F32 weights
    are left alone; removing the handles restores the plain forward."""
    from mmconvert.convert.readers import read_checkpoint
    from mmconvert.verify.reference import ReferenceModel

    model = read_checkpoint(example_ckpt)
    lm = ReferenceModel(model).lm
    types = {"model.layers.0.self_attn.q_proj.weight": "Q8_0",
             "model.layers.0.mlp.down_proj.weight": "Q5_0",
             "model.layers.1.mlp.up_proj.weight": "F16",
             "model.layers.1.self_attn.o_proj.weight": "F32",
             "lm_head.weight": "BF16"}
    linears = {name: m for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}

    def watch(store: dict) -> list:
        return [m.register_forward_pre_hook(
            lambda _m, args, name=name: store.__setitem__(name, args[0].clone()))
            for name, m in linears.items()]

    given: dict[str, torch.Tensor] = {}
    used: dict[str, torch.Tensor] = {}
    handles = watch(given)  # pre-hooks run in order: before the rounding, then after it
    rounding = round_matmul_inputs(lm, types)
    handles += watch(used)
    assert len(rounding) == 4  # q_proj, down_proj, up_proj, lm_head
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        rounded = lm(ids).logits
    for name in linears:
        kind = types.get(f"{name}.weight")
        expect = input_rounding(kind)(given[name]) if input_rounding(kind or "F32") else \
            given[name]
        assert torch.equal(used[name], expect), name
    assert not torch.equal(used["lm_head"], given["lm_head"])
    for handle in rounding + handles:
        handle.remove()
    with torch.no_grad():
        plain = lm(ids).logits
    assert not torch.equal(plain, rounded)


def test_rows_must_fill_whole_blocks():
    """A row that is not a whole number of blocks is refused, not rounded across rows."""
    with pytest.raises(ValueError, match="multiple of 256"):
        input_rounding("Q4_K")(torch.zeros(4, 128))
    with pytest.raises(ValueError, match="multiple of 32"):
        input_rounding("Q8_0")(torch.zeros(4, 48))
