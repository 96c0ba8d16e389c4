"""Pickled torch checkpoints (``pytorch_model.bin``), loaded with ``weights_only=True`` only.

``weights_only`` refuses anything but tensors and plain containers, so no code from the file
runs. Zip-format files are memory-mapped (``mmap=True``): tensors are paged in when read.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from mmconvert.convert.errors import CheckpointError


def load_state_dict(path: Path) -> dict:
    """The state dict in ``path`` as CPU tensors; never executes pickled code."""
    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # legacy (non-zip) format cannot be memory-mapped; still weights_only
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
        raise CheckpointError(
            f"{path}: refused to unpickle: it holds more than tensors ({first}). mmconvert "
            "loads pickles with weights_only=True only; re-save it as a plain state_dict"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors
