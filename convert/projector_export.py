"""The projectors as a target stores them: canonical layers, with tanh gates applied and/or
adjacent linear maps folded, and the lazy tensors that go with them.

* ``apply_gates`` (the projector GGUF): a ``tanh_gate`` layer with raw ``g`` becomes a
  ``scale`` layer holding the multiplier ``tanh(g)`` (or ``1 - tanh(g)``), so a runtime only
  multiplies; the layer keeps ``gate="tanh"`` and ``complementary`` to say where it came from.
  The HF bundle keeps ``g`` (its remote code applies tanh), so it is bit-exact there.
* ``fold_linear`` (``--fold-linear``): linear layers that follow each other with nothing in
  between (a low-rank ``down`` then ``up``) become one linear layer ``<a>_<b>`` with
  ``W = W_b @ W_a`` and ``b = W_b @ b_a + b_b``, computed in float64 and stored as float32;
  the layer lists ``folded_from``. Exact in real arithmetic, so parity shows it; it trades the
  rank-r factorisation's smaller size for one matrix product.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from mmconvert.convert import transforms
from mmconvert.convert.model import LAYER_KINDS, CanonicalModel, ProjectorLayer, ProjectorSpec
from mmconvert.convert.tensors import TensorRef, computed_tensor
from mmconvert.errors import UnsupportedError
from mmconvert.formats.dtypes import to_float32

Exported = tuple[dict[str, ProjectorSpec], list[TensorRef]]


def export_projectors(model: CanonicalModel, *, apply_gates: bool, fold_linear: bool
                      ) -> Exported:
    """(specs as stored, their tensors in layer order, named ``mm.<modality>.<layer>.<param>``)."""
    specs: dict[str, ProjectorSpec] = {}
    refs: list[TensorRef] = []
    for modality, spec in model.projectors.items():
        layers, tensors = _export_layers(spec, model, apply_gates, fold_linear)
        # hidden_dim is the width after the first linear (or gated) layer: a fold moves it
        first = next((x for x in layers if LAYER_KINDS[x.kind].resizes), None)
        specs[modality] = replace(spec, layers=layers,
                                  hidden_dim=first.out_dim if first else spec.hidden_dim)
        refs += tensors
    return specs, refs


def _export_layers(spec: ProjectorSpec, model: CanonicalModel, apply_gates: bool,
                   fold_linear: bool) -> tuple[list[ProjectorLayer], list[TensorRef]]:
    prefix = f"mm.{spec.modality}."
    layers: list[ProjectorLayer] = []
    refs: list[TensorRef] = []
    pending = list(spec.layers)
    while pending:
        layer = pending.pop(0)
        if fold_linear and layer.kind == "linear" and pending and pending[0].kind == "linear":
            chain = [layer]
            while pending and pending[0].kind == "linear":
                chain.append(pending.pop(0))
            folded, tensors = _fold(spec, chain, model)
            layers.append(folded)
            refs += tensors
        elif apply_gates and layer.kind == "tanh_gate":
            scale = replace(layer, kind="scale", gate="tanh")
            refs.append(_applied_gate(model.tensors[f"{prefix}{layer.name}.gate"],
                                      f"{prefix}{layer.name}.scale", layer.complementary))
            layers.append(scale)
        else:
            layers.append(layer)
            refs += [model.tensors[f"{prefix}{layer.name}.{p}"] for p in layer.params()]
    names = [x.name for x in layers]
    if len(set(names)) != len(names):
        raise UnsupportedError(f"modality {spec.modality!r}: folding gives two layers named "
                               f"{sorted({n for n in names if names.count(n) > 1})[0]!r}")
    return layers, refs


def _applied_gate(gate: TensorRef, name: str, complementary: bool) -> TensorRef:
    def apply(a: np.ndarray) -> np.ndarray:
        # looked up at call time so a test can plant a wrong gate in a real conversion
        return transforms.apply_tanh_gate(to_float32(a, gate.dtype), complementary)

    return gate.derive(name, f"apply_tanh_gate(complementary={complementary})", apply,
                       gate.shape, dtype="F32", row_separable=True)


def _fold(spec: ProjectorSpec, chain: list[ProjectorLayer], model: CanonicalModel
          ) -> tuple[ProjectorLayer, list[TensorRef]]:
    prefix = f"mm.{spec.modality}."
    name = "_".join(x.name for x in chain)
    weights = [model.tensors[f"{prefix}{x.name}.weight"] for x in chain]
    biases = [model.tensors.get(f"{prefix}{x.name}.bias") if x.bias else None for x in chain]
    has_bias = any(b is not None for b in biases)
    layer = ProjectorLayer("linear", name, chain[0].in_dim, chain[-1].out_dim, bias=has_bias,
                           folded_from=tuple(x.name for x in chain))
    step = f"fold_linear({' @ '.join(x.name for x in reversed(chain))})"
    n = len(chain)
    inputs = weights + [b for b in biases if b is not None]

    def arrays(*raw: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
        values = [to_float32(a, r.dtype) for a, r in zip(raw, inputs)]
        ws, rest = values[:n], iter(values[n:])
        return ws, [next(rest) if b is not None else None for b in biases]

    def fold_weight(*raw: np.ndarray) -> np.ndarray:
        return transforms.fold_linear(*arrays(*raw))[0].astype(np.float32)

    def fold_bias(*raw: np.ndarray) -> np.ndarray:
        return transforms.fold_linear(*arrays(*raw))[1].astype(np.float32)

    refs = [computed_tensor(f"{prefix}{name}.weight", inputs, fold_weight,
                            (layer.out_dim, layer.in_dim), "F32", step)]
    if has_bias:
        refs.append(computed_tensor(f"{prefix}{name}.bias", inputs, fold_bias,
                                    (layer.out_dim,), "F32", step))
    return layer, refs


def fold_notes(specs: dict[str, ProjectorSpec], fold_linear: bool) -> list[str]:
    """Plan notes saying what ``--fold-linear`` did (or that it found nothing to fold)."""
    if not fold_linear:
        return []
    folded = [f"{m}: {'+'.join(x.folded_from)} -> {x.name}" for m, s in specs.items()
              for x in s.layers if x.folded_from]
    return [f"folded linear maps: {'; '.join(folded)}" if folded else
            "--fold-linear: no adjacent linear layers to fold"]
