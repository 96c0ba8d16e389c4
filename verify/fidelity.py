"""A quantized bundle is judged on its conversion, not on what quantization costs.

Against the source's logits, a correct Q8_0 GGUF of a deep random-weight model measures mean
KLD ~0.7 (rounding amplified layer after layer): that measures the model's sensitivity, and a
user cannot act on it. So for every quantized GGUF target verify reports two things:

- **conversion fidelity**, which decides PASS/FAIL: the bundle's tensors equal the
  quantization of the source (:mod:`mmconvert.verify.tensorcheck`), and the runtime's logits
  match the **dequantized reference**: the reference forward (the source's own config and
  code) run on the bundle's dequantized weights. What a correct conversion changes (the
  weights' values) is in both; what a conversion bug changes (metadata, layout, a runtime that
  reads the file differently) is in one only. Limits: :data:`FIDELITY_LIMITS`.
- **quantization loss**: the runtime's logits against the source reference (KLD, top-1),
  beside llama.cpp's published figures for the type (``verify.thresholds.PUBLISHED``); a
  failure only under a user's quality gate (``--max-kld``, ``--min-top1``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mmconvert.convert.model import CanonicalModel
from mmconvert.verify.backends import BundleTensor, Target
from mmconvert.verify.reference import TensorLoader, canonical_loaders, canonical_to_neox

EXACT_OUTPUT_TYPES = ("auto", "same", "F32", "F16", "BF16", "F64")

# runtime vs dequantized reference, per backend. gguf_torch runs the same forward code on the
# same text weights and differs only in what the GGUF declares (measured: 0), and in projector
# tensors the file stores computed (a fold, a gate applied) and rounded to its type, where the
# dequantized reference runs the source's own (F16 rounding: max|Δ| ~2e-3, mean KLD ~1e-9 on
# the example's kinds): F16's distribution limits. llama.cpp's CPU kernels also round the
# activations of every quantized matmul to 8 bits (Q8_0 / Q8_K blocks) and reduce in their own
# order: a looser bound (docs/verification.md, "Fidelity and quantization loss").
FIDELITY_LIMITS: dict[str, dict[str, float]] = {
    "gguf_torch": {"mean_kld": 1e-4, "top1": 0.99},
    "gguf_llama": {"mean_kld": 2e-2, "top1": 0.9},
}
FIDELITY_FALLBACK = {"mean_kld": 2e-2, "top1": 0.9}

# backends whose matmuls round their inputs (:mod:`mmconvert.verify.llama_rounding`): their
# dequantized reference rounds the same way
INPUT_ROUNDING: dict[str, str] = {"gguf_llama": "llama.cpp"}
# unquantized types whose matmul inputs such a backend rounds (F32 keeps them)
ROUNDED_EXACT_TYPES = ("F16", "BF16")


def rejudged_with_rounding(target: Target) -> bool:
    """An unquantized target whose runtime rounds its matmul inputs: judged against the source
    first, and against its own weights with rounded inputs if its logits alone fail (its
    runtime logits are kept for that)."""
    return target.backend in INPUT_ROUNDING and target.output_type in ROUNDED_EXACT_TYPES


def widened_limits(limits: dict[str, float], sensitivity: dict[str, float]
                   ) -> dict[str, float]:
    """The fidelity limits on a model that amplifies rounding. ``sensitivity`` compares the
    dequantized reference without input rounding to the one with it: how far llama.cpp's
    rounding of the matmul inputs alone moves this model. What the emulation cannot repeat bit
    for bit (ggml's summation order, so a value on a rounding edge going the other way) moves
    such a model too: measured 18-52 % of the sensitivity on the bench's random shapes. The
    runtime is held to sit no farther from the rounded reference than the unrounded forward
    does (mean KLD, top-1), where that is looser than ``limits``: it computes this network
    with llama.cpp's rounding, not another network."""
    out = dict(limits)
    if "mean_kld" in out:
        out["mean_kld"] = max(out["mean_kld"], sensitivity["mean_kld"])
    if "top1" in out:
        out["top1"] = min(out["top1"], sensitivity["top1"])
    return out


def is_quantized(target: Target) -> bool:
    """A GGUF target whose text weights are block-quantized (its loss is not a bug)."""
    return target.kind == "gguf" and target.output_type not in EXACT_OUTPUT_TYPES


@dataclass(frozen=True)
class QualityGates:
    """The user's bounds on quantization loss (None: no gate)."""

    max_kld: float | None = None
    min_top1: float | None = None

    def failures(self, loss: dict[str, float] | None) -> list[str]:
        if loss is None:
            return []
        out = []
        if self.max_kld is not None and not loss["mean_kld"] <= self.max_kld:
            out.append(f"mean KLD {loss['mean_kld']:.3g} > --max-kld {self.max_kld:g}")
        if self.min_top1 is not None and not loss["top1"] >= self.min_top1:
            out.append(f"top-1 {100 * loss['top1']:.1f}% < --min-top1 "
                       f"{100 * self.min_top1:.1f}%")
        return out


NO_GATES = QualityGates()


def published(output_type: str) -> dict[str, float | str] | None:
    """llama.cpp's published figures for a type (mean KLD, top-1 on its reference model), as
    :data:`mmconvert.verify.thresholds.PUBLISHED` records them."""
    from mmconvert.verify.thresholds import PUBLISHED

    return PUBLISHED.get(output_type)


def dequantized_loaders(tensors: list[BundleTensor], model: CanonicalModel
                        ) -> dict[str, TensorLoader]:
    """The weights of the dequantized reference: every bundle tensor that stands for a source
    tensor of the same shape (read back dequantized, canonical layout), the source's own
    tensor for the rest (missing ones, computed projector tensors): those are judged by the
    tensor check, and a gap here must not hide a bug elsewhere."""
    import torch

    loaders = canonical_loaders(model)
    interleaved = model.text.rope_layout == "interleaved"
    for bt in tensors:
        ref = model.tensors.get(bt.name)
        expected = ref.shape if ref is not None else None
        if bt.name == "lm_head.weight" and ref is None:  # stored although the source ties it
            expected = model.tensors.get("model.embed_tokens.weight").shape
        if expected is None or bt.expect is not None:
            continue

        def load(bt=bt, shape=tuple(expected)) -> torch.Tensor:
            import numpy as np

            array = np.require(bt.load(), requirements="W")
            if tuple(array.shape) != shape:  # the tensor check reports it; run the source's
                raise _ShapeMismatch
            tensor = torch.from_numpy(array)
            return canonical_to_neox(bt.name, tensor, model.text) if interleaved else tensor

        source = loaders.get(bt.name)
        loaders[bt.name] = _or_source(load, source)
    return loaders


class _ShapeMismatch(Exception):
    pass


def _or_source(load: TensorLoader, source: TensorLoader | None) -> TensorLoader:
    def read():
        try:
            return load()
        except _ShapeMismatch:
            if source is None:
                raise
            return source()

    return read
