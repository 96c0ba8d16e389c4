"""Reports of a verification: terminal table, JSON, JUnit XML and a markdown summary.

The markdown summary is self-contained (one heading, one table, the thresholds) so that
``to-hf`` and model cards can embed it as is; :func:`markdown_summary` is its public entry.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from mmconvert.verify.harness import TargetResult, VerifyResult
from mmconvert.verify.metrics import TIE_MARGIN
from mmconvert.verify.thresholds import UPPER_BOUNDS

TOP1_NOTE = (f"top-1 counts the reference's near-ties (< {TIE_MARGIN:g} nats) as agreement; "
             "plain argmax agreement is top1_strict in --report-json")
COLUMNS = (("max_abs", "max|Δ|"), ("nmse", "NMSE"), ("mean_kld", "mean KLD"),
           ("max_kld", "max KLD"), ("top1", "top-1"), ("top5", "top-5"), ("greedy", "greedy"))


def fmt(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric in ("top1", "top5", "greedy"):
        return f"{100 * value:.2f}%"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return "0" if value == 0 else f"{value:.2e}"


def _row(t: TargetResult) -> list[str]:
    values = [fmt(m, (t.overall or {}).get(m)) for m, _ in COLUMNS]
    return [t.target.label, t.target.backend, t.target.output_type, t.compared_with, *values,
            t.status.upper()]


def loss_line(t: TargetResult) -> str:
    """A quantized target's loss against the source, beside llama.cpp's published figures."""
    from mmconvert.verify.fidelity import published

    loss = t.loss or {}
    text = (f"{t.target.label} [{t.target.backend}] {t.target.output_type}: mean KLD "
            f"{fmt('mean_kld', loss.get('mean_kld'))}, top-1 {fmt('top1', loss.get('top1'))}, "
            f"greedy {fmt('greedy', loss.get('greedy'))}")
    figures = published(t.target.output_type)
    if figures:  # tests/test_verify_mutations.py pins this wording
        shown = ", ".join(f"{k} {fmt(k, v) if isinstance(v, float) else v}"
                          for k, v in figures.items())
        text += f" (llama.cpp publishes {shown})"
    return text


def verdict(result: VerifyResult) -> str:
    """The last line: a conversion error, or only quantization loss over the user's gate."""
    if result.passed:
        return "PASS: every bundle matches the checkpoint"
    if any(t.status == "fail" and t.causes for t in result.targets):
        return "FAIL: at least one bundle differs from the checkpoint"
    return ("FAIL: quantization loss above the quality gate (--max-kld / --min-top1); the "
            "bundles are faithful conversions: a less lossy type lowers the loss")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return lines


def terminal_report(result: VerifyResult, max_causes: int = 8) -> str:
    ref = result.reference
    positions = sum(c.fused_length(None) for c in ref.cases)
    lines = [f"checkpoint {result.checkpoint} (content {result.content_hash[:12]})",
             f"reference: {ref.source} on {ref.device} ({ref.dtype}), {len(ref.cases)} cases, "
             f"~{positions} positions" + (f", {ref.seconds:.1f}s" if ref.seconds else ""), ""]
    header = ["bundle", "backend", "type", "vs", *[label for _, label in COLUMNS], "result"]
    lines += _table(header, [_row(t) for t in result.targets])
    lines.append(TOP1_NOTE)
    if any(t.compared_with == "dequantized" for t in result.targets):
        lines.append("vs dequantized: a quantized bundle's verdict compares its runtime with the "
                     "reference forward on the bundle's own dequantized weights (conversion "
                     "fidelity); for llama.cpp, with every matmul input rounded as its CPU "
                     "kernels round it (8-bit blocks for quantized weights)")
    for t in result.targets:
        if t.sensitivity is not None:
            lines.append(f"{t.target.label} [{t.target.backend}]: llama.cpp's input rounding "
                         f"alone moves this model by mean KLD {t.sensitivity['mean_kld']:.3g}, "
                         f"top-1 {100 * t.sensitivity['top1']:.1f}% (it amplifies rounding): "
                         f"judged within mean KLD {t.limits.get('mean_kld', 0):.3g}, top-1 "
                         f"{100 * t.limits.get('top1', 0):.1f}%")
    quantized = [t for t in result.targets if t.loss is not None]
    if quantized:
        lines += ["", "quantization loss against the source (what the type costs on this model; "
                  "not a conversion error):"]
        lines += [f"  {loss_line(t)}" for t in quantized]
    for t in result.targets:
        if t.status == "skip":
            lines.append(f"\n{t.target.label} [{t.target.backend}]: skipped: {t.reason}")
        elif t.status == "fail":
            causes = t.causes
            if causes:
                lines.append(f"\n{t.target.label} [{t.target.backend}] FAILED:")
                lines += [f"  - {c}" for c in causes[:max_causes]]
                if len(causes) > max_causes:
                    lines.append(f"  ... and {len(causes) - max_causes} more (see "
                                 "--report-json)")
            if t.loss_gate:
                lines.append(f"\n{t.target.label} [{t.target.backend}]: quantization loss "
                             f"of {t.target.output_type} on this model is above your quality "
                             f"gate ({'; '.join(t.loss_gate)})"
                             + ("" if causes else "; the conversion itself is faithful"))
    if result.stages:
        lines += ["", "stages (one model in memory at a time):"]
        lines += [f"  {s.line()}" for s in result.stages]
    lines.append("")
    lines.append(verdict(result))
    return "\n".join(lines)


def _clean(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(result: VerifyResult) -> dict[str, Any]:
    ref = result.reference
    return _clean({
        "passed": result.passed,
        "checkpoint": result.checkpoint,
        "content_hash": result.content_hash,
        "reference": {"source": ref.source, "device": ref.device, "dtype": ref.dtype,
                      "seconds": ref.seconds, "environment": ref.environment},
        "cases": [{"name": c.name, "description": c.description,
                   "prompt_tokens": len(c.input_ids), "generated": len(c.continuation),
                   "rows": c.n_rows} for c in ref.cases],
        "targets": [{
            "label": t.target.label, "bundle": str(t.target.bundle), "kind": t.target.kind,
            "backend": t.target.backend, "output_type": t.target.output_type,
            "files": [str(f) for f in t.target.files], "status": t.status, "reason": t.reason,
            "thresholds": t.limits, "overall": t.overall,
            "cases": [{"name": c.name, "positions": c.positions, "metrics": c.metrics,
                       "error": c.error} for c in t.cases],
            "facts": t.facts,
            "tensors": {"checked": t.tensors_checked,
                        "failing": [d.describe() for d in t.tensor_diffs]},
            "checks": [{"name": n, "passed": ok, "message": m} for n, ok, m in t.checks],
            "causes": t.causes, "errors": t.errors, "seconds": round(t.seconds, 3),
            "compared_with": t.compared_with, "quantization_loss": t.loss,
            "quality_gate_failures": t.loss_gate, "input_rounding_sensitivity": t.sensitivity,
        } for t in result.targets],
        "stages": [s.as_dict() for s in result.stages],
    })


def write_json(result: VerifyResult, path: Path) -> None:
    Path(path).write_text(json.dumps(to_json(result), indent=2) + "\n", encoding="utf-8")


def junit_xml(result: VerifyResult) -> str:
    """JUnit XML: one suite per target; facts, tensors, each case, thresholds, extras as tests."""
    root = ET.Element("testsuites", name="mmconvert verify")
    totals = {"tests": 0, "failures": 0, "skipped": 0}
    for t in result.targets:
        suite = ET.SubElement(root, "testsuite", name=f"{t.target.label} [{t.target.backend}]")
        cases: list[tuple[str, str | None, str | None]] = []  # (name, failure, skipped)
        if t.status == "skip":
            cases.append(("run", None, t.reason))
        else:
            cases.append(("load", "; ".join(t.errors) or None, None))
            cases.append(("facts", "; ".join(t.facts) or None, None))
            cases.append((f"tensors ({t.tensors_checked})",
                          "; ".join(d.describe() for d in t.tensor_diffs) or None, None))
            for c in t.cases:
                detail = c.error
                cases.append((f"case {c.name}", detail, None))
            limits = ", ".join(f"{m} {'<=' if m in UPPER_BOUNDS else '>='} {v:g}"
                               for m, v in t.limits.items())
            cases.append((f"thresholds {t.target.output_type} ({limits})",
                          "; ".join(t.failures) or None, None))
            for name, ok, message in t.checks:
                cases.append((name, message if ok is False else None,
                              message if ok is None else None))
        failures = skipped = 0
        for name, failure, skip in cases:
            case = ET.SubElement(suite, "testcase", name=name, classname=t.target.label)
            if failure:
                ET.SubElement(case, "failure", message=failure[:500]).text = failure
                failures += 1
            elif skip:
                ET.SubElement(case, "skipped", message=skip)
                skipped += 1
        suite.set("tests", str(len(cases)))
        suite.set("failures", str(failures))
        suite.set("skipped", str(skipped))
        suite.set("time", f"{t.seconds:.3f}")
        totals["tests"] += len(cases)
        totals["failures"] += failures
        totals["skipped"] += skipped
    for key, value in totals.items():
        root.set(key, str(value))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(result: VerifyResult, path: Path) -> None:
    Path(path).write_text(junit_xml(result), encoding="utf-8")


def markdown_summary(result: VerifyResult) -> str:
    """A markdown section: verdict, one row per bundle and backend, thresholds applied."""
    ref = result.reference
    headline = "✅ All bundles match" if result.passed else "❌ A bundle differs from" \
        if any(t.causes for t in result.targets) else \
        "⚠️ Quantization loss above the quality gate against"
    lines = ["### Logit parity (`mmconvert verify`)", "",
             f"{headline} the "
             f"source checkpoint (content hash `{result.content_hash[:12]}`) on "
             f"{len(ref.cases)} cases ({', '.join(c.name for c in ref.cases)}); reference "
             f"computed in {ref.dtype} on {ref.device}.", "",
             "| bundle | backend | type | vs | "
             + " | ".join(label.replace("|", "\\|") for _, label in COLUMNS) + " | result |",
             "|---|---|---|---|" + "---:|" * len(COLUMNS) + "---|"]
    for t in result.targets:
        row = _row(t)
        row[-1] = {"PASS": "pass", "FAIL": "**FAIL**", "SKIP": "skipped"}[row[-1]]
        lines.append("| " + " | ".join(row) + " |")
    limits = sorted({(t.target.output_type, ", ".join(
        f"{m} {'≤' if m in UPPER_BOUNDS else '≥'} {v:g}" for m, v in t.limits.items()))
        for t in result.targets if t.limits})
    if limits:
        lines += ["", "Thresholds: " + "; ".join(f"{k}: {v}" for k, v in limits) + ". "
                  + TOP1_NOTE.replace("--report-json", "the JSON report") + "."]
    failing = [t for t in result.targets if t.status == "fail"]
    for t in failing:
        lines += ["", f"**{t.target.label} [{t.target.backend}]**:"]
        lines += [f"- {c}" for c in t.causes[:5]]
    return "\n".join(lines) + "\n"


def write_markdown(result: VerifyResult, path: Path) -> None:
    Path(path).write_text(markdown_summary(result), encoding="utf-8")
