"""Plan and metadata for the projector GGUF (``mmproj-embed``), specified in
``docs/gguf-projector.md``: keep the two in step (bump the spec version on a change a reader
must know about).

A file is stamped with the lowest spec version that describes it: version 1 (``linear``,
``layer_norm``, ``act``) for the seed's MLPs, so readers written for version 1 keep working;
version 2 when a projector has a gated (``glu``) layer or a ``scale`` (a tanh gate, stored
already applied).
"""

from __future__ import annotations

import re

from mmconvert.convert.gguf_metadata import FILE_TYPES, QUANTIZATION_VERSION
from mmconvert.convert.model import CanonicalModel, ProjectorSpec
from mmconvert.convert.plan import Plan, PlannedTensor
from mmconvert.convert.projector_export import export_projectors, fold_notes
from mmconvert.errors import UnsupportedError
from mmconvert.formats import quants
from mmconvert.formats.gguf_writer import Metadata, ValueType

ARCH = "mmproj-embed"
SPEC_VERSION = 2  # the newest version this writer produces
V1_KINDS = ("linear", "layer_norm", "act")
PROJECTOR_OUTTYPES = ("f32", "f16", "q8_0")
FUSION_RULE = "replace-placeholders-else-prepend"
_NAME_OK = re.compile(r"[A-Za-z0-9_-]+")


def spec_version(specs: dict[str, ProjectorSpec]) -> int:
    """The lowest spec version that describes these (exported) projectors."""
    return 1 if all(x.kind in V1_KINDS for s in specs.values() for x in s.layers) else 2


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
    # weight matrices take the outtype (F16 when a Q8_0 row is not whole blocks); biases,
    # layer-norm parameters and scales (1-D) stay F32
    tensors = [PlannedTensor(ref.name, ref, quants.tensor_type(ref.name, ref.shape, ggml),
                             ref.shape) for ref in refs]
    notes = [f"arch: {ARCH} spec version {spec_version(specs)} (docs/gguf-projector.md)",
             f"projector outtype: {ggml}",
             f"modalities in fusion order: {', '.join(model.projectors)}"]
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
    md.string("general.architecture", ARCH)
    md.string("general.type", "mmproj")
    md.string("general.name", name)
    md.uint32("general.file_type", FILE_TYPES[ggml])
    md.uint32("general.quantization_version", QUANTIZATION_VERSION)
    md.uint32(f"{ARCH}.spec_version", spec_version(specs))
    md.uint32(f"{ARCH}.embedding_length", model.text.hidden_size)
    md.array(f"{ARCH}.modalities", ValueType.STRING, list(specs))
    md.string(f"{ARCH}.fusion", FUSION_RULE)
    md.string(f"{ARCH}.placeholder.token", model.multimodal_token)
    md.int32(f"{ARCH}.placeholder.token_id",
             -1 if model.multimodal_token_id is None else model.multimodal_token_id)
    for m, spec in specs.items():
        p = f"{ARCH}.{m}"
        layers = spec.layers
        md.uint32(f"{p}.input_dim", spec.input_dim)
        md.uint32(f"{p}.hidden_dim", spec.hidden_dim)
        md.uint32(f"{p}.output_dim", spec.output_dim)
        md.array(f"{p}.layer.names", ValueType.STRING, [x.name for x in layers])
        md.array(f"{p}.layer.kinds", ValueType.STRING, [x.kind for x in layers])
        md.array(f"{p}.layer.in_dims", ValueType.UINT32, [x.in_dim for x in layers])
        md.array(f"{p}.layer.out_dims", ValueType.UINT32, [x.out_dim for x in layers])
        md.array(f"{p}.layer.activations", ValueType.STRING,
                 [(x.activation or spec.activation) if x.kind in ("act", "glu") else ""
                  for x in layers])
        md.array(f"{p}.layer.eps", ValueType.FLOAT32,
                 [(x.eps if x.eps is not None else spec.layer_norm_eps)
                  if x.kind == "layer_norm" else 0.0 for x in layers])
        md.array(f"{p}.layer.has_bias", ValueType.BOOL,
                 [x.bias if x.kind in ("linear", "layer_norm", "glu") else False
                  for x in layers])
        # optional, informational keys (a runtime needs neither): where a scale or a linear
        # layer came from, so verify can check it against the checkpoint's tensors
        if any(x.gate for x in layers):
            md.array(f"{p}.layer.gates", ValueType.STRING,
                     [("1-tanh" if x.complementary else "tanh") if x.gate else ""
                      for x in layers])
        if any(x.folded_from for x in layers):
            md.array(f"{p}.layer.folded_from", ValueType.STRING,
                     ["+".join(x.folded_from) for x in layers])
    return md
