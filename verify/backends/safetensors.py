"""The safetensors bundle: tensor equality with the source through the manifest's name map,
then the forward pass on the bundle's own tensors and config."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mmconvert.convert.model import CanonicalModel, ProjectorSpec, TextSpec
from mmconvert.convert.readers.common import load_json, text_spec_from_config
from mmconvert.convert.readers.projectors import seed_projectors
from mmconvert.errors import CheckpointError
from mmconvert.formats.dtypes import to_float32
from mmconvert.formats.safetensors_io import SafetensorsEntry, read_entry, read_safetensors_header
from mmconvert.verify.backends import (
    BundleError,
    BundleTensor,
    Runner,
    Target,
    manifest_name_map,
    register,
)
from mmconvert.verify.backends.pieces import canonical_view
from mmconvert.verify.backends.torch_forward import build_forward, case_logits, placement_note
from mmconvert.verify.cases import Case
from mmconvert.verify.facts import projector_facts


def safetensors_entries(folder: Path, extra: Sequence[Path] = ()) -> dict[str, SafetensorsEntry]:
    """Every tensor of every ``*.safetensors`` file in ``folder``, then of the ``extra`` files
    (headers only); a name in two files is a :class:`BundleError`."""
    entries: dict[str, SafetensorsEntry] = {}
    for path in [*sorted(folder.glob("*.safetensors")), *extra]:
        try:
            found, _ = read_safetensors_header(path)
        except CheckpointError as exc:
            raise BundleError(str(exc)) from exc
        for name, entry in found.items():
            if name in entries:
                raise BundleError(f"{path}: tensor {name!r} also in {entries[name].path.name}")
            entries[name] = entry
    return entries


def entry_tensor(canonical: str, entry: SafetensorsEntry) -> BundleTensor:
    def load():
        return to_float32(read_entry(entry), entry.dtype)

    numel = 1
    for d in entry.shape:
        numel *= d
    return BundleTensor(canonical, entry.name, entry.dtype, load, numel)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer_file_check(folder: Path, model: CanonicalModel) -> tuple[str, bool | None, str]:
    """The tokenizer files a bundle carries must be the checkpoint's, byte for byte."""
    differ, checked = [], 0
    for name in model.tokenizer.files:
        if (folder / name).is_file():
            checked += 1
            if file_sha256(folder / name) != file_sha256(model.tokenizer.directory / name):
                differ.append(name)
    if not checked:
        return ("tokenizer files", None, "the bundle carries no tokenizer files")
    if differ:
        return ("tokenizer files", False, f"differ from the checkpoint's: {', '.join(differ)}")
    return ("tokenizer files", True, f"{checked} files identical to the checkpoint's")


def config_specs(config: dict[str, Any], where: str
                 ) -> tuple[TextSpec | None, dict[str, ProjectorSpec] | None]:
    """Text and projector specs as a multimodal ``config.json`` declares them."""
    text = None
    if isinstance(config.get("text_config"), dict):
        text = text_spec_from_config(config["text_config"], where)
    projectors = None
    if config.get("modality_configs"):
        hidden = text.hidden_size if text else int(config.get("hidden_size", 0))
        projectors = seed_projectors(config, hidden, where)
    return text, projectors


def spec_facts(text: TextSpec | None, projectors: dict[str, ProjectorSpec] | None
               ) -> dict[str, Any]:
    from mmconvert.verify.facts import TEXT_KEYS

    facts: dict[str, Any] = {}
    if text is not None:
        for key in TEXT_KEYS:
            if key not in ("vocab_size", "tie_word_embeddings"):
                facts[f"text.{key}"] = getattr(text, key)
    if projectors is not None:
        facts["modalities"] = list(projectors)
        for name, spec in projectors.items():
            for key, value in projector_facts(spec).items():
                facts[f"projector.{name}.{key}"] = value
    return facts


def manifest_facts(manifest: dict[str, Any]) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    special = manifest.get("special_ids") or {}
    for kind in ("eos", "bos", "pad"):
        if kind in special:
            facts[f"special.{kind}"] = list(special[kind])
    if "multimodal_token_id" in manifest:
        facts["placeholder.id"] = manifest["multimodal_token_id"]
    if "multimodal_token" in manifest:
        facts["placeholder.token"] = manifest["multimodal_token"]
    return facts


class SafetensorsRunner(Runner):
    def __init__(self, target: Target, model: CanonicalModel):
        super().__init__(target, model)
        self.folder = target.bundle
        self.manifest: dict[str, Any] = target.options["manifest"]
        self.names = manifest_name_map(self.folder, self.manifest)
        self.entries = safetensors_entries(self.folder)
        config_path = self.folder / "config.json"
        self.config = load_json(config_path, "config") if config_path.is_file() else {}
        self.text, self.projectors = config_specs(self.config, str(config_path))
        self.forward = None

    def facts(self) -> dict[str, Any]:
        facts = manifest_facts(self.manifest)
        facts.update(spec_facts(self.text, self.projectors))
        emb = next((e for n, e in self.entries.items()
                    if self.names.get(n) == "model.embed_tokens.weight"), None)
        if emb is not None:
            facts["text.vocab_size"] = emb.shape[0]
        facts["text.tie_word_embeddings"] = "lm_head.weight" not in self.names.values()
        if self.config.get("multimodal_token"):
            facts["placeholder.token"] = self.config["multimodal_token"]
        return facts

    def tensors(self) -> list[BundleTensor]:
        out = canonical_view([entry_tensor(self.names.get(name, ""), entry)
                              for name, entry in self.entries.items()],
                             self.manifest.get("pieces") or {})
        for stored in self.names:
            if stored not in self.entries:
                raise BundleError(f"{self.folder}: mmconvert.json lists {stored!r} but no "
                                  "safetensors file holds it")
        return out

    def prepare(self, tensors: dict[str, BundleTensor], device: str, dtype: torch.dtype) -> None:
        text = self.text or self.model.text
        emb = tensors.get("model.embed_tokens.weight")
        if emb is not None:
            text.vocab_size = self.entries[emb.stored_as].shape[0]
        text.tie_word_embeddings = "lm_head.weight" not in tensors
        projectors = self.projectors or self.model.projectors
        placeholder = self.manifest.get("multimodal_token_id", self.model.multimodal_token_id)
        self.forward = build_forward(text, projectors, placeholder, tensors, device, dtype,
                                     self.model.text.rope_layout, self.offload)

    def logits(self, case: Case) -> torch.Tensor:
        return case_logits(self.forward, case)

    def extra_checks(self) -> list[tuple[str, bool | None, str]]:
        return [tokenizer_file_check(self.folder, self.model)]

    def holder(self) -> object | None:
        return None if self.forward is None else self.forward.lm

    def placement_note(self) -> str:
        return placement_note(self.forward)

    def close(self) -> None:
        self.forward = None


def safetensors_targets(bundle: Path, manifest: dict) -> list[Target]:
    return [Target(bundle, "safetensors", "safetensors", f"{bundle.name} (safetensors)", "auto",
                   sorted(bundle.glob("*.safetensors")), {"manifest": manifest})]


register("safetensors", "safetensors", safetensors_targets, SafetensorsRunner)
