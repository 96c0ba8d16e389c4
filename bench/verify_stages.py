"""verify's time and peak RSS per stage on a checkpoint and its bundles (for bench_scale.py).

Each stage is one model in memory: the reference, each quantized file's dequantized
reference, each target. ``verify_stages`` runs ``mmconvert.api.verify`` in this process with
the first ``cases`` built-in cases (the full set takes minutes per stage on a 0.6B shape on
two cores) and returns one row per stage plus each target's verdict and loss:

    from bench.verify_stages import verify_stages
    rows = verify_stages(ckpt, [gguf_dir], cases=1, backends=("gguf_llama",))
    # [{"stage": "reference", "seconds": 41.2, "peak_rss_bytes": ..., ...}, ...]

    python bench/verify_stages.py CKPT BUNDLE... [--cases 1] [--backend gguf_llama] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


def write_cases(ckpt: Path, count: int, path: Path, greedy_tokens: int = 8,
                **read: Any) -> Path:
    """The first ``count`` built-in cases of ``ckpt`` as a cases file (``read``: how to read
    the checkpoint, as ``api.verify`` takes it: ``projector=`` for a plain Qwen3 folder)."""
    from safetensors.torch import save_file

    from mmconvert.convert.readers import ReadOptions, read_checkpoint
    from mmconvert.verify.cases import CASES_KEY, CASES_VERSION, cases_to_file_parts, default_cases

    model = read_checkpoint(ckpt, ReadOptions(**read))
    cases = default_cases(model, generate=greedy_tokens)[:count]
    tensors, entries = cases_to_file_parts(cases)
    if not tensors:  # safetensors wants at least one tensor; text-only cases have none
        import torch

        tensors = {"unused": torch.zeros(1)}
    save_file(tensors, str(path),
              metadata={CASES_KEY: json.dumps({"version": CASES_VERSION, "cases": entries})})
    return path


def verify_stages(ckpt: Path, bundles: Sequence[Path], *, cases: int = 1,
                  backends: Sequence[str] = (), device: str = "cpu", dtype: str = "float32",
                  offload: str = "auto", greedy_tokens: int = 8, log=None,
                  **read: Any) -> dict[str, Any]:
    """{"passed", "stages": [{stage, seconds, peak_rss_bytes, peak_anon_bytes, peak_gpu_bytes,
    note}],
    "targets": [{label, backend, type, status, reason, compared_with, overall, loss}]}."""
    from mmconvert import api
    from mmconvert.verify.report import to_json

    with tempfile.TemporaryDirectory(prefix="verify-stages-") as tmp:
        cases_file = write_cases(Path(ckpt), cases, Path(tmp) / "cases.safetensors",
                                 greedy_tokens, **read)
        result = api.verify(ckpt, list(bundles), device=device, dtype=dtype,
                            cases=str(cases_file), greedy_tokens=greedy_tokens,
                            backends=tuple(backends), offload=offload, log=log, **read)
    doc = to_json(result)
    return {
        "passed": result.passed,
        "stages": [{"stage": s["name"], **{k: v for k, v in s.items() if k != "name"}}
                   for s in doc["stages"]],
        "targets": [{"label": t["label"], "backend": t["backend"], "type": t["output_type"],
                     "status": t["status"], "reason": t["reason"],
                     "compared_with": t["compared_with"], "overall": t["overall"],
                     "loss": t["quantization_loss"]} for t in doc["targets"]],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("bundles", type=Path, nargs="+")
    parser.add_argument("--cases", type=int, default=1, help="first N built-in cases [1]")
    parser.add_argument("--backend", action="append", default=[], dest="backends")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--offload", default="auto", choices=["auto", "never", "disk"])
    parser.add_argument("--greedy-tokens", type=int, default=8)
    parser.add_argument("--projector", type=Path, help="projector weights of a plain Qwen3 "
                        "folder (its projector.json beside it)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    read = {"projector": args.projector} if args.projector else {}
    out = verify_stages(args.ckpt, args.bundles, cases=args.cases, backends=args.backends,
                        device=args.device, dtype=args.dtype, offload=args.offload,
                        greedy_tokens=args.greedy_tokens,
                        log=lambda line: print(line, file=sys.stderr), **read)
    for s in out["stages"]:
        gpu = f", peak GPU {s['peak_gpu_bytes'] / 2**30:.2f} GiB" if s["peak_gpu_bytes"] else ""
        print(f"{s['stage']}: {s['seconds']:.1f}s, peak RSS "
              f"{s['peak_rss_bytes'] / 2**30:.2f} GiB (anonymous "
              f"{s['peak_anon_bytes'] / 2**30:.2f} GiB){gpu}"
              + (f" ({s['note']})" if s["note"] else ""))
    for t in out["targets"]:
        loss = t["loss"] or {}
        print(f"{t['label']} [{t['backend']}] {t['type']} vs {t['compared_with']}: "
              f"{t['status'].upper()}" + (f" ({t['reason']})" if t["reason"] else "")
              + (f"; loss mean KLD {loss['mean_kld']:.3g}, top-1 {100 * loss['top1']:.1f}%"
                 if loss else ""))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
