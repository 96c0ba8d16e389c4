"""The Hugging Face bundle: a standard Qwen3 folder, the projectors beside it, remote code.

Layout (documented in ``docs/hf-bundle.md``): ``model.safetensors`` (or shards plus
``model.safetensors.index.json``) with the language model only, so plain ``from_pretrained``
sees no unexpected keys; ``multimodal_projector/model.safetensors`` (in a subfolder, so that
loaders globbing the root's ``*.safetensors``, vLLM's among them, see only the language model);
``config.json`` (Qwen3 +
``auto_map`` + ``multimodal_config``); ``generation_config.json``; tokenizer files;
``modeling_mmqwen3.py``; ``README.md``; ``mmconvert.json``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mmconvert.convert.hf_config import generation_config, hf_config, projector_config
from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan_hf import (
    PROJECTOR_DIR,
    PROJECTOR_FILE,
    PROJECTOR_STEM,
    hf_config_dtype,
    plan_hf,
)
from mmconvert.formats.bundle import (
    BundleDir,
    Input,
    manifest_sources,
    model_inputs,
    write_manifest,
)
from mmconvert.formats.hashing import SourceHashes
from mmconvert.formats.hf_folder import write_hf_files
from mmconvert.formats.safetensors_writer import data_bytes, write_safetensors
from mmconvert.formats.streaming import ProgressFactory
from mmconvert.publish.model_card import write_bundle_card

PROJECTOR_PREFIX = "multimodal_projector."


def export_hf(model: CanonicalModel, out: Path, *, dtype: str = "auto",
              max_shard_bytes: int = 5 * 10**9, force: bool = False,
              progress: ProgressFactory | None = None, fold_linear: bool = False,
              inputs: Iterable[Input] = ()) -> list[str]:
    """Write the HF bundle to ``out`` (atomically); return the files written. ``inputs``: what
    the user named besides the model, which OUT may not overlap (see :class:`BundleDir`);
    ``progress`` as in :func:`~mmconvert.convert.export_gguf.export_gguf` (one total for the
    language model and the projector)."""
    out = Path(out)
    lm_plan, projector_plan = plan_hf(model, dtype, fold_linear)
    digests: dict[str, str] = {}
    with SourceHashes(manifest_sources(model), model.tensors.refs()) as sources, \
            BundleDir(out, force, [*inputs, *model_inputs(model)]) as tmp:  # hashes fed by the reads
        report = (progress(data_bytes(lm_plan.tensors) + data_bytes(projector_plan.tensors))
                  if progress else None)
        files = write_safetensors(tmp, lm_plan.tensors, max_shard_bytes=max_shard_bytes,
                                  progress=report, digests=digests)
        # the projector is small: always one file, whatever the shard limit
        whole = sum(t.source.nbytes for t in projector_plan.tensors) * 2 + 1
        (tmp / PROJECTOR_DIR).mkdir()
        files += [f"{PROJECTOR_DIR}/{name}" for name in write_safetensors(
            tmp / PROJECTOR_DIR, projector_plan.tensors, stem=PROJECTOR_STEM,
            max_shard_bytes=whole, progress=report)]
        config_dtype = hf_config_dtype(model, dtype)
        projector = projector_config(model, PROJECTOR_FILE, PROJECTOR_PREFIX,
                                     projector_plan.projectors)
        files += write_hf_files(
            tmp, config=hf_config(model, config_dtype, projector),
            generation_config=generation_config(model), tokenizer_dir=model.tokenizer.directory,
            tokenizer_files=model.tokenizer.files)
        transforms = lm_plan.transforms_applied()
        transforms += [t for t in projector_plan.transforms_applied() if t not in transforms]
        write_manifest(tmp, kind="hf", model=model,
                       options={"dtype": dtype, "max_shard_bytes": max_shard_bytes,
                                "fold_linear": fold_linear},
                       transforms=transforms, source_hashes=sources.result(),
                       output_hashes=digests,
                       extra={"tensors": {t.name: t.source.name
                                          for t in lm_plan.tensors + projector_plan.tensors},
                              "pieces": {**lm_plan.pieces(), **projector_plan.pieces()}})
        files.append(write_bundle_card(tmp, out.name))
    return files + ["mmconvert.json"]
