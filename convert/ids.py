"""Special token ids merged from every file that names them, and checked once for all writers.

eos (and bos, pad) is the ordered, de-duplicated union of ``config.json``'s value (int or
list), ``generation_config.json``'s and the tokenizer's own token; the tokenizer's id comes
first because that is what the tokenizer emits and what chat templates end turns with.

Each ``*_token_id`` value must be a JSON integer, a list of them, or ``null`` (= not set, what
Hugging Face writes for an unset pad). Anything else (``"7"``, ``7.0``, ``true``) is refused
rather than dropped: an id silently ignored changes where generation stops.
:func:`check_ids_in_vocabulary` is the one range check; readers call it, so to-gguf, to-hf and
to-safetensors refuse the same ids with the same line.
"""

from __future__ import annotations

from typing import Any

from mmconvert.convert.config_values import shown
from mmconvert.convert.model import SpecialIds
from mmconvert.errors import CheckpointError

KINDS = ("bos", "eos", "pad")


def as_id_list(value: Any, key: str = "token id", where: str = "") -> list[int]:
    """A ``*_token_id`` value as a list of ids; refuses what is not an integer (see above)."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise CheckpointError(f"{where}: {key} must be an integer or a list of integers, "
                                  f"got {shown(value)}")
    return list(items)


def merge_ids(primary: int | None, *others: list[int]) -> list[int]:
    """``primary`` first, then the others in order, without duplicates."""
    merged: list[int] = []
    for candidate in ([primary] if primary is not None else []) + [i for o in others for i in o]:
        if candidate not in merged:
            merged.append(candidate)
    return merged


def resolve_special_ids(configs: list[tuple[str, dict]], generation_config: tuple[str, dict] | None,
                        tokenizer_ids: dict[str, int | None], tokenizer_file: str) -> SpecialIds:
    """Merge bos/eos/pad from the configs (in order), the generation config and the tokenizer."""
    special = SpecialIds()
    for kind in KINDS:
        key = f"{kind}_token_id"
        found: list[list[int]] = []
        provenance: list[tuple[str, Any]] = []
        sources = list(configs) + ([generation_config] if generation_config else [])
        for file, cfg in sources:
            ids = as_id_list(cfg.get(key), key, file)
            if ids:
                found.append(ids)
                provenance.append((file, cfg.get(key)))
        tok = tokenizer_ids.get(kind)
        if tok is not None:
            provenance.append((tokenizer_file, tok))
        setattr(special, kind, merge_ids(tok, *found))
        special.provenance[kind] = provenance
    return special


def check_ids_in_vocabulary(special: SpecialIds, rows: int, where: str) -> None:
    """Every bos/eos/pad id names one of the embedding's ``rows`` (the one check all writers
    share); the error says which file gave the id."""
    for kind in KINDS:
        bad = [i for i in getattr(special, kind) if not 0 <= i < rows]
        if bad:
            origin = next((file for file, value in special.provenance.get(kind, [])
                           if bad[0] in (value if isinstance(value, list) else [value])), None)
            detail = f"\nset by {origin}" if origin else ""
            raise CheckpointError(f"{where}: {kind} token id {shown(bad[0])} is outside the "
                                  f"vocabulary of {rows} tokens{detail}")
