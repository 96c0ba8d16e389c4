"""The projector GGUF (``mmproj-embed``) read back and run in numpy.

Written from ``docs/gguf-projector.md`` alone (keys, tensor layout, Q8_0/F16 bytes, the math of
each layer), not from the writer in :mod:`mmconvert.convert.plan_mmproj`: if the two disagree,
the tests comparing this module with the torch reference fail, so the document is shown to be
enough for another runtime. gguf-py's ``GGUFReader`` parses the container (the spec allows any
GGUF reader); weights are decoded here as the spec describes them.

Everything computes in float32, as the spec says; only GELU's error function is evaluated in
float64 (numpy has none; :func:`math.erfc` is accurate to double precision).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmconvert.errors import ProjectorFileError, ProjectorInputError

ARCH = "mmproj-embed"
SPEC_VERSION = 2  # the newest version this reader understands
FUSION_RULE = "replace-placeholders-else-prepend"
LAYER_KINDS = ("linear", "layer_norm", "act", "glu", "scale")  # glu, scale: version 2
_WIDENING = ("linear", "glu")  # the kinds that may change the width
_NAME_OK = re.compile(r"[A-Za-z0-9_-]+")
_Q8_0_BLOCK = 32  # values per block; a block is a float16 scale then 32 int8


# -- activations ------------------------------------------------------------------------------

_erfc = np.frompyfunc(math.erfc, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, ``0.5 x (1 + erf(x / sqrt 2))`` (PyTorch ``nn.GELU()``), float32 out.

    Evaluated as ``0.5 x erfc(-x / sqrt 2)``, the same function without the cancellation of
    ``1 + erf`` for negative x, in float64, then rounded once.
    """
    x64 = x.astype(np.float64)
    erfc = _erfc(x64 * (-1.0 / math.sqrt(2.0))).astype(np.float64)
    return (0.5 * x64 * erfc).astype(np.float32)


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    inner = np.float32(math.sqrt(2.0 / math.pi)) * (x + np.float32(0.044715) * x ** 3)
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(inner))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "relu": lambda x: np.maximum(x, np.float32(0.0)),
    "tanh": np.tanh,
    "silu": silu,
}


# -- weights ----------------------------------------------------------------------------------

def decode_weights(type_name: str, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of a tensor's bytes (``raw``, uint8) in numpy ``shape``."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    count = math.prod(shape)
    if type_name == "F32":
        values = raw.view("<f4")
    elif type_name == "F16":
        values = raw.view("<f2").astype(np.float32)
    elif type_name == "Q8_0":
        if shape[-1] % _Q8_0_BLOCK:
            raise ValueError(f"Q8_0 rows of {shape[-1]} values are not whole blocks of 32")
        blocks = raw.reshape(-1, 2 + _Q8_0_BLOCK)
        scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
        quants = blocks[:, 2:].view(np.int8).astype(np.float32)
        values = (scale * quants).reshape(-1)
    else:
        raise ValueError(f"tensor type {type_name} (the spec allows F32, F16 and Q8_0)")
    if values.size != count:
        raise ValueError(f"{values.size} values for shape {list(shape)}")
    return values.reshape(shape).astype(np.float32, copy=False)


# -- the model --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # one of LAYER_KINDS
    in_dim: int
    out_dim: int
    activation: str = ""
    eps: float = 0.0
    weight: np.ndarray | None = None  # linear, glu's gate: [out, in]; layer_norm: [dim]; scale
    bias: np.ndarray | None = None  # linear, layer_norm, glu's gate
    up_weight: np.ndarray | None = None  # glu's up: [out, in]
    up_bias: np.ndarray | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "linear":
            y = x @ self.weight.T
            return y + self.bias if self.bias is not None else y
        if self.kind == "glu":  # act(x G^T + bg) * (x U^T + bu)
            gate = x @ self.weight.T
            up = x @ self.up_weight.T
            if self.bias is not None:
                gate, up = gate + self.bias, up + self.up_bias
            return ACTIVATIONS[self.activation](gate) * up
        if self.kind == "scale":  # already tanh(g) or 1 - tanh(g): only multiply
            return x * self.weight
        if self.kind == "layer_norm":
            mu = x.mean(axis=-1, keepdims=True)
            centred = x - mu
            var = (centred * centred).mean(axis=-1, keepdims=True)  # biased, as nn.LayerNorm
            y = centred / np.sqrt(var + np.float32(self.eps)) * self.weight
            return y + self.bias if self.bias is not None else y
        return ACTIVATIONS[self.activation](x)


@dataclass(frozen=True)
class ModalityProjector:
    modality: str
    input_dim: int
    hidden_dim: int
    output_dim: int
    layers: tuple[Layer, ...]

    def rows(self, item: np.ndarray) -> np.ndarray:
        """``item`` as float32 rows ``[n, input_dim]`` (a vector is one row); checked."""
        x = np.asarray(item, dtype=np.float32)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.input_dim or x.shape[0] == 0:
            raise ProjectorInputError(
                f"modality {self.modality!r} takes items of shape [n, {self.input_dim}] (or "
                f"[{self.input_dim}]) with n >= 1, got {list(np.shape(item))}")
        return x

    def __call__(self, item: np.ndarray) -> np.ndarray:
        x = self.rows(item)
        for layer in self.layers:
            x = layer(x)
        return x.astype(np.float32, copy=False)


@dataclass(frozen=True)
class ProjectorGGUF:
    path: Path
    name: str
    embedding_length: int
    projectors: dict[str, ModalityProjector]  # in fusion order
    placeholder_token: str
    placeholder_id: int | None  # None: the text vocabulary has no placeholder (prepend only)

    @property
    def modalities(self) -> list[str]:
        return list(self.projectors)

    def _check_modalities(self, items: Mapping[str, Sequence[np.ndarray]]) -> None:
        unknown = sorted(set(items) - set(self.projectors))
        if unknown:
            raise ProjectorInputError(f"unknown modalit{'ies' if len(unknown) > 1 else 'y'} "
                                      f"{', '.join(unknown)}; {self.path.name} has "
                                      f"{', '.join(self.projectors)}")

    def rows_per_item(self, items: Mapping[str, Sequence[np.ndarray]]) -> list[int]:
        """Row counts of the items in fusion order (modalities as in the file, items in order)."""
        self._check_modalities(items)
        return [self.projectors[m].rows(item).shape[0]
                for m in self.projectors for item in items.get(m, ())]

    def project(self, items: Mapping[str, Sequence[np.ndarray]]) -> np.ndarray:
        """Every item projected, concatenated in fusion order: ``[N, embedding_length]``."""
        self._check_modalities(items)
        rows = [self.projectors[m](item) for m in self.projectors for item in items.get(m, ())]
        if not rows:
            return np.zeros((0, self.embedding_length), dtype=np.float32)
        return np.concatenate(rows)


# -- reading ----------------------------------------------------------------------------------

class _Fields:
    """Typed access to the key-value section, with errors that name the file and the key."""

    def __init__(self, path: Path, reader: Any):
        self.path = path
        self.fields = reader.fields

    def fail(self, message: str) -> ProjectorFileError:
        return ProjectorFileError(f"{self.path}: {message} (see docs/gguf-projector.md)")

    def get(self, key: str, *want: str, default: Any = ...) -> Any:
        """The value of ``key``, whose GGUF type must be ``want`` (``"UINT32"``, or
        ``"ARRAY", "STRING"`` for an array of strings)."""
        field = self.fields.get(key)
        if field is None:
            if default is not ...:
                return default
            raise self.fail(f"key {key} is missing")
        types = [t.name for t in field.types]
        if types != list(want):
            raise self.fail(f"key {key} is {'/'.join(types)}, the spec says {'/'.join(want)}")
        return field.contents()


def read_projector_gguf(path: str | Path) -> ProjectorGGUF:
    """Load and validate a projector GGUF; weights are dequantised to float32."""
    path = Path(path)
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
    except FileNotFoundError as exc:
        raise ProjectorFileError(f"{path}: no such file") from exc
    except Exception as exc:  # gguf-py raises ValueError / struct errors on damaged files
        raise ProjectorFileError(f"{path}: not a readable GGUF file ({exc})") from exc
    f = _Fields(path, reader)
    arch = f.get("general.architecture", "STRING")
    if arch != ARCH:
        raise f.fail(f"general.architecture is {arch!r}, not {ARCH!r}: not a projector GGUF")
    version = f.get(f"{ARCH}.spec_version", "UINT32")
    if version > SPEC_VERSION:
        raise f.fail(f"spec_version {version} is newer than this reader's {SPEC_VERSION}; "
                     "upgrade mmconvert")
    fusion = f.get(f"{ARCH}.fusion", "STRING")
    if fusion != FUSION_RULE:
        raise f.fail(f"fusion rule {fusion!r} is unknown (this reader runs {FUSION_RULE!r})")
    hidden = f.get(f"{ARCH}.embedding_length", "UINT32")
    modalities = f.get(f"{ARCH}.modalities", "ARRAY", "STRING")
    if not modalities or len(set(modalities)) != len(modalities):
        raise f.fail(f"{ARCH}.modalities must list distinct modality names, got {modalities}")
    token_id = f.get(f"{ARCH}.placeholder.token_id", "INT32")
    tensors = {t.name: t for t in reader.tensors}
    projectors = {m: _read_modality(f, tensors, m, hidden) for m in modalities}
    return ProjectorGGUF(
        path=path, name=f.get("general.name", "STRING", default=""), embedding_length=hidden,
        projectors=projectors, placeholder_token=f.get(f"{ARCH}.placeholder.token", "STRING"),
        placeholder_id=None if token_id < 0 else int(token_id))


def _read_modality(f: _Fields, tensors: dict[str, Any], m: str, hidden: int
                   ) -> ModalityProjector:
    if not _NAME_OK.fullmatch(m):
        raise f.fail(f"modality name {m!r} (letters, digits, '_' and '-' only)")
    p = f"{ARCH}.{m}"
    input_dim = f.get(f"{p}.input_dim", "UINT32")
    output_dim = f.get(f"{p}.output_dim", "UINT32")
    if output_dim != hidden:
        raise f.fail(f"{p}.output_dim {output_dim} differs from embedding_length {hidden}")
    columns = {
        "names": f.get(f"{p}.layer.names", "ARRAY", "STRING"),
        "kinds": f.get(f"{p}.layer.kinds", "ARRAY", "STRING"),
        "in_dims": f.get(f"{p}.layer.in_dims", "ARRAY", "UINT32"),
        "out_dims": f.get(f"{p}.layer.out_dims", "ARRAY", "UINT32"),
        "activations": f.get(f"{p}.layer.activations", "ARRAY", "STRING"),
        "eps": f.get(f"{p}.layer.eps", "ARRAY", "FLOAT32"),
        "has_bias": f.get(f"{p}.layer.has_bias", "ARRAY", "BOOL"),
    }
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) != 1 or not columns["names"]:
        raise f.fail(f"{p}.layer.* arrays must have one entry per layer, got lengths {lengths}")
    layers = []
    width = input_dim
    for name, kind, d_in, d_out, act, eps, has_bias in zip(*columns.values()):
        where = f"modality {m!r} layer {name!r}"
        if kind not in LAYER_KINDS:
            raise f.fail(f"{where}: kind {kind!r} (expected one of {', '.join(LAYER_KINDS)})")
        if d_in != width:
            raise f.fail(f"{where}: input width {d_in}, but the previous layer gives {width}")
        if kind not in _WIDENING and d_out != d_in:
            raise f.fail(f"{where}: a {kind} layer keeps the width, got {d_in} -> {d_out}")
        if kind in ("act", "glu") and act not in ACTIVATIONS:
            raise f.fail(f"{where}: activation {act!r} (known: {', '.join(ACTIVATIONS)})")
        weight = bias = up_weight = up_bias = None
        t = f"mm.{m}.{name}."
        if kind == "linear":
            weight = _tensor(f, tensors, t + "weight", (d_out, d_in))
        elif kind == "layer_norm":
            weight = _tensor(f, tensors, t + "weight", (d_out,))
        elif kind == "glu":
            weight = _tensor(f, tensors, t + "gate.weight", (d_out, d_in))
            up_weight = _tensor(f, tensors, t + "up.weight", (d_out, d_in))
        elif kind == "scale":  # one value for every channel, or one per channel
            count = int(tensors[t + "scale"].n_elements) if t + "scale" in tensors else d_out
            weight = _tensor(f, tensors, t + "scale", (1,) if count == 1 else (d_out,))
        if kind in ("linear", "layer_norm") and has_bias:
            bias = _tensor(f, tensors, t + "bias", (d_out,))
        elif kind == "glu" and has_bias:
            bias = _tensor(f, tensors, t + "gate.bias", (d_out,))
            up_bias = _tensor(f, tensors, t + "up.bias", (d_out,))
        layers.append(Layer(name, kind, int(d_in), int(d_out),
                            act if kind in ("act", "glu") else "", float(eps), weight, bias,
                            up_weight, up_bias))
        width = d_out
    if width != output_dim:
        raise f.fail(f"modality {m!r}: the last layer gives width {width}, output_dim is "
                     f"{output_dim}")
    hidden_dim = f.get(f"{p}.hidden_dim", "UINT32")
    first_linear = next((x for x in layers if x.kind in _WIDENING), None)
    if first_linear is not None and first_linear.out_dim != hidden_dim:
        raise f.fail(f"modality {m!r}: hidden_dim {hidden_dim}, but the first linear layer "
                     f"gives {first_linear.out_dim}")
    return ModalityProjector(m, int(input_dim), int(hidden_dim), int(output_dim), tuple(layers))


def _tensor(f: _Fields, tensors: dict[str, Any], name: str, shape: tuple[int, ...]
            ) -> np.ndarray:
    t = tensors.get(name)
    if t is None:
        raise f.fail(f"tensor {name} is missing")
    found = tuple(int(d) for d in reversed(t.shape))  # GGUF stores ggml's ne: reversed
    if found != shape:
        raise f.fail(f"tensor {name} has numpy shape {list(found)}, expected {list(shape)}")
    try:
        return decode_weights(t.tensor_type.name, np.asarray(t.data), shape)
    except ValueError as exc:
        raise f.fail(f"tensor {name}: {exc}") from exc
