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

A quantized GGUF target is compared with the **dequantized reference** for its verdict (the
reference forward on the bundle's own dequantized weights, :mod:`mmconvert.verify.fidelity`)
and with the source reference for its quantization loss, a failure only under a quality gate.

One model at a time (:mod:`mmconvert.verify.stages`): the reference's logits are computed and
kept, the reference freed; then each dequantized reference, then each target, each freed
before the next loads. Every stage reports its time and peak RSS.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from mmconvert.convert.model import CanonicalModel
from mmconvert.errors import MMConvertError
from mmconvert.formats import quants
from mmconvert.formats.dtypes import FLOAT_DTYPES, to_float32
from mmconvert.formats.imatrix import Imatrix
from mmconvert.verify.backends import BundleTensor, Target, discover, open_runner
from mmconvert.verify.cases import Case
from mmconvert.verify.diagnose import explain, rank
from mmconvert.verify.facts import compare_facts, source_facts
from mmconvert.verify.fidelity import (
    FIDELITY_FALLBACK,
    FIDELITY_LIMITS,
    INPUT_ROUNDING,
    NO_GATES,
    QualityGates,
    is_quantized,
    rejudged_with_rounding,
    widened_limits,
)
from mmconvert.verify.metrics import Metrics, aggregate, compare_logits
from mmconvert.verify.stages import StageStats, measure, release, track
from mmconvert.verify.tensorcheck import TensorDiff, compare_tensor
from mmconvert.verify.thresholds import Override, check, thresholds_for

Log = Callable[[str], None]


class StageProgress(Protocol):
    """Where verify shows how far a stage is (the command's bars on a terminal): one stage per
    pass over the cases, the reference's and each target's. With one, the per-case log lines
    are left out (the stage shows each case)."""

    def start(self, stage: str, total: int) -> None: ...

    def step(self, item: str) -> None: ...

    def end(self) -> None: ...


@contextmanager
def _stage(progress: StageProgress | None, stage: str, total: int
           ) -> Iterator[Callable[[str], None]]:
    """``step(case_name)`` after each case; the stage ends on leaving, also on an error."""
    if progress is None:
        yield lambda _item: None
        return
    progress.start(stage, total)
    try:
        yield progress.step
    finally:
        progress.end()


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
    stages: list[StageStats] = field(default_factory=list)  # how it was computed here


@dataclass
class CaseResult:
    name: str
    positions: int
    metrics: dict[str, float] | None = None
    error: str | None = None
    raw: Metrics | None = field(default=None, repr=False)  # sums, for the overall figures
    # the runtime's logits, kept while a verdict may be reconsidered (see verify_bundles)
    logits: torch.Tensor | None = field(default=None, repr=False)


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
    # a quantized target: logits judged against "dequantized" (the reference forward on the
    # bundle's weights); loss = its logits against the source, gated only by the user
    compared_with: str = "source"  # source | dequantized
    loss: dict[str, float] | None = None
    loss_gate: list[str] = field(default_factory=list)  # quality gates the loss missed
    # how far the runtime's input rounding alone moves this model (fidelity.widened_limits),
    # measured when the verdict needed it
    sensitivity: dict[str, float] | None = None

    def settle(self) -> None:
        """``status`` and ``reason`` from what was found."""
        causes = self.causes
        self.status = "fail" if causes or self.loss_gate else "pass"
        self.reason = causes[0] if causes else (
            "quantization loss above the quality gate: " + "; ".join(self.loss_gate)
            if self.loss_gate else "")

    @property
    def only_logits_failed(self) -> bool:
        """Failed on the logits thresholds alone (every other check passed)."""
        return bool(self.failures) and not self._causes_besides_logits()

    def _causes_besides_logits(self) -> list[str]:
        out = list(self.errors)
        out += [f"fact: {m}" for m in self.facts]
        out += [f"tensor: {d.describe()}" for d in self.tensor_diffs]
        out += [f"{name}: {msg}" for name, ok, msg in self.checks if ok is False]
        out += [f"case {c.name}: {c.error}" for c in self.cases if c.error]
        return out

    @property
    def causes(self) -> list[str]:
        """Why it failed, most specific first."""
        out = self._causes_besides_logits()
        if self.failures:
            out.append("logits: " + "; ".join(self.failures))
        return out


@dataclass
class VerifyResult:
    checkpoint: str
    content_hash: str
    reference: ReferenceLogits
    targets: list[TargetResult]
    stages: list[StageStats] = field(default_factory=list)  # in the order they ran

    @property
    def passed(self) -> bool:
        return all(t.status != "fail" for t in self.targets)


# -------------------------------------------------------------------------------------------
# reference


def _placement_note(forward) -> str:
    if not forward.device_map:
        return ""
    if forward.offloaded:
        return (f"accelerate device_map, {forward.offloaded} tensors left on disk, read in "
                "place per forward")
    return "accelerate device_map"


def run_reference(model: CanonicalModel, cases: list[Case], device: str, dtype: torch.dtype,
                  log: Log, progress: StageProgress | None = None, *, offload: str = "auto"
                  ) -> ReferenceLogits:
    """Greedy continuations and logits of every case from the source checkpoint; the logits
    are kept (float32, CPU) and the model freed before this returns."""
    from mmconvert.verify.reference import ReferenceModel

    stages: list[StageStats] = []
    store: dict[str, torch.Tensor] = {}
    with measure("reference", stages) as stats:
        ref = ReferenceModel.placed(model, device, dtype, offload)
        track(ref.lm, "reference")
        stats.note = _placement_note(ref)
        log(f"reference: {model.source} on {ref.device}"
            f"{f' ({stats.note})' if stats.note else ''}, {str(dtype).split('.')[-1]}")
        exclude = (model.multimodal_token_id,) if model.multimodal_token_id is not None else ()
        with _stage(progress, "reference", len(cases)) as step:
            for case in cases:
                case.continuation = ref.greedy(case.input_ids, case.mm_inputs, case.generate,
                                               exclude)
                store[case.name] = ref.logits(case.full_ids, case.mm_inputs)
                if progress is None:
                    log(f"reference: case {case.name}: {store[case.name].shape[0]} positions")
                step(case.name)
        del ref
        release()
    log(stats.line())
    return ReferenceLogits(cases, store.__getitem__, "forward", device,
                           str(dtype).split(".")[-1], stats.seconds, environment(),
                           stages)


def run_dequantized(target: Target, model: CanonicalModel, reference: ReferenceLogits,
                    device: str, dtype: torch.dtype, log: Log,
                    progress: StageProgress | None = None, *, offload: str = "auto",
                    stages: list[StageStats] | None = None,
                    rounding: str | None = None) -> ReferenceLogits:
    """The dequantized reference of a quantized GGUF target: the reference forward (the
    source's config and code) on the bundle's dequantized weights, logits of every case kept,
    model freed (see :mod:`mmconvert.verify.fidelity`). ``rounding="llama.cpp"``: every
    matmul input rounded as llama.cpp's CPU kernels round it for that weight's type
    (:mod:`mmconvert.verify.llama_rounding`)."""
    from mmconvert.verify.backends.gguf_common import GGUFBundle
    from mmconvert.verify.fidelity import dequantized_loaders
    from mmconvert.verify.llama_rounding import round_matmul_inputs
    from mmconvert.verify.reference import TorchMultimodalQwen3, plan_placement, weight_bytes

    label = f"dequantized {target.label}" + (f", {rounding} input rounding" if rounding else "")
    store: dict[str, torch.Tensor] = {}
    with measure(label, stages if stages is not None else []) as stats:
        tensors = GGUFBundle(target, model).tensors()
        loaders = dequantized_loaders(tensors, model)
        nbytes, largest = weight_bytes((r.numel for r in model.tensors.refs()), dtype)
        main, max_memory = plan_placement(nbytes, device, offload, largest_bytes=largest)
        forward = TorchMultimodalQwen3(model.text, model.projectors, model.multimodal_token_id,
                                       loaders, device=main, dtype=dtype, max_memory=max_memory)
        track(forward.lm, label)
        if rounding is not None:
            round_matmul_inputs(forward.lm, {bt.name: bt.dtype for bt in tensors})
        stats.note = _placement_note(forward)
        with _stage(progress, label, len(reference.cases)) as step:
            for case in reference.cases:
                store[case.name] = forward.logits(case.full_ids, case.mm_inputs)
                step(case.name)
        del forward
        release()
    log(stats.line())
    return ReferenceLogits(reference.cases, store.__getitem__, label, device,
                           reference.dtype, stats.seconds)


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

    def __init__(self, model: CanonicalModel, log: Log, label: str,
                 imatrix: Imatrix | None = None, imatrix_used: str | None = None):
        self.model = model
        # the importance weights the bundle was quantized with (``verify --imatrix``); when
        # the bundle used one that verify was not given, its weighted types cannot be redone
        self.imatrix, self.imatrix_used = imatrix, imatrix_used
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
        qt = quants.TYPES.get(bt.dtype)
        weighted = qt is not None and qt.quantized and qt.uses_imatrix
        weights = None
        if weighted and self.imatrix is not None and bt.stored_as in self.imatrix.entries:
            weights = self.imatrix.weights(bt.stored_as)
            if source.ndim == 3:  # one vector per expert, as llama-quantize passes them
                weights = weights.reshape(source.shape[0], -1)
        elif weighted and self.imatrix is None and self.imatrix_used:
            return TensorDiff(bt.name, bt.stored_as, bt.dtype, "unchecked",
                              numel=int(array.size),
                              hint=f"quantized with the importance matrix {self.imatrix_used}; "
                                   "pass --imatrix FILE to check its bytes")
        diff = compare_tensor(bt.name, bt.stored_as, bt.dtype, array, source,
                              derived=bt.expect is not None, imatrix=weights)
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


def _run_case(runner, case: Case, reference: ReferenceLogits, model: CanonicalModel,
              source: ReferenceLogits | None = None, keep: bool = False
              ) -> tuple[CaseResult, Metrics | None]:
    """The case against ``reference``; with ``source`` (a quantized target judged against its
    dequantized reference) also against the source's logits: its quantization loss.
    ``keep``: the result keeps the runtime's logits (for a verdict that may be reconsidered)."""
    try:
        logits = runner.logits(case)
    except Exception as exc:  # a broken bundle may break its runtime: report, go on
        return CaseResult(case.name, 0, error=f"forward failed: {exc}"), None
    metrics, error = _compare_case(case, reference.logits(case.name), logits,
                                   model.multimodal_token_id)
    loss = None
    if source is not None and error is None:
        loss, _ = _compare_case(case, source.logits(case.name), logits,
                                model.multimodal_token_id)
    return CaseResult(case.name, logits.shape[0], metrics.summary() if metrics else None,
                      error, metrics, logits if keep else None), loss


def verify_target(target: Target, model: CanonicalModel, reference: ReferenceLogits,
                  device: str, dtype: torch.dtype, overrides: list[Override], log: Log,
                  progress: StageProgress | None = None, *, offload: str = "auto",
                  dequantized: ReferenceLogits | None = None,
                  gates: QualityGates = NO_GATES,
                  stages: list[StageStats] | None = None,
                  imatrix: Imatrix | None = None) -> TargetResult:
    """One target, its model freed before this returns. ``dequantized``: the target is
    quantized, judge its logits against this (:func:`run_dequantized`) and report its loss
    against ``reference``."""
    result = TargetResult(target)
    if target.skip:
        result.status, result.reason = "skip", target.skip
        log(f"{target.label} [{target.backend}]: skipped ({target.skip})")
        return result
    with measure(f"{target.label} [{target.backend}]", stages if stages is not None else []
                 ) as stats:
        _verify_target(result, model, reference, device, dtype, overrides, log, progress,
                       offload, dequantized, gates, stats, imatrix)
        release()
    log(stats.line())
    return result


def _verify_target(result: TargetResult, model: CanonicalModel, reference: ReferenceLogits,
                   device: str, dtype: torch.dtype, overrides: list[Override], log: Log,
                   progress: StageProgress | None, offload: str,
                   dequantized: ReferenceLogits | None, gates: QualityGates,
                   stats: StageStats, imatrix: Imatrix | None = None) -> None:
    target = result.target
    start = time.perf_counter()
    # the manifest the GGUF backends' discovery already read
    used = ((target.options.get("manifest") or {}).get("options") or {}).get("imatrix")
    checker = _TensorChecker(model, log, f"{target.label} [{target.backend}]", imatrix,
                             Path(str(used)).name if used else None)
    runner = None
    judge, losses = (dequantized or reference), []
    if dequantized is not None:
        result.compared_with = "dequantized"
    try:
        runner = open_runner(target, model)
        runner.offload = offload
        result.facts = compare_facts(source_facts(model), runner.facts())
        bundle_tensors = [checker.wrap(bt) for bt in runner.tensors()]
        checker.total = len(bundle_tensors)
        target.output_type = _resolve_output_type(target, bundle_tensors, model)
        by_name = {bt.name: bt for bt in bundle_tensors if bt.name}
        log(f"{target.label} [{target.backend}]: loading {len(bundle_tensors)} tensors "
            f"({target.output_type})")
        try:
            runner.prepare(by_name, device, dtype)
            holder = runner.holder()
            if holder is not None:
                track(holder, f"{target.label} [{target.backend}]")
            stats.note = runner.placement_note()
        finally:
            for bt in bundle_tensors:  # the ones the forward did not read still get checked
                if bt.stored_as not in checker.diffs:
                    bt.load()
        diffs = list(checker.diffs.values()) + checker.missing(bundle_tensors)
        result.tensors_checked = len(diffs)
        result.tensor_diffs = rank(diffs)
        label = f"{target.label} [{target.backend}]"
        rejudged = rejudged_with_rounding(target)  # see verify_bundles
        with _stage(progress, label, len(reference.cases)) as step:
            for case in reference.cases:
                if progress is None:
                    log(f"{label}: case {case.name}")
                case_result, loss = _run_case(runner, case, judge, model,
                                              reference if dequantized is not None else None,
                                              keep=rejudged)
                result.cases.append(case_result)
                if loss is not None:
                    losses.append(loss)
                step(case.name)
        result.checks = runner.extra_checks()
        weighted = [d for d in diffs if d.status == "unchecked" and checker.imatrix_used
                    and checker.imatrix_used in d.hint]
        if weighted:
            result.checks.append(("tensor check", None, (
                f"{len(weighted)} tensors quantized with the importance matrix "
                f"{checker.imatrix_used} not compared byte for byte (the logits still are); "
                "pass --imatrix FILE to compare them")))
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
        del runner  # the last reference: the model is garbage now (release() collects it)
    parts = [c.raw for c in result.cases if c.raw is not None]
    result.limits = fidelity_limits(target, overrides) if dequantized is not None else \
        thresholds_for(target.output_type, overrides, reference.dtype)
    if parts:
        overall = aggregate(parts)
        result.overall = overall.summary()
        result.failures = check(result.overall, result.limits)
    elif not result.errors:
        result.errors.append("no case produced logits")
    if losses:
        result.loss = aggregate(losses).summary()
        result.loss_gate = gates.failures(result.loss)
    result.settle()
    result.seconds = time.perf_counter() - start
    loss = "" if result.loss is None else (
        f"; quantization loss mean KLD {result.loss['mean_kld']:.3g}, top-1 "
        f"{100 * result.loss['top1']:.1f}%")
    log(f"{target.label} [{target.backend}]: {result.status.upper()}"
        + (f" ({result.reason})" if result.reason else "") + loss)


def fidelity_limits(target: Target, overrides: list[Override]) -> dict[str, float]:
    """Limits of a quantized target against its dequantized reference; the user's
    ``--threshold`` overrides for its type (or every type) apply to them."""
    limits = dict(FIDELITY_LIMITS.get(target.backend, FIDELITY_FALLBACK))
    for o in overrides:
        if o.output_type in (None, target.output_type):
            if o.value is None:
                limits.pop(o.metric, None)
            else:
                limits[o.metric] = o.value
    return limits


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
                   overrides: list[Override], log: Log,
                   progress: StageProgress | None = None, *, offload: str = "auto",
                   gates: QualityGates = NO_GATES,
                   imatrix: Imatrix | None = None) -> VerifyResult:
    """Verify ``targets`` (from :func:`discover_all`) against the checkpoint's reference, one
    model in memory at a time: for each quantized GGUF file its dequantized reference first
    (kept as logits, model freed), then its targets. ``imatrix``: the importance matrix a
    GGUF bundle was quantized with, so its weighted tensors are checked byte for byte too."""
    stages = list(reference.stages)
    results = []
    # logits of each quantized file's dequantized reference (per input rounding), kept while a
    # target still needs them
    dequantized: dict[tuple[str | None, ...], ReferenceLogits | None] = {}

    def judge(t: Target, rounding: str | None) -> ReferenceLogits | None:
        key = (rounding, *(str(p) for p in t.files))
        if key not in dequantized:
            try:
                dequantized[key] = run_dequantized(t, model, reference, device, dtype, log,
                                                   progress, offload=offload, stages=stages,
                                                   rounding=rounding)
            except Exception as exc:  # unreadable file: the target's own run says what is wrong
                log(f"dequantized {t.label}: not computed ({exc}); judged against the source "
                    "reference")
                dequantized[key] = None
        return dequantized[key]

    for index, t in enumerate(targets):
        rounding = INPUT_ROUNDING.get(t.backend)
        rounded = judge(t, rounding) if not t.skip and is_quantized(t) else None
        result = verify_target(t, model, reference, device, dtype, overrides, log, progress,
                               offload=offload, dequantized=rounded, gates=gates,
                               stages=stages, imatrix=imatrix)
        if rejudged_with_rounding(t) and result.only_logits_failed:
            # llama.cpp rounds an F16/BF16 weight's inputs to that type: judge against the
            # stored weights with their inputs rounded so, then as below
            rounded = judge(t, rounding)
            if rounded is not None and _rejudge(result, rounded, model, log):
                result.compared_with = "dequantized"
                _widen_for_sensitivity(result, rounded, reference, model, log)
        elif rounding and rounded is not None and result.only_logits_failed:
            unrounded = judge(t, None)
            if unrounded is not None:
                _widen_for_sensitivity(result, rounded, unrounded, model, log)
        for case in result.cases:
            case.logits = None
        results.append(result)
        if all(later.files != t.files for later in targets[index + 1:]):
            for key in [k for k in dequantized if list(k[1:]) == [str(p) for p in t.files]]:
                dequantized.pop(key)
    return VerifyResult(str(model.source), content_hash, reference, results, stages)


def _rejudge(result: TargetResult, judge: ReferenceLogits, model: CanonicalModel,
             log: Log) -> bool:
    """Compare ``result``'s kept runtime logits with ``judge`` instead; False if some case
    kept none (the verdict stands)."""
    cases = {c.name: c for c in result.cases}
    if any(cases.get(case.name) is None or cases[case.name].logits is None
           for case in judge.cases):
        return False
    parts = []
    for case in judge.cases:
        kept = cases[case.name]
        metrics, kept.error = _compare_case(case, judge.logits(case.name), kept.logits,
                                            model.multimodal_token_id)
        kept.raw, kept.metrics = metrics, metrics.summary() if metrics else None
        if metrics is not None:
            parts.append(metrics)
    result.overall = aggregate(parts).summary() if parts else None
    result.failures = check(result.overall, result.limits) if result.overall else []
    result.settle()
    log(f"{result.target.label} [{result.target.backend}]: against {judge.source}: "
        f"{result.status.upper()}")
    return True


def _widen_for_sensitivity(result: TargetResult, rounded: ReferenceLogits,
                           unrounded: ReferenceLogits, model: CanonicalModel, log: Log) -> None:
    """Judge ``result`` again with limits widened by how far input rounding alone moves the
    model (:func:`mmconvert.verify.fidelity.widened_limits`) when it still fails."""
    if not result.only_logits_failed:
        return
    parts = []
    for case in rounded.cases:
        metrics, error = _compare_case(case, unrounded.logits(case.name),
                                       rounded.logits(case.name), model.multimodal_token_id)
        if metrics is None:
            log(f"sensitivity of case {case.name} not measured: {error}")
            return
        parts.append(metrics)
    result.sensitivity = aggregate(parts).summary()
    result.limits = widened_limits(result.limits, result.sensitivity)
    result.failures = check(result.overall, result.limits)
    result.settle()
    log(f"{result.target.label} [{result.target.backend}]: input rounding alone moves this "
        f"model by mean KLD {result.sensitivity['mean_kld']:.3g} (top-1 "
        f"{100 * result.sensitivity['top1']:.1f}%): limits widened to "
        f"{result.limits}; {result.status.upper()}")
