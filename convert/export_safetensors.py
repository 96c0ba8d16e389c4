"""The safetensors bundle: weights, their config, and the manifest."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan_safetensors import plan_safetensors
from mmconvert.formats.bundle import (
    BundleDir,
    Input,
    manifest_sources,
    model_inputs,
    write_manifest,
)
from mmconvert.formats.hashing import SourceHashes
from mmconvert.formats.safe_paths import copy_inside
from mmconvert.formats.safetensors_writer import data_bytes, write_safetensors
from mmconvert.formats.streaming import ProgressFactory
from mmconvert.publish.model_card import write_bundle_card


def export_safetensors(model: CanonicalModel, out: Path, *, naming: str = "source",
                       dtype: str = "auto", max_shard_bytes: int = 5 * 10**9,
                       force: bool = False, progress: ProgressFactory | None = None,
                       inputs: Iterable[Input] = ()) -> list[str]:
    """Write the safetensors bundle to ``out``; return the files written. ``inputs``: what the
    user named besides the model, which OUT may not overlap (see :class:`BundleDir`);
    ``progress`` as in :func:`~mmconvert.convert.export_gguf.export_gguf`."""
    plan = plan_safetensors(model, naming, dtype)
    digests: dict[str, str] = {}
    with SourceHashes(manifest_sources(model), model.tensors.refs()) as sources, \
            BundleDir(out, force, [*inputs, *model_inputs(model)]) as tmp:  # hashes fed by the reads
        report = progress(data_bytes(plan.tensors)) if progress else None
        files = write_safetensors(tmp, plan.tensors, max_shard_bytes=max_shard_bytes,
                                  progress=report, digests=digests)
        files += copy_side_files(model, tmp, with_config=naming == "source")
        write_manifest(tmp, kind="safetensors", model=model,
                       options={"naming": naming, "dtype": dtype, "max_shard_bytes": max_shard_bytes},
                       transforms=plan.transforms_applied(), source_hashes=sources.result(),
                       output_hashes=digests,
                       extra={"naming": naming, "tensors": {t.name: t.source.name for t in plan.tensors},
                              "pieces": plan.pieces()})
        files.append(write_bundle_card(tmp, Path(out).name))
    return files + ["mmconvert.json"]


def copy_side_files(model: CanonicalModel, folder: Path, with_config: bool) -> list[str]:
    """Tokenizer files and generation config (and, with source naming, the source's config.json)
    so that a source-named bundle is a drop-in replacement of the checkpoint folder."""
    copied = []
    sources = [(model.tokenizer.directory / f, f) for f in model.tokenizer.files]
    gen = model.source_files_from.get("generation_config")
    if gen:
        sources.append((Path(gen), "generation_config.json"))
    if with_config and (model.source / "config.json").is_file():
        sources.append((model.source / "config.json", "config.json"))
    for src, name in sources:  # contents, never a link, and only from inside src's folder
        copy_inside(src.parent, src.name, folder / name)
        copied.append(name)
    return copied


def load_bundle_names(folder: Path) -> dict[str, str]:
    """Output name -> canonical name, from a safetensors bundle's manifest."""
    manifest = json.loads((Path(folder) / "mmconvert.json").read_text(encoding="utf-8"))
    return dict(manifest["tensors"])
