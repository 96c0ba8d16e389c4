"""llama-quantize's mixture rules as data (formats/gguf_mixtures.py): the table's facts, each
rule on Qwen3-shaped tensor lists, the counters, the overrides and the documented table.

tests/test_mixtures_llama.py holds the same choices against llama.cpp's own quantizer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from mmconvert.cli import main
from mmconvert.errors import UsageError
from mmconvert.formats import gguf_constants as gc
from mmconvert.formats import gguf_mixtures as gm

DOC = Path(__file__).resolve().parents[1] / "docs" / "quantization.md"
LAYER_TENSORS = {"attn_q.weight": "q", "attn_k.weight": "kv", "attn_v.weight": "kv",
                 "attn_output.weight": "o", "ffn_gate.weight": "ff", "ffn_up.weight": "ff",
                 "ffn_down.weight": "down"}
NORMS = ("attn_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight", "ffn_norm.weight")


def qwen3_tensors(n_layer: int = 28, hidden: int = 1024, n_head: int = 16, n_kv: int = 8,
                  head_dim: int = 128, ff: int = 3072, vocab: int = 151936, tied: bool = True,
                  experts: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """A Qwen3 GGUF's tensor names and numpy shapes (Qwen3-0.6B by default), in our order."""
    shapes = {"q": (n_head * head_dim, hidden), "kv": (n_kv * head_dim, hidden),
              "o": (hidden, n_head * head_dim), "ff": (ff, hidden), "down": (hidden, ff)}
    out = [("token_embd.weight", (vocab, hidden))]
    for i in range(n_layer):
        out += [(f"blk.{i}.{n}", (head_dim,) if "q_norm" in n or "k_norm" in n else (hidden,))
                for n in NORMS]
        for name, kind in LAYER_TENSORS.items():
            if experts and name.startswith("ffn_"):
                name = name.replace(".weight", "_exps.weight")
                out.append((f"blk.{i}.{name}", (experts, *shapes[kind])))
            else:
                out.append((f"blk.{i}.{name}", shapes[kind]))
        if experts:
            out.append((f"blk.{i}.ffn_gate_inp.weight", (experts, hidden)))
    out.append(("output_norm.weight", (hidden,)))
    if not tied:
        out.append(("output.weight", (vocab, hidden)))
    return out


def types(ftype: str, tensors, facts: gm.ModelFacts, **kw) -> dict[str, str | None]:
    return {n: c.ggml_type for n, c in gm.choose_types(ftype, tensors, facts, **kw).items()}


def layers_with(chosen: dict[str, str | None], tensor: str, ggml_type: str) -> list[int]:
    return sorted(int(n.split(".")[1]) for n, t in chosen.items()
                  if n.endswith(f".{tensor}") and n.startswith("blk.") and t == ggml_type)


QWEN3_06B = gm.ModelFacts(n_layer=28, n_head=16, n_head_kv=8)
# use_more_bits for 28 layers, by hand from the C: i < 3, i >= 24, or (i - 3) % 3 == 2
MORE_BITS_28 = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]


def test_table_facts_agree_with_gguf_py():
    assert set(gm.MIXTURES) == set(gc.MIXTURE_BASE)
    for name, mixture in gm.MIXTURES.items():
        assert int(gc.file_type(name)) == int(LlamaFileType[f"MOSTLY_{name}"])
        assert mixture.base in gm.BLOCK_SIZES
        for rule in mixture.rules:
            assert rule.role in gm.ROLES and rule.ggml_type in gm.BLOCK_SIZES
            assert all(c in gm.CONDITIONS for c in rule.when), rule
    for name, block in gm.BLOCK_SIZES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]][0] == block
    assert gc.file_type("Q4_K_M") == 15 and gc.file_type_name(15) == "Q4_K_M"
    for mixture in gc.MIXTURE_BASE:
        assert mixture.lower() in gc.OUTTYPES


def test_use_more_bits_is_the_c_formula():
    assert [i for i in range(28) if gm.use_more_bits(i, 28)] == MORE_BITS_28
    assert [i for i in range(8) if gm.use_more_bits(i, 8)] == [0, 3, 6, 7]


def test_q4_k_m_on_qwen3_0_6b():
    chosen = types("Q4_K_M", qwen3_tensors(), QWEN3_06B)
    assert chosen["token_embd.weight"] == "Q6_K"  # tied: it is the output projection too
    assert layers_with(chosen, "attn_v.weight", "Q6_K") == MORE_BITS_28
    assert layers_with(chosen, "ffn_down.weight", "Q6_K") == MORE_BITS_28
    others = {t for n, t in chosen.items()
              if n.startswith("blk.") and not n.endswith(("attn_v.weight", "ffn_down.weight"))
              and t is not None}
    assert others == {"Q4_K"}
    assert all(chosen[n] is None for n in chosen if "norm" in n)


def test_untied_token_embd_keeps_the_base_type():
    chosen = types("Q4_K_M", qwen3_tensors(tied=False), QWEN3_06B)
    assert chosen["output.weight"] == "Q6_K" and chosen["token_embd.weight"] == "Q4_K"


@pytest.mark.parametrize("ftype, attn_v, ffn_down, attn_output", [
    ("Q2_K", {"Q3_K": range(28)}, {"Q3_K": range(28)}, {"Q3_K": range(28)}),
    ("Q3_K_S", {"Q3_K": range(28)}, {"Q3_K": range(28)}, {"Q3_K": range(28)}),
    ("Q3_K_M", {"Q5_K": [0, 1]}, {"Q5_K": [0]}, {"Q4_K": range(28)}),
    ("Q3_K_L", {"Q5_K": range(28)}, {"Q5_K": range(28)}, {"Q5_K": range(28)}),
    ("Q4_K_S", {"Q5_K": [0, 1, 2, 3]}, {"Q5_K": [0, 1, 2]}, {"Q4_K": range(28)}),
    ("Q5_K_S", {"Q5_K": range(28)}, {"Q5_K": range(28)}, {"Q5_K": range(28)}),
    ("Q5_K_M", {"Q6_K": MORE_BITS_28}, {"Q6_K": MORE_BITS_28}, {"Q5_K": range(28)}),
    ("Q6_K", {"Q6_K": range(28)}, {"Q6_K": range(28)}, {"Q6_K": range(28)}),
    ("IQ4_NL", {"IQ4_NL": range(28)}, {"Q5_K": [0, 1, 2]}, {"IQ4_NL": range(28)}),
    ("IQ4_XS", {"IQ4_XS": range(28)}, {"Q5_K": [0, 1, 2]}, {"IQ4_XS": range(28)}),
])
def test_layer_rules_per_file_type(ftype, attn_v, ffn_down, attn_output):
    chosen = types(ftype, qwen3_tensors(), QWEN3_06B)
    for tensor, want in (("attn_v.weight", attn_v), ("ffn_down.weight", ffn_down),
                         ("attn_output.weight", attn_output)):
        for ggml_type, layers in want.items():
            assert layers_with(chosen, tensor, ggml_type) == list(layers), (tensor, ggml_type)
    assert chosen["token_embd.weight"] == "Q6_K"


def test_gqa_and_imatrix_conditions():
    gqa4 = gm.ModelFacts(n_layer=28, n_head=16, n_head_kv=4)
    assert set(layers_with(types("Q2_K", qwen3_tensors(n_kv=4), gqa4), "attn_v.weight",
                           "Q4_K")) == set(range(28))
    assert layers_with(types("IQ4_XS", qwen3_tensors(n_kv=4), gqa4), "attn_v.weight",
                       "Q5_K") == list(range(28))
    with_imatrix = types("IQ4_NL", qwen3_tensors(), QWEN3_06B, has_imatrix=True)
    assert layers_with(with_imatrix, "ffn_down.weight", "Q5_K") == []


def test_eight_experts_rules_and_layers_from_names():
    facts = gm.ModelFacts(n_layer=8, n_head=16, n_head_kv=8, n_expert=8)
    tensors = qwen3_tensors(n_layer=8, ff=768, experts=8)
    chosen = types("Q4_K_M", tensors, facts)
    assert layers_with(chosen, "attn_v.weight", "Q8_0") == list(range(8))
    assert layers_with(chosen, "attn_k.weight", "Q8_0") == list(range(8))
    assert layers_with(chosen, "attn_output.weight", "Q5_K") == list(range(8))
    assert layers_with(chosen, "ffn_down_exps.weight", "Q6_K") == [0, 3, 6, 7]
    assert chosen["blk.0.ffn_gate_inp.weight"] is None  # the router is never quantized
    # Q3_K_L's attn_output bump is for models without 8 experts only
    q3l = types("Q3_K_L", tensors, facts)
    assert layers_with(q3l, "attn_output.weight", "Q3_K") == list(range(8))
    four = types("Q4_K_M", qwen3_tensors(n_layer=8, ff=768, experts=4),
                 gm.ModelFacts(8, 16, 8, n_expert=4))
    assert layers_with(four, "attn_v.weight", "Q8_0") == []


def test_rows_that_do_not_fit_fall_back():
    tensors = [("token_embd.weight", (400, 64)), ("blk.0.attn_v.weight", (64, 64)),
               ("blk.0.ffn_down.weight", (64, 96)), ("blk.0.attn_q.weight", (64, 48)),
               ("blk.0.attn_k.weight", (64, 256))]
    facts = gm.ModelFacts(n_layer=1, n_head=4, n_head_kv=4)
    assert types("Q4_K_M", tensors, facts) == {
        "token_embd.weight": "Q8_0",  # tied output, row 64: Q8_0 (not Q6_K)
        "blk.0.attn_v.weight": "Q8_0",  # layer 0 of 1 is a more-bits layer: Q6_K -> Q8_0
        "blk.0.ffn_down.weight": "Q8_0",
        "blk.0.attn_q.weight": "F16",  # 48 is not a multiple of 32 either
        "blk.0.attn_k.weight": "Q4_K"}
    fell = {n: t for n, t in types("Q3_K_M", tensors, facts).items()}
    assert fell["blk.0.attn_k.weight"] == "Q3_K" and fell["blk.0.attn_v.weight"] == "Q5_1"
    assert types("Q2_K", tensors, facts)["blk.0.attn_k.weight"] == "Q2_K"
    assert gm.fallback("Q2_K", 64)[0] == "Q4_0" and gm.fallback("IQ4_XS", 96)[0] == "IQ4_NL"
    assert gm.fallback("Q5_K", 64)[0] == "Q5_1" and gm.fallback("Q8_0", 33)[0] == "F16"


def test_not_quantized_tensors():
    assert not gm.quantizable("blk.0.attn_norm.weight", (64,))
    assert not gm.quantizable("blk.0.attn_q_norm.weight", (1, 64))  # ggml sees one dimension
    assert not gm.quantizable("blk.0.ffn_gate_inp.weight", (8, 64))
    assert not gm.quantizable("blk.0.attn_q.bias", (64, 64))
    assert gm.quantizable("blk.0.ffn_down_exps.weight", (8, 1, 64))


def test_overrides_follow_llama_quantize_precedence():
    tensors = qwen3_tensors(n_layer=8, hidden=256, n_head=4, n_kv=2, head_dim=64, ff=768,
                            vocab=512, tied=False)
    facts = gm.ModelFacts(8, 4, 2)
    ov = gm.make_overrides("q8_0", "Q5_K", ["ATTN_V=q8_0", "attn=f16", r"blk\.7\.=q2_k"])
    chosen = types("Q4_K_M", tensors, facts, overrides=ov)
    assert chosen["output.weight"] == "Q8_0" and chosen["token_embd.weight"] == "Q5_K"
    assert layers_with(chosen, "attn_v.weight", "Q8_0") == list(range(8))  # first match wins
    assert layers_with(chosen, "attn_q.weight", "F16") == list(range(8))
    assert layers_with(chosen, "ffn_up.weight", "Q2_K") == [7]
    assert chosen["blk.0.attn_norm.weight"] is None  # never quantized, whatever matches
    pure = types("Q4_K_M", tensors, facts, overrides=gm.make_overrides(pure=True))
    assert {t for t in pure.values() if t} == {"Q4_K"}
    tied = qwen3_tensors(n_layer=8, hidden=256, n_head=4, n_kv=2, head_dim=64, ff=768)
    assert types("Q4_K_M", tied, facts, overrides=gm.make_overrides("q5_k"))[
        "token_embd.weight"] == "Q5_K"  # a tied token_embd follows --output-tensor-type
    assert types("Q4_K_M", tied, facts, overrides=gm.make_overrides(pure=True))[
        "token_embd.weight"] == "Q4_K"


def test_a_manual_type_is_not_counted():
    """llama-quantize counts attn_v tensors only when its rules run: a --tensor-type match on
    layer 0 makes layers 1 and 2 Q3_K_M's first two."""
    tensors = qwen3_tensors(n_layer=8, hidden=256, n_head=4, n_kv=2, head_dim=64, ff=768)
    facts = gm.ModelFacts(8, 4, 2)
    plain = types("Q3_K_M", tensors, facts)
    assert layers_with(plain, "attn_v.weight", "Q5_K") == [0, 1]
    manual = types("Q3_K_M", tensors, facts,
                   overrides=gm.make_overrides(tensor_types=[r"blk\.0\.attn_v=q8_0"]))
    assert layers_with(manual, "attn_v.weight", "Q5_K") == [1, 2]
    # counting follows llama's order (by layer number, then name), not the file's
    shuffled = types("Q3_K_M", list(reversed(tensors)), facts)
    assert shuffled == plain


@pytest.mark.parametrize("spec, message", [
    ("attn_v", "expected PATTERN=TYPE"), ("=q8_0", "expected PATTERN=TYPE"),
    ("attn_v=", "expected PATTERN=TYPE"), ("attn_v=q9_9", "unknown type"),
    ("attn_v=iq2_xxs", "unknown type"), ("(attn=q8_0", "not a regular expression")])
def test_bad_tensor_type_specs(spec, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        gm.make_overrides(tensor_types=[spec])


def test_an_output_override_that_does_not_fit_is_refused():
    with pytest.raises(ValueError, match="not a multiple of the Q4_K block of 256"):
        gm.choose_types("Q4_K_M", [("output.weight", (400, 64))], gm.ModelFacts(1, 4, 4),
                        gm.make_overrides("q4_k"))


def test_bad_overrides_are_one_error_line(example_ckpt, tmp_path):
    for args, message in (
            (["--tensor-type", "attn_v"], "--tensor-type attn_v: expected PATTERN=TYPE"),
            (["--output-tensor-type", "q9"], "--output-tensor-type q9: unknown type"),
            (["--pure"], "--pure: these steer llama-quantize's K-quant mixtures")):
        result = CliRunner().invoke(main, ["to-gguf", str(example_ckpt), "-o",
                                           str(tmp_path / "o"), "--dry-run", *args])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], result.output
        assert "Traceback" not in result.output


def test_doc_table_is_the_data():
    text = DOC.read_text()
    assert "## K-quant mixtures" in text
    assert gm.mixture_table() in text, "regenerate: python -c 'from mmconvert.formats." \
                                       "gguf_mixtures import mixture_table; print(mixture_table())'"


# -- through to-gguf: plan, files, manifest, dry-run, inspect ---------------------------------

SMALL_256 = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, head_dim=64,
                 num_key_value_heads=1, num_hidden_layers=3, tied=True)


def test_to_gguf_writes_mixture_types_file_type_and_manifest(make_checkpoint, tmp_path):
    import json

    from gguf import GGUFReader

    from mmconvert.convert.plan_gguf import plan_gguf
    from mmconvert.convert.readers import read_checkpoint

    ckpt = make_checkpoint(**SMALL_256)
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["to-gguf", str(ckpt), "-o", str(out), "-q", "--outtype",
                                       "q4_k_m", "--outtype", "q8_0", "--outtype", "iq4_xs"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "mmconvert.json").read_text())
    model = read_checkpoint(ckpt)
    for entry in manifest["files"]:
        reader = GGUFReader(out / entry["path"])
        written = {t.name: t.tensor_type.name for t in reader.tensors}
        assert entry["types"] == written, entry["path"]
        if entry["role"] != "text":
            continue
        field = reader.fields["general.file_type"]
        assert int(field.parts[field.data[0]][0]) == int(gc.file_type(entry["quant"]))
        plan = {t.name: t.dtype for t in plan_gguf(model, entry["outtype"]).tensors}
        assert written == plan
    q4 = next(e["types"] for e in manifest["files"] if e["quant"] == "Q4_K_M")
    assert q4["token_embd.weight"] == "Q6_K"  # tied: the output's rule
    # 3 layers: use_more_bits holds for layer 2 only (3/8 == 0, 7*3/8 == 2)
    assert [q4[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q4_K", "Q4_K", "Q6_K"]
    iq = next(e["types"] for e in manifest["files"] if e["quant"] == "IQ4_XS")
    assert iq["blk.0.attn_v.weight"] == "Q5_K"  # GQA factor 4
    assert iq["blk.0.ffn_down.weight"] == "IQ4_XS"  # 3 layers: n/8 == 0, no Q5_K layer


def test_a_missing_kernel_is_one_line_and_writes_nothing(make_checkpoint, tmp_path,
                                                          monkeypatch):
    from mmconvert.formats import quants

    monkeypatch.delitem(quants.TYPES, "Q6_K")
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["to-gguf", str(make_checkpoint(**SMALL_256)), "-o",
                                       str(out), "-q", "--outtype", "q4_k_m"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        "error: --outtype q4_k_m needs the Q6_K kernel(s), which this mmconvert lacks")
    assert not out.exists()


def test_dry_run_and_inspect_print_every_tensor_type(make_checkpoint):
    import json

    ckpt = make_checkpoint(**SMALL_256)
    dry = CliRunner().invoke(main, ["to-gguf", str(ckpt), "--dry-run", "--outtype", "q3_k_m",
                                    "--tensor-type", r"blk\.2\.ffn=q8_0"])
    assert dry.exit_code == 0, dry.output
    rows = {line.split()[0]: line.split()[2] for line in dry.output.splitlines()
            if line.startswith(("blk.", "token_embd"))}
    assert rows["token_embd.weight"] == "Q6_K" and rows["blk.0.attn_v.weight"] == "Q5_K"
    assert rows["blk.2.ffn_up.weight"] == "Q8_0" and rows["blk.2.attn_v.weight"] == "Q4_K"
    assert "# overrides: --tensor-type blk\\.2\\.ffn=q8_0" in dry.output
    summary = json.loads(CliRunner().invoke(main, ["inspect", str(ckpt), "--json"]).output)
    types = summary["plans"]["gguf"]["types"]
    assert list(types) == [m.lower() for m in gc.MIXTURE_BASE]
    assert types["q3_k_m"]["tensors"]["blk.0.attn_v.weight"] == "Q5_K"
    assert types["q4_k_m"]["summary"] == "Q4_K; Q6_K: token_embd, attn_v [2], ffn_down [2]; " \
                                         "1-D/norms F32"
    text = CliRunner().invoke(main, ["inspect", str(ckpt)]).output
    assert "tensor types per K-quant --outtype" in text and "q6_k    Q6_K; 1-D/norms F32" in text


def test_verify_and_run_rank_a_mixture_by_its_base_type():
    from mmconvert.runtime.run_inputs import _rank
    from mmconvert.verify.backends.gguf_common import combined_type

    if "Q4_K" not in gc.PRECISION_ORDER:
        pytest.skip("PRECISION_ORDER does not list the K-quant types yet")
    assert combined_type("Q4_K_M", "F16") == "Q4_K_M"  # held to the lossier file
    assert combined_type("Q8_0", "Q6_K") == "Q6_K"
    assert _rank("Q8_0") < _rank("Q6_K") < _rank("Q4_K_M") < len(gc.PRECISION_ORDER)
