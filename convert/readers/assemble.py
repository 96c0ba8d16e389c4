"""Build a CanonicalModel from parts that every dialect shares once its names are mapped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmconvert.convert.config_values import (
    config_bool,
    config_dict,
    config_float,
    config_int,
    config_str,
    shown,
)
from mmconvert.convert.ids import check_ids_in_vocabulary
from mmconvert.convert.model import DEFAULT_MULTIMODAL_TOKEN, CanonicalModel, ProjectorSpec
from mmconvert.convert.readers.common import (
    check_lm_tensors,
    hub_cache_snapshot,
    load_json,
    load_tokenizer_spec,
    resolve_ids,
    text_spec_from_config,
)
from mmconvert.convert.readers.projectors import seed_projectors  # noqa: F401 (re-exported)
from mmconvert.convert.tensors import TensorRef, TensorTable
from mmconvert.errors import CheckpointError


def find_base_dir(mm_config: dict[str, Any], base: Path | None) -> Path | None:
    """``--base`` when given, else a local Hub-cache snapshot of ``base_model_name``."""
    if base is not None:
        if not (base / "config.json").is_file():
            raise CheckpointError(f"{base}: --base folder has no config.json")
        return base
    name = config_str(mm_config, "base_model_name", "config.json", default=None)
    if name:
        if Path(name).is_dir() and (Path(name) / "config.json").is_file():
            return Path(name)
        return hub_cache_snapshot(name)
    return None


def text_config_for(source: Path, mm_config: dict[str, Any], base_dir: Path | None
                    ) -> tuple[dict[str, Any], str]:
    """The Qwen3 config: embedded ``text_config``, else the base model's ``config.json``."""
    embedded = config_dict(mm_config, "text_config", str(source / "config.json"), default=None)
    if embedded:
        return embedded, f"{source / 'config.json'}#text_config"
    if base_dir is None:
        raise CheckpointError(
            f"{source}: no text_config, and base model "
            f"{shown(mm_config.get('base_model_name'))} is not available locally\n"
            "pass --base DIR (a Qwen3 folder with config.json and tokenizer files), or embed "
            "the Qwen3 config in config.json as text_config")
    return load_json(base_dir / "config.json", "base config"), str(base_dir / "config.json")


def assemble(*, dialect: str, source: Path, mm_config: dict[str, Any], text_config: dict[str, Any],
             text_where: str, lm: dict[str, TensorRef], projectors: dict[str, ProjectorSpec],
             projector_refs: list[TensorRef], base_dir: Path | None, weight_files: list[Path],
             rope_layout: str | None, warnings: list[str]) -> CanonicalModel:
    text = text_spec_from_config(text_config, text_where)
    where = str(source / "config.json")
    check_multimodal_config(mm_config, where)
    if "lm_head.weight" in lm and text.tie_word_embeddings:
        warnings.append("config says tie_word_embeddings but lm_head.weight is present: kept untied")
    if "lm_head.weight" not in lm and text_config.get("tie_word_embeddings") is False:
        raise CheckpointError(
            f"{text_where}: tie_word_embeddings is false but the weights have no lm_head.weight\n"
            "if the output head shares the embedding, set tie_word_embeddings: true in the "
            "config; otherwise save the checkpoint again with its lm_head.weight")
    if "lm_head.weight" not in lm and not text.tie_word_embeddings:
        warnings.append("lm_head.weight absent: embeddings treated as tied")
    emb = lm.get("model.embed_tokens.weight")
    if emb is not None:
        text.vocab_size = int(emb.shape[0])
    check_lm_tensors(text, lm, str(source))
    text.tie_word_embeddings = "lm_head.weight" not in lm
    if rope_layout:
        text.rope_layout = rope_layout
    else:
        text.rope_layout = config_str(mm_config, "rope_layout", where, default=None) or \
            config_str(text_config, "rope_layout", text_where, default=None) or text.rope_layout
    if text.rope_layout not in ("neox", "interleaved"):
        raise CheckpointError(f"{source}: rope_layout {shown(text.rope_layout)} is not neox or "
                              "interleaved")

    files_from: dict[str, str] = {"config": str(source / "config.json"), "text_config": text_where}
    tok_dir = source if (source / "tokenizer.json").is_file() else base_dir
    if tok_dir is None:
        raise CheckpointError(f"{source}: missing tokenizer (tokenizer.json); save the tokenizer "
                              "beside the checkpoint or pass --base DIR")
    tokenizer, vocab = load_tokenizer_spec(tok_dir)
    files_from["tokenizer"] = str(tok_dir / "tokenizer.json")
    if text.vocab_size < tokenizer.size:
        raise CheckpointError(
            f"{source}: the embedding has {text.vocab_size} rows but the tokenizer has "
            f"{tokenizer.size} tokens; resize the embeddings (model.resize_token_embeddings) "
            "before exporting")
    if text.vocab_size > tokenizer.size:
        warnings.append(f"embedding has {text.vocab_size} rows for {tokenizer.size} tokenizer "
                        f"tokens: rows {tokenizer.size}..{text.vocab_size - 1} are padding")

    gen_path = next((d / "generation_config.json" for d in (source, base_dir)
                     if d is not None and (d / "generation_config.json").is_file()), None)
    generation = load_json(gen_path, "generation config") if gen_path else {}
    if gen_path:
        files_from["generation_config"] = str(gen_path)
        check_generation_config(generation, str(gen_path))
    configs = [(text_where, text_config), (str(source / "config.json"), mm_config)]
    special = resolve_ids(configs, (str(gen_path), generation) if gen_path else None,
                          tokenizer, vocab)
    check_ids_in_vocabulary(special, text.vocab_size, str(source))
    if not special.eos:
        warnings.append("no eos token id found in any config or the tokenizer")

    token = config_str(mm_config, "multimodal_token", where, default=None) or \
        DEFAULT_MULTIMODAL_TOKEN
    token_id = vocab.get(token)
    if token_id is None:
        raise CheckpointError(
            f"{where}: multimodal token {shown(token)} is not in the tokenizer\n"
            "no prompt could reach the projectors; add it (tokenizer.add_special_tokens("
            "{'additional_special_tokens': [token]}), then model.resize_token_embeddings) or set "
            "multimodal_token to a token the tokenizer has")

    table = TensorTable()
    for ref in list(lm.values()) + projector_refs:
        table.add(ref)
    ordered = TensorTable({n: table[n] for n in _canonical_order(table, projectors)})
    return CanonicalModel(
        dialect=dialect, source=source, text=text, projectors=projectors, tokenizer=tokenizer,
        special=special, tensors=ordered, multimodal_token=token, multimodal_token_id=token_id,
        fusion_strategy="early",
        max_multimodal_length=mm_config.get("max_multimodal_length"),
        base_model_name=mm_config.get("base_model_name"), generation_config=generation,
        source_files=weight_files, source_files_from=files_from, mm_config=mm_config,
        warnings=warnings)


def check_multimodal_config(mm_config: dict[str, Any], where: str) -> None:
    """The multimodal config's own values (its projectors are read in
    :mod:`mmconvert.convert.readers.projectors`)."""
    config_str(mm_config, "base_model_name", where, default=None)
    config_int(mm_config, "max_multimodal_length", where, default=None)
    fusion = config_str(mm_config, "fusion_strategy", where, default="early")
    if fusion != "early":
        raise CheckpointError(f"{where}: fusion_strategy {shown(fusion)} is not supported\n"
                              "mmconvert converts early fusion (projected rows replace the "
                              "placeholder tokens)")


# generation_config.json values the bundles carry (GGUF sampling keys, HF generation config)
_SAMPLING_FLOATS = {"temperature": dict(minimum=0.0), "top_p": dict(minimum=0.0, below=1.0001),
                    "min_p": dict(minimum=0.0, below=1.0001),
                    "repetition_penalty": dict(above=0.0)}


def check_generation_config(generation: dict[str, Any], where: str) -> None:
    """Sampling defaults of the right type and range (the ids are checked in ``ids.py``)."""
    config_bool(generation, "do_sample", where, default=None)
    for key, bounds in _SAMPLING_FLOATS.items():
        config_float(generation, key, where, default=None, **bounds)
    config_int(generation, "top_k", where, default=None, minimum=0)


def _canonical_order(table: TensorTable, projectors: dict[str, ProjectorSpec]) -> list[str]:
    """LM tensors in layer order (numerically), then projectors in modality/layer order."""
    import re

    def key(name: str):
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if name == "model.embed_tokens.weight":
            return (0, 0, "")
        if m:
            return (1, int(m.group(1)), m.group(2))
        if name.startswith("mm."):
            return (3, 0, "")
        return (2, 0, name)

    lm = sorted((n for n in table if not n.startswith("mm.")), key=key)
    mm = [n for p in projectors.values() for n in p.tensor_names()]
    return lm + mm
