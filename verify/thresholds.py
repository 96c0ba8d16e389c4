"""Pass/fail thresholds on the logit metrics, per output type of the bundle.

The output type is what the bundle stores its weights as: ``same`` (an HF or safetensors
bundle in the source's own dtypes: the forward must reproduce the reference bit for bit up to
kernel order), ``F32``/``F16``/``BF16`` and the GGUF block quantizations; a K-quant mixture
(``Q4_K_M``) is held to the row of its base type (``Q4_K``), the least precise in it. Every value is
documented in ``docs/verification.md`` with the measurements it was calibrated on: correct
bundles of the example checkpoints pass with a wide margin, and each planted conversion bug
(``tests/test_verify_mutations.py``) fails at least one check.

A reference computed in bfloat16 (``--dtype bfloat16``, for models that do not fit in fp32)
carries its own rounding of ~1e-2 relative: absolute-difference limits are dropped and the
distribution limits are relaxed to at least :data:`BF16_REFERENCE` (a type's own looser
limits still apply).

Users override any value with ``--threshold METRIC=VALUE`` (every type) or
``--threshold TYPE.METRIC=VALUE`` (one type); ``VALUE`` may be ``off``.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmconvert.errors import ThresholdError
from mmconvert.formats.gguf_constants import MIXTURE_BASE, base_type
from mmconvert.verify.metrics import METRIC_NAMES

# metrics that must stay at or below their limit; the others must reach at least theirs
UPPER_BOUNDS = ("max_abs", "nmse", "mean_kld", "max_kld")

THRESHOLDS: dict[str, dict[str, float]] = {
    # same dtype as the source: the same numbers through the same kind of forward pass
    "same": {"max_abs": 1e-5},
    # F32 GGUF: exact weights; only kernel summation order differs (llama.cpp vs torch)
    "F32": {"max_abs": 1e-3},
    # half precision: weights rounded once, the distribution must not move
    "F16": {"mean_kld": 1e-4, "top1": 1.0},
    "BF16": {"mean_kld": 1e-4, "top1": 1.0},
    # 8-bit blocks: llama.cpp reports ~1.4e-3 KLD / 97.7 % top-1 on Llama-3-8B
    "Q8_0": {"mean_kld": 1e-3, "top1": 0.99},
    # 4/5-bit blocks: a sanity bound on the distribution only (top-1 on a flat random model
    # measures the model, not the conversion); their tensors are still checked block by
    # block against the quantization error bound, which is what catches a broken block
    "Q5_0": {"mean_kld": 2e-2},
    "Q5_1": {"mean_kld": 2e-2},
    "Q4_0": {"mean_kld": 5e-2},
    "Q4_1": {"mean_kld": 5e-2},
    # K-quants and IQ4, by base type (a mixture's least precise): sanity bounds too, 3-5x over
    # what correct mixtures of a 256-wide random model measure (docs/verification.md, beside
    # llama.cpp's published Llama-3-8B figures); the tensor check compares every block exactly
    "Q6_K": {"mean_kld": 5e-3},
    "Q5_K": {"mean_kld": 1.5e-2},
    "Q4_K": {"mean_kld": 5e-2},
    "IQ4_NL": {"mean_kld": 5e-2},
    "IQ4_XS": {"mean_kld": 5e-2},
    "Q3_K": {"mean_kld": 1.5e-1},
    "Q2_K": {"mean_kld": 4e-1},
}

# llama.cpp's published figures, for reports beside a bundle's own quantization loss: mean KLD
# against FP16 and "same top p" (top1) of Llama-3-8B on Wikitext, by file type (the K types by
# their llama-quantize mixture). Source: the pinned llama.cpp's tools/perplexity/README.md,
# "LLaMA 3 8b Scoreboard" (KLD, no imatrix unless noted) and "LLaMA 2 vs. LLaMA 3 Quantization
# comparison" (top1: q2_K, q4_K_M, q6_K, q8_0 only). IQ4_NL / IQ4_XS are published with an
# importance matrix only ("WT 10m": 10 M Wikitext tokens).
_LLAMA3_8B = "Llama-3-8B"
PUBLISHED: dict[str, dict[str, float | str]] = {
    "Q8_0": {"mean_kld": 0.001355, "top1": 0.97674, "model": _LLAMA3_8B},
    "Q6_K": {"mean_kld": 0.005452, "top1": 0.96031, "model": _LLAMA3_8B},
    "Q5_K_M": {"mean_kld": 0.010762, "model": _LLAMA3_8B},
    "Q5_K_S": {"mean_kld": 0.016595, "model": _LLAMA3_8B},
    "Q5_1": {"mean_kld": 0.018045, "model": _LLAMA3_8B},
    "Q5_0": {"mean_kld": 0.022239, "model": _LLAMA3_8B},
    "Q4_K_M": {"mean_kld": 0.031273, "top1": 0.91901, "model": _LLAMA3_8B},
    "Q4_K_S": {"mean_kld": 0.043136, "model": _LLAMA3_8B},
    "IQ4_NL": {"mean_kld": 0.035742, "imatrix": "WT 10m", "model": _LLAMA3_8B},
    "IQ4_XS": {"mean_kld": 0.036334, "imatrix": "WT 10m", "model": _LLAMA3_8B},
    "Q4_1": {"mean_kld": 0.071683, "model": _LLAMA3_8B},
    "Q4_0": {"mean_kld": 0.071940, "model": _LLAMA3_8B},
    "Q3_K_L": {"mean_kld": 0.087176, "model": _LLAMA3_8B},
    "Q3_K_M": {"mean_kld": 0.101913, "model": _LLAMA3_8B},
    "Q3_K_S": {"mean_kld": 0.228217, "model": _LLAMA3_8B},
    "Q2_K": {"mean_kld": 0.445132, "top1": 0.71138, "model": _LLAMA3_8B},
}

# on the example, a bf16 reference against exact bundles measures mean KLD ~3e-5 and Q8_0 ones
# ~2e-4, top-1 ≥ 99.9 %; these floors leave a 5x (Q8_0) to 30x (exact) margin
BF16_REFERENCE: dict[str, float] = {"mean_kld": 1e-3, "top1": 0.97}
FALLBACK = "Q2_K"  # an output type without its own row (or base type's) is held to the loosest


@dataclass(frozen=True)
class Override:
    metric: str
    value: float | None  # None: the check is off
    output_type: str | None = None  # None: every type


def parse_override(text: str) -> Override:
    """``METRIC=VALUE`` or ``TYPE.METRIC=VALUE``; VALUE a number or ``off``."""
    if "=" not in text:
        raise ThresholdError(f"--threshold {text!r}: expected METRIC=VALUE, e.g. mean_kld=1e-3")
    key, raw = (s.strip() for s in text.split("=", 1))
    output_type, _, metric = key.rpartition(".")
    if metric not in METRIC_NAMES:
        raise ThresholdError(f"--threshold {text!r}: unknown metric {metric!r}; use one of "
                             f"{', '.join(METRIC_NAMES)}")
    if output_type and output_type not in THRESHOLDS and output_type not in MIXTURE_BASE:
        raise ThresholdError(f"--threshold {text!r}: unknown output type {output_type!r}; use "
                             f"one of {', '.join(THRESHOLDS)} or a mixture "
                             f"({', '.join(MIXTURE_BASE)})")
    if raw.lower() in ("off", "none"):
        return Override(metric, None, output_type or None)
    try:
        value = float(raw)
    except ValueError as exc:
        raise ThresholdError(f"--threshold {text!r}: {raw!r} is not a number or 'off'") from exc
    return Override(metric, value, output_type or None)


def thresholds_for(output_type: str, overrides: list[Override] = (),
                   reference_dtype: str = "float32") -> dict[str, float]:
    """The limits that apply to one bundle (built-ins, then the user's overrides). A mixture
    takes its base type's row; an override for the base type (``Q4_K.mean_kld``) applies to
    every mixture of it, one for the mixture (``Q4_K_M.mean_kld``) to that one alone."""
    base = THRESHOLDS.get(output_type) or THRESHOLDS.get(base_type(output_type)) or \
        THRESHOLDS[FALLBACK]
    if reference_dtype == "bfloat16":
        limits = {"mean_kld": max(base.get("mean_kld", 0.0), BF16_REFERENCE["mean_kld"])}
        if "top1" in base or "max_abs" in base:
            limits["top1"] = min(base.get("top1", 1.0), BF16_REFERENCE["top1"])
    else:
        limits = dict(base)
    for o in overrides:
        if o.output_type in (None, output_type, base_type(output_type)):
            if o.value is None:
                limits.pop(o.metric, None)
            else:
                limits[o.metric] = o.value
    return limits


def check(values: dict[str, float], limits: dict[str, float]) -> list[str]:
    """One message per metric outside its limit (empty: pass)."""
    failures = []
    for metric, limit in limits.items():
        value = values[metric]
        if metric in UPPER_BOUNDS:
            if not value <= limit:  # written so that NaN fails
                failures.append(f"{metric} {value:.3g} > {limit:g}")
        elif not value >= limit:
            failures.append(f"{metric} {value:.4g} < {limit:g}")
    return failures
