"""Verification of bundles against a checkpoint: the reference, every target, the verdicts.

For each target (a bundle file set through one backend) the checks run in this order, and a
failing one does not stop the others, so a report shows every symptom at once:

1. facts: what the bundle declares (hyper-parameters, eos ids, placeholder id, projector
   layers) against the checkpoint;
2. tensors: every bundle tensor, read back in the canonical layout, against its source tensor
   (:mod:`mmconvert.verify.tensorcheck`); mismatches get a diagnosis
   (:mod:`mmconvert.verify.diagnose`);
3. logits: each case through the backend, metrics against the reference, thresholds for the
   target's output type;
4. backend extras (tokenizer parity, tokenizer files).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmconvert.convert.model import CanonicalModel
from mmconvert.errors import MMConvertError
from mmconvert.formats.dtypes import FLOAT_DTYPES, to_float32
from mmconvert.verify.backends import BundleTensor, Target, discover, open_runner
from mmconvert.verify.cases import Case
from mmconvert.verify.diagnose import explain, rank
from mmconvert.verify.facts import compare_facts, source_facts
from mmconvert.verify.metrics import Metrics, aggregate, compare_logits
from mmconvert.verify.tensorcheck import TensorDiff, compare_tensor
from mmconvert.verify.thresholds import Override, check, thresholds_for

Log = Callable[[str], None]


@dataclass
class ReferenceLogits:
    """The reference side: resolved cases (continuations filled) and their logits."""

    cases: list[Case]
    logits: Callable[[str], torch.Tensor]  # case name -> [T, V] float32
    source: str  # "forward" or the reference file
    device: str
    dtype: str
    seconds: float = 0.0
    environment: dict[str, Any] = field(default_factory=dict)


@dataclass
class CaseResult:
    name: str
    positions: int
    metrics: dict[str, float] | None = None
    error: str | None = None
    raw: Metrics | None = field(default=None, repr=False)  # sums, for the overall figures


@dataclass
class TargetResult:
    target: Target
    status: str = "pass"  # pass | fail | skip
    reason: str = ""  # skip reason, or the first cause of a failure
    facts: list[str] = field(default_factory=list)
    tensors_checked: int = 0
    tensor_diffs: list[TensorDiff] = field(default_factory=list)  # failing ones, worst first
    checks: list[tuple[str, bool | None, str]] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)
    overall: dict[str, float] | None = None
    limits: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # threshold messages
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def causes(self) -> list[str]:
        """Why it failed, most specific first."""
        out = list(self.errors)
        out += [f"fact: {m}" for m in self.facts]
        out += [f"tensor: {d.describe()}" for d in self.tensor_diffs]
        out += [f"{name}: {msg}" for name, ok, msg in self.checks if ok is False]
        out += [f"case {c.name}: {c.error}" for c in self.cases if c.error]
        if self.failures:
            out.append("logits: " + "; ".join(self.failures))
        return out


@dataclass
class VerifyResult:
    checkpoint: str
    content_hash: str
    reference: ReferenceLogits
    targets: list[TargetResult]

    @property
    def passed(self) -> bool:
        return all(t.status != "fail" for t in self.targets)


# -------------------------------------------------------------------------------------------
# reference


def run_reference(model: CanonicalModel, cases: list[Case], device: str, dtype: torch.dtype,
                  log: Log) -> ReferenceLogits:
    """Greedy continuations and logits of every case from the source checkpoint."""
    from mmconvert.verify.reference import ReferenceModel

    start = time.perf_counter()
    ref = ReferenceModel.placed(model, device, dtype)
    log(f"reference: {model.source} on {ref.device}"
        f"{' (accelerate device_map)' if ref.device_map else ''}, {str(dtype).split('.')[-1]}")
    exclude = (model.multimodal_token_id,) if model.multimodal_token_id is not None else ()
    store: dict[str, torch.Tensor] = {}
    for case in cases:
        case.continuation = ref.greedy(case.input_ids, case.mm_inputs, case.generate, exclude)
        store[case.name] = ref.logits(case.full_ids, case.mm_inputs)
        log(f"reference: case {case.name}: {store[case.name].shape[0]} positions")
    seconds = time.perf_counter() - start
    del ref
    return ReferenceLogits(cases, store.__getitem__, "forward", device,
                           str(dtype).split(".")[-1], seconds, environment())


def environment() -> dict[str, Any]:
    import platform

    import transformers

    from mmconvert import __version__

    env = {"mmconvert": __version__, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cuda": torch.version.cuda,
           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
           if torch.cuda.is_available() else []}
    return env


# -------------------------------------------------------------------------------------------
# one target


def _source_reader(model: CanonicalModel) -> Callable[[str], np.ndarray | None]:
    """canonical name -> float32 source tensor (``lm_head`` of a tied model: the embedding)."""

    def read(name: str) -> np.ndarray | None:
        if name == "lm_head.weight" and model.tied:
            name = "model.embed_tokens.weight"
        ref = model.tensors.get(name)
        if ref is None:
            return None
        return to_float32(ref.read(), ref.dtype)

    return read


def _resolve_output_type(target: Target, tensors: list[BundleTensor],
                         model: CanonicalModel) -> str:
    """``auto`` (HF/safetensors): ``same`` when every tensor keeps its source dtype, else the
    float type most weights were cast to. Tensors computed from the source (folded linear
    maps) are exact weights in new arithmetic: an otherwise uncast bundle gets ``F32``'s
    limits rather than bit-for-bit ``same``."""
    if target.output_type != "auto":
        return target.output_type
    counts: dict[str, int] = {}
    same = True
    for bt in tensors:
        ref = model.tensors.get(bt.name)
        if ref is not None and ref.dtype != bt.dtype:
            same = False
        if bt.dtype in FLOAT_DTYPES:
            counts[bt.dtype] = counts.get(bt.dtype, 0) + bt.numel
    if same or not counts:
        return "F32" if any(bt.expect is not None for bt in tensors) else "same"
    return max(counts, key=lambda k: counts[k])


class _TensorChecker:
    """Wraps bundle tensors so the first load also compares them with the source."""

    def __init__(self, model: CanonicalModel, log: Log, label: str):
        self.model = model
        self.read = _source_reader(model)
        self.diffs: dict[str, TensorDiff] = {}
        self.log, self.label = log, label
        self.total = 0
        self.last = time.monotonic()

    def wrap(self, bt: BundleTensor) -> BundleTensor:
        def load() -> np.ndarray:
            array = bt.load()
            if bt.stored_as not in self.diffs:
                self.diffs[bt.stored_as] = self._compare(bt, array)
                if time.monotonic() - self.last > 10:  # big models: show it is moving
                    self.last = time.monotonic()
                    self.log(f"{self.label}: {len(self.diffs)}/{self.total} tensors read and "
                             "compared")
            return array

        return replace(bt, load=load)

    def _compare(self, bt: BundleTensor, array: np.ndarray) -> TensorDiff:
        if bt.expect is not None:  # stored computed from the source: recompute it
            source = bt.expect(self.read)
        else:
            source = self.read(bt.name) if bt.name else None
        if source is None:
            return TensorDiff(bt.name or bt.stored_as, bt.stored_as, bt.dtype, "unexpected",
                              numel=int(array.size))
        diff = compare_tensor(bt.name, bt.stored_as, bt.dtype, array, source,
                              derived=bt.expect is not None)
        diff.derivation, diff.covers = bt.derivation, bt.covers
        if diff.status == "mismatch":
            diff.hint = explain(diff, array, source, self.model, self.read)
        elif diff.status == "ok" and bt.name == "lm_head.weight" and self.model.tied:
            diff.hint = "stored although the checkpoint ties it; equal to the embedding"
        return diff

    def missing(self, tensors: list[BundleTensor]) -> list[TensorDiff]:
        present = {bt.name for bt in tensors} | {n for bt in tensors for n in bt.covers}
        return [TensorDiff(name, name, self.model.tensors[name].dtype, "missing")
                for name in self.model.tensors if name not in present]


def _compare_case(case: Case, reference: torch.Tensor, logits: torch.Tensor,
                  placeholder: int | None) -> tuple[Metrics | None, str | None]:
    if logits.shape[0] != reference.shape[0]:
        return None, (f"the bundle's fused sequence has {logits.shape[0]} positions, the "
                      f"reference {reference.shape[0]}: the bundle places the projected rows "
                      "differently (placeholder id or prepend rule)")
    if logits.shape[1] != reference.shape[1]:
        return None, (f"the bundle's vocabulary has {logits.shape[1]} entries, the reference "
                      f"{reference.shape[1]}")
    exclude = (placeholder,) if placeholder is not None else ()
    return compare_logits(reference, logits, len(case.continuation), exclude), None


def verify_target(target: Target, model: CanonicalModel, reference: ReferenceLogits,
                  device: str, dtype: torch.dtype, overrides: list[Override], log: Log
                  ) -> TargetResult:
    result = TargetResult(target)
    if target.skip:
        result.status, result.reason = "skip", target.skip
        log(f"{target.label} [{target.backend}]: skipped ({target.skip})")
        return result
    start = time.perf_counter()
    checker = _TensorChecker(model, log, f"{target.label} [{target.backend}]")
    runner = None
    try:
        runner = open_runner(target, model)
        result.facts = compare_facts(source_facts(model), runner.facts())
        bundle_tensors = [checker.wrap(bt) for bt in runner.tensors()]
        checker.total = len(bundle_tensors)
        target.output_type = _resolve_output_type(target, bundle_tensors, model)
        by_name = {bt.name: bt for bt in bundle_tensors if bt.name}
        log(f"{target.label} [{target.backend}]: loading {len(bundle_tensors)} tensors "
            f"({target.output_type})")
        try:
            runner.prepare(by_name, device, dtype)
        finally:
            for bt in bundle_tensors:  # the ones the forward did not read still get checked
                if bt.stored_as not in checker.diffs:
                    bt.load()
        diffs = list(checker.diffs.values()) + checker.missing(bundle_tensors)
        result.tensors_checked = len(diffs)
        result.tensor_diffs = rank(diffs)
        for case in reference.cases:
            log(f"{target.label} [{target.backend}]: case {case.name}")
            try:
                logits = runner.logits(case)
            except Exception as exc:  # a broken bundle may break its runtime: report, go on
                result.cases.append(CaseResult(case.name, 0, error=f"forward failed: {exc}"))
                continue
            metrics, error = _compare_case(case, reference.logits(case.name), logits,
                                           model.multimodal_token_id)
            result.cases.append(CaseResult(case.name, logits.shape[0],
                                           metrics.summary() if metrics else None, error,
                                           metrics))
        result.checks = runner.extra_checks()
    except Exception as exc:  # unreadable bundle file, missing tensor, shape the forward refuses
        if checker.diffs:
            diffs = list(checker.diffs.values())
            result.tensor_diffs = rank(diffs)
            result.tensors_checked = len(diffs)
        known = isinstance(exc, MMConvertError | RuntimeError)
        result.errors.append(str(exc) if known else f"{type(exc).__name__}: {exc}")
        log("".join(traceback.format_exception_only(type(exc), exc)).strip())
    finally:
        if runner is not None:
            runner.close()
    parts = [c.raw for c in result.cases if c.raw is not None]
    result.limits = thresholds_for(target.output_type, overrides, reference.dtype)
    if parts:
        overall = aggregate(parts)
        result.overall = overall.summary()
        result.failures = check(result.overall, result.limits)
    elif not result.errors:
        result.errors.append("no case produced logits")
    result.status = "fail" if result.causes else "pass"
    result.reason = result.causes[0] if result.causes else ""
    result.seconds = time.perf_counter() - start
    log(f"{target.label} [{target.backend}]: {result.status.upper()}"
        + (f" ({result.reason})" if result.reason else ""))
    return result


# -------------------------------------------------------------------------------------------
# everything


def discover_all(bundles: list[Path], backends: tuple[str, ...], *, trust_code: bool = False,
                 warn: Log = print) -> list[Target]:
    """Every target of every bundle; each bundle's files are checked against its manifest
    first (see :mod:`mmconvert.verify.bundle_trust`), before any of them is read."""
    return [t for bundle in bundles
            for t in discover(bundle, backends, trust_code=trust_code, warn=warn)]


def verify_bundles(model: CanonicalModel, targets: list[Target], reference: ReferenceLogits,
                   content_hash: str, device: str, dtype: torch.dtype,
                   overrides: list[Override], log: Log) -> VerifyResult:
    """Verify ``targets`` (from :func:`discover_all`) against the checkpoint's reference."""
    results = [verify_target(t, model, reference, device, dtype, overrides, log)
               for t in targets]
    return VerifyResult(str(model.source), content_hash, reference, results)
