"""What a bundle's computed projector tensors must hold, recomputed from the source.

Some targets store a projector tensor that is no canonical tensor as it is (see
:mod:`mmconvert.convert.projector_export`): the projector GGUF keeps a tanh gate as its
multiplier (``scale = tanh(g)`` or ``1 - tanh(g)``), and ``--fold-linear`` replaces linear maps
with nothing between them by their product. The bundle's own projector description says so
(a ``scale`` layer with a gate, a linear layer with ``folded_from``); from it this module
derives, for each such tensor, the canonical tensors it stands for and the value it should
hold, so the tensor check still compares every number with the checkpoint's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from mmconvert.convert import transforms
from mmconvert.convert.model import ProjectorSpec
from mmconvert.verify.backends import BundleTensor

SourceReader = Callable[[str], np.ndarray | None]


def _gate(gate: str, complementary: bool):
    def expect(read: SourceReader) -> np.ndarray | None:
        g = read(gate)
        return None if g is None else transforms.apply_tanh_gate(g, complementary)

    return expect


def _fold(weights: list[str], biases: list[str], which: int):
    def expect(read: SourceReader) -> np.ndarray | None:
        ws = [read(n) for n in weights]
        if any(w is None for w in ws):
            return None
        folded = transforms.fold_linear(ws, [read(n) for n in biases])[which]
        return None if folded is None else folded.astype(np.float32)

    return expect


def derivations(specs: dict[str, ProjectorSpec]) -> dict[str, tuple[tuple[str, ...], str, Callable]]:
    """Bundle tensor name -> (canonical tensors covered, step, expected value from the source)."""
    out: dict[str, tuple[tuple[str, ...], str, Callable]] = {}
    for modality, spec in specs.items():
        p = f"mm.{modality}."
        for layer in spec.layers:
            if layer.kind == "scale" and layer.gate:
                gate = f"{p}{layer.name}.gate"
                out[f"{p}{layer.name}.scale"] = (
                    (gate,), f"apply_tanh_gate(complementary={layer.complementary})",
                    _gate(gate, layer.complementary))
            if layer.folded_from:
                weights = [f"{p}{n}.weight" for n in layer.folded_from]
                biases = [f"{p}{n}.bias" for n in layer.folded_from]
                step = f"fold_linear({' @ '.join(reversed(layer.folded_from))})"
                out[f"{p}{layer.name}.weight"] = (tuple(weights), step, _fold(weights, biases, 0))
                out[f"{p}{layer.name}.bias"] = (tuple(biases) + tuple(weights[1:]), step,
                                                _fold(weights, biases, 1))
    return out


def with_derivations(tensors: list[BundleTensor], specs: dict[str, ProjectorSpec]
                     ) -> list[BundleTensor]:
    """``tensors`` with the computed ones marked (``covers``, ``expect``, ``derivation``)."""
    known = derivations(specs)
    out = []
    for bt in tensors:
        found = known.get(bt.name)
        if found is not None:
            covers, step, expect = found
            bt = replace(bt, covers=covers, expect=expect, derivation=step)
        out.append(bt)
    return out
