"""mmconvert's own bundles as inputs: which ones read back, and why the others do not.

- The HF bundle (``to-hf``) has its own reader, :mod:`~mmconvert.convert.readers.hf_bundle`.
- A safetensors bundle written with ``--naming source`` (the default) *is* its checkpoint's
  layout: the source's tensors under their own names (fused and per-expert tensors rebuilt bit
  for bit) plus the source's ``config.json``, tokenizer and generation config. A checkpoint of
  a dialect whose folder describes itself (``multimodal_qwen3``, ``llava``) therefore reads back
  through that dialect's reader, and converts to the same files as the checkpoint.
- What cannot be read back is refused here, before any dialect reader guesses, with the reason:
  a ``--naming hf`` safetensors bundle carries no ``config.json`` at all; one written from a
  plain Qwen3 folder with ``--projector FILE`` or from a LoRA adapter lacks the projector config
  or the adapter's; a GGUF bundle is not a checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmconvert.convert.readers.common import load_json
from mmconvert.errors import CheckpointError
from mmconvert.formats.bundle import MANIFEST

# dialects whose folder (config.json + weights + tokenizer) describes the whole model
SELF_DESCRIBING = ("multimodal_qwen3", "llava")
CONVERT_AGAIN = "convert from the checkpoint it was written from"


def _manifest(path: Path) -> dict[str, Any] | None:
    if not (path / MANIFEST).is_file():
        return None
    try:
        return load_json(path / MANIFEST, "manifest")
    except CheckpointError:
        return None  # not ours, or damaged: the dialect readers say what they see


def unreadable_bundle(path: Path) -> CheckpointError | None:
    """The refusal for an mmconvert bundle that cannot be converted again (None: not a bundle,
    or one a reader reads)."""
    manifest = _manifest(path)
    if manifest is None or manifest.get("tool") != "mmconvert":
        return None
    kind, dialect = manifest.get("kind"), manifest.get("dialect")
    naming = (manifest.get("options") or {}).get("naming", manifest.get("naming"))
    if kind == "gguf":
        return CheckpointError(f"{path}: an mmconvert GGUF bundle, not a checkpoint; "
                               f"{CONVERT_AGAIN}, or from its HF bundle (to-hf)")
    if kind != "safetensors":
        return None  # the HF bundle: hf_bundle reads it; an example checkpoint: its dialect
    if naming == "hf":
        return CheckpointError(
            f"{path}: a safetensors bundle written with --naming hf carries no config.json "
            f"(Qwen3 and projector configs), so it cannot be converted again\n"
            f"{CONVERT_AGAIN}, or from its HF bundle (to-hf), or write the safetensors bundle "
            "with --naming source (the default), which reads back")
    if dialect not in SELF_DESCRIBING:
        return CheckpointError(
            f"{path}: a safetensors bundle of a {dialect!r} checkpoint; its folder does not "
            "carry everything that checkpoint was read from (the --projector config, the "
            f"LoRA adapter's base), so it cannot be converted again\n{CONVERT_AGAIN}, or from "
            "its HF bundle (to-hf)")
    return None
