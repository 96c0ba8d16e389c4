import math

import pytest
import torch

from mmconvert.verify.metrics import TIE_MARGIN, aggregate, compare_logits
from mmconvert.verify.thresholds import (
    THRESHOLDS,
    ThresholdError,
    check,
    parse_override,
    thresholds_for,
)


def _kld(ref: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(ref.double(), -1)
    return (p * (torch.log_softmax(ref.double(), -1) - torch.log_softmax(test.double(), -1))).sum(-1)


def test_identical_logits_are_perfect():
    ref = torch.randn(10, 50, generator=torch.Generator().manual_seed(0))
    m = compare_logits(ref, ref.clone(), greedy_positions=4)
    assert m.max_abs == 0 and m.nmse == 0 and m.mean_kld == 0 and m.max_kld == 0
    assert m.top1 == m.top1_strict == m.top5 == m.greedy == 1.0
    assert m.greedy_total == 4


def test_metrics_match_hand_computation():
    gen = torch.Generator().manual_seed(1)
    ref = torch.randn(7, 30, generator=gen)
    test = ref + 0.3 * torch.randn(7, 30, generator=gen)
    m = compare_logits(ref, test)
    assert m.max_abs == pytest.approx(float((test - ref).abs().max()), rel=1e-6)
    assert m.nmse == pytest.approx(float(((test - ref) ** 2).sum() / (ref ** 2).sum()), rel=1e-6)
    kld = _kld(ref, test)
    assert m.mean_kld == pytest.approx(float(kld.mean()), rel=1e-9)
    assert m.max_kld == pytest.approx(float(kld.max()), rel=1e-9)
    assert m.top1_strict == float((ref.argmax(-1) == test.argmax(-1)).double().mean())
    overlap = [len(set(ref[i].topk(5).indices.tolist()) & set(test[i].topk(5).indices.tolist()))
               for i in range(7)]
    assert m.top5 == pytest.approx(sum(overlap) / 35)


def test_top1_forgives_only_reference_near_ties():
    ref = torch.tensor([[2.0, 2.0 - TIE_MARGIN / 2, 0.0], [2.0, 1.0, 0.0]])
    test = torch.tensor([[1.0, 3.0, 0.0], [1.0, 3.0, 0.0]])  # both rows pick token 1
    m = compare_logits(ref, test)
    assert m.top1_strict == 0.0
    assert m.top1 == 0.5  # row 0 is a near-tie of the reference, row 1 a real disagreement


def test_greedy_counts_the_agreeing_prefix():
    ref = torch.zeros(6, 4)
    ref[:, 0] = 1.0  # reference always picks token 0
    test = ref.clone()
    test[3, 2] = 5.0  # disagrees at the 2nd continuation position (positions 2..4 compared)
    m = compare_logits(ref, test, greedy_positions=3)
    assert (m.greedy_prefix, m.greedy_total) == (1, 3)
    # the excluded id (the placeholder) never counts as a choice
    test2 = ref.clone()
    test2[2:5, 3] = 9.0
    assert compare_logits(ref, test2, greedy_positions=3, exclude=(3,)).greedy == 1.0


def test_non_finite_logits_fail_everything():
    ref = torch.randn(3, 8)
    test = ref.clone()
    test[1, 2] = math.nan
    m = compare_logits(ref, test)
    assert math.isinf(m.max_abs) and math.isinf(m.mean_kld)
    assert check(m.summary(), THRESHOLDS["Q4_0"]) and check(m.summary(), THRESHOLDS["same"])


def test_aggregate_equals_one_big_case():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 20, generator=gen), torch.randn(9, 20, generator=gen)
    da, db = a + 0.1 * torch.randn(5, 20, generator=gen), b + 0.1 * torch.randn(9, 20, generator=gen)
    total = aggregate([compare_logits(a, da), compare_logits(b, db)])
    whole = compare_logits(torch.cat([a, b]), torch.cat([da, db]))
    for name in ("max_abs", "nmse", "mean_kld", "max_kld", "top1", "top1_strict", "top5"):
        assert total.value(name) == pytest.approx(whole.value(name), rel=1e-9), name


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(torch.zeros(3, 4), torch.zeros(4, 4))


def test_thresholds_and_overrides():
    assert thresholds_for("F32") == {"max_abs": 1e-3}
    assert thresholds_for("Q8_0") == {"mean_kld": 1e-3, "top1": 0.99}
    assert thresholds_for("F16")["top1"] == 1.0
    overrides = [parse_override("mean_kld=2e-3"), parse_override("Q8_0.top1=off"),
                 parse_override("F32.max_abs=5e-4")]
    assert thresholds_for("Q8_0", overrides) == {"mean_kld": 2e-3}
    assert thresholds_for("F32", overrides) == {"max_abs": 5e-4, "mean_kld": 2e-3}
    assert thresholds_for("F16", reference_dtype="bfloat16") == {"mean_kld": 1e-3, "top1": 0.97}
    assert thresholds_for("same", reference_dtype="bfloat16") == {"mean_kld": 1e-3, "top1": 0.97}
    assert thresholds_for("Q4_0", reference_dtype="bfloat16") == {"mean_kld": 5e-2}
    for bad in ("kld=1", "mean_kld", "Q9_9.top1=1", "top1=lots"):
        with pytest.raises(ThresholdError):
            parse_override(bad)


def test_check_directions():
    values = {"max_abs": 2e-3, "top1": 0.995, "mean_kld": 1e-5}
    assert check(values, {"max_abs": 1e-3}) == ["max_abs 0.002 > 0.001"]
    assert check(values, {"top1": 0.99, "mean_kld": 1e-4}) == []
    assert check(values, {"top1": 1.0}) == ["top1 0.995 < 1"]
    assert check({"max_abs": math.nan}, {"max_abs": 1.0})  # NaN never passes
