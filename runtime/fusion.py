"""Early fusion, as the seed defines it, shared by the reference and the runners.

Each modality maps to a list of items; an item is a float tensor ``[n, input_dim]`` (or
``[input_dim]`` for one row). Projected rows are taken in order (modalities in the model's
dict order, items in list order) and replace the placeholder tokens of the prompt one row per
placeholder; when the prompt has no placeholder, all rows are prepended before the text.
"""

from __future__ import annotations

from collections.abc import Sequence


def as_rows(item):
    """An item as a 2-D ``[n, input_dim]`` tensor."""
    return item.unsqueeze(0) if item.dim() == 1 else item


def fusion_positions(input_ids: Sequence[int], placeholder_id: int | None, n_rows: int
                     ) -> tuple[list[int], list[int | None]]:
    """(token ids of the fused sequence, per position: index of the projected row or None).

    Raises ``ValueError`` when the prompt has placeholders but not one per projected row.
    """
    ids = list(input_ids)
    count = sum(1 for t in ids if placeholder_id is not None and t == placeholder_id)
    if n_rows == 0:
        return ids, [None] * len(ids)
    if count == 0:
        # prepended rows carry the placeholder id as their nominal token
        nominal = placeholder_id if placeholder_id is not None else 0
        return [nominal] * n_rows + ids, list(range(n_rows)) + [None] * len(ids)
    if count != n_rows:
        raise ValueError(f"the prompt has {count} placeholder tokens for {n_rows} projected "
                         "rows: use one placeholder per row, or none to prepend")
    rows: list[int | None] = []
    k = 0
    for t in ids:
        if t == placeholder_id:
            rows.append(k)
            k += 1
        else:
            rows.append(None)
    return ids, rows
