"""Special token ids merged from every file that names them.

eos (and bos, pad) is the ordered, de-duplicated union of ``config.json``'s value (int or
list), ``generation_config.json``'s and the tokenizer's own token; the tokenizer's id comes
first because that is what the tokenizer emits and what chat templates end turns with.
"""

from __future__ import annotations

from typing import Any

from mmconvert.convert.model import SpecialIds


def as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


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
    for kind in ("bos", "eos", "pad"):
        key = f"{kind}_token_id"
        found: list[list[int]] = []
        provenance: list[tuple[str, Any]] = []
        sources = list(configs) + ([generation_config] if generation_config else [])
        for file, cfg in sources:
            ids = as_id_list(cfg.get(key))
            if ids:
                found.append(ids)
                provenance.append((file, cfg.get(key)))
        tok = tokenizer_ids.get(kind)
        if tok is not None:
            provenance.append((tokenizer_file, tok))
        setattr(special, kind, merge_ids(tok, *found))
        special.provenance[kind] = provenance
    return special
