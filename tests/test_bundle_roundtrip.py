"""Bundles are inputs too (issue 13, item 5): an HF bundle and a source-named safetensors bundle
convert again, to the very bytes the checkpoint converts to.

ckpt -> to-hf -> to-gguf and ckpt -> to-safetensors -> to-gguf give the same text GGUFs (F16
and Q8_0 in one run) and projector GGUF, byte for byte, as ckpt -> to-gguf; to-hf of an HF
bundle writes the same weights, configs and tokenizer files again. Each conversion passes
``name``: ``general.name`` (and the file names) default to the input folder's name, which is
the one deliberate difference between the runs, not provenance; nothing else in the GGUF
records where it was converted from (sources and their sha256 are in ``mmconvert.json``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mmconvert import api
from mmconvert.cli import main

OUTTYPES = ("f16", "q8_0")
NAME = "roundtrip"
# checkpoint variants whose bundles must convert back: tied and untied heads, shards, padding
# rows, a base folder, Qwen3-MoE experts (per expert in the HF bundle, stacked in the GGUF),
# the projector kinds (SwiGLU with a raw tanh gate, low rank)
ROUND_TRIP_VARIANTS = {
    "default": {},
    "silu-tied": {"activation": "silu", "tied": True},
    "sharded": {"shards": 3},
    "padded-vocab": {"resize_vocab": False},
    "base-dir": {"embed_text_config": False},  # base_model_name: the base folder's path
    "moe": {"num_experts": 4},
    "swiglu-gate": {"projector_type": "swiglu", "activation": "silu",
                    "gate": {"kind": "tanh", "complementary": True, "per_channel": True}},
    "low-rank": {"projector_type": "low_rank", "rank": 8},
}


def gguf_bytes(folder: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("*.gguf"))}
    assert len(files) == len(OUTTYPES) + 1, sorted(files)  # text GGUFs + the projector GGUF
    return files


def to_gguf(source: Path, out: Path, **kwargs) -> dict[str, bytes]:
    api.to_gguf(source, out, outtypes=OUTTYPES, name=NAME, **kwargs)
    return gguf_bytes(out)


def assert_same_files(got: dict[str, bytes], want: dict[str, bytes], route: str) -> None:
    assert sorted(got) == sorted(want), route
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"{route}: {differ} differ from the checkpoint's GGUF"


@pytest.fixture(scope="module")
def interleaved_ckpt(make_checkpoint, tmp_path_factory) -> Path:
    """The example with the ``rope_layout: interleaved`` flag: the writers permute Q/K to
    rotate-half once (the HF bundle stores them permuted; reading it back must not again)."""
    ckpt = tmp_path_factory.mktemp("interleaved") / "ckpt"
    shutil.copytree(make_checkpoint(), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "rope_layout": "interleaved"}))
    return ckpt


@pytest.mark.parametrize("variant", [*ROUND_TRIP_VARIANTS, "interleaved"])
def test_hf_and_safetensors_bundles_convert_to_the_same_gguf(make_checkpoint, interleaved_ckpt,
                                                             tmp_path, variant):
    ckpt = interleaved_ckpt if variant == "interleaved" else \
        make_checkpoint(**ROUND_TRIP_VARIANTS[variant])
    want = to_gguf(ckpt, tmp_path / "direct")
    hf = api.to_hf(ckpt, tmp_path / "hf", max_shard_size="60KB").out
    assert (hf / "model.safetensors.index.json").is_file()  # the sharded HF layout is read too
    assert_same_files(to_gguf(hf, tmp_path / "via-hf"), want, "ckpt -> to-hf -> to-gguf")
    st = api.to_safetensors(ckpt, tmp_path / "st").out
    assert_same_files(to_gguf(st, tmp_path / "via-st"), want, "ckpt -> to-safetensors -> to-gguf")


def test_folded_projector_reads_back_folded(make_checkpoint, tmp_path):
    """A ``--fold-linear`` HF bundle stores the folded matrix (float32) with ``folded_from``:
    converting it gives what folding the checkpoint gives."""
    ckpt = make_checkpoint(projector_type="low_rank", rank=8)
    want = to_gguf(ckpt, tmp_path / "direct", fold_linear=True, projector_outtype="f32")
    hf = api.to_hf(ckpt, tmp_path / "hf", fold_linear=True).out
    got = to_gguf(hf, tmp_path / "via-hf", projector_outtype="f32")
    assert_same_files(got, want, "ckpt -> to-hf --fold-linear -> to-gguf")


def bundle_files(folder: Path) -> dict[str, bytes]:
    """Every file but the card and the manifest (they name the folder and the sources)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("README.md", "mmconvert.json")}


@pytest.mark.parametrize("variant", ["default", "moe", "swiglu-gate"])
def test_to_hf_of_an_hf_bundle_writes_it_again(make_checkpoint, tmp_path, variant):
    hf = api.to_hf(make_checkpoint(**ROUND_TRIP_VARIANTS[variant]), tmp_path / "hf").out
    again = api.to_hf(hf, tmp_path / "again").out
    first, second = bundle_files(hf), bundle_files(again)
    assert sorted(second) == sorted(first)
    assert [n for n in first if first[n] != second[n]] == []
    manifest = json.loads((again / "mmconvert.json").read_text())
    assert manifest["dialect"] == "mmconvert-hf"
    assert manifest["base_model"] == "Qwen/Qwen3-0.6B"  # carried over from the first bundle


def test_an_hf_bundle_of_the_earlier_layout_still_converts(example_ckpt, tmp_path):
    """Bundles written before the projector moved into its subfolder (``weights`` at the
    root) are on the Hub: they convert as well."""
    hf = api.to_hf(example_ckpt, tmp_path / "hf").out
    want = to_gguf(hf, tmp_path / "new")
    (hf / "multimodal_projector" / "model.safetensors").rename(
        hf / "multimodal_projector.safetensors")
    (hf / "multimodal_projector").rmdir()
    cfg = json.loads((hf / "config.json").read_text())
    cfg["multimodal_config"]["weights"] = "multimodal_projector.safetensors"
    (hf / "config.json").write_text(json.dumps(cfg))
    assert_same_files(to_gguf(hf, tmp_path / "old"), want, "earlier HF layout -> to-gguf")


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_bundles_that_cannot_convert_again_say_why(example_ckpt, tmp_path):
    api.to_safetensors(example_ckpt, tmp_path / "st-hf", naming="hf")
    api.to_gguf(example_ckpt, tmp_path / "gguf")
    for folder, cause in (("st-hf", "written with --naming hf carries no config.json"),
                          ("gguf", "an mmconvert GGUF bundle, not a checkpoint")):
        code, output = _cli("to-gguf", tmp_path / folder, "-o", tmp_path / f"{folder}-out")
        first = output.splitlines()[0]
        assert code == 2 and first.startswith("error: ") and cause in first, output
        assert len(first) <= 200
        assert "pass --projector" not in output and not (tmp_path / f"{folder}-out").exists()


def test_inspect_names_the_bundle_dialect(example_ckpt, tmp_path):
    hf = api.to_hf(example_ckpt, tmp_path / "hf").out
    code, output = _cli("inspect", hf)
    assert code == 0, output
    assert "mmconvert-hf" in output


def _edit_mm(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg["multimodal_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(("damage", "cause"), [
    ("weights-outside", "not a path inside"),
    ("no-projector-file", "missing multimodal_projector/model.safetensors"),
    ("wrong-dim", "layer 'norm1' takes 64 inputs, the layer before gives 96"),
    ("unknown-kind", "kind 'conv' is not one of"),
    ("placeholder-id", "placeholder_token_id is 3, but the tokenizer gives"),
])
def test_a_damaged_hf_bundle_is_refused_in_one_line(example_ckpt, tmp_path, damage, cause):
    hf = api.to_hf(example_ckpt, tmp_path / "hf").out
    m1_fc1 = lambda mm: mm["modalities"][0]["layers"][0]  # noqa: E731
    if damage == "weights-outside":
        _edit_mm(hf, lambda mm: mm.update(weights="../elsewhere/model.safetensors"))
    elif damage == "no-projector-file":
        (hf / "multimodal_projector" / "model.safetensors").unlink()
    elif damage == "wrong-dim":
        _edit_mm(hf, lambda mm: m1_fc1(mm).update(out_dim=96))
    elif damage == "unknown-kind":
        _edit_mm(hf, lambda mm: m1_fc1(mm).update(kind="conv"))
    else:
        _edit_mm(hf, lambda mm: mm.update(placeholder_token_id=3))
    code, output = _cli("to-gguf", hf, "-o", tmp_path / "out")
    first = output.splitlines()[0]
    assert code == 2 and first.startswith("error: ") and len(first) <= 200, output
    assert cause in output, output
    assert not (tmp_path / "out").exists()
