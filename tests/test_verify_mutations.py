"""Planted conversion bugs: each is written into an otherwise correct bundle (by editing the
files the writers produced) and ``mmconvert verify`` must exit 1 naming the cause.

Most runs compare against one saved reference (``--reference``), which is also how CI uses
verify; ``test_reference_gives_the_same_verdicts`` proves that shortcut changes no verdict.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from mmconvert.cli import main
from mmconvert.convert.export_gguf import export_gguf
from mmconvert.convert.export_hf import export_hf
from mmconvert.convert.export_safetensors import export_safetensors
from mmconvert.convert.readers import read_checkpoint
from mmconvert.convert.transforms import interleaved_to_neox
from mmconvert.runtime import llama_lib
from mmconvert.verify.thresholds import PUBLISHED, THRESHOLDS, parse_override, thresholds_for
from tests.hostile.harness import reseal_manifest

# ---------------------------------------------------------------------------------------------
# helpers: rewrite files the way a buggy writer would have written them


def rewrite_gguf(src: Path, dst: Path, kv: dict | None = None, tensors=None, add=()) -> None:
    """Copy a GGUF through gguf-py with key values replaced (``kv``), tensors edited or dropped
    (``tensors(name, data, qtype) -> (name, data) | None``) and tensors added (``add``)."""
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, (kv or {}).get(key, field.contents()), vtype, sub)
    for t in reader.tensors:
        data = np.array(t.data)
        edited = tensors(t.name, data, t.tensor_type) if tensors else (t.name, data)
        if edited is not None:
            writer.add_tensor(edited[0], edited[1], raw_dtype=t.tensor_type)
    for name, data, qtype in add:
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)


def gguf_copy(bundle: Path, out: Path, quant: str) -> tuple[Path, Path, Path]:
    """A bundle folder with one text GGUF (``quant``), the projector and the manifest."""
    out.mkdir(parents=True)
    text = next(bundle.glob(f"*-{quant}.gguf"))
    proj = next(bundle.glob("mmproj-*.gguf"))
    for f in (text, proj, bundle / "mmconvert.json"):
        shutil.copyfile(f, out / f.name)
    return out, out / text.name, out / proj.name


def tree_copy(bundle: Path, out: Path) -> Path:
    shutil.copytree(bundle, out)
    return out


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def edit_safetensors(path: Path, fn) -> None:
    """Rewrite a safetensors file with ``fn(dict of numpy arrays)`` applied (bf16 as bits)."""
    import torch
    from safetensors.torch import load_file as load_pt
    from safetensors.torch import save_file as save_pt

    state = load_pt(str(path))
    arrays = {k: v.view(torch.int16).numpy() if v.dtype == torch.bfloat16 else v.numpy()
              for k, v in state.items()}
    fn(arrays)
    out = {k: torch.from_numpy(np.ascontiguousarray(a)).view(torch.bfloat16)
           if state.get(k) is not None and state[k].dtype == torch.bfloat16 else
           torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()}
    save_pt(out, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def setup(make_checkpoint, tmp_path_factory):
    """Correct bundles of the example checkpoint and of a tied one, plus saved references."""
    root = tmp_path_factory.mktemp("mutations")
    ckpt = make_checkpoint()
    tied = make_checkpoint(tied=True)
    model = read_checkpoint(ckpt)
    export_gguf(model, root / "gguf", outtypes=["f16", "q8_0"], projector_outtype="f16")
    export_gguf(read_checkpoint(tied), root / "gguf-tied", outtypes=["f16"])
    export_hf(model, root / "hf")
    export_safetensors(model, root / "st")
    runner = CliRunner()
    for c, name in ((ckpt, "ref.safetensors"), (tied, "ref-tied.safetensors")):
        result = runner.invoke(main, ["verify", str(c), "--save-reference", str(root / name),
                                      "-q", "--device", "cpu"])
        assert result.exit_code == 0, result.output
    return {"root": root, "ckpt": ckpt, "tied": tied, "model": model}


def verify(ckpt: Path, bundle: Path, ref: Path | None, *extra: str) -> tuple[int, str]:
    # a buggy writer records the bytes it wrote: the planted bug must reach verify's
    # comparisons, not its tamper check (tests/hostile/test_bundle_trust.py)
    reseal_manifest(bundle)
    args = ["verify", str(ckpt), str(bundle), "-q", "--device", "cpu", *extra]
    if ref is not None:
        args += ["--reference", str(ref)]
    result = CliRunner().invoke(main, args)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def assert_caught(code: int, output: str, *needles: str) -> None:
    assert code == 1, output
    for needle in needles:
        assert needle in output, f"{needle!r} not in:\n{output}"


# ---------------------------------------------------------------------------------------------
# GGUF mutations (gguf_torch: dequantised tensors and the GGUF's own metadata)


def _gguf(setup, tmp_path, quant="F16", text_kv=None, text_tensors=None, proj_kv=None,
          proj_tensors=None, add=(), tied=False):
    bundle = setup["root"] / ("gguf-tied" if tied else "gguf")
    out, text, proj = gguf_copy(bundle, tmp_path / "bundle", quant)
    if text_kv or text_tensors or add:
        rewrite_gguf(text, text, text_kv, text_tensors, add)
    if proj_kv or proj_tensors:
        rewrite_gguf(proj, proj, proj_kv, proj_tensors)
    ckpt = setup["tied" if tied else "ckpt"]
    ref = setup["root"] / ("ref-tied.safetensors" if tied else "ref.safetensors")
    return verify(ckpt, out, ref, "--backend", "gguf_torch")


def test_qk_heads_permuted(setup, tmp_path):
    text = setup["model"].text
    heads = {"attn_q": text.num_attention_heads, "attn_k": text.num_key_value_heads}

    def permute(name, data, qtype):
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if kind in heads:
            return name, interleaved_to_neox(data, heads[kind])
        return name, data

    code, out = _gguf(setup, tmp_path, text_tensors=permute)
    assert_caught(code, out, "Q/K rows permuted per head: a rope-layout permutation", "blk.0.attn_q.weight", "logits:")


def test_gate_and_up_swapped(setup, tmp_path):
    swap = {"blk.1.ffn_gate.weight": "blk.1.ffn_up.weight",
            "blk.1.ffn_up.weight": "blk.1.ffn_gate.weight"}
    code, out = _gguf(setup, tmp_path,
                      text_tensors=lambda n, d, q: (swap.get(n, n), d))
    assert_caught(code, out, "blk.1.ffn_gate.weight", "the two are swapped", "logits:")


def test_rms_eps_changed(setup, tmp_path):
    code, out = _gguf(setup, tmp_path, text_kv={"qwen3.attention.layer_norm_rms_epsilon": 1e-5})
    assert_caught(code, out, "text.rms_norm_eps")


def test_projector_layer_norm_dropped(setup, tmp_path):
    p = "mmproj-embed.m1.layer."
    keep = [0, 2, 3]  # fc1, act, fc2: both layer norms gone
    reader = gguf.GGUFReader(str(next((setup["root"] / "gguf").glob("mmproj-*.gguf"))))
    kv = {p + k: [reader.fields[p + k].contents()[i] for i in keep]
          for k in ("names", "kinds", "in_dims", "out_dims", "activations", "eps", "has_bias")}
    code, out = _gguf(setup, tmp_path, proj_kv=kv,
                      proj_tensors=lambda n, d, q: None if ".norm" in n and ".m1." in n
                      else (n, d))
    assert_caught(code, out, "projector.m1.layer_norm", "layer norm added or dropped",
                  "mm.m1.norm1.weight", "missing", "logits:")


def test_tanh_gelu_instead_of_erf(setup, tmp_path):
    key = "mmproj-embed.m2.layer.activations"
    code, out = _gguf(setup, tmp_path, proj_kv={key: ["", "", "gelu_tanh", "", ""]})
    assert_caught(code, out, "projector.m2.activation", "tanh-approximate GELU",
                  "exact erf GELU")


def test_wrong_eos_id(setup, tmp_path):
    model = setup["model"]
    wrong = model.special.eos[0] - 1
    code, out = _gguf(setup, tmp_path, text_kv={"tokenizer.ggml.eos_token_id": wrong})
    assert_caught(code, out, "eos ids", str(wrong))


def test_vocabulary_shifted_by_one_row(setup, tmp_path):
    def shift(name, data, qtype):
        return (name, np.roll(data, 1, axis=0)) if name == "token_embd.weight" else (name, data)

    code, out = _gguf(setup, tmp_path, text_tensors=shift)
    assert_caught(code, out, "token_embd.weight", "vocabulary is off by one row", "logits:")


def test_tied_output_matrix_replaced(setup, tmp_path):
    reader = gguf.GGUFReader(str(next((setup["root"] / "gguf-tied").glob("*-F16.gguf"))))
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rng = np.random.default_rng(0)
    other = (rng.standard_normal(emb.data.shape) / 8).astype(np.float16)
    code, out = _gguf(setup, tmp_path, tied=True,
                      add=[("output.weight", other, gguf.GGMLQuantizationType.F16)])
    assert_caught(code, out, "output.weight", "ties the output matrix to the embedding",
                  "text.tie_word_embeddings", "logits:")


def test_one_weight_row_corrupted(setup, tmp_path):
    def corrupt(name, data, qtype):
        if name == "blk.1.attn_v.weight":
            data = data.copy()
            data[5] = np.float16(0.5) * np.sign(data[5] + np.float16(1e-3))
        return name, data

    code, out = _gguf(setup, tmp_path, text_tensors=corrupt)
    assert_caught(code, out, "blk.1.attn_v.weight", "corrupted rows", "[5]")


def test_q8_0_block_scale_wrong(setup, tmp_path):
    def scale(name, data, qtype):
        if name == "blk.0.ffn_down.weight":
            assert qtype == gguf.GGMLQuantizationType.Q8_0
            data = data.copy()
            d = data[3, 34:36].view(np.float16)
            data[3, 34:36] = (d * np.float16(3)).view(np.uint8)  # row 3, second block
        return name, data

    code, out = _gguf(setup, tmp_path, quant="Q8_0", text_tensors=scale)
    assert_caught(code, out, "blk.0.ffn_down.weight", "wrong block scale", "row 3 col 32")


# rows of 256: the K-quants' blocks, so a Q4_K_M mixture keeps its K types (no fallbacks)
K_SHAPES = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64)


@pytest.fixture(scope="module")
def k_setup(make_checkpoint, tmp_path_factory):
    """A correct Q4_K_M bundle (written by to-gguf) of a 256-wide checkpoint and its reference."""
    root = tmp_path_factory.mktemp("k-mutations")
    ckpt = make_checkpoint(**K_SHAPES)
    runner = CliRunner()
    result = runner.invoke(main, ["to-gguf", str(ckpt), "-o", str(root / "gguf"), "-q",
                                  "--outtype", "q4_k_m"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["verify", str(ckpt), "--save-reference",
                                  str(root / "ref.safetensors"), "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return {"root": root, "ckpt": ckpt}


def test_k_quant_mixture_passes(k_setup, tmp_path):
    """The correct mixture passes: every tensor checked by its own type (Q4_K, Q6_K, F32), its
    loss shown beside llama.cpp's published Q4_K_M figures."""
    report = tmp_path / "r.json"
    code, out = verify(k_setup["ckpt"], k_setup["root"] / "gguf", k_setup["root"] /
                       "ref.safetensors", "--backend", "gguf_torch", "--report-json", str(report))
    assert code == 0, out
    (target,) = json.loads(report.read_text())["targets"]
    assert target["output_type"] == "Q4_K_M" and target["tensors"]["failing"] == []
    assert "llama.cpp publishes mean_kld 3.13e-02, top1 91.90%, model Llama-3-8B" in out
    types = set(json.loads((k_setup["root"] / "gguf" / "mmconvert.json").read_text())["files"][0]
                ["types"].values())
    assert {"Q4_K", "Q6_K"} <= types


def test_k_thresholds_go_by_base_type():
    """A mixture takes its base type's row; overrides name the base type or the mixture."""
    assert thresholds_for("Q4_K_M") == thresholds_for("Q4_K_S") == THRESHOLDS["Q4_K"]
    assert thresholds_for("Q3_K_L") == THRESHOLDS["Q3_K"]
    assert thresholds_for("IQ4_XS") == THRESHOLDS["IQ4_XS"]
    assert thresholds_for("Q4_K_M", [parse_override("Q4_K.mean_kld=1")]) == {"mean_kld": 1.0}
    assert thresholds_for("Q4_K_S", [parse_override("Q4_K_M.mean_kld=1")]) == THRESHOLDS["Q4_K"]
    # the loosest row is the fallback; every K row sits between Q8_0's and it
    assert thresholds_for("Q1_X") == THRESHOLDS["Q2_K"]
    order = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
    assert [THRESHOLDS[t]["mean_kld"] for t in order] == \
        sorted(THRESHOLDS[t]["mean_kld"] for t in order)


LLAMA_README = (Path("/work/llama-src/llama_cpp_python-0.3.36/vendor/llama.cpp/tools/"
                     "perplexity/README.md"))


@pytest.mark.skipif(not LLAMA_README.exists(), reason="the pinned llama.cpp source is not here")
def test_published_figures_are_llama_cpps():
    """Every PUBLISHED figure is a row of the pinned llama.cpp's perplexity README."""
    lines = LLAMA_README.read_text().splitlines()
    top1_row = next(line for line in lines if line.startswith("| Same top p"))
    for name, figures in PUBLISHED.items():
        spelled = re.sub(r"_([sml])$", lambda m: "_" + m.group(1).upper(),
                         name.lower().replace("_k", "_K")).replace("iq4_nl", "iq4_NL") \
            .replace("iq4_xs", "iq4_XS")
        imatrix = figures.get("imatrix", "None")
        (row,) = [line for line in lines
                  if re.match(rf"\| {re.escape(spelled)}\s+\| {imatrix}\s", line)]
        assert f"{figures['mean_kld']:.6f}" in row, name
        if "top1" in figures:
            assert f"{100 * figures['top1']:.3f} " in top1_row, name


def test_k_quant_sub_block_scale_wrong(k_setup, tmp_path):
    """One bit of one 6-bit sub-block scale of one Q4_K block: 32 values move, verify names
    the tensor, the block and the values."""
    def flip(name, data, qtype):
        if name == "blk.0.ffn_down.weight":  # layer 1's is Q6_K (a "more bits" layer)
            assert qtype == gguf.GGMLQuantizationType.Q4_K and data.shape[1] == 2 * 144
            data = data.copy()
            # row 3, second Q4_K block (144 bytes: d, dmin, 12 bytes of packed 6-bit scales
            # and mins, 128 of levels); byte 4 + j holds sub-block j's scale in its low 6 bits
            data[3, 144 + 4 + 1] ^= np.uint8(0x20)  # sub-block 1: values 288..319
        return name, data

    out, text, _ = gguf_copy(k_setup["root"] / "gguf", tmp_path / "bundle", "Q4_K_M")
    rewrite_gguf(text, text, tensors=flip)
    code, output = verify(k_setup["ckpt"], out, k_setup["root"] / "ref.safetensors",
                          "--backend", "gguf_torch")
    assert_caught(code, output, "blk.0.ffn_down.weight (model.layers.0.mlp.down_proj.weight) "
                  "[Q4_K]", "of 131072 values off",
                  "1 Q4_K block(s) of 256 differ from the source quantized again: row 3 col 256")
    # only that sub-block's values (those whose level is not 0) moved
    first, last = map(int, re.search(r"row 3 col 256 \(values (\d+)-(\d+)\)", output).groups())
    assert 288 <= first <= last <= 319, output


def test_placeholder_token_id_off_by_one(setup, tmp_path):
    ph = setup["model"].multimodal_token_id
    code, out = _gguf(setup, tmp_path,
                      proj_kv={"mmproj-embed.placeholder.token_id": ph - 1})
    assert_caught(code, out, "placeholder token id", str(ph - 1),
                  "places the projected rows differently")


# ---------------------------------------------------------------------------------------------
# HF and safetensors mutations


def test_hf_config_mutations(setup, tmp_path):
    root = setup["root"]
    cases = {
        "eps": (lambda c: c.update(rms_norm_eps=1e-5), "text.rms_norm_eps"),
        "gelu": (lambda c: c["multimodal_config"]["modalities"][0].update(activation="gelu_tanh")
                 or c["multimodal_config"]["modalities"][0]["layers"][2].update(
                     activation="gelu_tanh"), "tanh-approximate GELU"),
        "placeholder": (lambda c: c["multimodal_config"].update(
            placeholder_token_id=c["multimodal_config"]["placeholder_token_id"] - 1),
            "placeholder token id"),
    }
    for name, (edit, needle) in cases.items():
        bundle = tree_copy(root / "hf", tmp_path / name)
        edit_json(bundle / "config.json", edit)
        code, out = verify(setup["ckpt"], bundle, root / "ref.safetensors")
        assert_caught(code, out, needle)


def test_hf_wrong_eos_and_swapped_tensors(setup, tmp_path):
    root = setup["root"]
    bundle = tree_copy(root / "hf", tmp_path / "eos")
    edit_json(bundle / "generation_config.json", lambda g: g.update(eos_token_id=[5]))
    edit_json(bundle / "config.json", lambda c: c.update(eos_token_id=5))
    assert_caught(*verify(setup["ckpt"], bundle, root / "ref.safetensors"), "eos ids")

    bundle = tree_copy(root / "hf", tmp_path / "swap")

    def swap(arrays):
        g, u = "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"
        arrays[g], arrays[u] = arrays[u], arrays[g]

    edit_safetensors(bundle / "model.safetensors", swap)
    code, out = verify(setup["ckpt"], bundle, root / "ref.safetensors")
    assert_caught(code, out, "model.layers.0.mlp.gate_proj.weight", "the two are swapped",
                  "logits:")


def test_safetensors_row_corrupted_and_vocab_shift(setup, tmp_path):
    root = setup["root"]
    bundle = tree_copy(root / "st", tmp_path / "row")
    name = "language_model.model.layers.0.self_attn.o_proj.weight"

    def corrupt(arrays):
        arrays[name][7] = arrays[name][7] ^ np.int16(0x0040)  # flip one mantissa bit per value

    edit_safetensors(bundle / "model.safetensors", corrupt)
    assert_caught(*verify(setup["ckpt"], bundle, root / "ref.safetensors"),
                  name, "corrupted rows", "[7]")

    bundle = tree_copy(root / "st", tmp_path / "shift")
    emb = "language_model.model.embed_tokens.weight"
    edit_safetensors(bundle / "model.safetensors",
                     lambda a: a.__setitem__(emb, np.roll(a[emb], -1, axis=0)))
    assert_caught(*verify(setup["ckpt"], bundle, root / "ref.safetensors"),
                  "vocabulary is off by one row", "logits:")


# ---------------------------------------------------------------------------------------------
# llama.cpp (the runtime): the same planted bugs seen through llama-cpp-python


@pytest.mark.llama
@pytest.mark.skipif(llama_lib.unavailable() is not None, reason="llama-cpp-python missing")
def test_llama_catches_runtime_visible_bugs(setup, tmp_path):
    root = setup["root"]
    model = setup["model"]
    ph = model.multimodal_token_id
    out, text, proj = gguf_copy(root / "gguf", tmp_path / "ph", "Q8_0")
    rewrite_gguf(proj, proj, {"mmproj-embed.placeholder.token_id": ph - 1})
    code, output = verify(setup["ckpt"], out, root / "ref.safetensors", "--backend", "gguf_llama")
    assert_caught(code, output, "placeholder token id", "places the projected rows differently")

    # a wrong eos id: llama.cpp would not stop on the checkpoint's primary eos
    out, text, proj = gguf_copy(root / "gguf", tmp_path / "eos", "F16")
    im_end = model.special.eos[0]
    reader = gguf.GGUFReader(str(text))
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    tokens[im_end] = "<|im_finish|>"  # the text llama.cpp recognises as end of generation
    rewrite_gguf(text, text, {"tokenizer.ggml.eos_token_id": 5,
                              "tokenizer.ggml.eos_token_ids": [5],
                              "tokenizer.ggml.tokens": tokens})
    code, output = verify(setup["ckpt"], out, root / "ref.safetensors", "--backend", "gguf_llama")
    assert_caught(code, output, "end of generation", "do not stop generation", "tokenizer parity")


# ---------------------------------------------------------------------------------------------
# the shortcut: a saved reference gives the same verdicts as the full run


def test_reference_gives_the_same_verdicts(setup, tmp_path):
    root = setup["root"]
    broken, text, _ = gguf_copy(root / "gguf", tmp_path / "broken", "F16")
    rewrite_gguf(text, text, tensors=lambda n, d, q: (n, np.roll(d, 1, axis=0))
                 if n == "token_embd.weight" else (n, d))
    for bundle in (root / "gguf", root / "st", broken):
        full = verify(setup["ckpt"], bundle, None, "--backend", "gguf_torch",
                      "--backend", "safetensors", "--report-json", str(tmp_path / "a.json"))
        quick = verify(setup["ckpt"], bundle, root / "ref.safetensors", "--backend",
                       "gguf_torch", "--backend", "safetensors", "--report-json",
                       str(tmp_path / "b.json"))
        assert full[0] == quick[0]
        a = json.loads((tmp_path / "a.json").read_text())
        b = json.loads((tmp_path / "b.json").read_text())
        assert [t["status"] for t in a["targets"]] == [t["status"] for t in b["targets"]]
        assert [t["overall"] for t in a["targets"]] == [t["overall"] for t in b["targets"]]
    assert full[0] == 1


def test_reference_from_another_checkpoint_is_refused(setup):
    code, out = verify(setup["tied"], setup["root"] / "gguf-tied",
                       setup["root"] / "ref.safetensors")
    assert code == 2
    assert "made from a different checkpoint" in out
