"""The Hugging Face bundle through transformers: ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` runs the bundle's own remote code, which takes ``mm_inputs`` and
fuses the projected rows itself (only once :mod:`mmconvert.verify.bundle_trust` found that
code to be mmconvert's own, or the user passed ``--trust-bundle-code``). Its tensors are
compared with the source through the manifest's name map; its facts come from
``config.json`` (``multimodal_config``) and ``generation_config.json``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmconvert.convert.model import LAYER_KINDS, CanonicalModel, ProjectorLayer, ProjectorSpec
from mmconvert.convert.readers.common import load_json, text_spec_from_config
from mmconvert.convert.rope import undo_neox_fixup
from mmconvert.formats.safe_paths import resolve_inside
from mmconvert.formats.safetensors_io import SafetensorsEntry
from mmconvert.verify.backends import (
    BundleError,
    BundleTensor,
    Runner,
    Target,
    manifest_name_map,
    register,
)
from mmconvert.verify.backends.pieces import canonical_view
from mmconvert.verify.backends.safetensors import (
    entry_tensor,
    safetensors_entries,
    tokenizer_file_check,
)
from mmconvert.verify.cases import Case
from mmconvert.verify.derived import with_derivations
from mmconvert.verify.facts import TEXT_KEYS, projector_facts
from mmconvert.verify.reference import plan_placement, weight_bytes


def projector_specs_from_config(mm: dict[str, Any], where: str) -> dict[str, ProjectorSpec]:
    """``config.json``'s ``multimodal_config.modalities`` as projector specs."""
    specs = {}
    for entry in mm.get("modalities") or []:
        try:
            layers = []
            for layer in entry["layers"]:
                kind = layer["kind"]
                dim = layer.get("dim")
                layers.append(ProjectorLayer(
                    kind, layer["name"], int(layer.get("in_dim", dim or 0)),
                    int(layer.get("out_dim", dim or 0)), activation=layer.get("activation"),
                    eps=float(layer["eps"]) if kind == "layer_norm" else None,
                    bias=bool(layer.get("bias", kind not in LAYER_KINDS
                                                   or LAYER_KINDS[kind].has_bias)),
                    per_channel=bool(layer.get("per_channel", False)),
                    complementary=bool(layer.get("complementary", False)),
                    folded_from=tuple(layer.get("folded_from") or ())))
            specs[entry["name"]] = ProjectorSpec(
                modality=entry["name"], input_dim=int(entry["input_dim"]),
                hidden_dim=int(entry.get("hidden_dim", 0)), output_dim=int(entry["output_dim"]),
                activation=str(entry.get("activation", "")),
                layer_norm=any(x.kind == "layer_norm" for x in layers), layers=layers)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: multimodal_config modality entry {entry!r} is "
                              f"malformed ({exc!r})") from exc
    return specs


def projector_file(folder: Path, mm: dict[str, Any]) -> Path | None:
    """The projector weights ``multimodal_config.weights`` names (``multimodal_projector/
    model.safetensors``; older bundles kept it at the root), when it is a file of the bundle."""
    rel = mm.get("weights")
    if not isinstance(rel, str) or not rel:
        return None
    resolve_inside(folder, rel)  # refuses a path leading out of the bundle
    path = folder / rel
    return path if path.is_file() else None


def hf_entries(folder: Path, mm: dict[str, Any]) -> dict[str, SafetensorsEntry]:
    """The tensors transformers loads: the language model's shards at the root and the
    projector file in its subfolder (headers only)."""
    path = projector_file(folder, mm)
    at_root = path is None or path.parent == folder  # then among the shards already
    return safetensors_entries(folder, () if at_root else (path,))


class HFRunner(Runner):
    def __init__(self, target: Target, model: CanonicalModel):
        super().__init__(target, model)
        self.folder = target.bundle
        self.manifest: dict[str, Any] = target.options["manifest"]
        self.names = manifest_name_map(self.folder, self.manifest)
        self.config = load_json(self.folder / "config.json", "config")
        self.mm = self.config.get("multimodal_config") or {}
        if not self.mm:
            raise BundleError(f"{self.folder}/config.json: no multimodal_config")
        gen = self.folder / "generation_config.json"
        self.generation = load_json(gen, "generation config") if gen.is_file() else {}
        self.entries = hf_entries(self.folder, self.mm)
        self.hf_model = None
        self._offload_dir = None
        self.loading: dict[str, list[str]] = {"missing_keys": [], "unexpected_keys": []}

    def facts(self) -> dict[str, Any]:
        text = text_spec_from_config(self.config, str(self.folder / "config.json"))
        facts: dict[str, Any] = {f"text.{k}": getattr(text, k) for k in TEXT_KEYS
                                 if k != "vocab_size"}
        emb = next((e for n, e in self.entries.items()
                    if self.names.get(n) == "model.embed_tokens.weight"), None)
        if emb is not None:
            facts["text.vocab_size"] = emb.shape[0]
        eos: list[int] = []
        for value in (self.config.get("eos_token_id"), self.generation.get("eos_token_id")):
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and i not in eos:
                    eos.append(i)
        facts["special.eos_set"] = sorted(eos)
        facts["placeholder.id"] = self.mm.get("placeholder_token_id")
        facts["placeholder.token"] = self.mm.get("placeholder_token")
        specs = projector_specs_from_config(self.mm, str(self.folder / "config.json"))
        facts["modalities"] = list(specs)
        for name, spec in specs.items():
            for key, value in projector_facts(spec).items():
                facts[f"projector.{name}.{key}"] = value
        return facts

    def _undo_rope(self, canonical: str, array: np.ndarray) -> np.ndarray:
        """HF's Qwen3 rotates halves: an interleaved source was permuted per head."""
        return undo_neox_fixup(self.model.text, canonical, array)

    def tensors(self) -> list[BundleTensor]:
        stored = [entry_tensor(self.names.get(name, ""), entry)
                  for name, entry in self.entries.items()]
        specs = projector_specs_from_config(self.mm, str(self.folder / "config.json"))
        out = []
        for bt in with_derivations(canonical_view(stored, self.manifest.get("pieces") or {}),
                                   specs):
            raw = bt.load

            def load(raw=raw, canonical=bt.name) -> np.ndarray:
                return self._undo_rope(canonical, raw())

            out.append(replace(bt, load=load))
        return out

    def prepare(self, tensors: dict[str, BundleTensor], device: str, dtype: torch.dtype) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # verify prints its own progress
        nbytes, largest = weight_bytes((bt.numel for bt in tensors.values()), dtype)
        main, max_memory = plan_placement(nbytes, device, self.offload,
                                          largest_bytes=largest)
        kwargs: dict[str, Any] = {"trust_remote_code": True, "dtype": dtype,
                                  "local_files_only": True}
        if main != "cpu" or max_memory:
            kwargs["device_map"] = "auto" if max_memory else {"": main}
        if max_memory:
            # what does not fit stays on disk; transformers wants a folder for any weight it
            # cannot read back from the bundle's safetensors as they are
            import tempfile

            self._offload_dir = tempfile.TemporaryDirectory(prefix="mmconvert-verify-")
            kwargs.update(max_memory=max_memory, offload_folder=self._offload_dir.name)
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report is ours to give (extra_checks)
        try:
            self.hf_model, info = AutoModelForCausalLM.from_pretrained(
                str(self.folder), output_loading_info=True, **kwargs)
        except Exception as exc:
            raise BundleError(f"transformers cannot load {self.folder}: {exc}") from exc
        finally:
            hf_logging.set_verbosity(level)
        # weights transformers skipped or had to invent: the bundle's config and tensors
        # disagree, and the model that runs is not the one whose tensors were checked
        self.loading = {k: sorted(info.get(k) or []) for k in ("missing_keys", "unexpected_keys")}
        self.hf_model.eval()
        self.device = next(self.hf_model.parameters()).device

    @torch.no_grad()
    def logits(self, case: Case) -> torch.Tensor:
        ids = torch.tensor([case.full_ids], device=self.device)
        mm = {m: [t.to(self.device) for t in items] for m, items in case.mm_inputs.items()}
        out = self.hf_model(input_ids=ids, mm_inputs=mm or None, use_cache=False)
        return out.logits[0].float().cpu()

    def extra_checks(self) -> list[tuple[str, bool | None, str]]:
        checks = [tokenizer_file_check(self.folder, self.model)]
        missing, unexpected = self.loading["missing_keys"], self.loading["unexpected_keys"]
        if missing or unexpected:
            parts = []
            if unexpected:
                parts.append(f"{len(unexpected)} tensors of the bundle ignored ({unexpected[0]}, "
                             "...)")
            if missing:
                parts.append(f"{len(missing)} parameters left randomly initialised "
                             f"({missing[0]}, ...)")
            checks.append(("transformers loading", False, "from_pretrained " + "; ".join(parts)
                           + ": config.json does not describe the stored tensors"))
        else:
            checks.append(("transformers loading", True, "every tensor loaded, none missing"))
        return checks

    def holder(self) -> object | None:
        return self.hf_model

    def placement_note(self) -> str:
        placed = getattr(self.hf_model, "hf_device_map", None) or {}
        on_disk = sum(1 for where in placed.values() if where == "disk")
        return f"{on_disk} modules offloaded to disk by transformers" if on_disk else ""

    def close(self) -> None:
        self.hf_model = None
        if self._offload_dir is not None:
            self._offload_dir.cleanup()
            self._offload_dir = None


def hf_targets(bundle: Path, manifest: dict) -> list[Target]:
    config = json.loads((bundle / "config.json").read_text("utf-8")) \
        if (bundle / "config.json").is_file() else {}
    if "auto_map" not in config:
        raise BundleError(f"{bundle}: config.json has no auto_map (no remote code to run)")
    projector = projector_file(bundle, config.get("multimodal_config") or {})
    files = sorted({*bundle.glob("*.safetensors"), *([projector] if projector else [])})
    return [Target(bundle, "hf", "hf", f"{bundle.name} (hf)", "auto", files,
                   {"manifest": manifest})]


register("hf", "hf", hf_targets, HFRunner)
