"""What ``mmconvert run`` needs before llama.cpp starts: the bundle's files, the embeddings
file, the chat template, the prompt's placeholders and the context size."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmconvert.errors import BundleError, RunInputError
from mmconvert.formats.bundle import read_manifest
from mmconvert.formats.gguf_constants import precision_rank

_ITEM_NAME = re.compile(r"^(?P<modality>[A-Za-z0-9_-]+)(?:\.(?P<index>\d+))?$")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class BundleFiles:
    text: Path  # the text GGUF (first shard of a split one)
    quant: str
    projector: Path | None


def choose_files(folder: Path, text_gguf: str | None = None) -> BundleFiles:
    """The text GGUF to run (``text_gguf``: a file name or a type such as ``q8_0``; default
    the most precise) and the projector GGUF of a ``to-gguf`` bundle."""
    folder = Path(folder)
    if not folder.exists():
        raise BundleError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise BundleError(f"{folder}: is a file, not a bundle folder; run a folder written by "
                          "`mmconvert to-gguf`")
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as exc:
        raise BundleError(f"{folder}: mmconvert.json is unreadable ({exc})") from exc
    if manifest is None:
        raise BundleError(f"{folder}: no mmconvert.json; run a folder written by "
                          "`mmconvert to-gguf`")
    if manifest.get("kind") != "gguf":
        raise BundleError(f"{folder}: mmconvert.json says kind {manifest.get('kind')!r}; "
                          "`mmconvert run` runs GGUF bundles (`mmconvert to-gguf`)")
    entries = [e for e in manifest.get("files") or [] if isinstance(e, dict) and e.get("path")]
    texts = [e for e in entries if e.get("role") == "text" and (e.get("split") or [1])[0] == 1]
    projectors = [e for e in entries if e.get("role") == "projector"]
    if not texts:
        raise BundleError(f"{folder}: mmconvert.json lists no text GGUF")
    names = tuple(e["path"] for e in texts)
    if text_gguf is None:
        chosen = min(texts, key=lambda e: _rank(e.get("quant", "")))
    else:
        matches = [e for e in texts if text_gguf in (e["path"], Path(e["path"]).stem)
                   or text_gguf.upper() == str(e.get("quant", "")).upper()]
        if not matches:
            raise RunInputError(f"--text-gguf {text_gguf}: the bundle has "
                                f"{', '.join(names)} (give a file name or its type)")
        chosen = matches[0]
    text = folder / chosen["path"]
    projector = folder / projectors[0]["path"] if projectors else None
    for path in (text, projector):
        if path is not None and not path.is_file():
            raise BundleError(f"{folder}: {path.name} is listed in mmconvert.json but missing")
    return BundleFiles(text, str(chosen.get("quant", "")), projector)


def _rank(quant: str) -> int:
    """Most precise first (:data:`PRECISION_ORDER`; a K-quant mixture by its base type): the
    default text GGUF is the first."""
    return precision_rank(quant)


def load_embeddings(path: Path) -> dict[str, list[np.ndarray]]:
    """Items per modality from a safetensors file: a tensor ``<modality>`` is one item, tensors
    ``<modality>.<k>`` are items in ``k`` order; each ``[n, input_dim]`` or ``[input_dim]``
    of F32/F16/BF16/F64 (computed in float32)."""
    from mmconvert.formats.dtypes import to_float32
    from mmconvert.formats.safetensors_io import read_entry, read_safetensors_header

    path = Path(path)
    if not path.is_file():
        raise RunInputError(f"--embeddings {path}: no such file")
    entries, _ = read_safetensors_header(path)
    if not entries:
        raise RunInputError(f"--embeddings {path}: the file holds no tensors")
    indexed: dict[str, dict[int | None, np.ndarray]] = {}
    for name, entry in entries.items():
        m = _ITEM_NAME.match(name)
        if not m:
            raise RunInputError(f"--embeddings {path}: tensor {name!r} is not named <modality> "
                                "or <modality>.<k>")
        if entry.dtype not in FLOAT_DTYPES:
            raise RunInputError(f"--embeddings {path}: tensor {name!r} is {entry.dtype}; use "
                                f"one of {', '.join(FLOAT_DTYPES)}")
        if len(entry.shape) not in (1, 2):
            raise RunInputError(f"--embeddings {path}: tensor {name!r} has shape "
                                f"{list(entry.shape)}; an item is [n, input_dim] or [input_dim]")
        modality, index = m.group("modality"), m.group("index")
        items = indexed.setdefault(modality, {})
        if (None in items) or (index is None and items):
            raise RunInputError(f"--embeddings {path}: modality {modality!r} has both a tensor "
                                f"{modality!r} and numbered items {modality}.<k>; use one form")
        items[None if index is None else int(index)] = to_float32(read_entry(entry), entry.dtype)
    return {m: [items[k] for k in sorted(items, key=lambda k: -1 if k is None else k)]
            for m, items in indexed.items()}


def expand_placeholders(text: str, token: str, rows_per_item: Sequence[int]) -> str:
    """Let a prompt name each item once: with one ``token`` per item, each is repeated to the
    item's row count. A prompt holding one token per row, or none (prepend), is kept as it is
    (the same rule as the HF bundle's ``tokenize_prompt``)."""
    count = text.count(token)
    total = sum(rows_per_item)
    if not rows_per_item or count in (0, total):
        return text
    if count != len(rows_per_item):
        raise RunInputError(f"the prompt has {count} {token} placeholders for "
                            f"{len(rows_per_item)} items ({total} rows): use one per item, one "
                            "per row, or none to prepend the rows")
    parts = text.split(token)
    return parts[0] + "".join(token * n + part for n, part in zip(rows_per_item, parts[1:]))


def render_chat(template: str | None, prompt: str, system: str | None = None,
                special: Mapping[str, str] | None = None,
                source: str = "the text GGUF's tokenizer.chat_template") -> str:
    """The chat template (bounded and sandboxed: formats/chat_template.py) applied to one user
    turn (after a system turn when given), with the assistant's turn opened."""
    if not template:
        raise RunInputError("--chat: the text GGUF has no tokenizer.chat_template")
    from mmconvert.errors import ChatTemplateError
    from mmconvert.formats.chat_template import render

    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]
    try:
        return render(template, source, messages=messages, add_generation_prompt=True,
                      **(special or {}))
    except ChatTemplateError as exc:
        raise RunInputError(f"--chat: the chat template failed: {exc.cause}\nin {source}") \
            from exc


def build_prompt(model, projector, prompt: str, chat: bool, system: str | None,
                 rows_per_item: Sequence[int], projected: np.ndarray | None,
                 warn: Callable[[str], None]):
    """(text as it runs, its token ids, the runs llama.cpp decodes) for ``model`` (a
    :class:`~mmconvert.runtime.llama_runtime.TextModel`) and ``projector`` (a
    :class:`~mmconvert.runtime.mmproj.ProjectorGGUF` or ``None``): the chat template applied
    when ``chat``, placeholders expanded per item, ``projected`` rows fused in."""
    from mmconvert.formats.gguf_constants import Keys
    from mmconvert.runtime.llama_runtime import fused_runs

    placeholder = placeholder_id(projector, model)
    text = prompt
    if chat:
        meta = model.metadata
        # templates may use bos_token / eos_token, as transformers passes them
        special = {f"{kind}_token": model.token_text(meta[key]) for kind, key in
                   (("bos", Keys.Tokenizer.BOS_ID), ("eos", Keys.Tokenizer.EOS_ID)) if key in meta}
        text = render_chat(meta.get(Keys.Tokenizer.CHAT_TEMPLATE), prompt, system, special)
    if placeholder is not None:
        text = expand_placeholders(text, projector.placeholder_token, rows_per_item)
    ids = model.tokenize(text)
    if projected is None:
        projected = np.zeros((0, model.n_embd), dtype=np.float32)
        if placeholder is not None and placeholder in ids:
            warn(f"the prompt has {ids.count(placeholder)} {projector.placeholder_token} but "
                 "no --embeddings; they run as ordinary tokens")
    try:
        return text, ids, fused_runs(ids, placeholder, projected)
    except ValueError as exc:
        raise RunInputError(str(exc)) from exc


def placeholder_id(projector, model) -> int | None:
    """The placeholder id, checked against the text GGUF (and the projector's width too)."""
    if projector is None:
        return None
    if projector.embedding_length != model.n_embd:
        raise BundleError(f"{projector.path.name} projects to {projector.embedding_length} "
                          f"values per row, {model.path.name} takes {model.n_embd}")
    if projector.placeholder_id is None:
        return None
    ids = model.tokenize(projector.placeholder_token)
    if ids != [projector.placeholder_id]:
        raise BundleError(f"{projector.path.name}: placeholder {projector.placeholder_token} is "
                          f"id {projector.placeholder_id}, but {model.path.name} tokenizes it "
                          f"as {ids}; the two files are not from the same conversion")
    return projector.placeholder_id


def context_size(n_ctx: int | None, positions: int, max_tokens: int, n_ctx_train: int) -> int:
    """``n_ctx`` checked to hold the prompt with room to generate; by default the prompt plus
    ``max_tokens``, within the model's trained context."""
    if n_ctx is None:
        limit = n_ctx_train if n_ctx_train > 0 else positions + max_tokens + 1
        n_ctx = min(positions + max(max_tokens, 1), limit)
        where = f"the model's context length {limit}"
    else:
        where = f"--n-ctx {n_ctx}"
    if positions >= n_ctx:
        raise RunInputError(f"the prompt takes {positions} positions: it does not fit {where} "
                            "with room to generate")
    return n_ctx
