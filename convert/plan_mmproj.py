"""Plan and metadata for the projector GGUF (``mmproj-embed``), specified in
``docs/gguf-projector.md``: keep the two in step (bump :data:`SPEC_VERSION` on a change a reader
must know about)."""

from __future__ import annotations

import re

from mmconvert.convert.errors import UnsupportedError
from mmconvert.convert.gguf_metadata import FILE_TYPES, QUANTIZATION_VERSION
from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan import Plan, PlannedTensor
from mmconvert.formats import quants
from mmconvert.formats.gguf_writer import Metadata, ValueType

ARCH = "mmproj-embed"
SPEC_VERSION = 1
PROJECTOR_OUTTYPES = ("f32", "f16", "q8_0")
FUSION_RULE = "replace-placeholders-else-prepend"
_NAME_OK = re.compile(r"[A-Za-z0-9_-]+")




def plan_mmproj(model: CanonicalModel, outtype: str = "f16") -> Plan:
    """Every projector tensor under its canonical name ``mm.<modality>.<layer>.<weight|bias>``."""
    if outtype.lower() not in PROJECTOR_OUTTYPES:
        raise UnsupportedError(f"--projector-outtype {outtype}: choose one of "
                               f"{', '.join(PROJECTOR_OUTTYPES)}")
    ggml = outtype.upper()
    for modality in model.projectors:
        if not _NAME_OK.fullmatch(modality):
            raise UnsupportedError(f"modality name {modality!r}: the projector GGUF needs names "
                                   "of letters, digits, '_' and '-'")
    tensors = []
    for spec in model.projectors.values():
        for name in spec.tensor_names():
            ref = model.tensors[name]
            # linear weights take the outtype (F16 when a Q8_0 row is not whole blocks);
            # biases and layer-norm parameters stay F32
            tensors.append(PlannedTensor(name, ref, quants.tensor_type(name, ref.shape, ggml),
                                         ref.shape))
    notes = [f"arch: {ARCH} (docs/gguf-projector.md)", f"projector outtype: {ggml}",
             f"modalities in fusion order: {', '.join(model.projectors)}"]
    return Plan("mmproj", tensors, notes)


def mmproj_metadata(model: CanonicalModel, ggml: str, name: str) -> Metadata:
    """The keys of docs/gguf-projector.md, in the order the spec lists them."""
    md = Metadata()
    md.string("general.architecture", ARCH)
    md.string("general.type", "mmproj")
    md.string("general.name", name)
    md.uint32("general.file_type", FILE_TYPES[ggml])
    md.uint32("general.quantization_version", QUANTIZATION_VERSION)
    md.uint32(f"{ARCH}.spec_version", SPEC_VERSION)
    md.uint32(f"{ARCH}.embedding_length", model.text.hidden_size)
    md.array(f"{ARCH}.modalities", ValueType.STRING, list(model.projectors))
    md.string(f"{ARCH}.fusion", FUSION_RULE)
    md.string(f"{ARCH}.placeholder.token", model.multimodal_token)
    md.int32(f"{ARCH}.placeholder.token_id",
             -1 if model.multimodal_token_id is None else model.multimodal_token_id)
    for m, spec in model.projectors.items():
        p = f"{ARCH}.{m}"
        md.uint32(f"{p}.input_dim", spec.input_dim)
        md.uint32(f"{p}.hidden_dim", spec.hidden_dim)
        md.uint32(f"{p}.output_dim", spec.output_dim)
        md.array(f"{p}.layer.names", ValueType.STRING, [x.name for x in spec.layers])
        md.array(f"{p}.layer.kinds", ValueType.STRING, [x.kind for x in spec.layers])
        md.array(f"{p}.layer.in_dims", ValueType.UINT32, [x.in_dim for x in spec.layers])
        md.array(f"{p}.layer.out_dims", ValueType.UINT32, [x.out_dim for x in spec.layers])
        md.array(f"{p}.layer.activations", ValueType.STRING,
                 [(x.activation or spec.activation) if x.kind == "act" else ""
                  for x in spec.layers])
        md.array(f"{p}.layer.eps", ValueType.FLOAT32,
                 [(x.eps if x.eps is not None else spec.layer_norm_eps)
                  if x.kind == "layer_norm" else 0.0 for x in spec.layers])
        md.array(f"{p}.layer.has_bias", ValueType.BOOL,
                 [x.bias if x.kind != "act" else False for x in spec.layers])
    return md
