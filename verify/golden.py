"""Golden references: the reference side of a verification, saved to one safetensors file.

``--save-reference REF`` stores, for every case, its inputs (token ids with the greedy
continuation, embedding items) and the reference's full logits; plus the checkpoint's content
hash, the reference's device and dtype, and the environment. ``--reference REF`` then checks
bundles without running the source model: a GPU box makes the reference once, CPU-only CI
checks every later bundle against it.

Logits are stored in **float32**: the F32 threshold (max |Δlogit| ≤ 1e-3) and the same-dtype
one (≤ 1e-5) are below float16's rounding of typical logits (~1e-2 at |x| ≈ 20), so fp16 would
change verdicts; fp32 keeps ``--reference`` verdicts identical to a full run. The cost is
4 bytes × vocabulary per position (~600 KB per position for Qwen3's 151 936 entries).

The content hash is the sha256 of the sorted ``"<file name> <sha256>"`` lines of the source
files (weights, config, tokenizer, generation config: the files a bundle manifest lists as
sources), so it does not depend on where the checkpoint lies. A reference made from another
checkpoint is refused.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from mmconvert.convert.model import CanonicalModel
from mmconvert.errors import ReferenceFileError
from mmconvert.formats.bundle import follow_umask
from mmconvert.formats.hashing import sha256_files
from mmconvert.verify.cases import CASES_KEY, CASES_VERSION, cases_from_entries, cases_to_file_parts
from mmconvert.verify.harness import ReferenceLogits

REFERENCE_KEY = "mmconvert.reference"
REFERENCE_VERSION = 1


def source_files(model: CanonicalModel) -> list[Path]:
    """The files that define the checkpoint: what bundle manifests list as sources."""
    files = [Path(p) for p in model.source_files]
    files += [Path(p) for role, p in model.source_files_from.items()
              if role in ("config", "tokenizer", "generation_config") and Path(p).is_file()]
    unique: list[Path] = []
    for p in files:
        if p not in unique:
            unique.append(p)
    return unique


def checkpoint_hash(model: CanonicalModel) -> tuple[str, list[dict[str, Any]]]:
    """(content hash, [{name, sha256, bytes}]) of the checkpoint's source files."""
    files = source_files(model)
    hashes = sha256_files(files)
    listed = sorted(({"name": p.name, "sha256": hashes[str(p)], "bytes": p.stat().st_size}
                     for p in files), key=lambda f: (f["name"], f["sha256"]))
    digest = hashlib.sha256("".join(f"{f['name']} {f['sha256']}\n" for f in listed).encode())
    return digest.hexdigest(), listed


def save_reference(path: Path, reference: ReferenceLogits, content_hash: str,
                   files: list[dict[str, Any]]) -> None:
    """Write ``reference`` (cases with continuations, float32 logits) to ``path``."""
    from safetensors.torch import save_file

    tensors, entries = cases_to_file_parts(reference.cases)
    for index, case in enumerate(reference.cases):
        tensors[f"logits.{index}"] = reference.logits(case.name).float().contiguous()
    doc = {
        "version": REFERENCE_VERSION,
        "checkpoint": {"content_hash": content_hash, "files": files},
        "reference": {"device": reference.device, "dtype": reference.dtype,
                      "seconds": round(reference.seconds, 3), "logits_dtype": "float32"},
        "environment": reference.environment,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    metadata = {REFERENCE_KEY: json.dumps(doc),
                CASES_KEY: json.dumps({"version": CASES_VERSION, "cases": entries})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=metadata)
    follow_umask(tmp)  # the safetensors library writes 0600
    tmp.replace(path)


def load_reference(path: Path, model: CanonicalModel, content_hash: str,
                   files: list[dict[str, Any]]) -> ReferenceLogits:
    """The reference stored in ``path``; refused when made from another checkpoint."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ReferenceFileError(f"{path}: reference file not found")
    try:
        handle = safe_open(str(path), "pt")
        metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise ReferenceFileError(f"{path}: not a reference file ({exc})") from exc
    if REFERENCE_KEY not in metadata or CASES_KEY not in metadata:
        raise ReferenceFileError(f"{path}: not an mmconvert reference (no {REFERENCE_KEY} "
                                 "metadata); make one with verify --save-reference")
    doc = json.loads(metadata[REFERENCE_KEY])
    if doc.get("version") != REFERENCE_VERSION:
        raise ReferenceFileError(f"{path}: reference format version {doc.get('version')}, "
                                 f"this mmconvert reads version {REFERENCE_VERSION}")
    stored = doc["checkpoint"]["content_hash"]
    if stored != content_hash:
        theirs = {(f["name"], f["sha256"]) for f in doc["checkpoint"].get("files", [])}
        ours = {(f["name"], f["sha256"]) for f in files}
        differ = sorted({name for name, _ in theirs ^ ours})
        raise ReferenceFileError(
            f"{path}: made from a different checkpoint (content hash {stored[:12]}…, this "
            f"checkpoint {content_hash[:12]}…; files that differ: "
            f"{', '.join(differ) or 'none listed'}); make a new reference from this checkpoint")
    entries = json.loads(metadata[CASES_KEY])["cases"]
    keys = set(handle.keys())
    tensors = {k: handle.get_tensor(k) for k in keys if k.startswith("input.")}
    cases = cases_from_entries(entries, tensors, model, str(path))
    names = {case.name: index for index, case in enumerate(cases)}
    for index in names.values():
        if f"logits.{index}" not in keys:
            raise ReferenceFileError(f"{path}: logits of case {index} missing")

    def logits(name: str) -> torch.Tensor:
        return handle.get_tensor(f"logits.{names[name]}").float()

    info = doc.get("reference", {})
    return ReferenceLogits(cases, logits, str(path), info.get("device", "?"),
                           info.get("dtype", "float32"), float(info.get("seconds", 0.0)),
                           doc.get("environment", {}))
