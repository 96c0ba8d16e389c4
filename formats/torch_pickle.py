"""Pickled torch checkpoints (``pytorch_model.bin``), loaded with ``weights_only=True`` only.

``weights_only`` refuses anything but tensors and plain containers, so no code from the file
runs; the refusal says how to re-save such a file safely (never "turn the check off"). Zip-format files are memory-mapped (``mmap=True``): tensors are paged in when read.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

from mmconvert.errors import CheckpointError, import_extra


def load_state_dict(path: Path) -> dict:
    """The state dict in ``path`` as CPU tensors; never executes pickled code."""
    torch = import_extra("torch", extra="hf", job=f"reading {path.name} (a pickled checkpoint)")

    try:
        with warnings.catch_warnings():
            # torch's note that its safe unpickler may not know protocol 4+ would be printed
            # before our own line; an unsupported instruction is refused below anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol",
                                    category=UserWarning)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # legacy (non-zip) format cannot be memory-mapped; still weights_only
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_refusal(path, str(exc))) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        reason = reason if len(reason) <= 100 else reason[:99] + "…"
        raise CheckpointError(f"{path.name}: not a readable torch checkpoint ({reason})\n"
                              f"file: {path}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    return tensors


def _cause(torch_message: str) -> str:
    """Why torch's safe unpickler stopped, in a few words, out of its long message."""
    if found := re.search(r"GLOBAL ([\w.]+)", torch_message):
        return f"it would run code ({found.group(1)})"
    if found := re.search(r"Unsupported operand (\d+)", torch_message):
        # e.g. 149 (FRAME): written with pickle protocol 4+, which the safe loader cannot read
        return (f"it uses pickle instruction {found.group(1)}, which loading without "
                "running code does not support")
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in torch_message.splitlines() if line.strip()]
    detail = next((line for line in lines if not line.startswith(boilerplate)),
                  "unsupported content")
    return f"it holds more than tensors ({detail[:80]})"


def _refusal(path: Path, torch_message: str) -> str:
    """Cause first (one short line), then the safe way to convert; never torch's advice to
    load with the check turned off."""
    return (f"refused to unpickle {path.name}: {_cause(torch_message)}\n"
            f"file: {path}\n"
            "mmconvert never unpickles code (it reads pickles with weights_only=True only).\n"
            "To convert this checkpoint, load it yourself in an environment where you trust\n"
            "the file, then save only its tensors, either with\n"
            "  safetensors.torch.save_file(model.state_dict(), \"model.safetensors\")\n"
            "or with\n"
            "  torch.save(model.state_dict(), \"pytorch_model.bin\")\n"
            "and convert that.")
