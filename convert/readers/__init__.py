"""Checkpoint readers, one per dialect, registered by name.

A reader is a module-level object with ``name``, ``detect(path, options) -> bool`` and
``read(path, options) -> CanonicalModel``. Adding a dialect means adding a reader module and
registering it here; writers and the verifier do not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mmconvert.convert.model import CanonicalModel
from mmconvert.errors import CheckpointError


@dataclass(frozen=True)
class ReadOptions:
    """What the user told us beyond the checkpoint path."""

    base: Path | None = None  # base Qwen3 folder (config, tokenizer, generation config)
    projector: Path | None = None  # separate projector weights (plain Qwen3 folder dialect)
    projector_config: Path | None = None  # its JSON config
    rope_layout: str | None = None  # override: "neox" | "interleaved"


class Reader(Protocol):
    name: str
    description: str

    def detect(self, path: Path, options: ReadOptions) -> bool: ...

    def read(self, path: Path, options: ReadOptions) -> CanonicalModel: ...


READERS: list[Reader] = []


def register(reader: Reader) -> Reader:
    READERS.append(reader)
    return reader


def _load_builtin_readers() -> None:
    from mmconvert.convert.readers import (  # noqa: F401
        hf_bundle,  # before qwen3_with_projector: our bundle's config.json is a Qwen3 one too
        llava_qwen3,
        multimodal_qwen3,
        peft_lora,
        qwen3_with_projector,
    )


def read_checkpoint(path: str | Path, options: ReadOptions | None = None) -> CanonicalModel:
    """Detect the dialect of ``path`` and read it into a :class:`CanonicalModel`."""
    options = options or ReadOptions()
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: expected a checkpoint folder, got a file")
    if not READERS:
        _load_builtin_readers()
    if (path / "adapter_config.json").is_file():
        return next(r for r in READERS if r.name == "peft-lora").read(path, options)
    from mmconvert.convert.readers.safetensors_bundle import unreadable_bundle

    refusal = unreadable_bundle(path)  # our own bundles that cannot be converted again
    if refusal is not None:
        raise refusal
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: missing config.json (is this a checkpoint folder?)")
    for reader in READERS:
        if reader.detect(path, options):
            return reader.read(path, options)
    from mmconvert.convert.readers.common import load_json

    model_type = load_json(path / "config.json", "config").get("model_type")
    supported = "; ".join(f"{r.name} ({r.description})" for r in READERS)
    raise CheckpointError(f"{path}: model_type {model_type!r} is not supported. Supported: {supported}")
