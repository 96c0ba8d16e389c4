"""Logit-parity metrics between the reference and a bundle, per case and overall.

- ``max_abs``: max |Δlogit| over every position and vocabulary entry;
- ``nmse``: Σ(Δ²) / Σ(ref²), llama.cpp's conversion guide calls < 1e-4 excellent;
- ``mean_kld`` / ``max_kld``: KL(P_ref ‖ P_bundle) per position (nats), mean and max;
- ``top1``: fraction of positions where the bundle's top token is the reference's, or one the
  reference ranks within :data:`TIE_MARGIN` of its top logit: a near-tie the reference itself
  barely decides. Random tiny models have flat distributions (median top-2 gap ≈ 0.2 nats on
  the example, 14 % of positions within 0.05), so a correct Q8_0 bundle flips ~2 % of plain
  argmaxes, always at gaps below 0.03 nats, where real models flip far less; without the margin
  top-1 would measure the test model rather than the conversion. ``top1_strict`` (plain argmax
  agreement, what llama.cpp's perplexity tool prints) is reported beside it;
- ``top5``: mean |top-5 ∩ top-5| / 5;
- ``greedy``: greedy continuation agreement. The reference's own greedy tokens are part of the
  compared sequence (teacher forcing), so the bundle would generate the same tokens exactly as
  long as its argmax agrees at every continuation position: the metric is the length of that
  agreeing prefix over the number of generated tokens, with one forward pass and no sampling.

Sums rather than means are kept so cases aggregate exactly (:func:`aggregate`). KLD is computed
in float64, a few positions at a time, because values around 1e-8 are what correct F16
bundles give and float32 cancellation would drown them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

METRIC_NAMES = ("max_abs", "nmse", "mean_kld", "max_kld", "top1", "top1_strict", "top5", "greedy")
TIE_MARGIN = 0.05  # nats: the reference's own near-ties do not count as top-1 disagreements
_CHUNK = 64  # positions per float64 block (bounds memory for 150k-entry vocabularies)


@dataclass
class Metrics:
    positions: int = 0
    max_abs: float = 0.0
    sq_err: float = 0.0
    sq_ref: float = 0.0
    kld_sum: float = 0.0
    max_kld: float = 0.0
    top1_hits: int = 0
    top1_strict_hits: int = 0
    top5_sum: float = 0.0
    greedy_total: int = 0  # generated tokens compared
    greedy_prefix: int = 0  # of those, how many before the first disagreement

    @property
    def nmse(self) -> float:
        return self.sq_err / self.sq_ref if self.sq_ref else (0.0 if not self.sq_err else math.inf)

    @property
    def mean_kld(self) -> float:
        return self.kld_sum / self.positions if self.positions else 0.0

    @property
    def top1(self) -> float:
        return self.top1_hits / self.positions if self.positions else 1.0

    @property
    def top1_strict(self) -> float:
        return self.top1_strict_hits / self.positions if self.positions else 1.0

    @property
    def top5(self) -> float:
        return self.top5_sum / self.positions if self.positions else 1.0

    @property
    def greedy(self) -> float:
        return self.greedy_prefix / self.greedy_total if self.greedy_total else 1.0

    def value(self, name: str) -> float:
        return float(getattr(self, name))

    def summary(self) -> dict[str, float | int]:
        """The reported values (what thresholds apply to), plus counts."""
        out: dict[str, float | int] = {name: self.value(name) for name in METRIC_NAMES}
        out.update(positions=self.positions, greedy_tokens=self.greedy_total,
                   greedy_prefix=self.greedy_prefix)
        return out

    def raw(self) -> dict[str, float | int]:
        return asdict(self)


def compare_logits(ref: torch.Tensor, test: torch.Tensor, greedy_positions: int = 0,
                   exclude: tuple[int, ...] = ()) -> Metrics:
    """Metrics of ``test`` against ``ref`` (both ``[T, V]``).

    The last ``greedy_positions + 1`` positions hold the reference's greedy continuation: the
    logits at position ``T - greedy_positions - 1 + k`` chose the k-th generated token.
    ``exclude`` ids are never chosen there (the placeholder, see :meth:`ReferenceModel.greedy`).
    """
    if ref.shape != test.shape:
        raise ValueError(f"logits shapes differ: reference {list(ref.shape)}, bundle "
                         f"{list(test.shape)}")
    ref = ref.float()
    test = test.float()
    m = Metrics(positions=ref.shape[0])
    if not torch.isfinite(test).all():
        # NaN/inf logits: every metric is as bad as it gets (no partial credit to mislead)
        m.max_abs = math.inf
        m.sq_err = math.inf
        m.sq_ref = float((ref.double() ** 2).sum())
        m.kld_sum = math.inf
        m.max_kld = math.inf
        m.greedy_total = greedy_positions
        return m
    for start in range(0, ref.shape[0], _CHUNK):
        r = ref[start:start + _CHUNK].double()
        t = test[start:start + _CHUNK].double()
        diff = t - r
        m.max_abs = max(m.max_abs, float(diff.abs().max()))
        m.sq_err += float((diff ** 2).sum())
        m.sq_ref += float((r ** 2).sum())
        log_r = torch.log_softmax(r, dim=-1)
        log_t = torch.log_softmax(t, dim=-1)
        kld = (log_r.exp() * (log_r - log_t)).sum(dim=-1).clamp_min(0.0)
        m.kld_sum += float(kld.sum())
        m.max_kld = max(m.max_kld, float(kld.max()))
        chosen = t.argmax(-1, keepdim=True)
        m.top1_strict_hits += int((r.argmax(-1, keepdim=True) == chosen).sum())
        best = r.max(-1, keepdim=True).values
        m.top1_hits += int((r.gather(-1, chosen) >= best - TIE_MARGIN).sum())
        k = min(5, r.shape[-1])
        top_r = r.topk(k, dim=-1).indices
        top_t = t.topk(k, dim=-1).indices
        overlap = (top_r.unsqueeze(-1) == top_t.unsqueeze(-2)).any(-1).sum(-1)
        m.top5_sum += float((overlap.double() / k).sum())
    if greedy_positions:
        lo = ref.shape[0] - greedy_positions - 1
        r = ref[lo:lo + greedy_positions].clone()
        t = test[lo:lo + greedy_positions].clone()
        if exclude:
            r[:, list(exclude)] = -math.inf
            t[:, list(exclude)] = -math.inf
        agree = (r.argmax(-1) == t.argmax(-1)).tolist()
        m.greedy_total = greedy_positions
        m.greedy_prefix = agree.index(False) if False in agree else greedy_positions
    return m


def aggregate(parts: list[Metrics]) -> Metrics:
    """Overall metrics: sums add up, maxima take the max (exactly what one big case would give)."""
    total = Metrics()
    for m in parts:
        total.positions += m.positions
        total.max_abs = max(total.max_abs, m.max_abs)
        total.sq_err += m.sq_err
        total.sq_ref += m.sq_ref
        total.kld_sum += m.kld_sum
        total.max_kld = max(total.max_kld, m.max_kld)
        total.top1_hits += m.top1_hits
        total.top1_strict_hits += m.top1_strict_hits
        total.top5_sum += m.top5_sum
        total.greedy_total += m.greedy_total
        total.greedy_prefix += m.greedy_prefix
    return total
