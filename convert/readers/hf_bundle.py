"""mmconvert's own Hugging Face bundle (``mmconvert to-hf``), read back as a checkpoint.

A user who downloads the HF bundle from the Hub converts it like any checkpoint
(``mmconvert to-gguf bundle/``). The layout is ``docs/hf-bundle.md``'s: ``config.json`` is a
standard Qwen3 (or Qwen3-MoE) config plus ``multimodal_config`` (format
``mmconvert.multimodal_projector``), the language model sits in the root shards under HF names
(Qwen3-MoE experts one tensor per expert) and the projector in ``multimodal_config.weights``
(``multimodal_projector/model.safetensors``; bundles of earlier versions kept it at the root)
under ``<tensor_prefix><modality>.<layer>.<param>``, which are the canonical projector names
with ``mm.`` replaced. The bundle stores rope rotate-half (neox) whatever the source had, tanh
gates raw and the layers as ``multimodal_config.modalities`` lists them, so reading it back
gives the canonical model the bundle was written from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmconvert.convert.config_values import (
    check_int,
    config_bool,
    config_float,
    config_int,
    config_str,
    shown,
)
from mmconvert.convert.model import LAYER_KINDS, CanonicalModel, ProjectorLayer, ProjectorSpec
from mmconvert.convert.readers import ReadOptions, register
from mmconvert.convert.readers.assemble import assemble
from mmconvert.convert.readers.common import (
    find_weight_files,
    load_json,
    open_weight_files,
    parse_activation,
)
from mmconvert.convert.readers.names import stack_experts
from mmconvert.convert.readers.projectors import check_modality_name
from mmconvert.convert.tensors import TensorRef
from mmconvert.errors import CheckpointError
from mmconvert.formats.hf_folder import CONFIG_KEY, PROJECTOR_FORMAT
from mmconvert.formats.safe_paths import checked_path

SUPPORTED_VERSIONS = (1, 2)  # those formats/templates/modeling_mmqwen3.py reads
LM_MODEL_TYPES = ("qwen3", "qwen3_moe")


def is_mmconvert_hf_config(config: dict[str, Any]) -> bool:
    """Whether ``config.json`` is an mmconvert HF bundle's (Qwen3 plus ``multimodal_config``)."""
    mm = config.get(CONFIG_KEY)
    return (config.get("model_type") in LM_MODEL_TYPES and isinstance(mm, dict)
            and mm.get("format") == PROJECTOR_FORMAT)


def _layer(entry: Any, modality: str, where: str) -> ProjectorLayer:
    """One ``layers`` entry (``docs/hf-bundle.md``) as a canonical projector layer."""
    label = f"{CONFIG_KEY}.modalities[{modality}].layers"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: {label} entry {shown(entry)} is not an object")
    kind = config_str(entry, "kind", where, label=f"{label}.kind")
    facts = LAYER_KINDS.get(kind)
    if facts is None or not facts.hf_version:
        stored = [k for k, f in LAYER_KINDS.items() if f.hf_version]
        raise CheckpointError(f"{where}: {label} kind {shown(kind)} is not one of "
                              f"{', '.join(stored)}")
    name = config_str(entry, "name", where, label=f"{label}.name")
    check_modality_name(name, where)  # a layer name is a tensor-name part too
    key = f"{label}[{name}]"
    if "dim" in facts.hf_fields:
        in_dim = out_dim = config_int(entry, "dim", where, label=f"{key}.dim")
    elif "in_dim" in facts.hf_fields:
        in_dim = config_int(entry, "in_dim", where, label=f"{key}.in_dim")
        out_dim = config_int(entry, "out_dim", where, label=f"{key}.out_dim")
    else:  # act: the shape of its input, filled in by the caller
        in_dim = out_dim = 0
    activation = parse_activation(entry.get("activation"), where, f"{key}.activation") \
        if facts.uses_activation else None
    eps = config_float(entry, "eps", where, label=f"{key}.eps", minimum=0.0) \
        if facts.uses_eps else None
    folded = entry.get("folded_from") or ()
    if not isinstance(folded, (list, tuple)) or not all(isinstance(x, str) for x in folded):
        raise CheckpointError(f"{where}: {key}.folded_from must be a list of layer names")
    return ProjectorLayer(
        kind, name, in_dim, out_dim, activation=activation, eps=eps,
        bias=config_bool(entry, "bias", where, default=facts.has_bias, label=f"{key}.bias"),
        per_channel=config_bool(entry, "per_channel", where, default=False,
                                label=f"{key}.per_channel"),
        complementary=config_bool(entry, "complementary", where, default=False,
                                  label=f"{key}.complementary"),
        folded_from=tuple(folded))


def projectors_from_config(mm: dict[str, Any], hidden: int, where: str
                           ) -> dict[str, ProjectorSpec]:
    """``multimodal_config.modalities`` (in fusion order) as canonical projector specs."""
    entries = mm.get("modalities")
    if not isinstance(entries, list) or not entries:
        raise CheckpointError(f"{where}: {CONFIG_KEY}.modalities is missing or empty")
    specs: dict[str, ProjectorSpec] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: {CONFIG_KEY}.modalities entry {shown(entry)} is "
                                  "not an object")
        name = config_str(entry, "name", where, label=f"{CONFIG_KEY}.modalities.name")
        check_modality_name(name, where)
        if name in specs:
            raise CheckpointError(f"{where}: modality {name!r} is listed twice")
        key = f"{CONFIG_KEY}.modalities[{name}]"
        raw_layers = entry.get("layers")
        if not isinstance(raw_layers, list) or not raw_layers:
            raise CheckpointError(f"{where}: {key}.layers is missing or empty")
        layers, width = [], config_int(entry, "input_dim", where, label=f"{key}.input_dim")
        input_dim = width
        for raw in raw_layers:
            layer = _layer(raw, name, where)
            if layer.kind == "act":
                layer.in_dim = layer.out_dim = width
            elif layer.in_dim != width:
                raise CheckpointError(f"{where}: {key} layer {layer.name!r} takes {layer.in_dim} "
                                      f"inputs, the layer before gives {width}")
            width = layer.out_dim
            layers.append(layer)
        output_dim = config_int(entry, "output_dim", where, label=f"{key}.output_dim")
        if width != output_dim or output_dim != hidden:
            raise CheckpointError(f"{where}: {key} ends at width {width}, output_dim is "
                                  f"{output_dim}, the language model's hidden size {hidden}")
        activation = entry.get("activation") or ""
        specs[name] = ProjectorSpec(
            modality=name, input_dim=input_dim,
            hidden_dim=config_int(entry, "hidden_dim", where, label=f"{key}.hidden_dim"),
            output_dim=output_dim,
            activation=parse_activation(activation, where, f"{key}.activation")
            if activation else "",
            layer_norm=config_bool(entry, "layer_norm", where, default=False,
                                   label=f"{key}.layer_norm"),
            layers=layers,
            dropout=config_float(entry, "dropout", where, default=0.0, minimum=0.0, below=1.0,
                                 label=f"{key}.dropout"))
    return specs


def projector_refs(specs: dict[str, ProjectorSpec], sources: dict[str, TensorRef], prefix: str,
                   where: str) -> list[TensorRef]:
    """The canonical projector tensors (``mm.<m>.<layer>.<param>``) from their stored names
    (``<prefix><m>.<layer>.<param>``), every one present with the shape the config implies and
    none left over."""
    refs = []
    for spec in specs.values():
        for canonical in spec.tensor_names():
            stored = prefix + canonical[len("mm."):]
            ref = sources.get(stored)
            if ref is None:
                raise CheckpointError(f"{where}: projector tensor {shown(stored)} missing "
                                      f"for modality {spec.modality!r}")
            layer_name, param = canonical.split(".", 3)[2:]
            layer = next(x for x in spec.layers if x.name == layer_name)
            if tuple(ref.shape) != layer.param_shape(param):
                raise CheckpointError(f"{where}: {shown(stored)} has shape {list(ref.shape)}; "
                                      f"config.json implies {list(layer.param_shape(param))}")
            refs.append(ref.renamed(canonical))
    wanted = {prefix + r.name[len("mm."):] for r in refs}
    extra = sorted(set(sources) - wanted)
    if extra:
        raise CheckpointError(f"{where}: projector tensors no modality describes: "
                              f"{', '.join(shown(n) for n in extra[:3])}")
    return refs


def _manifest(path: Path) -> dict[str, Any]:
    """The bundle's ``mmconvert.json`` when it has a readable one (provenance only)."""
    try:
        return load_json(path / "mmconvert.json", "manifest")
    except CheckpointError:
        return {}


def _placeholder(mm: dict[str, Any], where: str) -> tuple[str | None, int | None]:
    token = config_str(mm, "placeholder_token", where, default=None,
                       label=f"{CONFIG_KEY}.placeholder_token")
    token_id = mm.get("placeholder_token_id")
    if token_id is not None:
        check_int(token_id, f"{CONFIG_KEY}.placeholder_token_id", where, minimum=0)
    return token, token_id


class HFBundleReader:
    name = "mmconvert-hf"
    description = "an mmconvert HF bundle (Qwen3 config.json with multimodal_config)"

    def detect(self, path: Path, options: ReadOptions) -> bool:
        # --projector FILE is the user's explicit choice: the plain-folder reader takes it
        return options.projector is None and \
            is_mmconvert_hf_config(load_json(path / "config.json", "config"))

    def read(self, path: Path, options: ReadOptions) -> CanonicalModel:
        where = str(path / "config.json")
        config = load_json(path / "config.json", "config")
        mm: dict[str, Any] = config[CONFIG_KEY]
        version = mm.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            raise CheckpointError(f"{where}: {CONFIG_KEY} format_version {shown(version)} is "
                                  f"not {' or '.join(map(str, SUPPORTED_VERSIONS))}; convert "
                                  "with the mmconvert version that wrote the bundle, or newer")
        files = find_weight_files(path)
        if not files:
            raise CheckpointError(f"{path}: no language-model weights (model.safetensors or "
                                  "its index)")
        root = open_weight_files(files)
        prefix = config_str(mm, "tensor_prefix", where, label=f"{CONFIG_KEY}.tensor_prefix")
        weights = config_str(mm, "weights", where, label=f"{CONFIG_KEY}.weights")
        projector_file = checked_path(path, weights)  # no path out of the bundle
        projector_sources = {n: r for n, r in root.items() if n.startswith(prefix)}
        weight_files = list(files)
        if projector_file not in files:
            if not projector_file.is_file():
                raise CheckpointError(f"{path}: missing {weights} (the projector weights "
                                      f"{CONFIG_KEY}.weights names)")
            found = open_weight_files([projector_file])
            clash = sorted(set(found) & set(projector_sources))
            if clash:
                raise CheckpointError(f"{projector_file}: tensor {shown(clash[0])} is also in "
                                      "the language model's shards")
            projector_sources.update(found)
            weight_files.append(projector_file)
        lm = {n: r for n, r in root.items() if not n.startswith(prefix)}
        try:
            lm, _ = stack_experts(lm)  # one tensor per expert, as save_pretrained writes them
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        hidden = config_int(config, "hidden_size", where)
        specs = projectors_from_config(mm, hidden, where)
        refs = projector_refs(specs, projector_sources, prefix, str(projector_file))
        token, token_id = _placeholder(mm, where)
        mm_config = {"multimodal_token": token,
                     "max_multimodal_length": mm.get("max_multimodal_length"),
                     "fusion_strategy": mm.get("fusion_strategy", "early"),
                     "base_model_name": _manifest(path).get("base_model")}
        model = assemble(dialect=self.name, source=path, mm_config=mm_config,
                         text_config=config, text_where=where, lm=lm, projectors=specs,
                         projector_refs=refs, base_dir=options.base, weight_files=weight_files,
                         rope_layout=options.rope_layout, warnings=[])
        if token_id is not None and token_id != model.multimodal_token_id:
            raise CheckpointError(f"{where}: {CONFIG_KEY}.placeholder_token_id is {token_id}, "
                                  f"but the tokenizer gives {token!r} id "
                                  f"{model.multimodal_token_id}")
        return model


register(HFBundleReader())
