"""What ``mmconvert run`` needs before llama.cpp starts: the bundle's files, the embeddings
file, the chat template and the prompt's placeholders."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmconvert.errors import BundleError, RunInputError
from mmconvert.formats.bundle import read_manifest

# most precise first: the default text GGUF is the first of these the bundle has (F16 keeps
# more mantissa than BF16; block types by bits per weight)
PRECISION_ORDER = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
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
    return PRECISION_ORDER.index(quant) if quant in PRECISION_ORDER else len(PRECISION_ORDER)


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
