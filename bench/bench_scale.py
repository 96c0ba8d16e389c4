"""Conversion at real sizes: wall time and peak RSS per shape and target, mmconvert beside
llama.cpp's ``convert_hf_to_gguf.py`` in the same run.

Shapes: ``0.6b`` (``bench/make_checkpoint.py``: the seed layout for mmconvert, a plain Qwen3
folder with the same bytes for the peer), ``8b``, ``14b`` and ``30b-a3b`` (cut to
``--moe-layers``; ``bench/make_big_checkpoint.py``: one plain Qwen3 folder both read, plus the
seed's projectors for mmconvert). Targets: ``to-gguf`` per outtype (f16, q8_0, and q4_k_m once
``formats.quants.TYPES`` has Q4_K: until then that column says so), ``to-hf``,
``to-safetensors``; the peer only converts to GGUF (f16, q8_0: it has no Q4_K_M).

Every run is a fresh child process with default settings (sha256 of sources and outputs in
the manifest) and a cold hash cache (``MMCONVERT_NO_HASH_CACHE=1``); its output is deleted
after it. Peak RSS is the largest ``VmHWM`` of the child's tree or the sampled sum of its RSS,
whichever is larger (``bench/measure.py``). A watchdog kills a run whose anonymous memory
passes ``--mem-limit-gb`` (default: 20 GB or 85 % of RAM, the smaller), so the machine never
runs out of memory; the cell then says "killed at N GB". A run is skipped, and says so, when
the disk lacks room for its output. Sources smaller than 40 % of RAM are read once before each
run (both tools start from a warm page cache); larger ones are not (no tool gets them cached).

verify: the output of ``--verify-target`` (default ``gguf-q8_0``) is kept after its conversion
and verified (``bench/verify_stages.py``: ``--verify-cases`` built-in cases, the llama.cpp
backend, in a guarded child process like the conversions); the main table's verify column
gives its verdict, wall time and peak RSS, and a second table its time, peak RSS and peak
anonymous memory per stage (the reference, the dequantized reference, each target), as verify
reports them (RSS also counts mapped GGUF pages, page cache; see docs/verification.md).

    python bench/bench_scale.py --shapes 0.6b,8b
    python bench/bench_scale.py --shapes 14b --targets gguf-q8_0 --remove-after
    python bench/bench_scale.py --shapes 30b-a3b --moe-layers 4 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_big_checkpoint import (  # noqa: E402
    DEFAULT_OUT,
    make_big_checkpoint,
    shape_for,
)
from make_checkpoint import Shape, make_checkpoint  # noqa: E402
from measure import _TreeSampler, format_table, settle, warm  # noqa: E402
from peer import choose_gguf, ensure_deps, fetch_peer, peer_command, peer_env  # noqa: E402

TARGETS = ["gguf-f16", "gguf-q8_0", "gguf-q4_k_m", "hf", "safetensors"]
PEER_OUTTYPES = {"gguf-f16": "f16", "gguf-q8_0": "q8_0"}
OUTPUT_FACTOR = {"gguf-f16": 1.0, "gguf-q8_0": 0.54, "gguf-q4_k_m": 0.32, "hf": 1.0,
                 "safetensors": 1.0}  # output bytes per source byte (bf16 source)
RSS_TARGET_MB = 1500  # issue 12: peak RSS under 1.5 GB for every shape


@dataclass
class Source:
    label: str
    ours: list[str]  # mmconvert's input arguments
    peer: Path | None  # the plain Qwen3 folder for llama.cpp's converter
    nbytes: int  # weight bytes
    root: Path | None  # what --remove-after deletes (None: the cached 0.6B pair stays)
    generated_s: float | None


@dataclass
class Run:
    rc: int | None  # None: not run
    wall_s: float = 0.0
    peak_mb: float = 0.0
    anon_mb: float = 0.0
    note: str = ""


def has_q4_k() -> bool:
    """Q4_K_M is convertible once the kernel is registered and the outtype named."""
    from mmconvert.formats import gguf_constants, quants

    return "Q4_K" in quants.TYPES and "q4_k_m" in gguf_constants.OUTTYPES


def run_guarded(cmd: list[str], env: dict[str, str], log: Path, limit: int,
                poll: float = 0.05) -> Run:
    """Run ``cmd``; kill its process group when its anonymous memory passes ``limit``."""
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sampler = _TreeSampler(proc.pid, poll)
        sampler.start()
        killed = 0
        while proc.poll() is None:
            if sampler.anon > limit:
                killed = sampler.anon
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(poll)
        wall = time.perf_counter() - start
        sampler.stop.set()
        sampler.join()
    peak = max(sampler.peak, sampler.rss) / 1e6
    note = f"killed at {killed / 1e9:.1f} GB anon" if killed else ""
    return Run(proc.returncode, wall, peak, sampler.anon / 1e6, note)


def last_error(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errs = [ln for ln in lines if "rror" in ln] or lines[-1:]
    return errs[-1].strip()[:70] if errs else "no output"


def ours_command(src: Source, target: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "mmconvert"]
    if target.startswith("gguf-"):
        return [*cmd, "to-gguf", *src.ours, "-o", str(out), "--outtype", target[5:], "-q"]
    return [*cmd, f"to-{target}", *src.ours, "-o", str(out), "-q"]


def measure(src: Source, target: str, tool: str, work: Path, peer: tuple[Path, str] | None,
            limit: int, logs: Path, keep: Path | None = None) -> Run:
    """One conversion; ``keep``: move its output there instead of deleting it."""
    if tool == "peer" and (target not in PEER_OUTTYPES or src.peer is None):
        return Run(None, note="n/a")
    if tool == "ours" and target == "gguf-q4_k_m" and not has_q4_k():
        return Run(None, note="no Q4_K yet")
    need = int(src.nbytes * OUTPUT_FACTOR[target]) + (3 << 30)
    free = shutil.disk_usage(work).free
    if need > free:
        return Run(None, note=f"skipped: disk ({free / 1e9:.0f} GB free)")
    out = work / f"scale-out-{tool}"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, MMCONVERT_NO_HASH_CACHE="1")
    if tool == "ours":
        cmd = ours_command(src, target, out)
    else:
        assert peer is not None and src.peer is not None
        out.mkdir()
        cmd = peer_command(peer[0], src.peer, PEER_OUTTYPES[target], out / "peer.gguf")
        env = peer_env(peer[1])
    settle()
    if src.nbytes < 0.4 * psutil.virtual_memory().total:
        warm(src.peer if tool == "peer" and src.peer else Path(src.ours[0]))
    log = logs / f"{src.label}-{target}-{tool}.log"
    r = run_guarded(cmd, env, log, limit)
    if keep is not None and r.rc == 0:
        shutil.rmtree(keep, ignore_errors=True)
        out.rename(keep)
    shutil.rmtree(out, ignore_errors=True)
    settle()
    if r.rc not in (0, None) and not r.note:
        r.note = f"failed: {last_error(log)}"
    return r


def sources(shapes: list[str], moe_layers: int | None, out: Path) -> list[Source]:
    found = []
    for name in shapes:
        if name == "0.6b":
            ckpt = make_checkpoint(Shape())
            found.append(Source("Qwen3-0.6B", [str(ckpt.mm)], ckpt.hf, ckpt.lm_bytes(), None,
                                None))
            continue
        s = shape_for(name, moe_layers if name == "30b-a3b" else None, out=out)
        start = time.perf_counter()
        big = make_big_checkpoint(s, out)
        took = json.loads((big.root / "params.json").read_text()).get("seconds") \
            if time.perf_counter() - start < 1 else time.perf_counter() - start
        found.append(Source(s.label(), big.mmconvert_args(), big.hf, big.weight_bytes(),
                            big.root, took))
    return found


@dataclass
class Verified:
    run: Run
    passed: bool | None = None
    stages: list[dict] | None = None

    def cell(self) -> str:
        if self.run.rc is None or self.stages is None:
            return self.run.note or f"rc {self.run.rc}"
        verdict = "PASS" if self.passed else "FAIL"
        return f"{verdict}, {self.run.wall_s:.0f} s, {self.run.peak_mb / 1e3:.1f} GB"


def verify_output(src: Source, bundle: Path, cases: int, limit: int, logs: Path) -> Verified:
    """verify ``bundle`` against ``src`` in a guarded child; its stages from the JSON."""
    report = logs / f"{src.label}-verify.json"
    report.unlink(missing_ok=True)
    ckpt, *read = src.ours  # [folder] or [folder, "--projector", file]
    cmd = [sys.executable, str(Path(__file__).with_name("verify_stages.py")), ckpt,
           str(bundle), *read, "--cases", str(cases), "--greedy-tokens", "2",
           "--backend", "gguf_llama", "--json", str(report)]
    # verify plans its weights in RAM under the watchdog's limit, less room for the rest
    env = dict(os.environ, MMCONVERT_VERIFY_MEMORY_BUDGET=str(max(limit - (4 << 30), 1 << 30)))
    settle()
    r = run_guarded(cmd, env, logs / f"{src.label}-verify.log", limit)
    if not report.is_file():
        r.note = r.note or f"failed: {last_error(logs / f'{src.label}-verify.log')}"
        return Verified(r)
    doc = json.loads(report.read_text())
    return Verified(r, doc["passed"], doc["stages"])


def cell(r: Run) -> str:
    if r.rc is None or r.rc != 0:
        return r.note or f"rc {r.rc}"
    flag = "" if r.peak_mb < RSS_TARGET_MB else " (!)"
    return f"{r.wall_s:.1f} s, {r.peak_mb:.0f} MB{flag}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="0.6b,8b",
                        help="comma-separated: 0.6b, 8b, 14b, 30b-a3b [0.6b,8b]")
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma-separated: {', '.join(TARGETS)} [all]")
    parser.add_argument("--moe-layers", type=int, default=None,
                        help="layers of the 30b-a3b cut [what the disk allows]")
    parser.add_argument("--no-peer", action="store_true", help="mmconvert only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where big checkpoints and outputs go [{DEFAULT_OUT}]")
    parser.add_argument("--mem-limit-gb", type=float, default=None,
                        help="kill a run whose anonymous memory passes this [min(20, 85%% RAM)]")
    parser.add_argument("--remove-after", action="store_true",
                        help="delete each generated big checkpoint once its shape is measured")
    parser.add_argument("--verify-target", default="gguf-q8_0",
                        help="the target whose output verify checks, or none [gguf-q8_0]")
    parser.add_argument("--verify-cases", type=int, default=1,
                        help="built-in cases verify runs (each is a forward per stage) [1]")
    parser.add_argument("--json", type=Path, default=None, help="also write every run here")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.targets.split(",") if t]
    limit = int((args.mem_limit_gb * 1e9) if args.mem_limit_gb else
                min(20e9, 0.85 * psutil.virtual_memory().total))
    peer = None
    if not args.no_peer:
        peer_dir = fetch_peer()
        ensure_deps()
        peer = (peer_dir, choose_gguf(peer_dir)[0])
    logs = args.out / "scale-logs"
    logs.mkdir(exist_ok=True)
    rows, report, stage_rows = [], [], []
    for name in [s for s in args.shapes.split(",") if s]:
        (src,) = sources([name], args.moe_layers, args.out)
        gen = f", generated in {src.generated_s:.0f} s" if src.generated_s else ""
        print(f"{src.label}: {src.nbytes / 1e9:.1f} GB of weights{gen}", file=sys.stderr)
        kept = args.out / "scale-verified-bundle"
        for target in targets:
            keep = kept if target == args.verify_target else None
            runs = {tool: measure(src, target, tool, args.out, peer, limit, logs,
                                  keep if tool == "ours" else None)
                    for tool in ("ours", "peer") if tool == "ours" or peer}
            ours, other = runs["ours"], runs.get("peer", Run(None, note="not run"))
            ratio = (f"{ours.wall_s / other.wall_s:.2f}x" if ours.rc == 0 and other.rc == 0
                     else "")
            checked = None
            if keep is not None and keep.is_dir():
                checked = verify_output(src, keep, args.verify_cases, limit, logs)
                shutil.rmtree(keep, ignore_errors=True)
                stage_rows += [[src.label, st["stage"], f"{st['seconds']:.0f} s",
                                f"{st['peak_rss_bytes'] / 1e9:.1f} GB",
                                f"{st.get('peak_anon_bytes', 0) / 1e9:.1f} GB", st["note"]]
                               for st in checked.stages or []]
            rows.append([src.label, f"{src.nbytes / 1e9:.1f}", target, cell(ours), cell(other),
                         ratio, checked.cell() if checked else ""])
            report.append({"shape": src.label, "source_bytes": src.nbytes, "target": target,
                           "generated_s": src.generated_s,
                           **{f"{tool}_{k}": v for tool, r in runs.items()
                              for k, v in vars(r).items()},
                           **({"verify": {**vars(checked.run), "passed": checked.passed,
                                          "stages": checked.stages}} if checked else {})})
            print(f"  {target:12} mmconvert {cell(ours):28} peer {cell(other)}"
                  + (f"  verify {checked.cell()}" if checked else ""), file=sys.stderr)
        if args.remove_after and src.root is not None:
            shutil.rmtree(src.root, ignore_errors=True)
    print(format_table(["shape", "GB", "target", "mmconvert (wall, peak RSS)",
                        "llama.cpp convert_hf_to_gguf", "time ratio", "verify"], rows))
    if stage_rows:
        print()
        print(format_table(["shape", "verify stage", "wall", "peak RSS", "peak anonymous",
                            "note"], stage_rows))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(r["ours_rc"] in (0, None) and r.get("verify", {}).get("passed") is not False
                    for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())
