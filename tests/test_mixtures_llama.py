"""Every K-quant mixture against llama.cpp's own quantizer: a generated checkpoint is written
as an F32 GGUF by ``mmconvert to-gguf``, ``llama_cpp.llama_model_quantize`` (the C API behind
``llama-quantize``) quantizes it to each file type, and mmconvert's plan for the same
checkpoint must choose the same type for every tensor and write the same bytes.

Types are compared for every tensor. Bytes are compared for every tensor whose type has a
kernel in ``formats.quants.TYPES``; the others are listed in a skip message (the kernels land
in other modules). Overrides are compared with llama-quantize's own (``output_tensor_type``,
``token_embedding_type``, ``pure`` and ``tt_overrides``, all reachable through ctypes).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from mmconvert import api
from mmconvert.convert.plan_gguf import plan_gguf, text_sources
from mmconvert.convert.readers import read_checkpoint
from mmconvert.formats import quants
from mmconvert.formats.gguf_constants import MIXTURE_BASE, GGMLQuantizationType, file_type
from mmconvert.formats.gguf_mixtures import NO_OVERRIDES, Overrides, make_overrides

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama

MIXTURES = list(MIXTURE_BASE)
ROWS_256 = dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, head_dim=64)
# every row a multiple of 256 (the K-types' block); "rows-64" is the example's shape, where
# every 256-block choice falls back
VARIANTS = {
    # 16 layers for the n/16 rule; a 256-wide MLP keeps our kernels' share of the time small
    "dense-16-layers": dict(ROWS_256, num_hidden_layers=16, num_key_value_heads=2,
                            intermediate_size=256),
    "gqa4-tied": dict(ROWS_256, num_hidden_layers=8, num_key_value_heads=1, tied=True),
    "moe-8-experts": dict(ROWS_256, num_hidden_layers=4, num_key_value_heads=2, num_experts=8,
                          moe_intermediate_size=256),
    "rows-64": {},
}


class Case:
    """One variant: its checkpoint, our F32 GGUF of it and llama-quantize's outputs (cached)."""

    def __init__(self, ckpt: Path, work: Path):
        self.ckpt, self.work = ckpt, work
        result = api.to_gguf(ckpt, work / "f32", outtypes=["f32"], checksums=False)
        self.f32 = next(work / "f32" / f for f in result.files if f.endswith("-F32.gguf"))
        self.model = read_checkpoint(ckpt)
        self.sources = text_sources(self.model)
        self._quantized: dict[tuple, dict] = {}

    def llama(self, mixture: str, **params) -> dict[str, tuple[str, np.ndarray]]:
        """llama-quantize's file for ``mixture``: name -> (type name, data as uint8)."""
        key = (mixture, tuple(sorted(params.items())))
        if key not in self._quantized:
            out = self.work / f"llama-{len(self._quantized)}.gguf"
            self._quantized[key] = read_tensors(llama_quantize(self.f32, out, mixture, **params))
            self._quantized[key]["general.file_type"] = file_type_of(out)
        return self._quantized[key]

    def planned(self, mixture: str, overrides: Overrides = NO_OVERRIDES) -> dict:
        plan = plan_gguf(self.model, mixture.lower(), self.sources, overrides)
        return {t.name: t for t in plan.tensors}


def llama_quantize(src: Path, out: Path, mixture: str, pure: bool = False,
                   output_tensor_type: str | None = None,
                   token_embedding_type: str | None = None,
                   tensor_types: tuple[tuple[str, str], ...] = ()) -> Path:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(mixture))
    params.nthread = 2
    params.pure = pure
    if output_tensor_type:
        params.output_tensor_type = int(GGMLQuantizationType[output_tensor_type])
    if token_embedding_type:
        params.token_embedding_type = int(GGMLQuantizationType[token_embedding_type])
    if tensor_types:  # a {NULL, GGML_TYPE_COUNT}-terminated array, as llama-quantize builds
        entries = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for entry, (pattern, ggml_type) in zip(entries, tensor_types):
            entry.pattern = pattern.encode()
            entry.type = int(GGMLQuantizationType[ggml_type])
        entries[len(tensor_types)].pattern = None
        entries[len(tensor_types)].type = len(GGMLQuantizationType) + 100
        params.tt_overrides = ctypes.cast(entries, type(params.tt_overrides))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(),
                                        ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({mixture}) failed"
    return out


def read_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    reader = GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.ascontiguousarray(t.data).view(np.uint8).reshape(-1))
            for t in reader.tensors}


def file_type_of(path: Path) -> int:
    field = GGUFReader(path).fields["general.file_type"]
    return int(field.parts[field.data[0]][0])


@pytest.fixture(scope="module")
def cases(make_checkpoint, tmp_path_factory) -> dict[str, Case]:
    made: dict[str, Case] = {}

    def get(variant: str) -> Case:
        if variant not in made:
            made[variant] = Case(make_checkpoint(**VARIANTS[variant]),
                                 tmp_path_factory.mktemp(variant))
        return made[variant]

    return get


def assert_same_types(ours: dict, theirs: dict, what: str) -> None:
    mine = {name: t.dtype for name, t in ours.items()}
    llama = {name: v[0] for name, v in theirs.items() if name != "general.file_type"}
    assert set(mine) == set(llama), what
    wrong = {n: (mine[n], llama[n]) for n in mine if mine[n] != llama[n]}
    assert not wrong, f"{what}: (ours, llama-quantize): {wrong}"


def compare_bytes(ours: dict, theirs: dict) -> list[str]:
    """Assert equal bytes where a kernel exists; return the types that have none."""
    missing: list[str] = []
    for name, planned in ours.items():
        if planned.dtype not in quants.TYPES:
            missing.append(planned.dtype)
            continue
        data = quants.encoder_for(planned.source.dtype, planned.dtype)(planned.source.read())
        mine = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        llama = theirs[name][1]
        assert mine.shape == llama.shape, name
        if not np.array_equal(mine, llama):
            blocks = np.flatnonzero(mine != llama) // max(1, quants.TYPES[planned.dtype]
                                                                 .type_size)
            pytest.fail(f"{name} ({planned.dtype}): {len(np.unique(blocks))} blocks differ "
                        "from llama-quantize's")
    return sorted(set(missing))


@pytest.mark.parametrize("mixture", MIXTURES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_types_equal_llama_quantize(cases, variant, mixture):
    case = cases(variant)
    theirs = case.llama(mixture)
    assert_same_types(case.planned(mixture), theirs, f"{variant} {mixture}")
    assert theirs["general.file_type"] == int(file_type(mixture))


@pytest.mark.parametrize("mixture", MIXTURES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bytes_equal_llama_quantize(cases, variant, mixture):
    case = cases(variant)
    missing = compare_bytes(case.planned(mixture), case.llama(mixture))
    if missing:
        pytest.skip(f"bytes not compared for tensors of {', '.join(missing)}: no kernel yet")


# (our overrides, llama-quantize's params), on the variants where each one matters
OVERRIDES = [
    ("dense-16-layers", "Q4_K_M", dict(output_tensor_type="Q8_0", token_embedding_type="Q5_K")),
    ("gqa4-tied", "Q4_K_M", dict(output_tensor_type="Q8_0")),  # a tied token_embd follows it
    ("gqa4-tied", "Q5_K_M", dict(token_embedding_type="Q4_0")),
    ("dense-16-layers", "Q4_K_M", dict(pure=True)),
    ("gqa4-tied", "Q3_K_M", dict(pure=True, output_tensor_type="Q6_K")),
    # a match on layer 0's attn_v is not counted: layers 1 and 2 become Q3_K_M's first two
    ("dense-16-layers", "Q3_K_M", dict(tensor_types=((r"blk\.0\.attn_v", "Q8_0"),))),
    ("dense-16-layers", "Q4_K_S", dict(tensor_types=(("ffn_(up|gate)", "Q5_K"),
                                                     ("ffn", "Q8_0"), ("attn_q", "F16")))),
    ("moe-8-experts", "Q4_K_M", dict(tensor_types=(("_exps", "Q6_K"),), pure=True)),
    ("rows-64", "Q2_K", dict(tensor_types=(("attn_output", "Q6_K"),))),  # then the fallback
]


@pytest.mark.parametrize("variant, mixture, options", OVERRIDES)
def test_overrides_equal_llama_quantize(cases, variant, mixture, options):
    case = cases(variant)
    ours = make_overrides(options.get("output_tensor_type"), options.get("token_embedding_type"),
                          [f"{p}={t}" for p, t in options.get("tensor_types", ())],
                          options.get("pure", False))
    theirs = case.llama(mixture, **options)
    planned = case.planned(mixture, ours)
    assert_same_types(planned, theirs, f"{variant} {mixture} {ours.describe()}")
    missing = compare_bytes(planned, theirs)
    if missing:
        pytest.skip(f"types equal; bytes not compared for {', '.join(missing)}: no kernel yet")


def test_written_bundle_equals_llama_quantize(cases, tmp_path):
    """The files ``to-gguf`` writes, all mixtures whose kernels exist in one run: every tensor's
    type and bytes and general.file_type as llama-quantize writes them."""
    case = cases("dense-16-layers")
    ready = [m for m in MIXTURES
             if all(t.dtype in quants.TYPES for t in case.planned(m).values())]
    if not ready:
        missing = sorted({t.dtype for m in MIXTURES for t in case.planned(m).values()}
                         - set(quants.TYPES))
        pytest.skip(f"no mixture can be written yet: no kernel for {', '.join(missing)}")
    result = api.to_gguf(case.ckpt, tmp_path / "b", outtypes=[m.lower() for m in ready],
                         checksums=False)
    for mixture in ready:
        (name,) = [f for f in result.files if f.endswith(f"-{mixture}.gguf")]
        path = tmp_path / "b" / name
        written, theirs = read_tensors(path), case.llama(mixture)
        assert file_type_of(path) == theirs["general.file_type"]
        for tensor, (ggml_type, data) in written.items():
            assert (ggml_type, data.tobytes()) == (theirs[tensor][0], theirs[tensor][1].tobytes()), \
                f"{mixture} {tensor}"
