"""The projector GGUF in numpy (:mod:`mmconvert.runtime.mmproj`), written from
docs/gguf-projector.md alone: activations, weight decoding, projections against the seed's
torch projector for every activation with and without layer norm, the fusion order, and every
way a projector file can break the spec.

Run with ``-s`` to see the F16/Q8_0 projection errors.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mmconvert.cli import main
from mmconvert.runtime import mmproj
from mmconvert.runtime.llama_runtime import fused_runs
from mmconvert.runtime.mmproj import (
    ProjectorFileError,
    ProjectorInputError,
    decode_weights,
    read_projector_gguf,
)
from tests.ggml_c import libggml
from tests.independent_reference import SeedModel

ACTIVATIONS = ["relu", "gelu", "tanh", "silu"]


def to_gguf(ckpt: Path, out: Path, *args: str) -> Path:
    result = CliRunner().invoke(main, ["to-gguf", str(ckpt), "-o", str(out), *args])
    assert result.exit_code == 0, result.output
    return out


def test_activations_match_torch():
    x = np.concatenate([np.linspace(-12, 12, 24001),
                        3 * np.random.default_rng(0).standard_normal(20000)]).astype(np.float32)
    t = torch.from_numpy(x)
    ref = {"relu": torch.relu(t), "gelu": torch.nn.functional.gelu(t), "tanh": torch.tanh(t),
           "silu": torch.nn.functional.silu(t),
           "gelu_tanh": torch.nn.functional.gelu(t, approximate="tanh")}
    for name, want in ref.items():
        got = mmproj.ACTIVATIONS[name](x)
        assert got.dtype == np.float32, name
        # torch's float32 1 + erf(x) cancels for x near -3.5 (off by up to 1.1e-6 there)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=2e-6, err_msg=name)
    # GELU against the float64 truth (erfc: no cancellation): within float32 rounding
    exact = np.array([0.5 * v * math.erfc(-v / math.sqrt(2)) for v in x.astype(np.float64)])
    np.testing.assert_allclose(mmproj.gelu(x), exact, rtol=2 ** -24, atol=0)
    # the exact form, not the approximation the spec warns about
    assert np.abs(mmproj.gelu(x) - mmproj.gelu_tanh(x)).max() > 1e-4


@pytest.mark.parametrize("type_name", ["F16", "Q8_0"])
def test_weight_decoding_matches_gguf_py(type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    values = np.random.default_rng(1).standard_normal((6, 96)).astype(np.float32)
    raw = gguf.quants.quantize(values, qtype)
    want = gguf.quants.dequantize(raw, qtype)
    np.testing.assert_array_equal(decode_weights(type_name, raw, (6, 96)), want)


@pytest.mark.parametrize("type_name", ["Q6_K", "Q5_K", "Q4_K", "Q5_1", "Q5_0"])
def test_k_quant_decoding_matches_libggml(type_name):
    """The K-quants (and the 32-block types they fall back to) decode to exactly the values of
    ggml's own dequantize_row_* on bytes ggml's own quantizer wrote."""
    ggml = libggml()
    values = np.random.default_rng(4).standard_normal((6, 512)).astype(np.float32)
    raw = ggml.quantize(values, type_name)
    want = ggml.dequantize(raw, type_name, 512)
    np.testing.assert_array_equal(decode_weights(type_name, raw, (6, 512)), want)
    with pytest.raises(ValueError, match="not whole blocks"):
        decode_weights(type_name, raw, (64, 48))


SEQ_INDEX = {True: {"fc1": 0, "norm1": 1, "fc2": 4, "norm2": 5}, False: {"fc1": 0, "fc2": 3}}


def torch_with_file_weights(seq: torch.nn.Module, path: Path, modality: str, layer_norm: bool):
    """The seed's nn.Sequential with the GGUF's weights, dequantised by gguf-py."""
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        prefix = f"mm.{modality}."
        if t.name.startswith(prefix):
            layer, kind = t.name[len(prefix):].rsplit(".", 1)
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            values = np.array(values, np.float32).reshape([int(d) for d in reversed(t.shape)])
            state[f"{SEQ_INDEX[layer_norm][layer]}.{kind}"] = torch.from_numpy(values)
    clone = copy.deepcopy(seq)
    clone.load_state_dict(state)
    return clone


@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "no-ln"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_numpy_projector_matches_the_reference(make_checkpoint, tmp_path, activation,
                                               layer_norm):
    """F32 reproduces the seed's projector; F16/Q8_0 compute exactly what their stored weights
    say, and stay within their rounding of the source (figures printed with -s)."""
    ckpt = make_checkpoint(activation=activation, layer_norm=layer_norm, dtype="float32")
    seed = SeedModel(ckpt)
    rng = np.random.default_rng(0)
    # m1's fc1 has 48 inputs: not whole Q8_0 blocks, so it stays F16 under q8_0 (the fallback)
    bounds = {"f32": 1e-5, "f16": 1e-3, "q8_0": 2e-2}  # f32: max |Δ|; else max |Δ| / max |ref|
    figures = []
    for outtype, bound in bounds.items():
        out = to_gguf(ckpt, tmp_path / outtype, "--outtype", "f16",
                      "--projector-outtype", outtype)
        path = next(out.glob("mmproj-*.gguf"))
        projector = read_projector_gguf(path)
        assert projector.modalities == list(seed.projectors)
        for m, p in projector.projectors.items():
            x = rng.standard_normal((5, p.input_dim)).astype(np.float32)
            ours = p(x)
            with torch.no_grad():
                ref = seed.projectors[m](torch.from_numpy(x)).numpy()
                same_weights = torch_with_file_weights(seed.projectors[m], path, m, layer_norm)(
                    torch.from_numpy(x)).numpy()
            assert ours.shape == (5, p.output_dim) and ours.dtype == np.float32
            assert np.abs(ours - same_weights).max() <= 1e-5, (outtype, m)
            delta = float(np.abs(ours - ref).max())
            error = delta if outtype == "f32" else delta / float(np.abs(ref).max())
            figures.append(f"{outtype}/{m} {error:.1e}")
            assert error <= bound, (outtype, m, error)
    print(f"\nprojector {activation} {'ln' if layer_norm else 'no-ln'}: max|Δ| (f32), "
          "max|Δ|/max|ref| (f16, q8_0): "
          + ", ".join(figures))


# rows of 256 (K blocks) and of 288 (32-blocks only) and 40 (neither): every fallback
K_SHAPES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64,
                modalities={"m1": {"input_dim": 256, "hidden_dim": 512}, "m2": {"input_dim": 288},
                            "m3": {"input_dim": 40}})
# outtype -> (general.file_type, the 32-block fallback, bound on max |Δ| / max |ref| of a
# projection: measured 2.6e-2, 5.5e-2, 8.6e-2; Q8_0 measures ~5e-3, F16 ~3e-4)
K_OUTTYPES = {"q6_k": (18, "Q8_0", 4e-2), "q5_k": (16, "Q5_1", 8e-2),
              "q4_k": (14, "Q5_0", 1.5e-1)}


@pytest.mark.parametrize("outtype", list(K_OUTTYPES))
def test_k_quantized_projector_round_trips(make_checkpoint, tmp_path, outtype):
    """A K-quantized projector: every weight matrix in the type (or llama-quantize's fallback
    for its row length), spec version 3, the runtime's weights exactly ggml's dequantization,
    its linear layers exactly dequantize-then-matmul, and projections within the type's error
    of the source (figures printed with -s)."""
    ckpt = make_checkpoint(dtype="float32", **K_SHAPES)
    file_type, fallback, bound = K_OUTTYPES[outtype]
    ggml_type = outtype.upper()
    out = to_gguf(ckpt, tmp_path / "o", "--outtype", "f16", "--projector-outtype", outtype)
    path = next(out.glob("mmproj-*.gguf"))
    assert path.name.endswith(f"-{ggml_type}.gguf")
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    matrices = {n: t for n, t in types.items() if n.endswith(".weight") and ".norm" not in n}
    assert matrices == {"mm.m1.fc1.weight": ggml_type, "mm.m1.fc2.weight": ggml_type,
                        "mm.m2.fc1.weight": fallback, "mm.m2.fc2.weight": ggml_type,
                        "mm.m3.fc1.weight": "F16", "mm.m3.fc2.weight": ggml_type}
    assert {t for n, t in types.items() if n not in matrices} == {"F32"}  # biases, norms
    assert reader.fields["general.file_type"].contents() == file_type
    assert reader.fields["mmproj-embed.spec_version"].contents() == 3

    ggml = libggml()
    seed = SeedModel(ckpt)
    projector = read_projector_gguf(path)
    rng = np.random.default_rng(5)
    figures = []
    for m, p in projector.projectors.items():
        for t in reader.tensors:  # the runtime's weights are ggml's own dequantization
            layer, param = t.name.removeprefix(f"mm.{m}.").rsplit(".", 1)
            if not t.name.startswith(f"mm.{m}.") or t.name not in matrices:
                continue
            want = ggml.dequantize(np.array(t.data), t.tensor_type.name, int(t.shape[0])) \
                if types[t.name] != "F16" else np.array(t.data, np.float32)
            got = next(x for x in p.layers if x.name == layer).weight
            np.testing.assert_array_equal(got, want.reshape(got.shape), err_msg=t.name)
        x = rng.standard_normal((5, p.input_dim)).astype(np.float32)
        fc1 = p.layers[0]
        np.testing.assert_array_equal(fc1(x), x @ fc1.weight.T + fc1.bias)
        with torch.no_grad():
            ref = seed.projectors[m](torch.from_numpy(x)).numpy()
            same_weights = torch_with_file_weights(seed.projectors[m], path, m, True)(
                torch.from_numpy(x)).numpy()
        ours = p(x)
        assert np.abs(ours - same_weights).max() <= 1e-5, m
        error = float(np.abs(ours - ref).max()) / float(np.abs(ref).max())
        figures.append(f"{m} {error:.1e}")
        assert error <= bound, (m, error)
    print(f"\nprojector {outtype}: max|Δ|/max|ref| " + ", ".join(figures))


def test_k_quantized_projector_plan_says_its_fallbacks(make_checkpoint):
    from mmconvert.convert.plan_mmproj import plan_mmproj
    from mmconvert.convert.readers import read_checkpoint

    model = read_checkpoint(make_checkpoint(dtype="float32", **K_SHAPES))
    text = "\n".join(plan_mmproj(model, "q4_k").notes)
    assert "spec version 3" in text
    assert "mm.m2.fc1.weight (row of 288 is not a multiple of 256: Q4_K -> Q5_0)" in text
    assert "mm.m3.fc1.weight (row of 40 is not a multiple of 256: Q4_K -> F16)" in text
    # Q8_0 stays in the version that introduced it
    assert "spec version 1" in "\n".join(plan_mmproj(model, "q8_0").notes)


def test_k_quant_weights_need_spec_version_3(make_checkpoint, tmp_path):
    out = to_gguf(make_checkpoint(dtype="float32", **K_SHAPES), tmp_path / "o", "--outtype",
                  "f16", "--projector-outtype", "q6_k")
    bad = tmp_path / "v2.gguf"
    rewrite_gguf(next(out.glob("mmproj-*.gguf")), bad, kv={f"{A}.spec_version": 2})
    with pytest.raises(ProjectorFileError,
                       match="tensor mm.m1.fc1.weight is Q6_K, which needs spec_version 3; "
                             "the file says 2"):
        read_projector_gguf(bad)


def test_items_are_projected_in_fusion_order(example_ckpt, tmp_path):
    """The spec's example: modalities [m1, m2], inputs given m2 first; rows go m1 then m2, and
    replace the placeholders left to right."""
    out = to_gguf(example_ckpt, tmp_path / "o", "--outtype", "f16", "--projector-outtype", "f32")
    proj = read_projector_gguf(next(out.glob("mmproj-*.gguf")))
    rng = np.random.default_rng(2)
    x1, x2 = rng.standard_normal(48), rng.standard_normal((2, 80))
    rows = proj.project({"m2": [x2], "m1": [x1]})
    np.testing.assert_array_equal(rows, np.concatenate([proj.projectors["m1"](x1),
                                                        proj.projectors["m2"](x2)]))
    assert proj.rows_per_item({"m2": [x2], "m1": [x1]}) == [1, 2]
    ph = proj.placeholder_id
    runs = fused_runs([7, ph, 8, ph, ph, 9], ph, rows)
    assert [(k, len(v)) for k, v in runs] == [("tokens", 1), ("embd", 1), ("tokens", 1),
                                              ("embd", 2), ("tokens", 1)]
    np.testing.assert_array_equal(np.concatenate([v for k, v in runs if k == "embd"]), rows)
    prepended = fused_runs([7, 8], ph, rows)
    assert [(k, len(v)) for k, v in prepended] == [("embd", 3), ("tokens", 2)]
    with pytest.raises(ValueError, match="2 placeholder tokens for 3 projected rows"):
        fused_runs([ph, 7, ph], ph, rows)
    with pytest.raises(ProjectorInputError, match="unknown modality m3; .* has m1, m2"):
        proj.project({"m3": [x1]})
    with pytest.raises(ProjectorInputError, match=r"'m1' takes items of shape \[n, 48\]"):
        proj.project({"m1": [x2]})


def rewrite_gguf(src: Path, dst: Path, kv: dict | None = None, drop_keys=(), drop_tensors=()):
    """Copy a GGUF through gguf-py with keys replaced or dropped and tensors dropped."""
    reader = gguf.GGUFReader(str(src))
    arch = (kv or {}).get("general.architecture",
                          reader.fields["general.architecture"].contents())
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
            continue
        value = (kv or {}).get(key, field.contents())
        vtype = field.types[0]
        if isinstance(value, str) and vtype != gguf.GGUFValueType.ARRAY:
            vtype = gguf.GGUFValueType.STRING
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub)
    for t in reader.tensors:
        if t.name not in drop_tensors:
            writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


A = "mmproj-embed"


@pytest.mark.parametrize("edit, message", [
    ({"kv": {"general.architecture": "clip"}}, "general.architecture is 'clip'"),
    ({"kv": {f"{A}.spec_version": 4}}, "spec_version 4 is newer than this reader's 3"),
    ({"kv": {f"{A}.fusion": "cross-attention"}}, "fusion rule 'cross-attention' is unknown"),
    ({"kv": {f"{A}.m1.input_dim": "48"}}, f"key {A}.m1.input_dim is STRING, the spec says UINT32"),
    ({"drop_keys": [f"{A}.m2.layer.eps"]}, f"key {A}.m2.layer.eps is missing"),
    ({"drop_tensors": ["mm.m1.fc2.weight"]}, "tensor mm.m1.fc2.weight is missing"),
    ({"kv": {f"{A}.m1.layer.kinds": ["linear", "layer_norm", "conv", "linear", "layer_norm"]}},
     "layer 'act': kind 'conv'"),
    ({"kv": {f"{A}.m1.layer.activations": ["", "", "swish", "", ""]}}, "activation 'swish'"),
    ({"kv": {f"{A}.m2.layer.in_dims": [80, 96, 96, 64, 64]}},
     "layer 'fc2': input width 64, but the previous layer gives 96"),
    ({"kv": {f"{A}.m1.layer.names": ["fc1", "norm1", "act", "fc2"]}},
     "one entry per layer"),
    ({"kv": {f"{A}.embedding_length": 32}}, "output_dim 64 differs from embedding_length 32"),
])
def test_projector_file_errors(example_ckpt, tmp_path, edit, message):
    out = to_gguf(example_ckpt, tmp_path / "o", "--outtype", "f16")
    source = next(out.glob("mmproj-*.gguf"))
    rewrite_gguf(source, tmp_path / "copy.gguf")  # the copy alone is still a valid file
    assert read_projector_gguf(tmp_path / "copy.gguf").modalities == ["m1", "m2"]
    bad = tmp_path / "bad.gguf"
    rewrite_gguf(source, bad, **edit)
    with pytest.raises(ProjectorFileError, match=re.escape(message)):
        read_projector_gguf(bad)


def test_projector_file_not_gguf(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ProjectorFileError, match="not a readable GGUF"):
        read_projector_gguf(tmp_path / "x.gguf")
    with pytest.raises(ProjectorFileError, match="no such file"):
        read_projector_gguf(tmp_path / "missing.gguf")


def test_spec_lists_every_weight_type_with_its_version():
    """docs/gguf-projector.md's tensor-type table is the one PROJECTOR_WEIGHT_TYPES holds."""
    from mmconvert.formats.gguf_constants import PROJECTOR_SPEC_VERSION, PROJECTOR_WEIGHT_TYPES

    doc = (Path(__file__).parents[1] / "docs" / "gguf-projector.md").read_text()
    section = doc.split("### Tensor types", 1)[1].split("\n\n", 3)[2]
    listed = {}
    for row in section.splitlines()[2:]:
        names, since = row.split("|")[1:3]
        listed.update({n.strip(): int(since) for n in names.split(",")})
    assert listed == PROJECTOR_WEIGHT_TYPES
    assert f"spec version {PROJECTOR_SPEC_VERSION})" in doc.splitlines()[0]
