"""Issue 9 "Done means": a seeded, bounded fuzzer over the files a checkpoint is read from.

Each case mutates one file of a small generated, sharded checkpoint (a safetensors header,
config.json, tokenizer_config.json, generation_config.json or the index): type swaps,
deletions, huge / negative / NaN numbers, deep nesting, truncation, byte flips, unicode and
``../`` in names. Every case runs ``mmconvert inspect`` in-process (click's CliRunner, a
per-case alarm bounds hangs and a memory limit bounds growth); a smaller seeded sample runs
as a real subprocess through the harness. A case fails on a traceback (any exception other
than ``SystemExit`` 0/2 escaping), any other exit code, a hang, an ``error:`` line over 200
characters, or an exit 2 without exactly one ``error:`` line. All failures are collected and
reported together, deduplicated by exception and the innermost line of ours it came from.

The default run takes well under a minute; ``-m slow`` runs ten times as many cases.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import resource
import shutil
import signal
import struct
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from mmconvert.cli import main

from .harness import REPO, run_cli

CASES, SLOW_CASES = 300, 3000
SUBPROCESS_CASES, SLOW_SUBPROCESS_CASES = 6, 60
CASE_SECONDS = 10  # one inspect of the tiny checkpoint takes tens of milliseconds
MEMORY_HEADROOM = 4 << 30  # address space a case may add before MemoryError
MAX_ERROR_LINE = 200
DEEP = "\x00DEEP\x00"  # placeholder replaced by deeply nested JSON text

TARGETS = ("config.json", "tokenizer_config.json", "generation_config.json",
           "model.safetensors.index.json", "header")
ODD_VALUES: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -2**63, 10**30, 1e308, -1e308, 64.7,
    -0.5, math.nan, math.inf, -math.inf, "", "x", "64", "1e9", "../../outside/x.safetensors",
    "/etc/passwd", "\u202e\u0000é🙂", "x" * 5000, [], [1], [[1, 2]], ["a", None], {},
    {"a": 1}, {"content": None},
)
ODD_NAMES = ("../{}", "../../outside/{}", "/abs/{}", "{}\u0000", "{}/../..", "\u202e{}🙂", "",
             "{}" + "x" * 4000, "ü{}", " {} ", ".")
ODD_FILES = ("../../outside/x.safetensors", "/etc/passwd", "", ".", "..", "config.json",
             "tokenizer.json", "sub/model.safetensors", "model.safetensors\u0000", "ünï.safetensors",
             "missing.safetensors")
COUNT_KEYS = frozenset({"num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                        "hidden_size", "intermediate_size", "vocab_size", "head_dim",
                        "max_position_embeddings", "num_experts", "num_experts_per_tok",
                        "moe_intermediate_size", "input_dim", "hidden_dim", "total_size"})
HUGE_NUMBERS = (2**63, 2**64, 10**30, 1e308, -1, -2**63, 0, math.nan, math.inf, 64.7, -0.0,
                1e9, 2**31 - 1)


@dataclass
class Case:
    index: int
    target: str  # file name (or "header": a safetensors shard's header)
    description: str
    data: bytes


@dataclass
class Failure:
    case: Case
    kind: str  # traceback | exit code | hang | long error line | error lines
    detail: str
    where: str  # innermost file:line of ours, for routing

    def key(self) -> tuple[str, str]:
        exception = self.detail.split(":")[0] if self.kind == "traceback" else ""
        return (f"{self.kind} {exception}", self.where)


# ---------------------------------------------------------------------------------------
# mutations


def _nodes(doc: Any, limit: int = 5000) -> list[tuple[Any, Any]]:
    """(container, key) for every value in ``doc`` (breadth first, at most ``limit``)."""
    found, queue = [], [doc]
    while queue and len(found) < limit:
        node = queue.pop(0)
        items = node.items() if isinstance(node, dict) else enumerate(node) \
            if isinstance(node, list) else ()
        for key, value in items:
            found.append((node, key))
            if isinstance(value, (dict, list)):
                queue.append(value)
    return found


def _dump(doc: Any, rng: random.Random) -> str:
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5)  # NaN/Infinity written as such
    depth = rng.choice((100, 1000, 20_000, 200_000))
    return text.replace(json.dumps(DEEP), "[" * depth + "]" * depth)


def mutate_json(rng: random.Random, doc: Any, name_values: tuple[str, ...] = ()
                ) -> tuple[Any, str, Callable[[str], str] | None]:
    """Mutate ``doc`` in place; returns (doc, description, a text-level edit or None)."""
    nodes = _nodes(doc)
    kind = rng.choice(("swap", "swap", "delete", "number", "number", "count", "nest", "rename",
                       "truncate", "flip", "file"))
    if not nodes or kind in ("truncate", "flip"):
        if kind == "flip" or not nodes:
            flips = [(rng.random(), rng.choice('{}[]":,\\0x\x00é')) for _ in range(rng.randint(1, 4))]

            def flip(text: str) -> str:
                chars = list(text)
                for where, char in flips:
                    chars[int(where * len(chars))] = char
                return "".join(chars)

            return doc, f"flip {len(flips)} characters", flip
        cut = rng.random()
        return doc, f"truncate at {cut:.0%}", lambda text: text[:int(cut * len(text))]
    container, key = rng.choice(nodes)
    where = f"[{key!r}]"
    if kind == "count":  # the sizes everything is allocated from (issue 9 item 6)
        counts = [(c, k) for c, k in nodes if k in COUNT_KEYS]
        if counts:
            container, key = rng.choice(counts)
            value = rng.choice((10**9, 2**63, 2**31, 2**64, -1, 0, 1e9, 7.5))
            container[key] = value
            return doc, f"count [{key!r}] = {value!r}", None
        kind = "number"
    if kind == "number":
        numeric = [(c, k) for c, k in nodes if isinstance(c[k], (int, float))
                   and not isinstance(c[k], bool)]
        container, key = rng.choice(numeric or nodes)
        value = rng.choice(HUGE_NUMBERS)
        container[key] = value
        return doc, f"number [{key!r}] = {value!r}", None
    if kind == "swap":
        value = rng.choice(ODD_VALUES)
        container[key] = value
        return doc, f"swap {where} = {_short(value)}", None
    if kind == "delete":
        del container[key]
        return doc, f"delete {where}", None
    if kind == "nest":
        container[key] = DEEP
        return doc, f"deep nesting at {where}", None
    if kind == "file" and name_values:
        strings = [(c, k) for c, k in nodes if isinstance(c[k], str)]
        if strings:
            container, key = rng.choice(strings)
            value = rng.choice(ODD_FILES)
            container[key] = value
            return doc, f"file name [{key!r}] = {value!r}", None
    dicts = [(c, k) for c, k in nodes if isinstance(c, dict)]
    if not dicts:
        return doc, "unchanged", None
    container, key = rng.choice(dicts)
    new = rng.choice(ODD_NAMES).format(key)
    container[new] = container.pop(key)
    return doc, f"rename [{key!r}] -> {_short(new)}", None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def mutate_header(rng: random.Random, blob: bytes) -> tuple[bytes, str]:
    """A mutated safetensors file: its header JSON, its length prefix, bytes or length."""
    (size,) = struct.unpack("<Q", blob[:8])
    header, data = blob[8:8 + size], blob[8 + size:]
    kind = rng.choice(("json", "json", "json", "json", "prefix", "flip", "truncate", "trailing"))
    if kind == "prefix":
        new = rng.choice((0, 1, 2, size - 1, size + 1, len(blob), 100_000_001, 2**63, 2**64 - 1))
        return struct.pack("<Q", new) + blob[8:], f"header length {size} -> {new}"
    if kind == "flip":
        edited = bytearray(header)
        positions = [rng.randrange(len(edited)) for _ in range(rng.randint(1, 4))]
        for pos in positions:
            edited[pos] = rng.randrange(256)
        return blob[:8] + bytes(edited) + data, f"flip header bytes at {positions}"
    if kind == "truncate":
        cut = rng.randrange(len(blob))
        return blob[:cut], f"truncate file at byte {cut} of {len(blob)}"
    if kind == "trailing":
        return blob + b"\x00" * rng.choice((1, 7, 64)), "trailing bytes after the data"
    doc, description, edit = mutate_json(rng, json.loads(header))
    text = _dump(doc, rng)
    text = edit(text) if edit else text
    raw = text.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(raw)) + raw + data, f"header: {description}"


def generate_cases(ckpt: Path, seed: int, count: int) -> Iterator[Case]:
    rng = random.Random(seed)
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    for index in range(count):
        target = TARGETS[index % len(TARGETS)] if index < len(TARGETS) else rng.choice(TARGETS)
        if target == "header":
            shard = rng.choice(shards)
            data, description = mutate_header(rng, (ckpt / shard).read_bytes())
            yield Case(index, shard, description, data)
            continue
        doc = json.loads((ckpt / target).read_text(encoding="utf-8"))
        doc, description, edit = mutate_json(rng, doc, name_values=tuple(shards))
        text = _dump(doc, rng)
        text = edit(text) if edit else text
        yield Case(index, target, description, text.encode("utf-8", "surrogatepass"))


# ---------------------------------------------------------------------------------------
# running a case


class _Hang(BaseException):
    """Raised by the per-case alarm (a BaseException, so no ``except Exception`` hides it)."""


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    def ring(signum, frame):
        raise _Hang()

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _memory_limit(headroom: int) -> Iterator[None]:
    """Cap the address space at what the process uses now plus ``headroom``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = used + headroom if hard == resource.RLIM_INFINITY else min(hard, used + headroom)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _ours(exc: BaseException) -> str:
    """Innermost traceback frame inside the repository (not tests), as path:line."""
    where = "?"
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename)
        if REPO in path.parents and "tests" not in path.relative_to(REPO).parts:
            where = f"{path.relative_to(REPO)}:{frame.lineno}"
    return where


def _check_output(case: Case, code: int, stderr: str, where: str) -> list[Failure]:
    failures = []
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    if code not in (0, 2):
        failures.append(Failure(case, "exit code", f"{code}: {stderr.strip()[-300:]}", where))
    if "Traceback" in stderr:
        failures.append(Failure(case, "traceback", stderr.strip().splitlines()[-1], where))
    if code == 2 and len(errors) != 1:
        failures.append(Failure(case, "error lines", f"{len(errors)}: {stderr[:300]}", where))
    for line in errors:
        if len(line) > MAX_ERROR_LINE:
            failures.append(Failure(case, "long error line", f"{len(line)} chars: {line[:160]}",
                                    where))
    return failures


def run_in_process(ckpt: Path, case: Case, cli: click.Command = main) -> list[Failure]:
    runner = CliRunner()
    try:
        with _alarm(CASE_SECONDS):
            result = runner.invoke(cli, ["inspect", str(ckpt)], catch_exceptions=True)
    except _Hang as exc:
        return [Failure(case, "hang", f"over {CASE_SECONDS} s", _ours(exc))]
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        if isinstance(exc, _Hang):
            return [Failure(case, "hang", f"over {CASE_SECONDS} s", _ours(exc))]
        detail = f"{type(exc).__name__}: {str(exc)[:200]}"
        return [Failure(case, "traceback", detail, _ours(exc))]
    # an exit 2 is raised inside ``except MMConvertError``: the error is its context
    cause = exc.__context__ if exc is not None else None
    return _check_output(case, result.exit_code, result.stderr,
                         _ours(cause) if cause is not None else "?")


def run_subprocess(ckpt: Path, case: Case) -> list[Failure]:
    try:
        result = run_cli("inspect", ckpt, timeout=60)
    except AssertionError as exc:  # the harness's hang report
        return [Failure(case, "hang", str(exc), "?")]
    where = "?"
    for line in result.stderr.splitlines():  # the last frame of ours in a printed traceback
        if line.strip().startswith('File "') and str(REPO) in line and "/tests/" not in line:
            path, _, rest = line.strip()[6:].partition('", line ')
            where = f"{Path(path).relative_to(REPO)}:{rest.split(',')[0]}"
    return _check_output(case, result.returncode, result.stderr, where)


def fuzz(ckpt_template: Path, work: Path, seed: int, count: int,
         runner: Callable[[Path, Case], list[Failure]]) -> list[Failure]:
    ckpt = work / "ck"
    shutil.copytree(ckpt_template, ckpt)
    pristine = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    failures: list[Failure] = []
    for case in generate_cases(ckpt, seed, count):
        path = ckpt / case.target
        path.write_bytes(case.data)
        try:
            failures += runner(ckpt, case)
        finally:
            for name in {p.name for p in ckpt.iterdir()} - set(pristine):
                (ckpt / name).unlink()  # nothing should appear; keep the next case clean
            path.write_bytes(pristine[case.target])
    return failures


def report(failures: list[Failure]) -> str:
    distinct: dict[tuple[str, str], list[Failure]] = {}
    for failure in failures:
        distinct.setdefault(failure.key(), []).append(failure)
    lines = [f"{len(failures)} failing cases, {len(distinct)} distinct:"]
    for (_kind, where), group in sorted(distinct.items(), key=lambda kv: kv[0][1]):
        first = group[0]
        lines.append(f"- {first.kind} at {where} ({len(group)}x): {first.detail}\n"
                     f"    e.g. case {first.case.index}: {first.case.target}: "
                     f"{first.case.description}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def fuzz_ckpt(make_checkpoint) -> Path:
    """A small checkpoint in two shards (so there is an index to mutate)."""
    return make_checkpoint(shards=2)


def test_generator_is_seeded_and_covers_every_target(fuzz_ckpt):
    first = [(c.target, c.description, c.data) for c in generate_cases(fuzz_ckpt, 1, 40)]
    again = [(c.target, c.description, c.data) for c in generate_cases(fuzz_ckpt, 1, 40)]
    assert first == again
    targets = {t if t.endswith(".json") else "header" for t, _, _ in first}
    assert targets == set(TARGETS)


def test_runner_reports_each_kind_of_failure(tmp_path, monkeypatch):
    """The checks can fail: a stand-in ``inspect`` that crashes, hangs, exits 3 or prints a
    long error line is reported as such (and a clean refusal is not)."""
    monkeypatch.setattr(sys.modules[__name__], "CASE_SECONDS", 0.3)
    behaviours = {
        "crash": lambda: {}["missing"],
        "hang": lambda: next(x for x in iter(int, 1) if x),  # CPU-bound, no memory
        "exit 3": lambda: sys.exit(3),
        "long line": lambda: (click.echo("error: " + "x" * 300, err=True), sys.exit(2)),
        "two errors": lambda: (click.echo("error: a\nerror: b", err=True), sys.exit(2)),
        "clean": lambda: (click.echo("error: short", err=True), sys.exit(2)),
    }
    expected = {"crash": "traceback", "hang": "hang", "exit 3": "exit code",
                "long line": "long error line", "two errors": "error lines"}
    for name, behave in behaviours.items():
        @click.group()
        def cli():
            pass

        @cli.command("inspect")
        @click.argument("ckpt")
        def inspect(ckpt, behave=behave):
            behave()

        found = run_in_process(tmp_path, Case(0, "config.json", name, b""), cli)
        assert [f.kind for f in found] == ([expected[name]] if name in expected else []), name


def test_fuzz_inspect(fuzz_ckpt, tmp_path):
    with _memory_limit(MEMORY_HEADROOM):
        failures = fuzz(fuzz_ckpt, tmp_path, seed=9, count=CASES, runner=run_in_process)
    assert not failures, report(failures)


def test_fuzz_inspect_subprocess_sample(fuzz_ckpt, tmp_path):
    failures = fuzz(fuzz_ckpt, tmp_path, seed=90, count=SUBPROCESS_CASES, runner=run_subprocess)
    assert not failures, report(failures)


@pytest.mark.slow
def test_fuzz_inspect_long(fuzz_ckpt, tmp_path):
    with _memory_limit(MEMORY_HEADROOM):
        failures = fuzz(fuzz_ckpt, tmp_path, seed=99, count=SLOW_CASES, runner=run_in_process)
    assert not failures, report(failures)


@pytest.mark.slow
def test_fuzz_inspect_subprocess_long(fuzz_ckpt, tmp_path):
    failures = fuzz(fuzz_ckpt, tmp_path, seed=990, count=SLOW_SUBPROCESS_CASES,
                    runner=run_subprocess)
    assert not failures, report(failures)
