"""Backends: one way of running a bundle kind, registered by the kinds they handle.

A bundle folder (its ``mmconvert.json`` says ``kind``: hf | safetensors | gguf) expands into
:class:`Target` s, one per thing to run (a GGUF bundle with F16 and Q8_0 text files gives two
per GGUF backend). A backend's :class:`Runner` exposes what verification needs and nothing
else: the facts the bundle declares, its tensors read back in the canonical layout, and logits
for a case. Everything else (metrics, thresholds, diagnosis, reports) is shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmconvert.convert.model import CanonicalModel
from mmconvert.errors import BundleError
from mmconvert.formats.bundle import read_manifest
from mmconvert.verify.bundle_trust import check_bundle
from mmconvert.verify.cases import Case


def manifest_name_map(folder: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Bundle tensor name -> canonical name, as the writer recorded it in ``mmconvert.json``."""
    names = dict(manifest.get("tensors") or {})
    if not names:
        raise BundleError(f"{folder}: mmconvert.json has no 'tensors' name map")
    return names


@dataclass
class Target:
    """One bundle file set run through one backend."""

    bundle: Path
    kind: str  # hf | safetensors | gguf
    backend: str  # safetensors | hf | gguf_torch | gguf_llama
    label: str  # what reports call it
    output_type: str  # same | F32 | F16 | BF16 | Q8_0 | ... (selects thresholds)
    files: list[Path] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    skip: str | None = None  # why it cannot run here (reported as skipped)


@dataclass
class BundleTensor:
    """A bundle tensor, loadable as float32 in the canonical layout (plan transforms undone).

    A tensor the bundle stores computed from canonical ones (a tanh gate applied, linear maps
    folded) has no canonical counterpart: ``name`` is then what the bundle's own projector
    description calls it (what its forward pass reads), ``covers`` the canonical tensors it
    stands for, and ``expect(read)`` recomputes the value it should hold from the source
    (``read``: canonical name -> float32 array or None), ``derivation`` naming the step.
    """

    name: str  # canonical name
    stored_as: str  # the bundle's name
    dtype: str  # storage type in the bundle (BF16, F16, Q8_0, ...)
    load: Callable[[], np.ndarray]
    numel: int = 0
    covers: tuple[str, ...] = ()
    expect: Callable[[Callable[[str], np.ndarray | None]], np.ndarray | None] | None = None
    derivation: str = ""


class Runner:
    """What a backend provides for one target. Subclasses fill in the four methods."""

    # auto | never | disk: what may stay on disk when the model does not fit in RAM
    # (mmconvert.verify.reference.plan_placement); set by the harness before prepare()
    offload: str = "auto"

    def __init__(self, target: Target, model: CanonicalModel):
        self.target = target
        self.model = model

    def facts(self) -> dict[str, Any]:
        """Facts the bundle declares, keyed as :func:`mmconvert.verify.facts.source_facts`."""
        raise NotImplementedError

    def tensors(self) -> list[BundleTensor]:
        """Every tensor of the bundle (canonical name ``""`` when it maps to none)."""
        raise NotImplementedError

    def prepare(self, tensors: dict[str, BundleTensor], device: str, dtype: torch.dtype) -> None:
        """Build the forward pass (torch-based runners load ``tensors`` through it)."""
        raise NotImplementedError

    def logits(self, case: Case) -> torch.Tensor:
        """``[fused length, vocab]`` float32 logits for ``case.full_ids`` and its embeddings."""
        raise NotImplementedError

    def extra_checks(self) -> list[tuple[str, bool | None, str]]:
        """Further (name, passed or None when skipped, message) checks, e.g. tokenizer parity."""
        return []

    def holder(self) -> object | None:
        """The object that owns the loaded model (after :meth:`prepare`): verify watches it
        being freed before the next model loads (:mod:`mmconvert.verify.stages`)."""
        return None

    def placement_note(self) -> str:
        """How the model was placed, when not plainly on one device (offload, spread)."""
        return ""

    def close(self) -> None:
        """Drop the model: after this, nothing of the runner keeps its memory alive."""


BackendFactory = Callable[[Target, CanonicalModel], Runner]
# bundle kind -> [(backend name, targets(bundle, manifest) -> list[Target], runner factory)]
REGISTRY: dict[str, list[tuple[str, Callable[[Path, dict], list[Target]], BackendFactory]]] = {}


def register(kind: str, name: str, targets: Callable[[Path, dict], list[Target]],
             factory: BackendFactory) -> None:
    REGISTRY.setdefault(kind, []).append((name, targets, factory))


def _load_builtin() -> None:
    from mmconvert.verify.backends import gguf_llama, gguf_torch, hf, safetensors  # noqa: F401


def backend_names() -> list[str]:
    if not REGISTRY:
        _load_builtin()
    return [name for entries in REGISTRY.values() for name, _, _ in entries]


def discover(bundle: Path, backends: tuple[str, ...] = (), *, trust_code: bool = False,
             warn: Callable[[str], None] = print) -> list[Target]:
    """The targets of a bundle folder, for the chosen backends (all of its kind by default).

    Nothing of the bundle is read before :func:`mmconvert.verify.bundle_trust.check_bundle`
    accepted it: its files match ``mmconvert.json`` and, for an HF bundle, its code is
    mmconvert's own (``trust_code``: import it anyway, with a warning through ``warn``).
    """
    if not REGISTRY:
        _load_builtin()
    bundle = Path(bundle)
    if bundle.exists() and not bundle.is_dir():
        raise BundleError(f"{bundle}: is a file, not a bundle folder (verify checks folders "
                          "written by mmconvert to-hf, to-safetensors or to-gguf)")
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle folder")
    try:
        manifest = read_manifest(bundle)
    except (OSError, ValueError) as exc:  # not a JSON object, or nested too deep to decode
        raise BundleError(f"{bundle}/mmconvert.json is not valid JSON ({exc})") from None
    if manifest is None:
        raise BundleError(f"{bundle}: no mmconvert.json; verify checks bundles written by "
                          "mmconvert to-hf, to-safetensors or to-gguf")
    kind = manifest.get("kind")
    if kind not in REGISTRY:
        raise BundleError(f"{bundle}: mmconvert.json says kind {str(kind)[:40]!r}; expected one "
                          f"of {', '.join(REGISTRY)}")
    check_bundle(bundle, kind, manifest, trust_code=trust_code, warn=warn)
    targets = []
    for name, make_targets, _ in REGISTRY[kind]:
        if backends and name not in backends:
            continue
        targets += make_targets(bundle, manifest)
    return targets


def open_runner(target: Target, model: CanonicalModel) -> Runner:
    for name, _, factory in REGISTRY[target.kind]:
        if name == target.backend:
            return factory(target, model)
    raise BundleError(f"no backend {target.backend!r} for kind {target.kind!r}")
