"""Gated (SwiGLU), low-rank and tanh-gated projectors through every bundle.

Two generated checkpoints cover the kinds of docs/dialects.md between them:

* ``A``: m1 SwiGLU stored fused (up half first) ending in a per-channel complementary tanh
  gate; m2 low-rank with nothing between ``down`` and ``up`` (foldable) and a scalar gate;
* ``B``: m1 SwiGLU stored split, no layer norm, no biases; m2 low-rank with a layer norm and
  GELU between; m3 the seed's MLP with a scalar gate.

Each converts to all three bundles (A's GGUF and one of its HF bundles with ``--fold-linear``)
and passes ``verify`` with every backend, llama.cpp included; each transform has a round trip
and a planted bug that makes ``verify`` exit 1 naming it.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from mmconvert.cli import main
from mmconvert.convert import transforms
from mmconvert.convert.export_gguf import export_gguf
from mmconvert.convert.export_hf import export_hf
from mmconvert.convert.export_safetensors import export_safetensors
from mmconvert.convert.readers import read_checkpoint
from mmconvert.errors import CheckpointError
from mmconvert.formats.dtypes import to_float32
from mmconvert.runtime import llama_lib
from mmconvert.verify.reference import ReferenceModel
from tests.independent_reference import SeedModel, _state_dict
from tests.test_verify_mutations import (
    assert_caught,
    edit_safetensors,
    rewrite_gguf,
    tree_copy,
    verify,
)

TANH = {"kind": "tanh"}
KINDS = {
    "A": {"modalities": {
        "m1": {"input_dim": 48, "projector_type": "swiglu", "activation": "silu",
               "fused_gate_up": True, "gate_up_gate_first": False,
               "gate": {"kind": "tanh", "complementary": True, "per_channel": True}},
        "m2": {"input_dim": 64, "projector_type": "low_rank", "rank": 8, "gate": TANH}}},
    "B": {"modalities": {
        "m1": {"input_dim": 48, "projector_type": "swiglu", "hidden_dim": 96,
               "layer_norm": False, "bias": False},
        "m2": {"input_dim": 80, "projector_type": "low_rank", "rank": 16, "activation": "gelu",
               "layer_norm": True},
        "m3": {"input_dim": 32, "gate": TANH}}},
}


def mm_inputs(model, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return {m: [torch.randn(2, spec.input_dim, generator=gen),
                torch.randn(spec.input_dim, generator=gen)]
            for m, spec in model.projectors.items()}


@pytest.fixture(scope="module")
def kinds(make_checkpoint, tmp_path_factory):
    """Per checkpoint: its folder, canonical model, bundles and a saved reference."""
    out = {}
    for name, options in KINDS.items():
        ckpt = make_checkpoint(**options)
        model = read_checkpoint(ckpt)
        root = tmp_path_factory.mktemp(f"kinds-{name}")
        fold = name == "A"
        export_hf(model, root / "hf")
        if fold:
            export_hf(model, root / "hf-folded", fold_linear=True)
        export_safetensors(model, root / "st")
        export_gguf(model, root / "gguf", outtypes=["f32", "f16", "q8_0"], fold_linear=fold)
        result = CliRunner().invoke(main, ["verify", str(ckpt), "--save-reference",
                                           str(root / "ref.safetensors"), "-q", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        out[name] = {"ckpt": ckpt, "model": model, "root": root}
    return out


# ---------------------------------------------------------------------------------------------
# the reader and every bundle compute what the independent model computes


@pytest.mark.parametrize("name", list(KINDS))
def test_reference_and_hf_bundle_match_the_independent_model(kinds, name):
    from transformers import AutoModelForCausalLM

    k = kinds[name]
    model = k["model"]
    seed, ref = SeedModel(k["ckpt"]), ReferenceModel(model)
    bundles = ["hf", "hf-folded"] if name == "A" else ["hf"]
    remotes = [AutoModelForCausalLM.from_pretrained(k["root"] / b, trust_remote_code=True,
                                                    dtype=torch.float32,
                                                    attn_implementation="eager").eval()
               for b in bundles]
    ph = model.multimodal_token_id
    mm = mm_inputs(model)
    rows = sum(x.reshape(-1, x.shape[-1]).shape[0] for items in mm.values() for x in items)
    for ids in ([5] + [ph] * rows + [6], [7, 8, 9]):
        want = seed.logits(ids, mm)
        assert (ref.logits(ids, mm) - want).abs().max() <= 1e-5
        for remote in remotes:
            with torch.no_grad():
                got = remote(input_ids=torch.tensor([ids]), mm_inputs=mm).logits[0]
            assert (got - want).abs().max() <= 1e-5


@pytest.mark.llama
@pytest.mark.skipif(llama_lib.unavailable() is not None, reason="llama-cpp-python missing")
@pytest.mark.parametrize("name", list(KINDS))
def test_every_bundle_passes_verify(kinds, name, tmp_path):
    k = kinds[name]
    root = k["root"]
    bundles = [root / b for b in ("hf", "hf-folded", "st", "gguf") if (root / b).is_dir()]
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["verify", str(k["ckpt"]), *map(str, bundles), "-q",
                                       "--device", "cpu", "--reference",
                                       str(root / "ref.safetensors"), "--report-json",
                                       str(report)])
    assert result.exit_code == 0, result.output
    targets = json.loads(report.read_text())["targets"]
    assert len(targets) == len(bundles) - 1 + 6  # the GGUF: 3 files x 2 backends
    types = {(t["label"].split(" ")[0], t["backend"]): t["output_type"] for t in targets}
    assert types[("hf", "hf")] == "same" and types[("st", "safetensors")] == "same"
    if name == "A":
        assert types[("hf-folded", "hf")] == "F32"  # folded: exact weights, new arithmetic
    folded = 2 if name == "A" else 0  # down+up weights and biases -> one weight, one bias
    for t in targets:
        assert t["status"] == "pass", t["causes"]
        assert t["tensors"]["failing"] == []
        is_folded = t["label"].startswith("hf-folded") or t["backend"].startswith("gguf")
        assert t["tensors"]["checked"] == len(k["model"].tensors) - (folded if is_folded else 0)


# ---------------------------------------------------------------------------------------------
# round trips: what each transform keeps bit for bit


def test_fused_gate_up_is_split_lazily_and_fused_back_bit_exact(kinds):
    k = kinds["A"]
    model, source = k["model"], _state_dict(k["ckpt"])
    gate = model.tensors["mm.m1.glu.gate.weight"]
    assert gate.derivation == ("split_gate_up(up,gate)[gate]",)
    fused = source["multimodal_projector.projectors.m1.gate_up_proj.weight"]
    half = fused.shape[0] // 2  # the up half is first in this checkpoint
    assert torch.equal(torch.from_numpy(gate.read()).view(torch.bfloat16), fused[half:])
    with safe_open(str(k["root"] / "st" / "model.safetensors"), "pt") as f:
        bundle = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118
    assert set(bundle) == set(source)
    for name, tensor in source.items():
        assert torch.equal(bundle[name].view(torch.uint8), tensor.view(torch.uint8)), name
    manifest = json.loads((k["root"] / "st" / "mmconvert.json").read_text())
    assert manifest["pieces"]["multimodal_projector.projectors.m1.gate_up_proj.weight"] == {
        "kind": "concat", "parts": ["mm.m1.glu.gate.weight", "mm.m1.glu.up.weight"][::-1],
        "axis": 0, "sizes": [half, half]}


def test_hf_keeps_the_raw_gate_and_gguf_stores_it_applied(kinds):
    k = kinds["A"]
    source = _state_dict(k["ckpt"])
    with safe_open(str(k["root"] / "hf" / "multimodal_projector" / "model.safetensors"), "pt") as f:
        for m in ("m1", "m2"):
            raw = source[f"multimodal_projector.projectors.{m}.gate"]
            assert torch.equal(f.get_tensor(f"multimodal_projector.{m}.gate.gate"), raw)
    reader = gguf.GGUFReader(str(next((k["root"] / "gguf").glob("mmproj-*.gguf"))))
    fields = {key: f.contents() for key, f in reader.fields.items()}
    assert fields["mmproj-embed.spec_version"] == 2
    assert fields["mmproj-embed.m1.layer.kinds"] == ["glu", "linear", "layer_norm", "scale"]
    assert fields["mmproj-embed.m1.layer.gates"] == ["", "", "", "1-tanh"]
    assert fields["mmproj-embed.m2.layer.kinds"] == ["linear", "scale"]
    assert fields["mmproj-embed.m2.layer.folded_from"] == ["down+up", ""]
    tensors = {t.name: t for t in reader.tensors}
    for m, complementary in (("m1", True), ("m2", False)):
        t = tensors[f"mm.{m}.gate.scale"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        g = source[f"multimodal_projector.projectors.{m}.gate"].float().numpy()
        # exactly the deterministic function of the raw gate (float64 tanh, rounded once)
        assert np.array_equal(np.asarray(t.data), transforms.apply_tanh_gate(g, complementary))


def test_fold_is_the_product_of_the_maps(kinds):
    k = kinds["A"]
    t = {x.name: x for x in gguf.GGUFReader(
        str(next((k["root"] / "gguf").glob("mmproj-*.gguf")))).tensors}
    model = k["model"]

    def f32(name):
        return to_float32(model.tensors[name].read(), model.tensors[name].dtype).astype(np.float64)

    down, b_down, up, b_up = (f32(f"mm.m2.{n}") for n in
                              ("down.weight", "down.bias", "up.weight", "up.bias"))
    # the F16 projector file: the float64 product rounded to float32, then to float16
    w = np.asarray(t["mm.m2.down_up.weight"].data).astype(np.float64)
    assert np.array_equal(w, (up @ down).astype(np.float32).astype(np.float16))
    b = np.asarray(t["mm.m2.down_up.bias"].data)
    assert np.array_equal(b, (up @ b_down + b_up).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# negative tests: each transform applied wrongly, and verify names it


def _gguf_with(kinds, tmp_path, monkeypatch, **patches):
    """A GGUF bundle of A converted with ``transforms`` functions replaced (a planted bug)."""
    k = kinds["A"]
    with monkeypatch.context() as m:
        for name, fn in patches.items():
            m.setattr(transforms, name, fn)
        export_gguf(k["model"], tmp_path / "bad", outtypes=["f32"], fold_linear=True)
    return verify(k["ckpt"], tmp_path / "bad", k["root"] / "ref.safetensors",
                  "--backend", "gguf_torch")


def test_gate_not_applied_is_caught(kinds, tmp_path, monkeypatch):
    code, out = _gguf_with(kinds, tmp_path, monkeypatch,
                           apply_tanh_gate=lambda g, c=False: np.asarray(g, np.float32))
    assert_caught(code, out, "mm.m2.gate.scale", "the tanh gate was not applied", "logits:")


def test_gate_applied_twice_is_caught(kinds, tmp_path, monkeypatch):
    once = transforms.apply_tanh_gate
    code, out = _gguf_with(kinds, tmp_path, monkeypatch,
                           apply_tanh_gate=lambda g, c=False: once(once(g, c), c))
    assert_caught(code, out, "mm.m1.gate.scale", "the tanh gate was applied twice")


def test_gate_flag_inverted_is_caught(kinds, tmp_path):
    k = kinds["A"]
    bundle = tree_copy(k["root"] / "gguf", tmp_path / "flag")
    proj = next(bundle.glob("mmproj-*.gguf"))
    rewrite_gguf(proj, proj, {"mmproj-embed.m2.layer.gates": ["", "1-tanh"]})
    code, out = verify(k["ckpt"], bundle, k["root"] / "ref.safetensors", "--backend",
                       "gguf_torch")
    assert_caught(code, out, "tanh_gate:gate(1 - tanh(g)) instead of tanh_gate:gate(tanh(g))",
                  "the complementary flag of the gate is inverted")


def test_gate_applied_in_the_hf_bundle_is_caught(kinds, tmp_path):
    k = kinds["A"]
    bundle = tree_copy(k["root"] / "hf", tmp_path / "hf")
    name = "multimodal_projector.m2.gate.gate"

    def apply(arrays):  # bf16 bits -> tanh -> bf16 bits, as a writer applying the gate would
        g = to_float32(arrays[name].view(np.uint16), "BF16")
        arrays[name] = (transforms.apply_tanh_gate(g).view(np.uint32) >> 16).astype(np.int16)

    edit_safetensors(bundle / "multimodal_projector" / "model.safetensors", apply)
    code, out = verify(k["ckpt"], bundle, k["root"] / "ref.safetensors")
    assert_caught(code, out, name, "holds tanh(g) instead of the raw gate g", "logits:")


def test_gate_and_up_swapped_is_caught(kinds, tmp_path):
    k = kinds["B"]
    assert "mm.m1.glu.up.weight" in k["model"].tensors
    assert "mm.m1.glu.up.bias" not in k["model"].tensors  # "bias": false
    bundle = tree_copy(k["root"] / "hf", tmp_path / "hf")

    def swap(arrays):
        g, u = "multimodal_projector.m1.glu.gate.weight", "multimodal_projector.m1.glu.up.weight"
        arrays[g], arrays[u] = arrays[u], arrays[g]

    edit_safetensors(bundle / "multimodal_projector" / "model.safetensors", swap)
    code, out = verify(k["ckpt"], bundle, k["root"] / "ref.safetensors")
    assert_caught(code, out, "multimodal_projector.m1.glu.gate.weight",
                  "gate and up of the gated projector are swapped", "logits:")


def test_fold_in_the_wrong_order_is_caught(kinds, tmp_path, monkeypatch):
    right = transforms.fold_linear

    def transposed(weights, biases):  # W_first^T @ W_second^T: fits when the maps are square
        w, b = right(weights, biases)
        return w.T, b

    code, out = _gguf_with(kinds, tmp_path, monkeypatch, fold_linear=transposed)
    assert_caught(code, out, "mm.m2.down_up.weight",
                  "the fold multiplied the maps in the wrong order", "logits:")


def test_fold_dropping_the_first_bias_is_caught(kinds, tmp_path, monkeypatch):
    right = transforms.fold_linear

    def last_bias_only(weights, biases):
        return right(weights, biases)[0], np.asarray(biases[-1], np.float64)

    code, out = _gguf_with(kinds, tmp_path, monkeypatch, fold_linear=last_bias_only)
    assert_caught(code, out, "mm.m2.down_up.bias", "the folded bias is the last map's bias alone")


# ---------------------------------------------------------------------------------------------
# bad configs: one clear error


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("rank"), "needs an integer rank"),
    (lambda m: m.update(projector_type="conv"), "projector_type 'conv'"),
    (lambda m: m.update(gate={"kind": "sigmoid"}), 'gate must be {"kind": "tanh"'),
])
def test_bad_projector_config_is_one_error_line(kinds, tmp_path, edit, message):
    ckpt = tree_copy(kinds["A"]["ckpt"], tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg["modality_configs"]["m2"])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace("{", r"\{")):
        read_checkpoint(ckpt)
    result = CliRunner().invoke(main, ["inspect", str(ckpt)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith("error: ")


def test_fused_gate_up_of_the_wrong_size_is_refused(kinds, tmp_path):
    ckpt = tree_copy(kinds["A"]["ckpt"], tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["modality_configs"]["m1"]["hidden_dim"] = 48  # the file's halves are 64 rows
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gate_up_proj.weight has 128 rows"):
        read_checkpoint(ckpt)


# ---------------------------------------------------------------------------------------------
# the numpy runtime of the projector GGUF (runtime/mmproj.py, written from the spec) runs them


@pytest.mark.parametrize("name", list(KINDS))
def test_numpy_projector_runtime_runs_the_new_kinds(kinds, name, tmp_path):
    from mmconvert.runtime.mmproj import read_projector_gguf

    k = kinds[name]
    export_gguf(k["model"], tmp_path / "g", outtypes=["f16"], projector_outtype="f32",
                fold_linear=name == "A")
    projector = read_projector_gguf(next((tmp_path / "g").glob("mmproj-*.gguf")))
    seed = SeedModel(k["ckpt"])
    rng = np.random.default_rng(0)
    for m, p in projector.projectors.items():
        x = rng.standard_normal((5, p.input_dim)).astype(np.float32)
        with torch.no_grad():
            want = seed.projectors[m](torch.from_numpy(x)).numpy()
        assert np.abs(p(x) - want).max() <= 1e-5, m


def test_plain_qwen3_with_a_projector_file_reads_the_new_kinds(kinds, tmp_path):
    """The same projectors saved apart from a plain Qwen3 folder (--projector FILE)."""
    from mmconvert.convert.readers import ReadOptions
    from tests.dialect_builders import qwen3_with_projector

    k = kinds["A"]
    qwen, projector = qwen3_with_projector(k["ckpt"], tmp_path)
    model = read_checkpoint(qwen, ReadOptions(projector=projector))
    assert model.dialect == "qwen3+projector"
    assert {m: p.layers for m, p in model.projectors.items()} == \
        {m: p.layers for m, p in k["model"].projectors.items()}
    for name in k["model"].tensors:
        assert np.array_equal(model.tensors[name].read(), k["model"].tensors[name].read()), name
