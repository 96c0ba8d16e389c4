"""``mmconvert to-gguf --outtype q4_k_m`` against the pipeline users run today, same weights,
same run: llama.cpp's ``convert_hf_to_gguf.py --outtype f16``, then its quantizer
(``llama_model_quantize``, the C API behind ``llama-quantize``, 2 threads; bench/peer_quantize.py).

The peer's time is the sum of its two steps, its peak RSS the larger of the two. Every run is a
fresh child process; before each the input is read once (warm page cache) and pending writes
are flushed; outputs are deleted after each run. Cases: Q4_K_M, Q6_K, Q4_K_M with an
importance matrix (a synthetic one with the model's names and sizes: the bench measures the
quantizer, not the matrix), and several mixtures in one run against one run per mixture.
mmconvert's numba kernels are compiled on first use and cached: the first run, with an empty
cache, is reported on its own line; the table's runs use the warm cache.

Targets (issue 11): wall time <= 1/2 of the pipeline's, peak RSS <= 1/3 of it.

    python bench/bench_kquants.py                    # 0.6B shape, 1 repeat
    python bench/bench_kquants.py --layers 2 --case q4_k_m   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from make_checkpoint import WORK, make_checkpoint, shape_args, shape_from
from measure import Measurement, format_table, run_measured, settle, warm
from peer import choose_gguf, ensure_deps, fetch_peer, peer_command, peer_env

TIME_TARGET, RSS_TARGET = 1 / 2, 1 / 3
CASES = {"q4_k_m": (["q4_k_m"], False), "q6_k": (["q6_k"], False),
         "q4_k_m+imatrix": (["q4_k_m"], True)}
MULTI = ["q4_k_m", "q6_k", "q8_0"]
BENCH = Path(__file__).resolve().parent


def ours(ckpt_dir: Path, outtypes: list[str], imatrix: Path | None, log: Path,
         env: dict[str, str] | None = None) -> Measurement:
    out = WORK / "out-ours"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "mmconvert", "to-gguf", str(ckpt_dir), "-o", str(out), "-q"]
    for t in outtypes:
        cmd += ["--outtype", t]
    if imatrix:
        cmd += ["--imatrix", str(imatrix)]
    settle()
    warm(ckpt_dir)
    m = run_measured(cmd, env=env, log=log)
    shutil.rmtree(out, ignore_errors=True)
    check(m, log)
    return m


def peer_convert(peer_dir: Path, gguf: str, hf_dir: Path, f16: Path, log: Path) -> Measurement:
    f16.unlink(missing_ok=True)
    settle()
    warm(hf_dir)
    m = run_measured(peer_command(peer_dir, hf_dir, "f16", f16), env=peer_env(gguf), log=log)
    check(m, log)
    return m


def peer_quantize(f16: Path, mixture: str, imatrix: Path | None, log: Path) -> Measurement:
    dst = WORK / f"peer-{mixture}.gguf"
    cmd = [sys.executable, str(BENCH / "peer_quantize.py"), str(f16), str(dst), mixture,
           "--threads", "2"]
    if imatrix:
        cmd += ["--imatrix", str(imatrix)]
    settle()
    warm(f16)
    m = run_measured(cmd, log=log)
    dst.unlink(missing_ok=True)
    check(m, log)
    return m


def check(m: Measurement, log: Path) -> None:
    if m.returncode != 0:
        raise SystemExit(f"a run failed (rc {m.returncode}); see {log}")


def synthetic_imatrix(f16: Path, dst: Path) -> Path:
    """An imatrix GGUF for every 2-D layer weight of ``f16`` (positive sums, 512 tokens)."""
    import gguf

    from mmconvert.formats.imatrix import stats_imatrix, write_imatrix_gguf

    rng = np.random.default_rng(0)
    sums, counts = {}, {}
    for t in gguf.GGUFReader(f16).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            n_per_row = int(t.shape[0])  # ggml order: ne0 is the row length
            sums[t.name] = rng.uniform(0.2, 5.0, (1, n_per_row)) * 512
            counts[t.name] = np.array([512])
    write_imatrix_gguf(dst, stats_imatrix(sums, counts, ["synthetic"], 1, 512))
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=[*CASES, "multi"],
                        help="what to measure (repeatable) [all]")
    parser.add_argument("--repeat", type=int, default=1, help="runs per case [1]")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the runs here")
    shape_args(parser)
    args = parser.parse_args(argv)
    cases = args.case or [*CASES, "multi"]

    ckpt = make_checkpoint(shape_from(args))
    peer_dir = fetch_peer()
    ensure_deps()
    gguf, where = choose_gguf(peer_dir, "auto")
    logs = WORK / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"input: {ckpt.mm} ({ckpt.lm_bytes() / 1e9:.2f} GB of LM weights); peer: {peer_dir} "
          f"with {where}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as cold:  # numba compiles every kernel once here
        m = ours(ckpt.mm, ["q4_k_m", "q6_k"], None, logs / "ours-cold.log",
                 env={**os.environ, "NUMBA_CACHE_DIR": cold})
    print(f"first run, empty JIT cache (Q4_K_M + Q6_K): {m.wall_s:.1f} s, {m.cpu_s:.1f} CPU s",
          file=sys.stderr)
    ours(ckpt.mm, MULTI, None, logs / "ours-warm.log")  # fills the real cache, untimed

    f16 = WORK / "peer-F16.gguf"
    imatrix = None
    rows, runs = [], {"cold_first_run_s": m.wall_s}
    for case in cases:
        best: dict[str, list[float]] = {}
        for k in range(args.repeat):
            if case == "multi":
                one = ours(ckpt.mm, MULTI, None, logs / "ours-multi.log")
                each = [ours(ckpt.mm, [t], None, logs / f"ours-{t}.log") for t in MULTI]
                sample = {"one": one.wall_s, "each": sum(e.wall_s for e in each),
                          "one_mb": one.peak_rss_mb, "each_mb": max(e.peak_rss_mb for e in each)}
            else:
                outtypes, use_imatrix = CASES[case]
                conv = peer_convert(peer_dir, gguf, ckpt.hf, f16, logs / "peer-f16.log")
                if use_imatrix and imatrix is None:
                    imatrix = synthetic_imatrix(f16, WORK / "synthetic-imatrix.gguf")
                quant = peer_quantize(f16, outtypes[0], imatrix if use_imatrix else None,
                                      logs / f"peer-{case}.log")
                mine = ours(ckpt.mm, outtypes, imatrix if use_imatrix else None,
                            logs / f"ours-{case}.log")
                sample = {"ours": mine.wall_s, "peer": conv.wall_s + quant.wall_s,
                          "peer_convert": conv.wall_s, "peer_quantize": quant.wall_s,
                          "ours_mb": mine.peak_rss_mb,
                          "peer_mb": max(conv.peak_rss_mb, quant.peak_rss_mb)}
            print(f"  {case} #{k + 1}: {json.dumps({a: round(b, 1) for a, b in sample.items()})}",
                  file=sys.stderr)
            for key, value in sample.items():
                best.setdefault(key, []).append(value)
        runs[case] = best
        b = {key: min(v) if not key.endswith("_mb") else float(np.median(v))
             for key, v in best.items()}
        if case == "multi":
            rows.append([f"{'+'.join(MULTI)}: one run vs one per mixture", f"{b['one']:.1f}",
                         f"{b['each']:.1f}", f"{b['one'] / b['each']:.2f}", f"{b['one_mb']:.0f}",
                         f"{b['each_mb']:.0f}", ""])
        else:
            t, r = b["ours"] / b["peer"], b["ours_mb"] / b["peer_mb"]
            rows.append([case.upper(), f"{b['ours']:.1f}",
                         f"{b['peer']:.1f} ({b['peer_convert']:.1f} + {b['peer_quantize']:.1f})",
                         f"{t:.2f} (≤{TIME_TARGET:.2f} {'met' if t <= TIME_TARGET else 'NOT met'})",
                         f"{b['ours_mb']:.0f}", f"{b['peer_mb']:.0f}",
                         f"{r:.2f} (≤{RSS_TARGET:.2f} {'met' if r <= RSS_TARGET else 'NOT met'})"])
    f16.unlink(missing_ok=True)
    print(format_table(["case", "ours s", "peer s (convert + quantize)", "time ratio",
                        "ours MB", "peer MB", "RSS ratio"], rows))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
