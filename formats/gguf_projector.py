"""The projector GGUF's description (``docs/gguf-projector.md``), read and checked.

The one parser of a projector file's keys, used by the projector runtime
(:mod:`mmconvert.runtime.mmproj`, which adds the weights and the math), by ``verify`` (which
compares the declared layers with the checkpoint's) and by the bundle summary. It is strict:
whatever the spec requires must be there with the spec's type, and every layer must fit the
previous one, so a file that passes can be run by any reader written from the document.
Only tensor infos are read (a ``scale`` is per channel when its tensor has several values;
every ``mm.*`` tensor's type must be one the file's spec version allows), never tensor data.

    >>> spec = read_projector_spec(GGUFReader("mmproj-model-F16.gguf"))
    >>> [(m.name, m.input_dim, [x.kind for x in m.layers]) for m in spec.modalities.values()]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmconvert.errors import ProjectorFileError
from mmconvert.formats.gguf_constants import (
    FUSION_RULE,
    PROJECTOR_ACTIVATED_KINDS,
    PROJECTOR_ACTIVATIONS,
    PROJECTOR_LAYER_KINDS,
    PROJECTOR_WEIGHT_TYPES,
    PROJECTOR_WIDENING_KINDS,
    Keys,
)
from mmconvert.formats.gguf_constants import PROJECTOR_ARCH as ARCH
from mmconvert.formats.gguf_constants import PROJECTOR_SPEC_VERSION as SPEC_VERSION
from mmconvert.formats.gguf_constants import ProjectorKeys as K
from mmconvert.formats.gguf_reader import GGUFReader

_NAME_OK = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class LayerSpec:
    name: str
    kind: str  # one of PROJECTOR_LAYER_KINDS
    in_dim: int
    out_dim: int
    activation: str = ""  # PROJECTOR_ACTIVATED_KINDS only
    eps: float = 0.0
    has_bias: bool = False
    gate: str = ""  # a scale stored as an applied tanh gate: "tanh" or "1-tanh"
    folded_from: tuple[str, ...] = ()  # a linear layer replacing these (--fold-linear)
    per_channel: bool = False  # a scale with one value per channel


@dataclass(frozen=True)
class ModalitySpec:
    name: str
    input_dim: int
    hidden_dim: int
    output_dim: int
    layers: tuple[LayerSpec, ...]


@dataclass(frozen=True)
class ProjectorFileSpec:
    name: str  # general.name
    spec_version: int
    embedding_length: int
    modalities: dict[str, ModalitySpec]  # in fusion order
    placeholder_token: str
    placeholder_id: int | None  # None: the text vocabulary has no placeholder (prepend only)


def is_projector(reader: GGUFReader) -> bool:
    """Whether the file says it is a projector GGUF (``general.architecture``)."""
    return reader.value(Keys.General.ARCHITECTURE) == ARCH


class _Keys:
    """Typed access whose errors name the file and point at the spec."""

    def __init__(self, reader: GGUFReader):
        self.reader = reader

    def fail(self, message: str) -> ProjectorFileError:
        return ProjectorFileError(f"{self.reader.path}: {message} (see docs/gguf-projector.md)",
                                  path=self.reader.path)

    def get(self, key: str, *types: str, default=...):
        try:
            if default is ...:
                return self.reader.get(key, *types)
            return self.reader.get(key, *types, default=default)
        except ValueError as exc:
            raise self.fail(str(exc)) from None


def read_projector_spec(reader: GGUFReader) -> ProjectorFileSpec:
    """The projectors ``reader``'s file declares; :class:`ProjectorFileError` where it breaks
    the spec."""
    f = _Keys(reader)
    arch = f.get(Keys.General.ARCHITECTURE, "STRING")
    if arch != ARCH:
        raise f.fail(f"{Keys.General.ARCHITECTURE} is {arch!r}, not {ARCH!r}: not a projector "
                     "GGUF")
    version = f.get(K.SPEC_VERSION, "UINT32")
    if version > SPEC_VERSION:
        raise f.fail(f"spec_version {version} is newer than this reader's {SPEC_VERSION}; "
                     "upgrade mmconvert")
    fusion = f.get(K.FUSION, "STRING")
    if fusion != FUSION_RULE:
        raise f.fail(f"fusion rule {fusion!r} is unknown (this reader runs {FUSION_RULE!r})")
    hidden = f.get(K.EMBEDDING_LENGTH, "UINT32")
    names = f.get(K.MODALITIES, "ARRAY", "STRING")
    if not names or len(set(names)) != len(names):
        raise f.fail(f"{K.MODALITIES} must list distinct modality names, got {names}")
    token_id = f.get(K.PLACEHOLDER_TOKEN_ID, "INT32")
    modalities = {m: _modality(f, m, hidden) for m in names}
    _check_tensor_types(f, int(version))
    return ProjectorFileSpec(
        name=f.get(Keys.General.NAME, "STRING", default=""), spec_version=int(version),
        embedding_length=int(hidden), modalities=modalities,
        placeholder_token=f.get(K.PLACEHOLDER_TOKEN, "STRING"),
        placeholder_id=None if token_id < 0 else int(token_id))


def _check_tensor_types(f: _Keys, version: int) -> None:
    """Every projector tensor in a type the spec lists, and one the file's version allows (a
    version-2 reader cannot decode a Q4_K weight, so such a file must say version 3)."""
    for name, info in f.reader.tensors.items():
        if not name.startswith("mm."):
            continue
        since = PROJECTOR_WEIGHT_TYPES.get(info.type_name)
        if since is None:
            raise f.fail(f"tensor {name} is {info.type_name}; the spec allows "
                         f"{', '.join(PROJECTOR_WEIGHT_TYPES)}")
        if since > version:
            raise f.fail(f"tensor {name} is {info.type_name}, which needs spec_version "
                         f"{since}; the file says {version}")


def _modality(f: _Keys, m: str, hidden: int) -> ModalitySpec:
    if not _NAME_OK.fullmatch(m):
        raise f.fail(f"modality name {m!r} (letters, digits, '_' and '-' only)")
    input_dim = f.get(K.INPUT_DIM.format(m=m), "UINT32")
    output_dim = f.get(K.OUTPUT_DIM.format(m=m), "UINT32")
    if output_dim != hidden:
        raise f.fail(f"{K.OUTPUT_DIM.format(m=m)} {output_dim} differs from embedding_length {hidden}")
    item_types = {"in_dims": "UINT32", "out_dims": "UINT32", "eps": "FLOAT32", "has_bias": "BOOL"}
    columns = {c: f.get(K.LAYER.format(m=m, column=c), "ARRAY", item_types.get(c, "STRING"))
               for c in K.LAYER_COLUMNS}
    count = len(columns["names"])
    # informational arrays (optional, ignored by the math): "" where absent or short
    optional = [(f.get(K.LAYER.format(m=m, column=c), "ARRAY", "STRING", default=None)
                 or [])[:count] for c in K.OPTIONAL_LAYER_COLUMNS]
    optional = [values + [""] * (count - len(values)) for values in optional]
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) != 1 or not count:
        raise f.fail(f"{K.LAYER.format(m=m, column='*')} arrays must have one entry per layer, got lengths {lengths}")
    layers = []
    width = input_dim
    for name, kind, d_in, d_out, act, eps, has_bias, gate, folded in zip(
            *columns.values(), *optional):
        where = f"modality {m!r} layer {name!r}"
        if kind not in PROJECTOR_LAYER_KINDS:
            raise f.fail(f"{where}: kind {kind!r} (expected one of "
                         f"{', '.join(PROJECTOR_LAYER_KINDS)})")
        if d_in != width:
            raise f.fail(f"{where}: input width {d_in}, but the previous layer gives {width}")
        if kind not in PROJECTOR_WIDENING_KINDS and d_out != d_in:
            raise f.fail(f"{where}: a {kind} layer keeps the width, got {d_in} -> {d_out}")
        if kind in PROJECTOR_ACTIVATED_KINDS and act not in PROJECTOR_ACTIVATIONS:
            raise f.fail(f"{where}: activation {act!r} (known: {', '.join(PROJECTOR_ACTIVATIONS)})")
        scale = f.reader.tensors.get(f"mm.{m}.{name}.scale")
        layers.append(LayerSpec(
            name, kind, int(d_in), int(d_out), act if kind in PROJECTOR_ACTIVATED_KINDS else "",
            float(eps), bool(has_bias), gate, tuple(folded.split("+")) if folded else (),
            per_channel=kind == "scale" and scale is not None and scale.n_elements > 1))
        width = d_out
    if width != output_dim:
        raise f.fail(f"modality {m!r}: the last layer gives width {width}, output_dim is "
                     f"{output_dim}")
    hidden_dim = f.get(K.HIDDEN_DIM.format(m=m), "UINT32")
    first_linear = next((x for x in layers if x.kind in PROJECTOR_WIDENING_KINDS), None)
    if first_linear is not None and first_linear.out_dim != hidden_dim:
        raise f.fail(f"modality {m!r}: hidden_dim {hidden_dim}, but the first linear layer "
                     f"gives {first_linear.out_dim}")
    return ModalitySpec(m, int(input_dim), int(hidden_dim), int(output_dim), tuple(layers))
