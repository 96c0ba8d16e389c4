import numpy as np
import pytest
import torch

from mmconvert.formats import dtypes as D


def test_bf16_round_trip_matches_torch():
    x = torch.randn(4096) * torch.logspace(-30, 30, 4096)
    x[:4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")])
    bits = D.f32_to_bf16(x.numpy())
    expect = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    same = bits == expect
    # NaN payloads may differ; every other value rounds exactly like torch
    assert same[~np.isnan(x.numpy())].all()
    back = D.bf16_to_f32(expect)
    assert np.array_equal(back[~np.isnan(back)],
                          x.to(torch.bfloat16).float().numpy()[~np.isnan(back)])


@pytest.mark.parametrize("src,dst", [("BF16", "F32"), ("BF16", "F16"), ("F32", "BF16"),
                                     ("F16", "F32"), ("F32", "F16"), ("BF16", "BF16")])
def test_convert_matches_torch(src, dst):
    t = torch.randn(64, 8).to(getattr(torch, D.TORCH_NAMES[src]))
    data, dtype = D.from_torch(t)
    assert dtype == src
    out = D.convert(data, src, dst)
    expect = D.from_torch(t.to(getattr(torch, D.TORCH_NAMES[dst])))[0]
    assert np.array_equal(out, expect)
    assert torch.equal(D.to_torch(out, dst), t.to(getattr(torch, D.TORCH_NAMES[dst])))
