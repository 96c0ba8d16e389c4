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

import re
from dataclasses import replace
from typing import Any

from mmconvert.convert.config_values import config_bool, config_float, config_int, config_str, shown
from mmconvert.convert.model import ProjectorLayer, ProjectorSpec
from mmconvert.convert.readers.common import parse_activation
from mmconvert.convert.tensors import Origin, TensorRef
from mmconvert.errors import CheckpointError

PROJECTOR_TYPES = ("mlp", "swiglu", "low_rank")
SEED_INDEX_WITH_NORM = {0: "fc1", 1: "norm1", 4: "fc2", 5: "norm2"}
SEED_INDEX_WITHOUT_NORM = {0: "fc1", 3: "fc2"}
LN_EPS = 1e-5  # nn.LayerNorm's default, what the seed uses


MODALITY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,47}")


def seed_projectors(mm_config: dict[str, Any], hidden: int, where: str) -> dict[str, ProjectorSpec]:
    """Every modality's :class:`ProjectorSpec` from a multimodal config."""
    modalities = mm_config.get("modality_configs")
    if not isinstance(modalities, dict) or not modalities:
        raise CheckpointError(f"{where}: modality_configs is missing or empty (an object "
                              'like {"m1": {"input_dim": 1024}})')
    activation = parse_activation(mm_config.get("projector_hidden_act"), where)
    layer_norm = config_bool(mm_config, "use_layer_norm", where, default=True)
    dropout = config_float(mm_config, "projector_dropout", where, default=0.0, minimum=0.0,
                           below=1.0)
    specs = {}
    for name, mcfg in modalities.items():
        check_modality_name(name, where)
        if not isinstance(mcfg, dict):
            raise CheckpointError(f"{where}: modality_configs.{name} must be an object with "
                                  f"input_dim, got {shown(mcfg)}")
        specs[name] = projector_spec(name, mcfg, hidden, activation, layer_norm, dropout,
                                     where)
    return specs


def check_modality_name(name: str, where: str) -> None:
    """A modality name becomes a tensor-name part, an ``nn.ModuleDict`` key and a GGUF key:
    letters, digits, ``_`` and ``-`` only (no ``.``, ``/``), at most 48 characters."""
    if not MODALITY_NAME.fullmatch(name):
        raise CheckpointError(
            f"{where}: modality name {shown(name, 40)} is not a plain name\n"
            "use letters, digits, _ and - (at most 48 characters) in modality_configs and in "
            "the projector tensor names")


def projector_spec(name: str, mcfg: dict[str, Any], text_hidden: int, activation: str,
                   layer_norm: bool, dropout: float, where: str) -> ProjectorSpec:
    """One modality's projector (``activation``/``layer_norm``: the global defaults)."""
    key = f"modality_configs.{name}"
    if mcfg.get("input_dim") is None:
        raise CheckpointError(f"{where}: modality {name!r} has no input_dim")
    input_dim = config_int(mcfg, "input_dim", where, label=f"{key}.input_dim")
    kind = config_str(mcfg, "projector_type", where, default="mlp",
                      label=f"{key}.projector_type")
    if kind not in PROJECTOR_TYPES:
        raise CheckpointError(f"{where}: modality {name!r} has projector_type {shown(kind)}; "
                              f"supported: {', '.join(PROJECTOR_TYPES)}")
    bias = config_bool(mcfg, "bias", where, default=True, label=f"{key}.bias")
    act_value = mcfg.get("activation")
    if act_value == "":
        act_value = None
    if kind == "low_rank":
        act = None if act_value in (None, "none") else \
            parse_activation(act_value, where, f"{key}.activation")
        norm = config_bool(mcfg, "layer_norm", where, default=False, label=f"{key}.layer_norm")
        if isinstance(mcfg.get("rank"), bool) or not isinstance(mcfg.get("rank"), int):
            raise CheckpointError(f"{where}: low_rank modality {name!r} needs an integer "
                                  f"rank, got {shown(mcfg.get('rank'))}")
        hidden = config_int(mcfg, "rank", where, label=f"{key}.rank")
        layers = [ProjectorLayer("linear", "down", input_dim, hidden, bias=bias)]
        if norm:
            layers.append(ProjectorLayer("layer_norm", "norm", hidden, hidden, eps=LN_EPS))
        if act:
            layers.append(ProjectorLayer("act", "act", hidden, hidden, activation=act))
        layers.append(ProjectorLayer("linear", "up", hidden, text_hidden, bias=bias))
    else:
        act = activation if act_value is None else \
            parse_activation(act_value, where, f"{key}.activation")
        norm = config_bool(mcfg, "layer_norm", where, default=layer_norm,
                           label=f"{key}.layer_norm")
        hidden = config_int(mcfg, "hidden_dim", where, default=text_hidden,
                            label=f"{key}.hidden_dim")
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
    gate = _gate_config(mcfg.get("gate"), name, where)
    if gate is not None:
        layers.append(ProjectorLayer(
            "tanh_gate", "gate", text_hidden, text_hidden,
            per_channel=config_bool(gate, "per_channel", where, default=False,
                                    label=f"{key}.gate.per_channel"),
            complementary=config_bool(gate, "complementary", where, default=False,
                                      label=f"{key}.gate.complementary")))
    return ProjectorSpec(modality=name, input_dim=input_dim, hidden_dim=hidden,
                         output_dim=text_hidden, activation=act or "", layer_norm=norm,
                         layers=layers, dropout=dropout, projector_type=kind)


def _gate_config(gate: Any, name: str, where: str) -> dict[str, Any] | None:
    """``gate``: null or false (no gate), or ``{"kind": "tanh", ...}`` (``{}``: its defaults)."""
    if gate is None or gate is False:
        return None
    if not isinstance(gate, dict) or gate.get("kind", "tanh") != "tanh":
        raise CheckpointError(f"{where}: modality {name!r}: gate must be "
                              '{"kind": "tanh", "complementary": bool, "per_channel": bool}')
    return gate


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
                f"{where}: {shown(ref.source_name)} has shape {list(ref.shape)}; modality "
                f"{spec.modality!r} declares input_dim={spec.input_dim}, "
                f"hidden_dim={spec.hidden_dim}")
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
