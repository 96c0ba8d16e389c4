"""Bringing a source's Q/K into the rope layout the targets use.

HF Qwen3 and llama.cpp's ``qwen3``/``qwen3moe`` both rotate halves (NEOX). A source trained
with the interleaved-pair layout has Q and K output rows permuted per head (K with
``num_key_value_heads``); the per-head ``q_norm``/``k_norm`` weights act on the same head
vector before rope, so they get the same permutation (with one "head" of ``head_dim``).
A NEOX source needs nothing.
"""

from __future__ import annotations

from dataclasses import replace

from mmconvert.convert.model import CanonicalModel, TextSpec
from mmconvert.convert.tensors import TensorRef
from mmconvert.convert.transforms import interleaved_to_neox, neox_to_interleaved


def neox_from_interleaved(ref: TensorRef, n_heads: int) -> TensorRef:
    """``ref`` with each head's rows reordered interleaved -> NEOX, still row-streamable: a row
    slice reads the whole heads around it, permutes them and returns the asked rows."""
    head_dim = ref.shape[0] // n_heads
    derived = ref.derive(ref.name, f"interleaved_to_neox(heads={n_heads})",
                         lambda a: interleaved_to_neox(a, n_heads), ref.shape)

    def load(rows: tuple[int, int] | None):
        if rows is None:
            return interleaved_to_neox(ref.read(), n_heads)
        start, stop = rows
        first, last = start // head_dim, -(-stop // head_dim)
        block = ref.read_rows(first * head_dim, last * head_dim)
        out = interleaved_to_neox(block, last - first)
        return out[start - first * head_dim: stop - first * head_dim]

    return replace(derived, loader=load, row_streamable=ref.row_streamable)


def neox_fixups(model: CanonicalModel) -> dict[str, TensorRef]:
    """Canonical name -> permuted tensor, for every tensor an interleaved source needs changed
    (empty for a NEOX source)."""
    text = model.text
    if text.rope_layout == "neox":
        return {}
    heads = {"q_proj": text.num_attention_heads, "k_proj": text.num_key_value_heads}
    fixed: dict[str, TensorRef] = {}
    for i in range(text.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        for proj, n in heads.items():
            for part in ("weight", "bias"):
                ref = model.tensors.get(f"{p}{proj}.{part}")
                if ref is not None:
                    fixed[ref.name] = neox_from_interleaved(ref, n)
        for norm in ("q_norm.weight", "k_norm.weight"):
            fixed[p + norm] = neox_from_interleaved(model.tensors[p + norm], 1)
    return fixed


def undo_neox_fixup(text: TextSpec, canonical: str, array):
    """The inverse of :func:`neox_fixups` for one tensor read back from a bundle (verify
    compares it with the source): identity for a NEOX source or an untouched tensor."""
    if text.rope_layout != "interleaved":
        return array
    attn = canonical.split(".self_attn.", 1)[-1] if ".self_attn." in canonical else ""
    if attn.startswith("q_proj."):
        return neox_to_interleaved(array, text.num_attention_heads)
    if attn.startswith("k_proj."):
        return neox_to_interleaved(array, text.num_key_value_heads)
    if attn.startswith(("q_norm.", "k_norm.")):
        return neox_to_interleaved(array, 1)
    return array
