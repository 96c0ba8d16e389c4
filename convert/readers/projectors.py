"""Projectors as the multimodal config describes them, and their tensors on disk.

Per modality (``modality_configs.<m>``), ``projector_type`` picks the layout (documented with
tensor names in ``docs/dialects.md``); without it, the seed's MLP:

* ``mlp`` (default): the seed's ``nn.Sequential`` -- Linear, [LayerNorm], act, Dropout,
  Linear, [LayerNorm] -- tensors ``<index>.weight/bias``; canonical ``fc1, [norm1], act, fc2,
  [norm2]``.
* ``swiglu``: ``act(gate_proj(x)) * up_proj(x)`` then ``down_proj``, then ``norm`` with layer
  norm; ``gate_proj``/``up_proj`` may be stored fused as ``gate_up_proj [2*hidden, in]``
  (``gate_up_gate_first``, default true, says which half is the gate). Canonical ``glu``
  (params ``gate.*``, ``up.*``), ``down``, [``norm``].
* ``low_rank``: ``down [rank, in]``, then optionally ``norm`` (``layer_norm: true``) and an
  activation (``activation``), then ``up [hidden, rank]``. Canonical ``down, [norm], [act], up``.

Any type may end in a learned tanh gate (``gate: {"kind": "tanh", "complementary": false,
"per_channel": false}``): tensor ``gate`` of shape ``[1]`` (or ``[output_dim]``), applied as
``tanh(g) * y`` (``(1 - tanh(g)) * y`` when complementary); canonical layer ``gate``.

Per-modality ``activation``, ``layer_norm`` and ``bias`` override the global
``projector_hidden_act`` and ``use_layer_norm`` (``low_rank`` has neither unless its modality
asks: its defaults are no activation, no norm).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from mmconvert.convert.errors import CheckpointError
from mmconvert.convert.model import ProjectorLayer, ProjectorSpec
from mmconvert.convert.readers.common import parse_activation
from mmconvert.convert.tensors import Origin, TensorRef

PROJECTOR_TYPES = ("mlp", "swiglu", "low_rank")
SEED_INDEX_WITH_NORM = {0: "fc1", 1: "norm1", 4: "fc2", 5: "norm2"}
SEED_INDEX_WITHOUT_NORM = {0: "fc1", 3: "fc2"}
LN_EPS = 1e-5  # nn.LayerNorm's default, what the seed uses


def seed_projectors(mm_config: dict[str, Any], hidden: int, where: str) -> dict[str, ProjectorSpec]:
    """Every modality's :class:`ProjectorSpec` from a multimodal config."""
    modalities = mm_config.get("modality_configs")
    if not isinstance(modalities, dict) or not modalities:
        raise CheckpointError(f"{where}: modality_configs is missing or empty")
    activation = parse_activation(mm_config.get("projector_hidden_act"), where)
    layer_norm = bool(mm_config.get("use_layer_norm", True))
    dropout = float(mm_config.get("projector_dropout", 0.0) or 0.0)
    return {name: projector_spec(name, m or {}, hidden, activation, layer_norm, dropout, where)
            for name, m in modalities.items()}


def projector_spec(name: str, mcfg: dict[str, Any], text_hidden: int, activation: str,
                   layer_norm: bool, dropout: float, where: str) -> ProjectorSpec:
    """One modality's projector (``activation``/``layer_norm``: the global defaults)."""
    try:
        input_dim = int(mcfg["input_dim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: modality {name!r} has no input_dim") from exc
    kind = str(mcfg.get("projector_type") or "mlp")
    if kind not in PROJECTOR_TYPES:
        raise CheckpointError(f"{where}: modality {name!r} has projector_type {kind!r}; "
                              f"supported: {', '.join(PROJECTOR_TYPES)}")
    bias = bool(mcfg.get("bias", True))
    if kind == "low_rank":
        act = mcfg.get("activation")
        act = None if act in (None, "none", "") else parse_activation(act, where)
        norm = bool(mcfg.get("layer_norm", False))
        try:
            hidden = int(mcfg["rank"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: low_rank modality {name!r} needs an integer "
                                  "rank") from exc
        layers = [ProjectorLayer("linear", "down", input_dim, hidden, bias=bias)]
        if norm:
            layers.append(ProjectorLayer("layer_norm", "norm", hidden, hidden, eps=LN_EPS))
        if act:
            layers.append(ProjectorLayer("act", "act", hidden, hidden, activation=act))
        layers.append(ProjectorLayer("linear", "up", hidden, text_hidden, bias=bias))
    else:
        act = parse_activation(mcfg["activation"], where) if mcfg.get("activation") \
            else activation
        norm = bool(mcfg.get("layer_norm", layer_norm))
        hidden = int(mcfg.get("hidden_dim") or text_hidden)
        if kind == "mlp":
            layers = [ProjectorLayer("linear", "fc1", input_dim, hidden)]
            if norm:
                layers.append(ProjectorLayer("layer_norm", "norm1", hidden, hidden, eps=LN_EPS))
            layers.append(ProjectorLayer("act", "act", hidden, hidden, activation=act))
            layers.append(ProjectorLayer("linear", "fc2", hidden, text_hidden))
            if norm:
                layers.append(ProjectorLayer("layer_norm", "norm2", text_hidden, text_hidden,
                                             eps=LN_EPS))
        else:
            layers = [ProjectorLayer("glu", "glu", input_dim, hidden, activation=act, bias=bias),
                      ProjectorLayer("linear", "down", hidden, text_hidden, bias=bias)]
            if norm:
                layers.append(ProjectorLayer("layer_norm", "norm", text_hidden, text_hidden,
                                             eps=LN_EPS))
    gate = mcfg.get("gate")
    if gate:
        if not isinstance(gate, dict) or gate.get("kind", "tanh") != "tanh":
            raise CheckpointError(f"{where}: modality {name!r}: gate must be "
                                  '{"kind": "tanh", "complementary": bool, "per_channel": bool}')
        layers.append(ProjectorLayer("tanh_gate", "gate", text_hidden, text_hidden,
                                     per_channel=bool(gate.get("per_channel", False)),
                                     complementary=bool(gate.get("complementary", False))))
    return ProjectorSpec(modality=name, input_dim=input_dim, hidden_dim=hidden,
                         output_dim=text_hidden, activation=act or "", layer_norm=norm,
                         layers=layers, dropout=dropout, projector_type=kind)


# on-disk names of the canonical params that are not named alike (per projector type)
_RENAMES = {"swiglu": {"glu.gate.": "gate_proj.", "glu.up.": "up_proj.", "down.": "down_proj."},
            "low_rank": {}}


def _source_names(spec: ProjectorSpec) -> dict[str, str]:
    """Canonical param (``<layer>.<param>``) -> tensor name under the modality's prefix."""
    names: dict[str, str] = {}
    if spec.projector_type == "mlp":  # the seed's nn.Sequential indices
        index_map = SEED_INDEX_WITH_NORM if spec.layer_norm else SEED_INDEX_WITHOUT_NORM
        names = {f"{layer}.{part}": f"{index}.{part}" for index, layer in index_map.items()
                 for part in ("weight", "bias")}
    else:
        renames = _RENAMES[spec.projector_type]
        for layer in spec.layers:
            for param in layer.params():
                key = f"{layer.name}.{param}"
                prefix = next((p for p in renames if key.startswith(p)), None)
                names[key] = renames[prefix] + key[len(prefix):] if prefix else key
    if spec.layers[-1].kind == "tanh_gate":
        names[f"{spec.layers[-1].name}.gate"] = "gate"
    return names


def projector_tensors(spec: ProjectorSpec, sources: dict[str, TensorRef], prefix: str,
                      where: str, gate_first: bool = True) -> list[TensorRef]:
    """Canonical projector tensors from the on-disk names under ``prefix``, checked against
    the dims the config declares. A fused ``gate_up_proj`` is split lazily by rows
    (``gate_first``: which half is the gate)."""
    by_layer = {layer.name: layer for layer in spec.layers}
    fused = f"{prefix}gate_up_proj.weight" in sources and spec.projector_type == "swiglu"
    refs, used = [], set()
    for canonical, stored in _source_names(spec).items():
        layer_name, param = canonical.split(".", 1)
        layer = by_layer[layer_name]
        want = layer.param_shape(param)
        if fused and stored.startswith(("gate_proj.", "up_proj.")):
            ref = _fused_half(sources, prefix, stored, want, gate_first, where, spec.modality)
            used.add(ref.source_name)
        else:
            src = prefix + stored
            if src not in sources:
                raise CheckpointError(f"{where}: projector tensor {src} missing for modality "
                                      f"{spec.modality!r}")
            ref = sources[src]
            used.add(src)
        if tuple(ref.shape) != want:
            raise CheckpointError(
                f"{where}: {ref.source_name} has shape {list(ref.shape)} but modality "
                f"{spec.modality!r} declares input_dim={spec.input_dim}, "
                f"hidden_dim={spec.hidden_dim} (expected {list(want)})")
        refs.append(ref.renamed(f"mm.{spec.modality}.{canonical}"))
    extra = sorted(n for n in sources if n.startswith(prefix) and n not in used)
    if extra:
        raise CheckpointError(f"{where}: unexpected projector tensors for modality "
                              f"{spec.modality!r}: {', '.join(extra[:3])}")
    return refs


def _fused_half(sources: dict[str, TensorRef], prefix: str, stored: str,
                want: tuple[int, ...], gate_first: bool, where: str, modality: str) -> TensorRef:
    """The gate or up half of ``gate_up_proj.{weight,bias}`` as a lazy row slice."""
    part = stored.split(".")[-1]
    src = f"{prefix}gate_up_proj.{part}"
    if src not in sources:
        raise CheckpointError(f"{where}: projector tensor {src} missing for modality "
                              f"{modality!r}")
    fused = sources[src]
    half = want[0]
    if fused.shape[0] != 2 * half:
        raise CheckpointError(f"{where}: {src} has {fused.shape[0]} rows; the gate and up "
                              f"halves of modality {modality!r} need {2 * half}")
    is_gate = stored.startswith("gate_proj.")
    lo = 0 if is_gate == gate_first else half
    order = "gate,up" if gate_first else "up,gate"
    which = "gate" if is_gate else "up"
    return replace(fused.row_slice(src, f"split_gate_up({order})[{which}]", lo, lo + half),
                   origin=Origin("slice", 0, lo, lo + half))
