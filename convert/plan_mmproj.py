"""Plan and metadata for the projector GGUF (``mmproj-embed``), specified in
``docs/gguf-projector.md``: keep the two in step (bump the spec version on a change a reader
must know about).

A file is stamped with the lowest spec version that describes it: version 1 (``linear``,
``layer_norm``, ``act``; F32, F16 and Q8_0 weights) for the seed's MLPs, so readers written for
version 1 keep working; version 2 when a projector has a gated (``glu``) layer or a ``scale``
(a tanh gate, stored already applied); version 3 when a weight matrix is a K-quant (or one of
their 32-block fallbacks, Q5_0 / Q5_1).

Weight matrices take ``--projector-outtype``; a row that is not whole blocks of it falls back
as llama-quantize's ``tensor_type_fallback`` does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
then F16 when the row is not whole 32-blocks either; Q8_0 -> F16).
"""

from __future__ import annotations

import re

from mmconvert.convert.model import LAYER_KINDS, CanonicalModel, ProjectorSpec
from mmconvert.convert.plan import Plan, PlannedTensor
from mmconvert.convert.projector_export import export_projectors, fold_notes
from mmconvert.errors import UnsupportedError
from mmconvert.formats import quants
from mmconvert.formats.gguf_constants import (
    FUSION_RULE,
    PROJECTOR_ARCH,
    PROJECTOR_LAYER_KINDS,
    PROJECTOR_OUTTYPES,
    PROJECTOR_TYPE,
    PROJECTOR_WEIGHT_TYPES,
    QUANTIZATION_VERSION,
    Keys,
    file_type,
)
from mmconvert.formats.gguf_mixtures import fallback
from mmconvert.formats.gguf_writer import Metadata, ValueType

_NAME_OK = re.compile(r"[A-Za-z0-9_-]+")
# general.file_type of a projector whose weights are a K type: llama.cpp has no "mostly Q4_K"
# file type; its _S mixture is the one whose tensors are all the base type but a few
_K_FILE_TYPES = {"Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S"}


def weight_type(ggml: str, name: str, shape: tuple[int, ...]) -> str:
    """The GGML type the projector file stores a tensor in: F32 for 1-D tensors, biases and
    norms; else ``ggml`` (upper case) or its llama-quantize fallback for the row length."""
    if quants.tensor_type(name, shape, "F16") == "F32":
        return "F32"
    return fallback(ggml, shape[-1])[0]


def _matrix_types(specs: dict[str, ProjectorSpec], ggml: str) -> set[str]:
    """The types of every weight matrix of these projectors (linear, glu), by their rows."""
    return {fallback(ggml, x.in_dim)[0] for s in specs.values() for x in s.layers
            if LAYER_KINDS[x.kind].resizes}


def spec_version(specs: dict[str, ProjectorSpec], ggml: str = "F32") -> int:
    """The lowest spec version that describes these (exported) projectors with their weight
    matrices in ``ggml``."""
    kinds = [PROJECTOR_LAYER_KINDS[x.kind] for s in specs.values() for x in s.layers]
    types = [PROJECTOR_WEIGHT_TYPES[t] for t in _matrix_types(specs, ggml)]
    return max(kinds + types, default=1)


def projector_file_type(ggml: str) -> int:
    """``general.file_type`` of a projector file whose weights are ``ggml``."""
    return int(file_type(_K_FILE_TYPES.get(ggml, ggml)))


def plan_mmproj(model: CanonicalModel, outtype: str = "f16", fold_linear: bool = False) -> Plan:
    """Every projector tensor as the file stores it, under ``mm.<modality>.<layer>.<param>``:
    tanh gates applied (``scale`` layers), linear maps folded with ``fold_linear``."""
    if outtype.lower() not in PROJECTOR_OUTTYPES:
        raise UnsupportedError(f"--projector-outtype {outtype}: choose one of "
                               f"{', '.join(PROJECTOR_OUTTYPES)}")
    ggml = outtype.upper()
    for modality in model.projectors:
        if not _NAME_OK.fullmatch(modality):
            raise UnsupportedError(f"modality name {modality!r}: the projector GGUF needs names "
                                   "of letters, digits, '_' and '-'")
    specs, refs = export_projectors(model, apply_gates=True, fold_linear=fold_linear)
    # weight matrices take the outtype (or its fallback for the row length); biases,
    # layer-norm parameters and scales (1-D) stay F32
    tensors = [PlannedTensor(ref.name, ref, weight_type(ggml, ref.name, ref.shape), ref.shape)
               for ref in refs]
    notes = [f"arch: {PROJECTOR_ARCH} spec version {spec_version(specs, ggml)} "
             "(docs/gguf-projector.md)",
             f"projector outtype: {ggml}",
             f"modalities in fusion order: {', '.join(model.projectors)}"]
    fell = [f"{t.name} ({fallback(ggml, t.shape[-1])[1].removeprefix('; ')})" for t in tensors
            if t.dtype not in ("F32", ggml)]
    if fell:
        notes.append(f"fallbacks: {'; '.join(fell)}")
    gates = [f"{m}.{x.name}" for m, s in specs.items() for x in s.layers if x.gate]
    if gates:
        notes.append(f"tanh gates stored applied (scale = tanh(g) or 1 - tanh(g)): "
                     f"{', '.join(gates)}")
    notes += fold_notes(specs, fold_linear)
    if ggml != "F32" and any(x.folded_from for s in specs.values() for x in s.layers):
        # a bf16 checkpoint's own weights fit F16 exactly; their float32 product does not
        notes.append(f"folded matrices are float32 products: {ggml} rounds them "
                     "(--projector-outtype f32 keeps them)")
    return Plan("mmproj", tensors, notes, projectors=specs)


def mmproj_metadata(model: CanonicalModel, ggml: str, name: str,
                    specs: dict[str, ProjectorSpec] | None = None) -> Metadata:
    """The keys of docs/gguf-projector.md, in the order the spec lists them. ``specs``: the
    projectors as stored (:attr:`Plan.projectors` of :func:`plan_mmproj`)."""
    specs = specs or model.projectors
    md = Metadata()
    k = Keys.Projector
    md.string(Keys.General.ARCHITECTURE, PROJECTOR_ARCH)
    md.string(Keys.General.TYPE, PROJECTOR_TYPE)
    md.string(Keys.General.NAME, name)
    md.uint32(Keys.General.FILE_TYPE, projector_file_type(ggml))
    md.uint32(Keys.General.QUANTIZATION_VERSION, QUANTIZATION_VERSION)
    md.uint32(k.SPEC_VERSION, spec_version(specs, ggml))
    md.uint32(k.EMBEDDING_LENGTH, model.text.hidden_size)
    md.array(k.MODALITIES, ValueType.STRING, list(specs))
    md.string(k.FUSION, FUSION_RULE)
    md.string(k.PLACEHOLDER_TOKEN, model.multimodal_token)
    md.int32(k.PLACEHOLDER_TOKEN_ID,
             -1 if model.multimodal_token_id is None else model.multimodal_token_id)
    for m, spec in specs.items():
        layers = spec.layers
        kinds = [LAYER_KINDS[x.kind] for x in layers]

        def column(name: str, vtype: ValueType, values: list, m: str = m) -> None:
            md.array(k.LAYER.format(m=m, column=name), vtype, values)

        md.uint32(k.INPUT_DIM.format(m=m), spec.input_dim)
        md.uint32(k.HIDDEN_DIM.format(m=m), spec.hidden_dim)
        md.uint32(k.OUTPUT_DIM.format(m=m), spec.output_dim)
        column("names", ValueType.STRING, [x.name for x in layers])
        column("kinds", ValueType.STRING, [x.kind for x in layers])
        column("in_dims", ValueType.UINT32, [x.in_dim for x in layers])
        column("out_dims", ValueType.UINT32, [x.out_dim for x in layers])
        column("activations", ValueType.STRING,
               [(x.activation or spec.activation) if kind.uses_activation else ""
                for x, kind in zip(layers, kinds)])
        column("eps", ValueType.FLOAT32,
               [(x.eps if x.eps is not None else spec.layer_norm_eps) if kind.uses_eps else 0.0
                for x, kind in zip(layers, kinds)])
        column("has_bias", ValueType.BOOL,
               [x.bias and kind.has_bias for x, kind in zip(layers, kinds)])
        # optional, informational keys (a runtime needs neither): where a scale or a linear
        # layer came from, so verify can check it against the checkpoint's tensors
        if any(x.gate for x in layers):
            column("gates", ValueType.STRING,
                   [("1-tanh" if x.complementary else "tanh") if x.gate else "" for x in layers])
        if any(x.folded_from for x in layers):
            column("folded_from", ValueType.STRING, ["+".join(x.folded_from) for x in layers])
    return md
