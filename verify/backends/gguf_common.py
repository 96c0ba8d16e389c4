"""Reading a GGUF bundle back: files, metadata as facts and specs, tensors in canonical layout.

Names are mapped back with gguf-py's own Qwen3 tensor-name map (what llama.cpp's converter
uses), not with mmconvert's plan, so a naming mistake in the writer cannot cancel out here.
Projector files follow ``docs/gguf-projector.md`` (architecture ``mmproj-embed``), read by the
one parser of that spec (:mod:`mmconvert.formats.gguf_projector`); files are read with
:mod:`mmconvert.formats.gguf_reader`.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from mmconvert.convert.model import CanonicalModel, ProjectorLayer, ProjectorSpec, TextSpec
from mmconvert.convert.rope import undo_neox_fixup
from mmconvert.errors import ProjectorFileError
from mmconvert.formats.gguf_constants import (
    MIXTURE_BASE,
    PRECISION_ORDER,
    PROJECTOR_ACTIVATED_KINDS,
    PROJECTOR_ARCH,
    TEXT_ARCHS,
    TEXT_MOE_ARCH,
    Keys,
    file_type_name,
    precision_rank,
)
from mmconvert.formats.gguf_projector import ModalitySpec, read_projector_spec
from mmconvert.formats.gguf_reader import GGUFReader
from mmconvert.verify.backends import BundleError, BundleTensor, Target
from mmconvert.verify.derived import with_derivations
from mmconvert.verify.facts import projector_facts

SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def combined_type(*types: str) -> str:
    """The least precise of ``types``: a target is held to the thresholds of its lossiest file
    (an F32 text GGUF with an F16 projector rounds the projected rows to F16 precision). A
    K-quant mixture (``Q4_K_M``) ranks as its base type, the least precise in it."""
    known = [t for t in types if precision_rank(t) < len(PRECISION_ORDER)]
    return max(known, key=precision_rank) if known else types[0]


class GGUFFile:
    """A GGUF model, possibly split over several files: metadata of the first, all tensors."""

    def __init__(self, paths: list[Path]):
        self.paths = paths
        self.readers = []
        for path in paths:
            try:
                self.readers.append(GGUFReader(path))
            except (OSError, ValueError) as exc:
                raise BundleError(f"{path}: not a readable GGUF file ({exc})", path=path) from exc
        self._reader_of = {name: r for r in self.readers for name in r.tensors}
        self.tensors = {name: r.tensors[name] for name, r in self._reader_of.items()}

    def value(self, key: str, default: Any = None) -> Any:
        return self.readers[0].value(key, default)

    @property
    def arch(self) -> str:
        return str(self.value(Keys.General.ARCHITECTURE, ""))

    def array(self, name: str) -> np.ndarray:
        """A tensor as float32, numpy (row-major) shape."""
        return self._reader_of[name].tensor_array(name)

    def type_name(self, name: str) -> str:
        return self.tensors[name].type_name

    def numel(self, name: str) -> int:
        return self.tensors[name].n_elements


def group_files(folder: Path) -> list[list[Path]]:
    """GGUF files of a folder, split shards grouped (first shard first)."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.gguf")):
        m = SPLIT_RE.match(path.name)
        key = m.group("stem") if m else path.name
        groups.setdefault(key, []).append(path)
    return list(groups.values())


def output_type(text: GGUFFile) -> str:
    """The file's quantization: ``general.file_type``, else its most common 2-D type."""
    ftype = text.value(Keys.General.FILE_TYPE)
    name = file_type_name(ftype) if ftype is not None else None
    if name in PRECISION_ORDER or name in MIXTURE_BASE:  # a type or mixture mmconvert writes
        return name
    counts: dict[str, int] = {}
    for t in text.tensors.values():
        if len(t.shape) >= 2:
            counts[t.type_name] = counts.get(t.type_name, 0) + t.n_elements
    return max(counts, key=lambda k: counts[k]) if counts else "F32"


def gguf_targets(backend: str, label_suffix: str = "") -> Any:
    """A ``targets(bundle, manifest)`` function for a GGUF backend: one target per text GGUF
    (each with the bundle's projector GGUF)."""

    def targets(bundle: Path, manifest: dict) -> list[Target]:
        texts, projectors, types = [], [], {}
        for paths in group_files(bundle):
            head = GGUFFile([paths[0]])
            types[paths[0]] = output_type(head)
            (projectors if head.arch == PROJECTOR_ARCH else texts).append(paths)
        if not texts:
            raise BundleError(f"{bundle}: no text GGUF (general.architecture qwen3) found")
        if len(projectors) > 1:
            raise BundleError(f"{bundle}: {len(projectors)} projector GGUFs; keep one per bundle")
        out = []
        for paths in texts:
            files = paths + (projectors[0] if projectors else [])
            kind = combined_type(*(types[p[0]] for p in [paths, *projectors[:1]]))
            out.append(Target(bundle, "gguf", backend, paths[0].name, kind, files,
                              {"text": paths, "projector": projectors[0] if projectors else None,
                               "manifest": manifest}))
        return out

    return targets


class GGUFBundle:
    """One text GGUF and the projector GGUF of a target, read back for verification."""

    def __init__(self, target: Target, model: CanonicalModel):
        self.model = model
        self.text = GGUFFile(target.options["text"])
        self.projector = GGUFFile(target.options["projector"]) \
            if target.options.get("projector") else None
        self.arch = self.text.arch
        if self.arch not in TEXT_ARCHS:
            raise BundleError(f"{self.text.paths[0]}: general.architecture {self.arch!r}; the "
                              f"verifier runs {' and '.join(TEXT_ARCHS)} text GGUFs")
        if target.output_type == "auto":
            types = [output_type(self.text)]
            if self.projector is not None:
                types.append(output_type(self.projector))
            target.output_type = combined_type(*types)

    # -- specs and facts ---------------------------------------------------------------

    def _key(self, suffix: str, default: Any = None) -> Any:
        return self.text.value(f"{self.arch}.{suffix}", default)

    @cached_property
    def text_spec(self) -> TextSpec:
        emb = self.text.tensors.get("token_embd.weight")
        if emb is None:
            raise BundleError(f"{self.text.paths[0]}: no token_embd.weight")
        heads = int(self._key("attention.head_count", 0))
        hidden = int(self._key("embedding_length", 0))
        spec = TextSpec(
            vocab_size=int(emb.shape[0]), hidden_size=hidden,
            intermediate_size=int(self._key("feed_forward_length", 0)),
            num_hidden_layers=int(self._key("block_count", 0)), num_attention_heads=heads,
            num_key_value_heads=int(self._key("attention.head_count_kv", heads)),
            head_dim=int(self._key("attention.key_length", hidden // max(heads, 1))),
            rms_norm_eps=float(self._key("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(self._key("rope.freq_base", 10000.0)),
            max_position_embeddings=int(self._key("context_length", 0)),
            tie_word_embeddings="output.weight" not in self.text.tensors)
        if self.arch == TEXT_MOE_ARCH:
            # llama.cpp's qwen3moe: experts in every layer, top-k weights renormalised
            spec.num_experts = int(self._key("expert_count", 0))
            spec.num_experts_per_tok = int(self._key("expert_used_count", 0))
            spec.moe_intermediate_size = int(self._key("expert_feed_forward_length", 0))
            spec.norm_topk_prob = True
        kind = self._key("rope.scaling.type")
        if kind and kind != "none":
            spec.rope_scaling = {"rope_type": kind,
                                 "factor": float(self._key("rope.scaling.factor", 1.0))}
            orig = self._key("rope.scaling.original_context_length")
            if orig:
                spec.rope_scaling["original_max_position_embeddings"] = int(orig)
        return spec

    @cached_property
    def projector_specs(self) -> dict[str, ProjectorSpec]:
        """The projectors as the file declares them (docs/gguf-projector.md, versions 1-2)."""
        if self.projector is None:
            return {}
        try:
            spec = read_projector_spec(self.projector.readers[0])
        except ProjectorFileError as exc:
            raise BundleError(str(exc), path=self.projector.paths[0]) from exc
        return {m: _projector_spec(x) for m, x in spec.modalities.items()}

    @property
    def placeholder_id(self) -> int | None:
        if self.projector is None:
            return None
        value = self.projector.value(Keys.Projector.PLACEHOLDER_TOKEN_ID)
        return None if value is None or int(value) < 0 else int(value)

    def facts(self) -> dict[str, Any]:
        spec = self.text_spec
        facts: dict[str, Any] = {
            f"text.{key}": getattr(spec, key) for key in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                "num_experts", "num_experts_per_tok", "moe_intermediate_size")}
        eos = self.text.value(Keys.Tokenizer.EOS_ID)
        eos_list = list(self.text.value(Keys.Tokenizer.EOS_IDS, []) or [])
        if eos is not None:
            facts["special.eos"] = [int(eos)] + [int(i) for i in eos_list if int(i) != int(eos)]
        for kind, key in (("bos", Keys.Tokenizer.BOS_ID), ("pad", Keys.Tokenizer.PAD_ID)):
            value = self.text.value(key)
            if value is not None:
                facts[f"special.{kind}_id"] = int(value)
        if self.projector is not None:
            facts["placeholder.id"] = self.placeholder_id
            facts["placeholder.token"] = self.projector.value(Keys.Projector.PLACEHOLDER_TOKEN)
            facts["modalities"] = list(self.projector_specs)
            for name, pspec in self.projector_specs.items():
                for key, value in projector_facts(pspec).items():
                    facts[f"projector.{name}.{key}"] = value
        return facts

    # -- tensors -------------------------------------------------------------------------

    @cached_property
    def canonical_names(self) -> dict[str, str]:
        """GGUF text tensor name -> canonical name, through gguf-py's Qwen3 name map."""
        import gguf

        arch = gguf.MODEL_ARCH.QWEN3MOE if self.arch == TEXT_MOE_ARCH else gguf.MODEL_ARCH.QWEN3
        tmap = gguf.get_tensor_name_map(arch, self.model.text.num_hidden_layers)
        names = list(self.model.tensors.names()) + ["lm_head.weight"]
        out = {}
        for canonical in names:
            if canonical.startswith("mm."):
                continue
            name = tmap.get_name(canonical, try_suffixes=(".weight", ".bias"))
            if name and name not in self.text.tensors and name + ".weight" in self.text.tensors:
                name += ".weight"  # stacked experts have no suffix in canonical names
            if name:
                out[name] = canonical
        return out

    def _undo_rope(self, canonical: str, array: np.ndarray) -> np.ndarray:
        """llama.cpp runs Qwen3 with rotate-half rope: a source trained with interleaved pairs
        was permuted per head (Q/K rows, biases and per-head norms); undo it for comparison."""
        return undo_neox_fixup(self.model.text, canonical, array)

    def tensors(self) -> list[BundleTensor]:
        out = []
        for name in self.text.tensors:
            canonical = self.canonical_names.get(name, "")

            def load(name=name, canonical=canonical) -> np.ndarray:
                return self._undo_rope(canonical, self.text.array(name))

            out.append(BundleTensor(canonical, name, self.text.type_name(name), load,
                                    self.text.numel(name)))
        if self.projector is not None:
            projector = []
            for name in self.projector.tensors:
                # projector tensors keep their canonical-style names; a tensor the file stores
                # computed (a gate applied, a fold) is what its own layer list calls it
                def load_p(name=name) -> np.ndarray:
                    return self.projector.array(name)

                projector.append(BundleTensor(name, name, self.projector.type_name(name),
                                              load_p, self.projector.numel(name)))
            out += with_derivations(projector, self.projector_specs)
        return out

    # -- vocabulary ------------------------------------------------------------------------

    def vocab_check(self) -> tuple[str, bool | None, str]:
        """Token strings, types and merges against tokenizer.json (no llama.cpp needed)."""
        import json

        tok = json.loads((self.model.tokenizer.directory / "tokenizer.json").read_text("utf-8"))
        vocab = dict((tok.get("model") or {}).get("vocab") or {})
        for t in tok.get("added_tokens") or []:
            vocab[t["content"]] = int(t["id"])
        by_id = {i: s for s, i in vocab.items()}
        tokens = list(self.text.value(Keys.Tokenizer.LIST, []) or [])
        problems = []
        if len(tokens) != self.text_spec.vocab_size:
            problems.append(f"{len(tokens)} tokens for {self.text_spec.vocab_size} embedding rows")
        wrong = [i for i, s in by_id.items() if i >= len(tokens) or tokens[i] != s]
        if wrong:
            i = wrong[0]
            got = tokens[i] if i < len(tokens) else None
            shifted = sum(1 for j in wrong if j + 1 < len(tokens) and tokens[j + 1] == by_id[j])
            hint = " (the token list is shifted by one)" if shifted > len(wrong) // 2 else ""
            problems.append(f"{len(wrong)} token strings differ from tokenizer.json, first id {i}: "
                            f"{got!r} instead of {by_id[i]!r}{hint}")
        merges = (tok.get("model") or {}).get("merges") or []
        merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
        gguf_merges = list(self.text.value(Keys.Tokenizer.MERGES, []) or [])
        if merges != gguf_merges:
            problems.append(f"merges differ ({len(gguf_merges)} in the GGUF, {len(merges)} in "
                            "tokenizer.json)")
        if problems:
            return ("vocabulary", False, "; ".join(problems))
        return ("vocabulary", True, f"{len(by_id)} tokens and {len(merges)} merges as in "
                f"tokenizer.json")


def _projector_spec(m: ModalitySpec) -> ProjectorSpec:
    """The canonical model's description of a projector, from the file's layers."""
    layers = [ProjectorLayer(
        x.kind, x.name, x.in_dim, x.out_dim,
        activation=(x.activation or None) if x.kind in PROJECTOR_ACTIVATED_KINDS else None,
        eps=x.eps if x.kind == "layer_norm" else None, bias=x.has_bias,
        gate="tanh" if x.gate else "", complementary=x.gate == "1-tanh",
        folded_from=x.folded_from, per_channel=x.per_channel) for x in m.layers]
    act = next((x.activation for x in layers if x.kind in PROJECTOR_ACTIVATED_KINDS), "") or ""
    return ProjectorSpec(modality=m.name, input_dim=m.input_dim, hidden_dim=m.hidden_dim,
                         output_dim=m.output_dim, activation=act,
                         layer_norm=any(x.kind == "layer_norm" for x in layers), layers=layers)
