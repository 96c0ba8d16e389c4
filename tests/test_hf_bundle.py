"""End-to-end: checkpoint -> ``to-hf`` -> transformers (plain and remote code) vs. the seed.

Every checkpoint variant is exported once per session; the bundle is loaded both ways and its
logits compared with :class:`tests.independent_reference.SeedModel` (fp32, no mmconvert code).
"""

from __future__ import annotations

import builtins
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mmconvert.cli import main
from mmconvert.convert.export_hf import export_hf
from mmconvert.convert.plan_hf import plan_hf
from mmconvert.convert.readers import ReadOptions, read_checkpoint
from mmconvert.convert.transforms import interleaved_to_neox, neox_to_interleaved
from mmconvert.errors import UnsupportedError
from testkit.variants import VARIANTS as SEED_VARIANTS
from tests import dialect_builders as build
from tests.independent_reference import SeedModel

TOL = 1e-5
VARIANTS = {**SEED_VARIANTS,
            "qwen3+projector": None}  # a plain Qwen3 folder + --projector, built from the default
SMALL_SHARD = "40KB"  # the "sharded" variant's bundle is split, with an index


@dataclass
class Bundle:
    source: Path  # what was converted
    seed_ckpt: Path  # the multimodal checkpoint with the same weights (for SeedModel)
    out: Path
    model: object  # CanonicalModel
    seed: SeedModel
    remote: torch.nn.Module  # from_pretrained(out, trust_remote_code=True)
    plain: torch.nn.Module  # from_pretrained(out)


def load_both(out: Path, attn: str = "eager") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(remote-code model, plain Qwen3 model) in fp32. Eager attention, as the seed reference
    runs: SDPA's kernel alone moves fp32 logits by ~1e-5 (see the SDPA test below)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32, "attn_implementation": attn}
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **kwargs)
    plain = AutoModelForCausalLM.from_pretrained(out, **kwargs)
    return remote.eval(), plain.eval()


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="session")
def hf_bundle(make_checkpoint, tmp_path_factory):
    """``hf_bundle(variant) -> Bundle``, exported and loaded once per session."""
    cache: dict[str, Bundle] = {}

    def get(variant: str) -> Bundle:
        if variant in cache:
            return cache[variant]
        root = tmp_path_factory.mktemp("hf")
        out = root / f"{variant.replace('+', '-')}-hf"
        if variant == "qwen3+projector":
            seed_ckpt = make_checkpoint()
            source, proj = build.qwen3_with_projector(seed_ckpt, root / "src")
            options = ReadOptions(projector=proj)
        else:
            seed_ckpt = source = make_checkpoint(**VARIANTS[variant])
            cfg = json.loads((source / "config.json").read_text())
            base = None if "text_config" in cfg else Path(cfg["base_model_name"])
            options = ReadOptions(base=base)
        model = read_checkpoint(source, options)
        if variant == "default":  # the CLI round trip
            result = cli("to-hf", source, "-o", out)
            assert result.exit_code == 0, result.output
        else:
            shard = 40_000 if variant == "sharded" else 5 * 10**9
            export_hf(model, out, max_shard_bytes=shard)
        remote, plain = load_both(out)
        base = options.base
        cache[variant] = Bundle(source, seed_ckpt, out, model, SeedModel(seed_ckpt, base),
                                remote, plain)
        return cache[variant]

    return get


def mm_inputs(seed: int = 1) -> dict[str, list[torch.Tensor]]:
    """Several items of both modalities, of shapes [input_dim] and [n, input_dim] (7 rows)."""
    gen = torch.Generator().manual_seed(seed)
    return {"m1": [torch.randn(48, generator=gen), torch.randn(3, 48, generator=gen)],
            "m2": [torch.randn(2, 80, generator=gen), torch.randn(80, generator=gen)]}


def prompts(ph: int) -> list[tuple[list[int], dict | None]]:
    return [([5, 6, 7, 8], None),  # text only
            ([5] + [ph] * 4 + [6] + [ph] * 3 + [7], mm_inputs()),  # one placeholder per row
            ([9, 10, 11], mm_inputs(2))]  # no placeholder: rows prepended


@torch.no_grad()
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_independent_seed_model(hf_bundle, variant):
    from transformers import Qwen3ForCausalLM

    b = hf_bundle(variant)
    assert type(b.plain) is Qwen3ForCausalLM
    assert type(b.remote).__name__ == "MultimodalQwen3ForCausalLM"
    for ids, inputs in prompts(b.model.multimodal_token_id):
        want = b.seed.logits(ids, inputs)
        with torch.no_grad():
            got = b.remote(input_ids=torch.tensor([ids]), mm_inputs=inputs).logits[0]
        assert max_diff(got, want) <= TOL, (variant, ids)
        if inputs is None:
            with torch.no_grad():
                plain = b.plain(input_ids=torch.tensor([ids])).logits[0]
            assert max_diff(plain, want) <= TOL


def test_default_attention_is_close_too(hf_bundle):
    """from_pretrained's default (SDPA) differs from eager only by fp32 rounding."""
    b = hf_bundle("silu-tied")
    remote, plain = load_both(b.out, attn="sdpa")
    for ids, inputs in prompts(b.model.multimodal_token_id):
        with torch.no_grad():
            got = remote(input_ids=torch.tensor([ids]), mm_inputs=inputs).logits[0]
        assert max_diff(got, b.seed.logits(ids, inputs)) <= 1e-4


@pytest.mark.parametrize("variant", ["default", "silu-tied", "sharded", "padded-vocab"])
def test_lm_folder_is_standard_qwen3(hf_bundle, variant):
    from safetensors import safe_open

    b = hf_bundle(variant)
    cfg = json.loads((b.out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["model_type"] == "qwen3"
    assert cfg["tie_word_embeddings"] is b.model.tied
    assert cfg["vocab_size"] == b.model.text.vocab_size
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    index = b.out / "model.safetensors.index.json"
    if variant == "sharded":
        weight_map = json.loads(index.read_text())["weight_map"]
        assert len(set(weight_map.values())) > 1
    else:
        assert not index.exists()
        with safe_open(str(b.out / "model.safetensors"), "pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    lm_names = {n for n in b.model.tensors if not n.startswith("mm.")}
    assert set(weight_map) == lm_names  # no projector tensors, no lm_head when tied
    assert ("lm_head.weight" in weight_map) is (not b.model.tied)
    with safe_open(str(b.out / "multimodal_projector" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == {"multimodal_projector." + n[3:] for n in b.model.tensors if n.startswith("mm.")}
    assert "multimodal_projector.m1.fc1.weight" in names


def test_plain_load_never_prompts_for_remote_code(hf_bundle, monkeypatch):
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    b = hf_bundle("default")
    assert "auto_map" in json.loads((b.out / "config.json").read_text())

    def refuse(*_):
        raise AssertionError("from_pretrained prompted for trust_remote_code")

    monkeypatch.setattr(builtins, "input", refuse)
    model, info = AutoModelForCausalLM.from_pretrained(b.out, output_loading_info=True)
    assert type(model) is Qwen3ForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_generate_with_mm_inputs_is_greedy_and_deterministic(hf_bundle):
    b = hf_bundle("default")
    ph = b.model.multimodal_token_id
    for ids, inputs in prompts(ph)[1:]:
        kwargs = {"mm_inputs": inputs, "max_new_tokens": 4, "do_sample": False}
        first = b.remote.generate(torch.tensor([ids]), **kwargs)
        again = b.remote.generate(torch.tensor([ids]), **kwargs)
        assert torch.equal(first, again)
        fused = len(ids) if ph in ids else len(ids) + 7
        assert first.shape[1] == fused + 4
        # the first new token is the argmax of the reference's last-position logits
        assert first[0, fused].item() == int(b.seed.logits(ids, inputs)[-1].argmax())
    # text only: the remote model generates what the plain Qwen3 model generates
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(b.remote.generate(ids, max_new_tokens=4, do_sample=False),
                       b.plain.generate(ids, max_new_tokens=4, do_sample=False))


def test_batched_mm_inputs_match_single_prompts(hf_bundle):
    b = hf_bundle("default")
    ph = b.model.multimodal_token_id
    ids = [5] + [ph] * 4 + [6] + [ph] * 3 + [7]
    rows = [mm_inputs(1), mm_inputs(3)]
    with torch.no_grad():
        batched = b.remote(input_ids=torch.tensor([ids, ids]), mm_inputs=rows).logits
        for k, inputs in enumerate(rows):
            assert max_diff(batched[k], b.seed.logits(ids, inputs)) <= TOL


def test_bad_mm_inputs_are_clear_errors(hf_bundle):
    b = hf_bundle("default")
    ph = b.model.multimodal_token_id
    with pytest.raises(ValueError, match="placeholder"):
        b.remote(input_ids=torch.tensor([[5, ph, 6]]), mm_inputs=mm_inputs())
    with pytest.raises(ValueError, match="input_dim=48"):
        b.remote(input_ids=torch.tensor([[5]]), mm_inputs={"m1": [torch.randn(47)]})
    with pytest.raises(ValueError, match="unknown modalities"):
        b.remote(input_ids=torch.tensor([[5]]), mm_inputs={"m3": [torch.randn(4)]})
    with pytest.raises(ValueError, match="list of 2"):
        b.remote(input_ids=torch.tensor([[5], [6]]), mm_inputs=mm_inputs())


def test_tokenizer_and_generation_config(hf_bundle):
    from transformers import AutoTokenizer

    b = hf_bundle("default")
    tok = AutoTokenizer.from_pretrained(b.out)
    assert tok.convert_tokens_to_ids(b.model.multimodal_token) == b.model.multimodal_token_id
    assert len(tok) == b.model.tokenizer.size
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")
    gen = json.loads((b.out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == b.model.special.eos and len(gen["eos_token_id"]) == 2
    assert list(b.remote.generation_config.eos_token_id) == b.model.special.eos
    # one placeholder per item is expanded to the item's rows (7 in all)
    inputs = mm_inputs()
    text = f"{b.model.multimodal_token} a {b.model.multimodal_token}" * 2
    ids = b.remote.tokenize_prompt(tok, text, inputs)
    assert ids.shape[0] == 1 and int((ids == b.model.multimodal_token_id).sum()) == 7
    with torch.no_grad():
        got = b.remote(input_ids=ids, mm_inputs=inputs).logits[0]
    assert max_diff(got, b.seed.logits(ids[0].tolist(), inputs)) <= TOL


def test_model_card_and_manifest(hf_bundle):
    from huggingface_hub import ModelCard

    from mmconvert.formats.bundle import sha256_file

    b = hf_bundle("default")
    card = ModelCard.load(b.out / "README.md")
    assert card.data.base_model == "Qwen/Qwen3-0.6B"
    assert card.data.base_model_relation == "finetune"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"multimodal", "qwen3", "mmconvert"} <= set(card.data.tags)
    assert "trust_remote_code=True" in card.text and "--enable-prompt-embeds" in card.text
    assert "| `m2` | 80 |" in card.text
    manifest = json.loads((b.out / "mmconvert.json").read_text())
    assert manifest["kind"] == "hf" and manifest["special_ids"]["eos"] == b.model.special.eos
    outputs = {o["path"]: o["sha256"] for o in manifest["outputs"]}
    on_disk = {p.relative_to(b.out).as_posix() for p in b.out.rglob("*")
               if p.is_file()} - {"mmconvert.json"}
    assert set(outputs) == on_disk
    assert outputs["config.json"] == sha256_file(b.out / "config.json")
    # a local base path is not a Hub id: no base_model in the card
    local = ModelCard.load(hf_bundle("base-dir").out / "README.md")
    assert local.data.base_model is None


def test_dtype_cast(make_checkpoint, tmp_path):
    from safetensors import safe_open

    model = read_checkpoint(make_checkpoint())
    out = tmp_path / "f16"
    export_hf(model, out, dtype="float16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == "float16"
    src = model.tensors["model.norm.weight"]
    with safe_open(str(out / "model.safetensors"), "np") as f:
        got = f.get_tensor("model.norm.weight")
    with safe_open(str(out / "multimodal_projector" / "model.safetensors"), "np") as f:
        assert f.get_tensor("multimodal_projector.m1.fc1.weight").dtype == np.float16
    from mmconvert.formats.dtypes import bf16_to_f32

    assert got.dtype == np.float16
    assert np.array_equal(got, bf16_to_f32(src.read()).astype(np.float16))


def test_interleaved_source_is_permuted_to_neox(make_checkpoint, tmp_path):
    """A source trained with interleaved rope pairs: its Q/K (and q/k norm) rows are permuted
    so that HF's rotate-half rope computes what the source computed."""
    from safetensors.torch import load_file, save_file

    ckpt = make_checkpoint()
    cfg = json.loads((ckpt / "config.json").read_text())
    heads = {"q": cfg["text_config"]["num_attention_heads"],
             "k": cfg["text_config"]["num_key_value_heads"]}
    state = load_file(str(ckpt / "model.safetensors"))
    for name in list(state):
        for kind, n in heads.items():
            if name.endswith(f"self_attn.{kind}_proj.weight"):
                state[name] = torch.from_numpy(neox_to_interleaved(state[name].float().numpy(), n))
            elif name.endswith(f"self_attn.{kind}_norm.weight"):
                state[name] = torch.from_numpy(neox_to_interleaved(state[name].float().numpy(), 1))
    src = tmp_path / "interleaved"
    shutil.copytree(ckpt, src)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()},
              str(src / "model.safetensors"))
    model = read_checkpoint(src, ReadOptions(rope_layout="interleaved"))
    lm_plan, _ = plan_hf(model)
    q = next(t for t in lm_plan.tensors if t.name == "model.layers.0.self_attn.q_proj.weight")
    assert any("interleaved_to_neox" in s for s in q.transforms)
    assert np.array_equal(q.source.read(), interleaved_to_neox(
        model.tensors[q.name].read(), heads["q"]))
    out = tmp_path / "hf"
    result = cli("to-hf", src, "-o", out, "--rope-layout", "interleaved")
    assert result.exit_code == 0, result.output
    remote, _ = load_both(out)
    seed = SeedModel(ckpt)  # the original neox checkpoint: same function
    for ids, inputs in prompts(model.multimodal_token_id):
        with torch.no_grad():
            got = remote(input_ids=torch.tensor([ids]), mm_inputs=inputs).logits[0]
        assert max_diff(got, seed.logits(ids, inputs)) <= TOL


def test_save_pretrained_keeps_the_layout(hf_bundle, tmp_path):
    from transformers import AutoModelForCausalLM

    b = hf_bundle("no-layer-norm-relu")
    b.remote.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "multimodal_projector" / "model.safetensors").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=True,
                                                 dtype=torch.float32)
    ids, inputs = prompts(b.model.multimodal_token_id)[2]
    with torch.no_grad():
        got = again(input_ids=torch.tensor([ids]), mm_inputs=inputs).logits[0]
    assert max_diff(got, b.seed.logits(ids, inputs)) <= TOL


def test_missing_projector_file_fails_loudly(hf_bundle, tmp_path):
    from transformers import AutoModelForCausalLM

    copy = tmp_path / "broken"
    shutil.copytree(hf_bundle("tanh").out, copy)
    (copy / "multimodal_projector" / "model.safetensors").unlink()
    with pytest.raises(OSError, match="multimodal_projector/model.safetensors"):
        AutoModelForCausalLM.from_pretrained(copy, trust_remote_code=True)


def test_cli_refuses_non_empty_out_and_dry_run_writes_nothing(make_checkpoint, tmp_path):
    ckpt = make_checkpoint()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = CliRunner().invoke(main, ["to-hf", str(ckpt), "-o", str(out)])
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "keep.txt").is_file()
    # --force replaces only a bundle mmconvert wrote: a foreign file is refused, and kept
    result = CliRunner().invoke(main, ["to-hf", str(ckpt), "-o", str(out), "--force"])
    assert result.exit_code == 2 and "keep.txt" in result.output
    assert (out / "keep.txt").is_file()
    (out / "keep.txt").unlink()
    assert cli("to-hf", ckpt, "-o", out).exit_code == 0
    result = cli("to-hf", ckpt, "-o", out, "--force", "--max-shard-size", "30KB")
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors.index.json").is_file()
    dry = tmp_path / "dry"
    result = cli("to-hf", ckpt, "-o", dry, "--dry-run", "--dtype", "float32")
    assert result.exit_code == 0
    assert "# plan: hf (" in result.output and "BF16->F32" in result.output
    assert "multimodal_projector.m2.fc2.weight" in result.output
    assert not dry.exists()
    result = CliRunner().invoke(main, ["to-hf", str(ckpt), "--max-shard-size", "lots"])
    assert result.exit_code == 2 and "error: --max-shard-size" in result.output


def test_module_names_must_be_valid(make_checkpoint):
    model = read_checkpoint(make_checkpoint())
    model.projectors = {"m.1": model.projectors["m1"]}
    with pytest.raises(UnsupportedError, match="module name"):
        plan_hf(model)
    with pytest.raises(UnsupportedError, match="--dtype"):
        plan_hf(read_checkpoint(make_checkpoint()), "int8")


def test_export_streams_without_torch(make_checkpoint, tmp_path):
    """The converter never materialises the model: not even torch is imported."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path\n"
            "from mmconvert.convert.readers import read_checkpoint\n"
            "from mmconvert.convert.export_hf import export_hf\n"
            f"export_hf(read_checkpoint(Path({str(make_checkpoint())!r})), Path({str(tmp_path / 'o')!r}))\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_root_holds_only_the_language_model(hf_bundle):
    """vLLM (and any loader that globs the root's *.safetensors when there is no index) loads
    every root file into Qwen3ForCausalLM: the projector must not be among them."""
    from safetensors import safe_open

    b = hf_bundle("default")
    root = sorted(p.name for p in b.out.glob("*.safetensors"))
    assert root == ["model.safetensors"]
    with safe_open(str(b.out / "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert not [n for n in names if n.startswith("multimodal_projector.")]
    cfg = json.loads((b.out / "config.json").read_text())
    assert cfg["multimodal_config"]["weights"] == "multimodal_projector/model.safetensors"


HUB_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True,
                                             dtype=torch.float32, attn_implementation="eager")
ids, mm = torch.tensor([[int(i) for i in sys.argv[2].split(",")]]), torch.load(sys.argv[3])
with torch.no_grad():
    torch.save(model(input_ids=ids, mm_inputs=mm).logits[0], sys.argv[4])
"""


def test_remote_code_loads_the_projector_from_the_hub(hf_bundle, tmp_path):
    """A Hub id: the remote code fetches the projector with hf_hub_download from the repo's
    multimodal_projector/ subfolder (a real process against the fake Hub, nothing cached)."""
    import os
    import subprocess
    import sys

    from tests.fake_hub import FakeHub

    b = hf_bundle("default")
    files = {p.relative_to(b.out).as_posix(): p.read_bytes() for p in b.out.rglob("*")
             if p.is_file()}
    ids, inputs = prompts(b.model.multimodal_token_id)[2]
    torch.save(inputs, tmp_path / "mm.pt")
    with FakeHub({}) as hub:
        hub.add_repo("alice/tiny-mm", files)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
               "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
               "HF_HOME": str(tmp_path / "hf-home")}
        env.pop("HF_TOKEN", None)
        proc = subprocess.run([sys.executable, "-c", HUB_LOAD, "alice/tiny-mm",
                               ",".join(map(str, ids)), str(tmp_path / "mm.pt"),
                               str(tmp_path / "logits.pt")],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        fetched = [r.path for r in hub.requests if "multimodal_projector" in r.path]
    assert any(p.endswith("/multimodal_projector/model.safetensors") for p in fetched), fetched
    got = torch.load(tmp_path / "logits.pt")
    assert max_diff(got, b.seed.logits(ids, inputs)) <= TOL
