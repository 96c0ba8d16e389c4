"""Bundle tensors mapped back onto canonical ones where a bundle stores them differently.

A bundle's manifest lists, under ``pieces``, the stored tensors that are not one canonical
tensor as it is (:class:`mmconvert.convert.plan.Piece`): one expert of stacked Qwen3-MoE
experts (``item``: the HF layout and the per-expert source layout) or canonical tensors
concatenated again (``concat``: a fused gate/up in the source layout). Verification compares
and runs canonical tensors, so experts are stacked again and fused tensors split here.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from mmconvert.verify.backends import BundleError, BundleTensor


def _pattern(names: list[str]) -> str:
    """``a.0.b``, ``a.1.b``, ... -> ``a.*.b`` (what reports show for a stacked tensor)."""
    if len(names) == 1:
        return names[0]
    head = os.path.commonprefix(names)
    tail = os.path.commonprefix([n[len(head):][::-1] for n in names])[::-1]
    return f"{head}*{tail}"


def _stacked(canonical: str, items: list[tuple[int, BundleTensor]]) -> BundleTensor:
    items.sort(key=lambda x: x[0])
    parts = [bt for _, bt in items]

    def load() -> np.ndarray:
        return np.stack([bt.load() for bt in parts])

    return BundleTensor(canonical, _pattern([bt.stored_as for bt in parts]), parts[0].dtype,
                        load, sum(bt.numel for bt in parts))


def _split(bt: BundleTensor, piece: dict[str, Any]) -> list[BundleTensor]:
    axis, sizes = int(piece["axis"]), [int(s) for s in piece["sizes"]]
    bounds = np.cumsum([0] + sizes)
    out = []
    for name, lo, hi in zip(piece["parts"], bounds[:-1], bounds[1:]):
        def load(lo=int(lo), hi=int(hi)) -> np.ndarray:
            array = bt.load()
            if array.shape[axis] != bounds[-1]:
                raise BundleError(f"{bt.stored_as}: {array.shape[axis]} entries along axis "
                                  f"{axis}, the manifest's pieces add up to {bounds[-1]}")
            return np.take(array, np.arange(lo, hi), axis=axis)

        out.append(BundleTensor(name, f"{bt.stored_as}[{lo}:{hi}]", bt.dtype, load,
                                bt.numel * (hi - lo) // max(int(bounds[-1]), 1)))
    return out


def canonical_view(tensors: list[BundleTensor], pieces: dict[str, dict[str, Any]]
                   ) -> list[BundleTensor]:
    """``tensors`` (named by the manifest's ``tensors`` map, keyed by ``stored_as``) with
    ``pieces`` undone: experts stacked, concatenations split."""
    out: list[BundleTensor] = []
    items: dict[str, list[tuple[int, BundleTensor]]] = {}
    for bt in tensors:
        piece = pieces.get(bt.stored_as)
        if piece is None:
            out.append(bt)
        elif piece.get("kind") == "item":
            if piece["of"] not in items:
                out.append(BundleTensor(piece["of"], "", "", lambda: None))  # keeps the order
            items.setdefault(piece["of"], []).append((int(piece["index"]), bt))
        elif piece.get("kind") == "concat":
            out += _split(bt, piece)
        else:
            raise BundleError(f"mmconvert.json: unknown piece kind {piece.get('kind')!r} for "
                              f"{bt.stored_as}")
    return [_stacked(bt.name, items[bt.name]) if not bt.stored_as and bt.name in items else bt
            for bt in out]
