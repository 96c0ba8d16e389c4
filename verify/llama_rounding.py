"""What llama.cpp's CPU matmuls do to their inputs, repeated in the reference forward.

ggml multiplies a weight of type W by activations converted first to W's ``vec_dot_type``
(``type_traits_cpu`` in ggml-cpu.c of the pinned llama.cpp): Q8_0 blocks of 32 for the
32-value types (Q8_1 for Q4_1/Q5_1, the same values), Q8_K blocks of 256 for the K-quants and
IQ4_XS, F16 for F16, BF16 for BF16; F32 stays F32. On a deep network that rounding alone moves
the logits (a random-weight Qwen3-0.6B shape: mean KLD ~0.2 from Q8_0 inputs), so a
dequantized reference that skips it blames the bundle for what the runtime does to every
correct file. :func:`round_matmul_inputs` rounds the input of every ``nn.Linear`` (and of the
MoE experts' gate/up product) of a transformers model the way ggml rounds it for that weight's
type in the bundle; the products and sums stay float32 (ggml sums integer products per block,
then scales: equal up to summation order).

Not repeated: the MoE experts' down projection input (computed inside transformers' expert
loop), and ggml's own summation order and element-wise kernels; what is left is measured
against the model's sensitivity (:func:`mmconvert.verify.fidelity.widened_limits`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

Rounding = Callable[[torch.Tensor], torch.Tensor]

Q8_0_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL")
Q8_K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS")


def round_q8_0(x: torch.Tensor) -> torch.Tensor:
    """ggml-cpu's ``quantize_row_q8_0`` (x86), dequantized: per 32 values, ``d = amax/127``
    stored as F16, ``q = round(x * 127/amax)`` (to nearest even)."""
    blocks = _blocks(x, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, _divide(127.0, amax), 0.0)
    q = torch.round(blocks * inverse) + 0.0  # + 0.0: C's int8 zero has no sign
    d = (amax / 127.0).half().float()
    return (q * d).reshape(x.shape).to(x.dtype)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] % size:
        raise ValueError(f"a row of {x.shape[-1]} values is not a multiple of {size}: ggml "
                         "would not store such a weight in this type")
    return x.float().reshape(-1, size)


def _divide(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` rounded once, as C divides (torch computes ``scalar /
    tensor`` as a reciprocal times the scalar: rounded twice)."""
    safe = torch.where(denominator != 0, denominator, 1.0)
    return torch.full_like(safe, numerator) / safe


def round_q8_k(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``quantize_row_q8_K_ref``, dequantized: per 256 values, ``iscale = -127/max``
    (``max`` the value of largest magnitude, its sign kept), ``q = min(127, round(iscale*x))``
    (nearest even), ``d = 1/iscale`` in float32; an all-zero block stays zero."""
    blocks = _blocks(x, 256)
    index = blocks.abs().argmax(dim=-1, keepdim=True)  # the first of equal magnitudes, as C
    signed_max = blocks.gather(-1, index)
    nonzero = signed_max != 0
    iscale = torch.where(nonzero, _divide(-127.0, signed_max), 0.0)
    q = torch.clamp(torch.round(iscale * blocks), max=127) + 0.0
    d = torch.where(nonzero, _divide(1.0, iscale), 0.0)
    return (q * d).reshape(x.shape).to(x.dtype)


def _through(dtype: torch.dtype) -> Rounding:
    return lambda x: x.to(dtype).to(x.dtype)


def input_rounding(weight_type: str) -> Rounding | None:
    """How ggml-cpu rounds the activations a ``weight_type`` weight multiplies (None: kept)."""
    if weight_type in Q8_0_TYPES:
        return round_q8_0
    if weight_type in Q8_K_TYPES:
        return round_q8_k
    if weight_type == "F16":
        return _through(torch.float16)
    if weight_type == "BF16":
        return _through(torch.bfloat16)
    return None


def round_matmul_inputs(lm: torch.nn.Module, weight_types: Mapping[str, str]) -> list:
    """Hook every matmul of ``lm`` (a transformers Qwen3/Qwen3-MoE CausalLM) whose weight the
    bundle stores with a rounding type: ``weight_types`` maps canonical tensor names (as in
    :func:`mmconvert.verify.reference.transformers_loaders`) to bundle types. Returns the hook
    handles (``handle.remove()`` undoes them)."""
    handles = []

    def hook(rounding: Rounding):
        return lambda _module, args: (rounding(args[0]), *args[1:])

    tied = weight_types.get("lm_head.weight") or weight_types.get("model.embed_tokens.weight")
    for name, module in lm.named_modules():
        if isinstance(module, torch.nn.Linear):
            kind = tied if name == "lm_head" else weight_types.get(f"{name}.weight")
        elif name.endswith(".mlp.experts"):  # the stacked experts: their gate/up input
            kind = weight_types.get(f"{name}.gate_proj")
        else:
            continue
        rounding = input_rounding(kind) if kind else None
        if rounding is not None:
            handles.append(module.register_forward_pre_hook(hook(rounding)))
    return handles
