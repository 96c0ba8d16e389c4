"""Why a tensor differs: test the usual conversion bugs against a mismatching tensor.

Given a bundle tensor that failed :func:`mmconvert.verify.tensorcheck.compare_tensor`, each
hypothesis rebuilds what the tensor would look like under one known bug (Q/K rope permutation,
a sibling tensor swapped in, experts out of order, rows shifted by one, the embedding used as
the output matrix, a scale factor, a few corrupted rows or blocks; for projectors a tanh gate
applied twice, not at all or inverted, a fold in the wrong order or without the first bias)
and keeps the first that explains the bytes within the same tolerance. The result is a one-line hint shown next to the tensor in reports.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.transforms import interleaved_to_neox, neox_to_interleaved
from mmconvert.verify.tensorcheck import QUANT_BOUNDS, TensorDiff, _bad_mask

SourceReader = Callable[[str], np.ndarray | None]

SIBLINGS = {
    "mlp.gate_proj.weight": "mlp.up_proj.weight",
    "mlp.up_proj.weight": "mlp.gate_proj.weight",
    "self_attn.q_norm.weight": "self_attn.k_norm.weight",
    "self_attn.k_norm.weight": "self_attn.q_norm.weight",
    "input_layernorm.weight": "post_attention_layernorm.weight",
    "post_attention_layernorm.weight": "input_layernorm.weight",
    "self_attn.k_proj.weight": "self_attn.v_proj.weight",
    "self_attn.v_proj.weight": "self_attn.k_proj.weight",
    "mlp.experts.gate_proj": "mlp.experts.up_proj",
    "mlp.experts.up_proj": "mlp.experts.gate_proj",
}


def _matches(bundle: np.ndarray, candidate: np.ndarray | None, dtype: str,
             derived: bool = False) -> bool:
    if candidate is None or candidate.shape != bundle.shape:
        return False
    mask = _bad_mask(bundle, candidate.astype(np.float32), dtype, derived)
    return mask is not None and not mask.any()


def _rope_heads(name: str, model: CanonicalModel) -> int | None:
    if re.search(r"self_attn\.q_proj\.(weight|bias)$", name):
        return model.text.num_attention_heads
    if re.search(r"self_attn\.k_proj\.(weight|bias)$", name):
        return model.text.num_key_value_heads
    if re.search(r"self_attn\.[qk]_norm\.weight$", name):
        return 1
    return None


def _rope(diff: TensorDiff, bundle, source, model, read) -> str | None:
    """Bundle tensors arrive with the runtime's rope permutation already undone, so a tensor
    that still looks permuted had it applied once too often, or once too few."""
    heads = _rope_heads(diff.name, model)
    if heads is None or source.shape[0] % (2 * heads):
        return None
    interleaved = model.text.rope_layout == "interleaved"
    if _matches(bundle, neox_to_interleaved(source, heads), diff.dtype) and interleaved:
        return ("the rope-layout permutation (interleaved -> rotate-half) is missing on this "
                "tensor: the checkpoint is interleaved, and Q/K rows and the q/k norm weights "
                "must all be permuted per head")
    for fn in (interleaved_to_neox, neox_to_interleaved):
        if _matches(bundle, fn(source, heads), diff.dtype):
            if interleaved:
                return ("Q/K rows permuted per head twice: the rope-layout permutation was "
                        "applied again on top of the one the interleaved checkpoint needs")
            return ("Q/K rows permuted per head: a rope-layout permutation was applied "
                    "although the checkpoint is already rotate-half (neox) like the runtime")
    return None


def _sibling(diff: TensorDiff, bundle, source, model, read) -> str | None:
    glu = re.match(r"(mm\.[^.]+\.[^.]+\.)(gate|up)\.(weight|bias)$", diff.name)
    if glu:
        other = f"{glu.group(1)}{'up' if glu.group(2) == 'gate' else 'gate'}.{glu.group(3)}"
        if _matches(bundle, read(other), diff.dtype):
            return (f"holds the checkpoint's {other}: gate and up of the gated projector are "
                    "swapped (act(gate(x)) * up(x) is not symmetric; check which half of a "
                    "fused gate_up is the gate)")
        return None
    m = re.match(r"(model\.layers\.)(\d+)\.(.*)", diff.name)
    if not m:
        return None
    prefix, layer, suffix = m.group(1), int(m.group(2)), m.group(3)
    other = SIBLINGS.get(suffix)
    if other and _matches(bundle, read(f"{prefix}{layer}.{other}"), diff.dtype):
        return f"holds the checkpoint's {prefix}{layer}.{other}: the two are swapped"
    for delta in (-1, 1):
        name = f"{prefix}{layer + delta}.{suffix}"
        if _matches(bundle, read(name), diff.dtype):
            return f"holds the checkpoint's {name}: layers are off by {delta:+d}"
    return None


def _experts(diff: TensorDiff, bundle, source, model, read) -> str | None:
    """Stacked Qwen3-MoE experts written or read back in the wrong order."""
    if source.ndim != 3 or ".mlp.experts." not in diff.name:
        return None
    moved = []
    for e in range(source.shape[0]):
        if _matches(bundle[e], source[e], diff.dtype):
            continue
        found = next((j for j in range(source.shape[0])
                      if _matches(bundle[e], source[j], diff.dtype)), None)
        if found is None:
            return None
        moved.append(f"expert {e} holds expert {found}")
    return f"experts are out of order ({', '.join(moved)})" if moved else None


def _shift(diff: TensorDiff, bundle, source, model, read) -> str | None:
    if source.ndim != 2 or source.shape[0] < 3:
        return None
    for k in (1, -1):
        rolled = np.roll(source, k, axis=0)
        inner = slice(1, -1)  # the wrapped row is whatever the bug put there
        if _matches(bundle[inner], rolled[inner], diff.dtype):
            what = ("the vocabulary is off by one row" if "embed" in diff.name or
                    "lm_head" in diff.name else "rows are off by one")
            return f"rows shifted by {k:+d} (bundle row i holds checkpoint row i{-k:+d}): {what}"
    return None


def _output(diff: TensorDiff, bundle, source, model, read) -> str | None:
    if diff.name != "lm_head.weight":
        return None
    if model.tied:
        return ("the checkpoint ties the output matrix to the embedding, but the bundle "
                "stores a different output matrix")
    if _matches(bundle, read("model.embed_tokens.weight"), diff.dtype):
        return ("the output matrix is the embedding (tied), but the checkpoint has its own "
                "lm_head")
    return None


def _scale(diff: TensorDiff, bundle, source, model, read) -> str | None:
    flat_s = source.astype(np.float64).ravel()
    denom = float(flat_s @ flat_s)
    if not denom:
        return None
    c = float(bundle.astype(np.float64).ravel() @ flat_s) / denom
    if abs(c - 1) > 1e-3 and _matches(bundle, (source * c).astype(np.float32), diff.dtype):
        return f"the whole tensor is scaled by {c:.4g}"
    return None


def _local(diff: TensorDiff, bundle, source, model, read) -> str | None:
    rows = source.shape[0] if source.ndim > 1 else 1
    if diff.dtype in QUANT_BOUNDS and diff.bad_block_count and diff.bad_block_count <= 4:
        r, c = diff.bad_blocks[0]
        block, factor, _ = QUANT_BOUNDS[diff.dtype]
        s = source.reshape(-1, source.shape[-1])[r, c:c + block].astype(np.float64)
        b = bundle.reshape(-1, bundle.shape[-1])[r, c:c + block].astype(np.float64)
        ratio = float(b @ s / (s @ s)) if s.any() else 0.0
        # the block still holds the right values up to one factor: only its scale is wrong
        if np.abs(b - ratio * s).max() <= 1.1 * factor * abs(ratio) * np.abs(s).max():
            return (f"{diff.bad_block_count} {diff.dtype} block(s) of {block} values out of "
                    f"the quantization error bound, the rest within it: a wrong block scale "
                    f"(block at row {r}, col {c} reads x{ratio:.3g} the source)")
    if source.ndim > 1 and diff.bad_row_count <= max(2, rows // 20) and \
            diff.bad_row_count < rows / 2:
        return (f"only {diff.bad_row_count} of {rows} rows differ (first {diff.bad_rows}): "
                "corrupted rows")
    return None


def _tanh_gate(diff: TensorDiff, bundle, source, model, read) -> str | None:
    """A tanh gate applied when it should not be, twice, not at all, or the wrong way round."""
    from mmconvert.convert.transforms import apply_tanh_gate

    if diff.derivation.startswith("apply_tanh_gate"):  # stored applied (projector GGUF)
        raw = read(diff.covers[0])
        comp = "complementary=True" in diff.derivation
        if raw is None:
            return None
        if _matches(bundle, raw, diff.dtype, True):
            return (f"holds the raw gate g of {diff.covers[0]}: the tanh gate was not applied "
                    "(this file stores the multiplier " + ("1 - tanh(g)" if comp else "tanh(g)")
                    + " that a runtime only multiplies by)")
        if _matches(bundle, apply_tanh_gate(source, comp), diff.dtype, True):
            return "the tanh gate was applied twice (the stored multiplier went through tanh again)"
        if _matches(bundle, apply_tanh_gate(raw, not comp), diff.dtype, True):
            return ("holds " + ("tanh(g)" if comp else "1 - tanh(g)") + " but the layer declares "
                    + ("1 - tanh(g)" if comp else "tanh(g)") + ": the complementary flag of the "
                    "gate is inverted")
        return None
    m = re.fullmatch(r"mm\.([^.]+)\.([^.]+)\.gate", diff.name)
    spec = model.projectors.get(m.group(1)) if m else None
    layer = next((x for x in spec.layers if x.name == m.group(2)), None) if spec else None
    if layer is not None and layer.kind == "tanh_gate":  # stored raw (HF, safetensors)
        for comp in (layer.complementary, not layer.complementary):
            if _matches(bundle, apply_tanh_gate(source, comp), diff.dtype, True):
                return (f"holds {'1 - tanh(g)' if comp else 'tanh(g)'} instead of the raw gate g: "
                        "this bundle keeps g and its code applies tanh, so the gate was applied "
                        "twice")
    return None


def _fold(diff: TensorDiff, bundle, source, model, read) -> str | None:
    """A fold of linear maps computed the wrong way round, or with the first bias dropped."""
    if not diff.derivation.startswith("fold_linear"):
        return None
    if diff.name.endswith(".weight"):
        if source.ndim == 2 and _matches(bundle, source.T, diff.dtype, True):
            return ("the folded matrix is transposed: the fold multiplied the maps in the "
                    "wrong order (W_first^T @ W_second^T instead of W_second @ W_first)")
        return None
    # a folded bias covers the n biases then the n - 1 later weights (verify/derived.py)
    n = (len(diff.covers) + 1) // 2
    last_bias = read(diff.covers[n - 1]) if diff.covers else None
    if _matches(bundle, last_bias, diff.dtype, True):
        return ("the folded bias is the last map's bias alone: the earlier biases must pass "
                "through the later maps (b = W_second @ b_first + b_second)")
    return None


HYPOTHESES = (_tanh_gate, _fold, _output, _rope, _sibling, _experts, _shift, _scale, _local)


def explain(diff: TensorDiff, bundle: np.ndarray, source: np.ndarray, model: CanonicalModel,
            read: SourceReader) -> str:
    """A one-line cause for a mismatching tensor (or a generic description)."""
    for hypothesis in HYPOTHESES:
        hint = hypothesis(diff, bundle, source, model, read)
        if hint:
            return hint
    if diff.name.startswith("mm."):
        return "projector weights differ from the checkpoint's"
    return "values differ throughout the tensor"


def rank(diffs: list[TensorDiff], limit: int = 8) -> list[TensorDiff]:
    """The failing tensors, worst first (missing/shape first, then by relative error)."""
    order = {"missing": 0, "shape": 0, "unexpected": 1, "mismatch": 2}
    bad = [d for d in diffs if not d.ok]
    bad.sort(key=lambda d: (order.get(d.status, 3), -d.rel, -d.bad))
    return bad[:limit]
