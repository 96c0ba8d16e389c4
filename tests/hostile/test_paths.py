"""Files from outside the checkpoint never get read or into a bundle (issue 9, items 4 and 8).

Index entries must be plain file names of the right kind; symlinks may only stay inside their
folder or point into the Hugging Face cache blob store the folder is a snapshot of. A secret
file planted outside every checkpoint must never show up in any output folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from mmconvert.errors import UnsafePathError
from mmconvert.formats.safe_paths import allowed_roots, plain_file_name, resolve_inside
from tests.hostile.harness import assert_refused, run_cli, tree_digest

SECRET = "SECRET-7f3a-do-not-ship"


@pytest.fixture
def ckpt(example_ckpt, tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(example_ckpt, copy)
    return copy


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the checkpoint holding a secret the bundles must never contain."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "id_rsa").write_text(f"-----BEGIN KEY----- {SECRET}\n")
    return folder


def grep_tree(root: Path, needle: str) -> list[str]:
    """Files under ``root`` (links followed) whose bytes contain ``needle``."""
    hits = []
    for p in Path(root).rglob("*") if Path(root).exists() else []:
        if p.is_file() and needle.encode() in p.read_bytes():
            hits.append(str(p))
    return hits


def write_index(ckpt: Path, values, name: str = "model.safetensors.index.json") -> None:
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "np") as f:
        keys = list(f.keys())
    weight_map = dict.fromkeys(keys, values) if not isinstance(values, dict) else values
    (ckpt / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def convert_refused(ckpt: Path, tmp_path: Path, needle: str, *extra: str,
                    commands=("to-hf", "to-safetensors")) -> None:
    """Every converting command refuses cleanly and leaves no trace of the secret."""
    before = tree_digest(ckpt)
    for command in commands:
        out = tmp_path / f"out-{command}"
        result = run_cli(command, ckpt, "-o", out, *extra)
        assert_refused(result, needle=needle, out=out, before=before, inputs=(ckpt,))
        assert not grep_tree(out, SECRET)


# ---------------------------------------------------------------------------------------------
# index entries


@pytest.mark.parametrize("entry", ["../outside/model.safetensors", "ABSOLUTE",
                                   "sub/model.safetensors", "..\\model.safetensors", "..", ""])
def test_index_entry_must_be_a_plain_file_name(ckpt, tmp_path, outside, entry):
    shutil.move(ckpt / "model.safetensors", outside / "model.safetensors")
    (ckpt / "sub").mkdir()
    shutil.copy(outside / "model.safetensors", ckpt / "sub" / "model.safetensors")
    entry = str(outside / "model.safetensors") if entry == "ABSOLUTE" else entry
    from safetensors import safe_open

    with safe_open(str(outside / "model.safetensors"), "np") as f:
        keys = list(f.keys())
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(keys, entry)}))
    convert_refused(ckpt, tmp_path, "weight_map")


def test_index_entry_with_nul_is_refused(ckpt, tmp_path):
    write_index(ckpt, "model.safetensors\u0000.txt")
    convert_refused(ckpt, tmp_path, "not a plain file name", commands=("to-safetensors",))


@pytest.mark.parametrize("value", [7, None, ["model.safetensors"], {"f": "model.safetensors"}])
def test_index_value_not_a_string(ckpt, tmp_path, value):
    write_index(ckpt, {"language_model.model.embed_tokens.weight": value,
                       "language_model.model.norm.weight": "model.safetensors"})
    convert_refused(ckpt, tmp_path, "not a file name", commands=("to-safetensors",))


@pytest.mark.parametrize("weight_map", [[1, 2], "model.safetensors", {}, None])
def test_index_weight_map_not_an_object(ckpt, tmp_path, weight_map):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    convert_refused(ckpt, tmp_path, "weight_map", commands=("to-safetensors",))


def test_safetensors_index_naming_a_pickle_is_refused(ckpt, tmp_path):
    """A safetensors index must only name safetensors files: never a pickle for torch.load."""
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(ckpt / "model.safetensors")), ckpt / "weights.bin")
    write_index(ckpt, "weights.bin")
    (ckpt / "model.safetensors").unlink()
    convert_refused(ckpt, tmp_path, ".safetensors", commands=("to-safetensors",))


def test_pickle_index_naming_safetensors_is_refused(ckpt, tmp_path):
    write_index(ckpt, "shard.safetensors", name="pytorch_model.bin.index.json")
    (ckpt / "model.safetensors").rename(ckpt / "shard.safetensors")
    convert_refused(ckpt, tmp_path, "pytorch_model.bin.index.json", commands=("to-safetensors",))


def test_sharded_index_with_plain_names_still_converts(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(shards=3)
    out = tmp_path / "out"
    result = run_cli("to-safetensors", ckpt, "-o", out)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# symlinks out of the checkpoint


def _secret_tokenizer(outside: Path, ckpt: Path, name: str) -> Path:
    """A copy of the checkpoint's file outside it, with the secret planted inside."""
    target = outside / name
    if name.endswith(".json"):
        data = json.loads((ckpt / name).read_text())
        data["planted"] = SECRET
        target.write_text(json.dumps(data))
    else:
        target.write_text(f"{SECRET}\n")
    return target


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json",
                                  "generation_config.json", "config.json",
                                  "special_tokens_map.json", "chat_template.jinja",
                                  "merges.txt"])
def test_symlink_out_of_the_checkpoint_is_refused(ckpt, tmp_path, outside, name):
    if name in ("special_tokens_map.json", "merges.txt", "chat_template.jinja"):
        target = outside / "id_rsa"  # files copied verbatim: the secret would ship as is
    else:
        target = _secret_tokenizer(outside, ckpt, name)
    (ckpt / name).unlink(missing_ok=True)
    (ckpt / name).symlink_to(target)
    convert_refused(ckpt, tmp_path, name)


def test_weights_symlinked_out_are_refused(ckpt, tmp_path, outside):
    shutil.move(ckpt / "model.safetensors", outside / "model.safetensors")
    (ckpt / "model.safetensors").symlink_to(os.path.relpath(outside / "model.safetensors", ckpt))
    convert_refused(ckpt, tmp_path, "model.safetensors")


def test_symlinked_subfolder_out_is_refused(ckpt, tmp_path, outside):
    shutil.move(ckpt / "model.safetensors", outside / "model.safetensors")
    (ckpt / "weights").symlink_to(outside, target_is_directory=True)
    (ckpt / "model.safetensors").symlink_to("weights/model.safetensors")
    convert_refused(ckpt, tmp_path, "model.safetensors", commands=("to-safetensors",))


def test_symlink_to_etc_passwd_is_refused(ckpt, tmp_path):
    (ckpt / "special_tokens_map.json").symlink_to("/etc/passwd")
    before = tree_digest(ckpt)
    out = tmp_path / "out"
    result = run_cli("to-hf", ckpt, "-o", out)
    assert_refused(result, needle="special_tokens_map.json", out=out, before=before,
                   inputs=(ckpt,))
    assert not grep_tree(out, "root:")


def test_symlinks_inside_the_checkpoint_are_followed(ckpt, tmp_path):
    (ckpt / "real").mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        shutil.move(ckpt / name, ckpt / "real" / name)
        (ckpt / name).symlink_to(Path("real") / name)
    out = tmp_path / "out"
    result = run_cli("to-hf", ckpt, "-o", out)
    assert result.returncode == 0, result.stderr
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (ckpt / "real" / "tokenizer.json").read_bytes()


def test_base_folder_symlink_out_is_refused(make_checkpoint, tmp_path, outside):
    src = make_checkpoint(embed_text_config=False)
    ckpt, base = tmp_path / "ckpt", tmp_path / "base"
    shutil.copytree(src, ckpt)
    shutil.copytree(src.parent / "base", base)
    (ckpt / "tokenizer.json").unlink(missing_ok=True)
    target = _secret_tokenizer(outside, base, "tokenizer.json")
    (base / "tokenizer.json").unlink()
    (base / "tokenizer.json").symlink_to(target)
    before = tree_digest(ckpt, base)
    out = tmp_path / "out"
    result = run_cli("to-hf", ckpt, "-o", out, "--base", base)
    assert_refused(result, needle="tokenizer.json", out=out, before=before, inputs=(ckpt, base))
    assert not grep_tree(out, SECRET)


def test_adapter_weights_symlinked_out_are_refused(example_ckpt, tmp_path, outside):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": str(example_ckpt)}))
    shutil.copy(example_ckpt / "model.safetensors", outside / "adapter_model.safetensors")
    (adapter / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    before = tree_digest(adapter)
    out = tmp_path / "out"
    result = run_cli("to-safetensors", adapter, "-o", out)
    assert_refused(result, needle="adapter_model.safetensors", out=out, before=before,
                   inputs=(adapter,))


def test_projector_config_beside_projector_symlinked_out_is_refused(example_ckpt, tmp_path,
                                                                    outside):
    from tests.dialect_builders import qwen3_with_projector

    qwen, projector = qwen3_with_projector(example_ckpt, tmp_path / "d")
    config = outside / "projector.json"
    shutil.move(projector.with_suffix(".json"), config)
    projector.with_suffix(".json").symlink_to(config)
    out = tmp_path / "out"
    result = run_cli("to-safetensors", qwen, "-o", out, "--projector", projector)
    assert_refused(result, needle="projector.json", out=out)
    # the same file named by the user with --projector-config is the user's choice
    result = run_cli("to-safetensors", qwen, "-o", out, "--projector", projector,
                     "--projector-config", config)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------------
# the Hugging Face cache layout: snapshots/REV/x -> ../../blobs/SHA must keep converting


def hf_cache_snapshot(src: Path, cache: Path, repo: str = "models--org--mm") -> Path:
    """``src`` laid out as the Hub cache does: every file a relative link into ``blobs/``."""
    blobs = cache / repo / "blobs"
    snapshot = cache / repo / "snapshots" / ("a" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, blobs / digest)
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snapshot


@pytest.mark.parametrize("command", ["to-hf", "to-safetensors", "to-gguf"])
def test_hf_cache_snapshot_converts(example_ckpt, tmp_path, command):
    snapshot = hf_cache_snapshot(example_ckpt, tmp_path / "hub")
    assert all((snapshot / f.name).is_symlink() for f in example_ckpt.iterdir())
    out = tmp_path / "out"
    result = run_cli(command, snapshot, "-o", out)
    assert result.returncode == 0, result.stderr
    copied = [p for p in out.rglob("*") if p.name.startswith("tokenizer")]
    assert all(not p.is_symlink() for p in out.rglob("*"))
    for p in copied:
        assert p.read_bytes() == (example_ckpt / p.name).read_bytes()


def test_hf_cache_link_into_another_repo_is_refused(example_ckpt, tmp_path, outside):
    snapshot = hf_cache_snapshot(example_ckpt, tmp_path / "hub")
    other = hf_cache_snapshot(example_ckpt, tmp_path / "hub", repo="models--evil--x")
    blob = (other / "tokenizer.json").resolve()
    blob.write_text(json.dumps({**json.loads(blob.read_text()), "planted": SECRET}))
    (snapshot / "tokenizer.json").unlink()
    (snapshot / "tokenizer.json").symlink_to(os.path.relpath(blob, snapshot))
    out = tmp_path / "out"
    result = run_cli("to-hf", snapshot, "-o", out)
    assert_refused(result, needle="tokenizer.json", out=out)
    assert not grep_tree(out, SECRET)


def test_hf_cache_blob_linking_further_out_is_refused(example_ckpt, tmp_path, outside):
    snapshot = hf_cache_snapshot(example_ckpt, tmp_path / "hub")
    blob = (snapshot / "generation_config.json").resolve()
    blob.unlink()
    blob.symlink_to(_secret_tokenizer(outside, example_ckpt, "generation_config.json"))
    out = tmp_path / "out"
    result = run_cli("to-hf", snapshot, "-o", out)
    assert_refused(result, needle="generation_config.json", out=out)
    assert not grep_tree(out, SECRET)


# ---------------------------------------------------------------------------------------------
# the module itself


def test_resolve_inside_rules(tmp_path):
    folder = tmp_path / "ck"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text("{}")
    (folder / "sub" / "b.json").write_text("{}")
    (folder / "link.json").symlink_to("sub/b.json")
    (folder / "out.json").symlink_to(tmp_path)
    (folder / "loop").symlink_to("loop")
    assert resolve_inside(folder, "a.json") == (folder / "a.json").resolve()
    assert resolve_inside(folder, "link.json") == (folder / "sub" / "b.json").resolve()
    assert resolve_inside(folder, "missing.json") == (folder / "missing.json").resolve()
    for bad in ("../a.json", str(tmp_path / "x"), "out.json", "sub/../../x", "loop", "a\0b"):
        with pytest.raises(UnsafePathError):
            resolve_inside(folder, bad)


def test_allowed_roots_see_the_hf_cache_only_from_a_snapshot(tmp_path):
    repo = tmp_path / "models--o--n"
    (repo / "snapshots" / "rev" / "sub").mkdir(parents=True)
    assert allowed_roots(repo / "snapshots" / "rev")[1:] == [repo.resolve() / "blobs"]
    assert allowed_roots(repo / "snapshots" / "rev" / "sub")[1:] == [repo.resolve() / "blobs"]
    assert allowed_roots(tmp_path / "models--o--n") == [repo.resolve()]
    plain = tmp_path / "x" / "snapshots" / "rev"
    plain.mkdir(parents=True)
    assert allowed_roots(plain) == [plain.resolve()]


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "a\\b", "/abs", "x\0y", 3, None, []])
def test_plain_file_name_refuses(name):
    with pytest.raises(UnsafePathError):
        plain_file_name(name, "index: weight_map['w']")


def test_plain_file_name_accepts_dots_inside():
    assert plain_file_name("model-00001-of-00002..safetensors", "x") == \
        "model-00001-of-00002..safetensors"
