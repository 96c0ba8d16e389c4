"""Where an ``mmconvert`` command spends its time and memory.

    python bench/profile_run.py cpu -- to-gguf CKPT -o OUT --outtype q8_0
    python bench/profile_run.py mem -- to-gguf CKPT -o OUT --outtype f16

``cpu``: samples the command with py-spy (``--idle --threads``, installed from PyPI into
``bench/_work/tools`` on first use) and prints the main thread's wall-clock time by mmconvert
call path (the phases), then the busiest leaf functions over the worker threads.

``mem``: runs the command in-process with ``tracemalloc`` (numpy reports its buffers to it) and
a thread that snapshots the allocations whenever the traced total reaches a new high; prints
the peak and the allocation sites alive at that moment. Much slower than a real run; sizes
are what matters. The output folder is removed afterwards in both modes.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import threading
import tracemalloc
from collections import Counter
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work"
OURS = ("convert/", "formats/", "verify/", "mmconvert/")  # as py-spy prints our files


def py_spy() -> list[str]:
    exe = WORK / "tools" / "bin" / "py-spy"
    if not exe.exists() and shutil.which("py-spy") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target",
                        str(WORK / "tools"), "py-spy"], check=True)
    return [str(exe)] if exe.exists() else ["py-spy"]


def cpu(args: list[str], rate: int, top: int) -> None:
    raw = WORK / "profile.raw"
    subprocess.run([*py_spy(), "record", "-r", str(rate), "-f", "raw", "-o", str(raw),
                    "--threads", "--idle", "--", sys.executable, "-m", "mmconvert", *args],
                   check=True)
    main: Counter[str] = Counter()
    workers: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        ours = [f.split(" (")[0] + ":" + f.rsplit(":", 1)[-1].rstrip(")")
                for f in frames if any(s in f for s in OURS)]
        leaf = frames[-1] if not any(s in frames[-1] for s in OURS) else ""
        if len(frames) > 1 and frames[1].startswith("_run_module_as_main"):  # the main thread
            main[" > ".join([*ours[-2:], leaf[:60]][-3:]).strip(" >")] += int(count)
        else:
            workers[frames[-1][:110]] += int(count)
    print(f"main thread, wall clock: {sum(main.values()) / rate:.2f} s")
    for key, n in main.most_common(top):
        print(f"  {n / rate:6.2f} s  {key}")
    print(f"worker threads, incl. idle: {sum(workers.values()) / rate:.2f} thread-s")
    for key, n in workers.most_common(top):
        print(f"  {n / rate:6.2f} s  {key}")


def mem(args: list[str], top: int) -> None:
    from mmconvert.cli import main as cli

    tracemalloc.start(12)
    best: dict = {"peak": 0, "snap": None}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            current, _ = tracemalloc.get_traced_memory()
            if current > best["peak"] * 1.05:
                best["peak"], best["snap"] = current, tracemalloc.take_snapshot()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        cli.main(args, standalone_mode=False)
    finally:
        stop.set()
        thread.join()
        _, peak = tracemalloc.get_traced_memory()
    print(f"traced peak: {peak / 1e6:.0f} MB; largest snapshot: {best['peak'] / 1e6:.0f} MB")
    if best["snap"] is not None:
        for stat in best["snap"].statistics("traceback")[:top]:
            frames = [f for f in stat.traceback if any(s in f.filename for s in OURS)]
            # oldest frame first: the last ones are where the block was allocated
            where = " > ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:])
            print(f"  {stat.size / 1e6:7.1f} MB  {stat.count:6d} blocks  {where or stat.traceback[0]}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["cpu", "mem"])
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second [100]")
    parser.add_argument("--top", type=int, default=15, help="rows to print [15]")
    parser.usage = "%(prog)s {cpu,mem} [--rate N] [--top N] -- MMCONVERT-ARGS..."
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        parser.error("give the mmconvert command after --")
    out = next((Path(command[i + 1]) for i, a in enumerate(command[:-1]) if a in ("-o", "--out")),
               None)
    if importlib.util.find_spec("mmconvert") is None:
        raise SystemExit("mmconvert is not installed (pip install -e .)")
    try:
        cpu(command, args.rate, args.top) if args.mode == "cpu" else mem(command, args.top)
    finally:
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
