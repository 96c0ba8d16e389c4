"""The projector GGUF (``mmproj-embed``) read back and run in numpy.

Written from ``docs/gguf-projector.md`` alone (keys, tensor layout, Q8_0/F16 bytes, the math of
each layer), not from the writer in :mod:`mmconvert.convert.plan_mmproj`: if the two disagree,
the tests comparing this module with the torch reference fail, so the document is shown to be
enough for another runtime. :mod:`mmconvert.formats.gguf_reader` parses the container and
:mod:`mmconvert.formats.gguf_projector` checks the keys (the one parser of the spec, shared with
verify and the bundle summary); F32, F16 and Q8_0 weights are decoded here as the spec
describes them. The K-quants (and their Q5_0/Q5_1 fallbacks), which the spec defines as ggml's
layouts and ggml's ``dequantize_row_*``, go through :func:`mmconvert.formats.quants.dequantize`,
whose values tests compare with libggml's own (tests/test_mmproj.py).

Everything computes in float32, as the spec says; only GELU's error function is evaluated in
float64 (numpy has none; :func:`math.erfc` is accurate to double precision).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmconvert.errors import ProjectorFileError, ProjectorInputError
from mmconvert.formats import quants
from mmconvert.formats.gguf_constants import PROJECTOR_WEIGHT_TYPES
from mmconvert.formats.gguf_projector import LayerSpec, ModalitySpec, read_projector_spec
from mmconvert.formats.gguf_reader import GGUFReader

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
        levels = blocks[:, 2:].view(np.int8).astype(np.float32)
        values = (scale * levels).reshape(-1)
    elif type_name in PROJECTOR_WEIGHT_TYPES:  # ggml's block layouts (K-quants, Q5_0, Q5_1)
        block = quants.ggml_type_info(type_name)
        if shape[-1] % block.block_size:
            raise ValueError(f"{type_name} rows of {shape[-1]} values are not whole blocks of "
                             f"{block.block_size}")
        values = quants.dequantize(raw, type_name).reshape(-1)
    else:
        raise ValueError(f"tensor type {type_name} (the spec allows "
                         f"{', '.join(PROJECTOR_WEIGHT_TYPES)})")
    if values.size != count:
        raise ValueError(f"{values.size} values for shape {list(shape)}")
    return values.reshape(shape).astype(np.float32, copy=False)


# -- the model --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layer:
    name: str
    kind: str  # one of gguf_projector.LAYER_KINDS
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

def read_projector_gguf(path: str | Path) -> ProjectorGGUF:
    """Load and validate a projector GGUF; weights are dequantised to float32. The keys are
    checked by :func:`mmconvert.formats.gguf_projector.read_projector_spec`."""
    path = Path(path)
    try:
        reader = GGUFReader(path)
    except FileNotFoundError as exc:
        raise ProjectorFileError(f"{path}: no such file", path=path) from exc
    except (OSError, ValueError) as exc:
        raise ProjectorFileError(f"{path}: not a readable GGUF file ({exc})", path=path) from exc
    spec = read_projector_spec(reader)
    projectors = {m: _modality(reader, s) for m, s in spec.modalities.items()}
    return ProjectorGGUF(path=path, name=spec.name, embedding_length=spec.embedding_length,
                         projectors=projectors, placeholder_token=spec.placeholder_token,
                         placeholder_id=spec.placeholder_id)


def _modality(reader: GGUFReader, spec: ModalitySpec) -> ModalityProjector:
    layers = tuple(_layer(reader, f"mm.{spec.name}.{x.name}.", x) for x in spec.layers)
    return ModalityProjector(spec.name, spec.input_dim, spec.hidden_dim, spec.output_dim, layers)


def _layer(reader: GGUFReader, t: str, x: LayerSpec) -> Layer:
    """One layer with its weights, by the tensor table of docs/gguf-projector.md."""
    weight = bias = up_weight = up_bias = None
    d_in, d_out = x.in_dim, x.out_dim
    if x.kind == "linear":
        weight = _tensor(reader, t + "weight", (d_out, d_in))
    elif x.kind == "layer_norm":
        weight = _tensor(reader, t + "weight", (d_out,))
    elif x.kind == "glu":
        weight = _tensor(reader, t + "gate.weight", (d_out, d_in))
        up_weight = _tensor(reader, t + "up.weight", (d_out, d_in))
    elif x.kind == "scale":  # one value for every channel, or one per channel
        weight = _tensor(reader, t + "scale", (d_out,) if x.per_channel else (1,))
    if x.kind in ("linear", "layer_norm") and x.has_bias:
        bias = _tensor(reader, t + "bias", (d_out,))
    elif x.kind == "glu" and x.has_bias:
        bias = _tensor(reader, t + "gate.bias", (d_out,))
        up_bias = _tensor(reader, t + "up.bias", (d_out,))
    return Layer(x.name, x.kind, d_in, d_out, x.activation, x.eps, weight, bias, up_weight,
                 up_bias)


def _tensor(reader: GGUFReader, name: str, shape: tuple[int, ...]) -> np.ndarray:
    def fail(message: str) -> ProjectorFileError:
        return ProjectorFileError(f"{reader.path}: {message} (see docs/gguf-projector.md)",
                                  path=reader.path, name=name)

    t = reader.tensors.get(name)
    if t is None:
        raise fail(f"tensor {name} is missing")
    if t.shape != shape:
        raise fail(f"tensor {name} has numpy shape {list(t.shape)}, expected {list(shape)}")
    try:
        return decode_weights(t.type_name, reader.tensor_bytes(name), shape)
    except ValueError as exc:
        raise fail(f"tensor {name}: {exc}") from exc
