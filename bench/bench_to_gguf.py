"""``mmconvert to-gguf`` against llama.cpp's own ``convert_hf_to_gguf.py``, same weights, same run.

For each outtype and repeat, both converters run as fresh child processes, one after the
other (the order alternates between repeats). Before each run: pending writes are flushed
(``sync``), the run's input folder is read once so both start from a warm page cache, and
(``--memory settled``, the default) the bench waits until a VM's balloon has handed the free
memory back to its host (``measure.settle_memory``): on such a VM the first touch of a page
costs a host page fault, and writing the output into the page cache takes ~10x longer than
into memory freed a moment before, so without the wait a run is faster when it follows one
that freed a lot. The header prints both speeds (``measure.first_touch_probe``). After each
run its output is deleted. Wall time is measured around the child; peak RSS is the
kernel's high-water mark (``VmHWM``) of the largest process of the child's tree, or the
sampled sum over the tree when larger (see ``bench/measure.py``). Times in the table are the
minimum over the repeats (the least disturbed run; ``--stat median`` for medians), memory the
median; CPU seconds (user + system) are shown too, being less sensitive than wall time to
other processes on the machine.

Targets (issue 3): wall time <= 1/4 of the peer's for F16/BF16 and <= 1/3 for Q8_0; peak RSS
<= 1/3 of the peer's.

    python bench/bench_to_gguf.py                         # F16, BF16, Q8_0; 1 repeat
    python bench/bench_to_gguf.py --repeat 3 --json out.json
    python bench/bench_to_gguf.py --layers 2 --outtype q8_0   # quick check on a small model
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

from make_checkpoint import WORK, Checkpoint, make_checkpoint, shape_args, shape_from
from measure import (
    Measurement,
    first_touch_probe,
    format_table,
    run_measured,
    settle,
    settle_memory,
    tail,
    warm,
)
from peer import choose_gguf, ensure_deps, fetch_peer, peer_command, peer_env

TIME_TARGET = {"f16": 1 / 4, "bf16": 1 / 4, "q8_0": 1 / 3}
RSS_TARGET = 1 / 3


def output_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def run_one(tool: str, outtype: str, ckpt: Checkpoint, peer_dir: Path, gguf: str,
            ours_args: list[str], logs: Path, keep: bool = False,
            memory: str = "settled") -> dict:
    """One measured run; its output is deleted unless ``keep`` (then the caller deletes it)."""
    out = WORK / f"out-{tool}-{outtype}"
    shutil.rmtree(out, ignore_errors=True)
    if tool == "ours":
        cmd = [sys.executable, "-m", "mmconvert", "to-gguf", str(ckpt.mm), "-o", str(out),
               "--outtype", outtype, *ours_args]
        env, source = None, ckpt.mm
    else:
        out.mkdir()
        cmd = peer_command(peer_dir, ckpt.hf, outtype, out / f"peer-{outtype}.gguf")
        env, source = peer_env(gguf), ckpt.hf
    settle()
    warm(source)
    if memory == "settled":
        settle_memory()
    log = logs / f"{tool}-{outtype}.log"
    m: Measurement = run_measured(cmd, env=env, log=log)
    size = output_bytes(out)
    files = sorted(p.name for p in out.rglob("*") if p.is_file()) if out.exists() else []
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    settle()
    if m.returncode != 0:
        print(f"{tool} {outtype} failed (rc {m.returncode}); {log}:\n{tail(log)}", file=sys.stderr)
    return {"tool": tool, "outtype": outtype, "output_bytes": size, "files": files, "out": str(out),
            "command": cmd, "peak_mb": m.peak_rss_mb, **asdict(m)}


def compare(ours_out: Path, peer_out: Path, outtype: str) -> dict:
    """Are the two text GGUFs the same work? Tensor bytes and metadata keys side by side."""
    import gguf
    import numpy as np

    ours_file = next(p for p in ours_out.glob(f"*-{outtype.upper()}.gguf")
                     if not p.name.startswith("mmproj-"))
    a, b = gguf.GGUFReader(ours_file), gguf.GGUFReader(next(peer_out.glob("*.gguf")))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differ = sorted(n for n in ta.keys() & tb.keys()
                    if ta[n].tensor_type != tb[n].tensor_type
                    or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data)))
    return {"outtype": outtype, "tensors": len(ta), "peer_tensors": len(tb),
            "identical": len(ta.keys() & tb.keys()) - len(differ), "differ": differ,
            "only_ours": sorted(ta.keys() - tb.keys()), "only_peer": sorted(tb.keys() - ta.keys()),
            "keys_only_ours": sorted(a.fields.keys() - b.fields.keys()),
            "keys_only_peer": sorted(b.fields.keys() - a.fields.keys())}


def summarize(runs: list[dict], outtypes: list[str], stat: str = "min") -> list[dict]:
    """Per outtype: wall and CPU time by ``stat`` (min or median over the repeats), memory by
    median, ratios ours/peer and whether each target is met."""
    rows = []
    for ot in outtypes:
        def med(tool: str, key: str, ot: str = ot, how: str = "median") -> float:
            vals = [r[key] for r in runs if r["tool"] == tool and r["outtype"] == ot
                    and r["returncode"] == 0]
            if not vals:
                return float("nan")
            return min(vals) if how == "min" else statistics.median(vals)

        ours_s, peer_s = med("ours", "wall_s", how=stat), med("peer", "wall_s", how=stat)
        ours_mb = med("ours", "peak_mb")
        peer_mb = med("peer", "peak_mb")
        t_ratio, m_ratio = ours_s / peer_s, ours_mb / peer_mb
        rows.append({"outtype": ot, "ours_s": ours_s, "peer_s": peer_s, "time_ratio": t_ratio,
                     "time_target": TIME_TARGET.get(ot), "time_met": t_ratio <= TIME_TARGET.get(ot, 1),
                     "ours_mb": ours_mb, "peer_mb": peer_mb, "rss_ratio": m_ratio,
                     "rss_target": RSS_TARGET, "rss_met": m_ratio <= RSS_TARGET,
                     "ours_cpu_s": med("ours", "cpu_s", how=stat),
                     "peer_cpu_s": med("peer", "cpu_s", how=stat),
                     "ours_anon_mb": med("ours", "anon") / 1e6,
                     "peer_anon_mb": med("peer", "anon") / 1e6,
                     "ours_out_mb": med("ours", "output_bytes") / 1e6,
                     "peer_out_mb": med("peer", "output_bytes") / 1e6})
    return rows


def table(rows: list[dict]) -> str:
    def mark(ok: bool, ratio: float, target: float) -> str:
        if ratio != ratio:  # nan: a run failed
            return "n/a"
        return f"{ratio:.2f} (≤{target:.2f} {'met' if ok else 'NOT met'})"

    return format_table(
        ["outtype", "ours s", "peer s", "time ratio", "ours MB", "peer MB", "RSS ratio",
         "ours CPU s", "peer CPU s"],
        [[r["outtype"].upper(), f"{r['ours_s']:.1f}", f"{r['peer_s']:.1f}",
          mark(r["time_met"], r["time_ratio"], r["time_target"]),
          f"{r['ours_mb']:.0f}", f"{r['peer_mb']:.0f}",
          mark(r["rss_met"], r["rss_ratio"], r["rss_target"]),
          f"{r['ours_cpu_s']:.1f}", f"{r['peer_cpu_s']:.1f}"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outtype", action="append", choices=["f16", "bf16", "q8_0"],
                        help="outtype to measure (repeatable) [f16, bf16, q8_0]")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool and outtype [1]")
    parser.add_argument("--stat", choices=["min", "median"], default="min",
                        help="how repeats combine for times (min: the least disturbed run, as "
                             "other processes may share the cores) [min]; memory: median")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                        help="print the summary and every run as JSON instead of the table "
                             "(to FILE when given, the table still printed)")
    parser.add_argument("--peer-version", default=None,
                        help="llama-cpp-python release the peer comes from [installed one]")
    parser.add_argument("--peer-gguf", choices=["auto", "pypi", "vendored"], default="auto",
                        help="gguf package the peer runs with (see bench/peer.py) [auto]")
    parser.add_argument("--compare", action="store_true",
                        help="after the first repeat, check that both text GGUFs hold identical "
                             "tensor bytes (untimed; keeps both outputs until then)")
    parser.add_argument("--only", choices=["ours", "peer"], default=None,
                        help="run one side only (no ratios)")
    parser.add_argument("--ours-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for mmconvert to-gguf (repeatable)")
    parser.add_argument("--memory", choices=["settled", "as-is"], default="settled",
                        help="settled: before each run, wait until a VM's balloon has handed the "
                             "free memory back to its host, so every run of either tool starts "
                             "from the same state (no wait elsewhere); as-is: start at once, "
                             "each run then profits from what the previous one freed [settled]")
    shape_args(parser)
    args = parser.parse_args(argv)
    outtypes = args.outtype or ["f16", "bf16", "q8_0"]

    ckpt = make_checkpoint(shape_from(args))
    peer_dir = fetch_peer(args.peer_version)
    ensure_deps()
    gguf, where = choose_gguf(peer_dir, args.peer_gguf)
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"input: {ckpt.mm} / {ckpt.hf} ({ckpt.lm_bytes() / 1e9:.2f} GB of LM weights)\n"
          f"peer:  {peer_dir} with {where}", file=sys.stderr)
    probe = first_touch_probe(WORK)
    if probe is not None:
        print(f"memory: {args.memory}; this VM hands free memory back to its host: page-cache "
              f"writes {probe['settled_gbps']:.2f} GB/s into settled memory, "
              f"{probe['recycled_gbps']:.2f} GB/s into memory just freed", file=sys.stderr)

    tools = [args.only] if args.only else ["ours", "peer"]
    runs, checks = [], []
    for ot in outtypes:
        for k in range(args.repeat):
            keep = args.compare and k == 0 and len(tools) == 2
            for tool in (tools if k % 2 == 0 else tools[::-1]):
                r = run_one(tool, ot, ckpt, peer_dir, gguf, args.ours_arg, logs, keep, args.memory)
                print(f"  {tool:4} {ot:5} #{k + 1}: {r['wall_s']:6.1f} s  {r['peak_mb']:6.0f} MB  "
                      f"{r['cpu_s']:5.1f} CPU s  (rc {r['returncode']})", file=sys.stderr)
                runs.append(r)
            if keep:
                outs = {r["tool"]: Path(r["out"]) for r in runs[-2:]}
                if all(r["returncode"] == 0 for r in runs[-2:]):
                    checks.append(compare(outs["ours"], outs["peer"], ot))
                    c = checks[-1]
                    print(f"  compare {ot}: {c['identical']}/{c['tensors']} tensors identical"
                          f"{'; differ: ' + ', '.join(c['differ'][:5]) if c['differ'] else ''}"
                          f"; keys only ours: {c['keys_only_ours']}, only peer: "
                          f"{c['keys_only_peer']}", file=sys.stderr)
                for out in outs.values():
                    shutil.rmtree(out, ignore_errors=True)
    rows = summarize(runs, outtypes, args.stat)
    report = json.dumps({"input": str(ckpt.root), "peer": str(peer_dir), "peer_gguf": where,
                         "repeat": args.repeat, "stat": args.stat, "memory": args.memory,
                         "first_touch": probe, "summary": rows, "compare": checks,
                         "runs": runs}, indent=2)
    if args.json == "-":
        print(report)
    else:
        print(table(rows))
        if args.json:
            Path(args.json).write_text(report + "\n")
    ok = all(r["returncode"] == 0 for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
