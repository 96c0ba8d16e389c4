"""``mmconvert to-hf`` next to ``cp -r`` of the same checkpoint folder (issue 2's closing note).

Same procedure as ``bench_to_gguf.py``: each run is a fresh child process, preceded by
``sync`` and a warm-up read of the checkpoint; outputs are deleted after each run; peak RSS is
the kernel's high-water mark (``VmHWM``) of the child's processes, or the sampled sum over the
tree when larger (see ``bench/measure.py``). Times: min over the repeats; memory: median.
``cp -r`` is the floor: GNU cp copies with ``copy_file_range``, in the kernel, no work at all.

    python bench/bench_to_hf.py
    python bench/bench_to_hf.py --repeat 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from bench_to_gguf import output_bytes
from make_checkpoint import WORK, make_checkpoint, shape_args, shape_from
from measure import format_table, run_measured, settle, tail, warm


def command(tool: str, src: Path, out: Path, extra: list[str]) -> list[str]:
    if tool == "cp":
        return ["cp", "-r", str(src), str(out)]
    return [sys.executable, "-m", "mmconvert", "to-hf", str(src), "-o", str(out), *extra]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool [1]")
    parser.add_argument("--stat", choices=["min", "median"], default="min",
                        help="how repeats combine for times [min]; memory: median")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="print every run as JSON instead of the table (to FILE when given)")
    parser.add_argument("--ours-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for mmconvert to-hf (repeatable)")
    shape_args(parser)
    args = parser.parse_args(argv)
    ckpt = make_checkpoint(shape_from(args))
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs = []
    for k in range(args.repeat):
        for tool in (["to-hf", "cp"] if k % 2 == 0 else ["cp", "to-hf"]):
            out = WORK / f"out-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            settle()
            warm(ckpt.mm)
            log = logs / f"{tool}.log"
            m = run_measured(command(tool, ckpt.mm, out, args.ours_arg), log=log)
            size = output_bytes(out)
            shutil.rmtree(out, ignore_errors=True)
            settle()
            if m.returncode:
                print(f"{tool} failed (rc {m.returncode}); {log}:\n{tail(log)}", file=sys.stderr)
            print(f"  {tool:5} #{k + 1}: {m.wall_s:6.1f} s  {m.peak_rss_mb:6.0f} MB  "
                  f"{m.cpu_s:5.1f} CPU s", file=sys.stderr)
            runs.append({"tool": tool, "output_bytes": size, "peak_mb": m.peak_rss_mb, **asdict(m)})

    def agg(tool: str, key: str, how: str = "median") -> float:
        vals = [r[key] for r in runs if r["tool"] == tool and r["returncode"] == 0]
        if not vals:
            return float("nan")
        return min(vals) if how == "min" else statistics.median(vals)

    rows = [[tool, f"{agg(tool, 'wall_s', args.stat):.1f}",
             f"{agg(tool, 'wall_s', args.stat) / agg('cp', 'wall_s', args.stat):.2f}",
             f"{agg(tool, 'cpu_s', args.stat):.1f}", f"{agg(tool, 'peak_mb'):.0f}",
             f"{agg(tool, 'anon') / 1e6:.0f}", f"{agg(tool, 'output_bytes') / 1e6:.0f}"]
            for tool in ("to-hf", "cp")]
    if args.json == "-":
        print(json.dumps({"input": str(ckpt.mm), "runs": runs}, indent=2))
    else:
        print(format_table(["tool", "wall s", "x cp", "CPU s", "peak RSS MB", "anon MB",
                            "output MB"], rows))
        if args.json:
            Path(args.json).write_text(json.dumps({"input": str(ckpt.mm), "runs": runs}, indent=2))
    return 0 if all(r["returncode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
