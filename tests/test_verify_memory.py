"""verify holds one model at a time, reports each stage's time and peak RSS, and runs a model
larger than its memory budget with the rest left on disk (read in place), same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mmconvert import api
from mmconvert.cli import main
from mmconvert.convert.readers import read_checkpoint
from mmconvert.runtime import llama_lib
from mmconvert.verify import stages
from mmconvert.verify.reference import MEMORY_BUDGET_ENV, ReferenceModel, plan_placement

GiB = 2**30


@pytest.fixture(scope="module")
def bundles(example_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    api.to_gguf(example_ckpt, root / "gguf", outtypes=["f16", "q8_0"], projector_outtype="f16")
    api.to_safetensors(example_ckpt, root / "st")
    return root / "gguf", root / "st"


@pytest.fixture
def events():
    seen: list[tuple[str, str]] = []
    stages.LISTENERS.append(lambda event, label: seen.append((event, label)))
    yield seen
    stages.LISTENERS.pop()


def test_no_two_models_alive_at_once(example_ckpt, bundles, events, tmp_path):
    backends = ["gguf_torch", "safetensors"]
    if llama_lib.unavailable() is None:
        backends.append("gguf_llama")
    result = api.verify(example_ckpt, list(bundles), device="cpu", backends=backends,
                        report_json=tmp_path / "r.json")
    assert result.passed
    alive: list[str] = []
    for event, label in events:
        if event == "load":
            assert not alive, f"{label} loaded while {alive} still in memory: {events}"
            alive.append(label)
        else:
            assert alive == [label], f"{label} freed out of order: {events}"
            alive.pop()
    assert not alive, f"never freed: {alive}"
    loaded = [label for event, label in events if event == "load"]
    # the reference first, the Q8_0 file's dequantized reference before its first target of
    # each input rounding (gguf_torch: none; gguf_llama: llama.cpp's), then every target: 2
    # GGUF files per GGUF backend and the safetensors bundle
    assert loaded[0] == "reference"
    judges = {"gguf_torch": "dequantized ckpt-124K-Q8_0.gguf",
              "gguf_llama": "dequantized ckpt-124K-Q8_0.gguf, llama.cpp input rounding"}
    for backend in (b for b in backends if b in judges):
        at = loaded.index(f"ckpt-124K-Q8_0.gguf [{backend}]")
        assert loaded[at - 1] == judges[backend], loaded
    rounded = "gguf_llama" in backends
    assert sum(label.startswith("dequantized") for label in loaded) == 1 + rounded
    assert len(loaded) == 1 + 1 + rounded + 2 * (len(backends) - 1) + 1
    # one stage per model, each timed and measured, in the report and the JSON
    assert [s.name for s in result.stages] == loaded
    assert all(s.seconds > 0 and s.peak_rss > 50 * 2**20 for s in result.stages)
    # anonymous memory: measured (the interpreter and torch hold 100+ MB of it), never above
    # the RSS, which also counts mapped files
    assert all(100 * 2**20 < s.peak_anon <= s.peak_rss for s in result.stages)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [s["name"] for s in doc["stages"]] == loaded
    assert all(s["peak_rss_bytes"] > 0 and s["peak_anon_bytes"] > 0 for s in doc["stages"])
    from mmconvert.verify.report import terminal_report

    text = terminal_report(result)
    assert "stages (one model in memory at a time):" in text
    assert "stage reference: " in text and "peak RSS" in text


def test_plan_placement_offloads_what_exceeds_the_budget(monkeypatch):
    monkeypatch.setenv(MEMORY_BUDGET_ENV, str(4 * GiB))
    assert plan_placement(3 * GiB, "cpu") == ("cpu", None)
    assert plan_placement(10 * GiB, "cpu") == ("cpu", {"cpu": 4 * GiB})
    assert plan_placement(10 * GiB, "cpu", "never") == ("cpu", None)
    assert plan_placement(3 * GiB, "cpu", "disk") == ("cpu", {"cpu": 3 * GiB // 2})
    # room for reading the largest tensor before its cast comes off the budget
    assert plan_placement(10 * GiB, "cpu", largest_bytes=GiB) == ("cpu", {"cpu": 3 * GiB})
    # several GPUs: spread over them, RAM capped by the budget, the rest on disk
    main, budget = plan_placement(200 * GiB, "cuda", gpu_free=[80 * GiB, 80 * GiB])
    assert main == "cuda:0" and budget[0] == budget[1] == int(0.8 * 80 * GiB)
    assert budget["cpu"] == 4 * GiB
    monkeypatch.setenv(MEMORY_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=MEMORY_BUDGET_ENV):
        plan_placement(3 * GiB, "cpu")


def test_disk_offload_reads_the_source_in_place_and_matches(example_ckpt, monkeypatch,
                                                            tmp_path):
    model = read_checkpoint(example_ckpt)
    ids = list(range(5, 60))
    full = ReferenceModel.placed(model, "cpu", torch.float32, "never")
    want, want_greedy = full.logits(ids), full.greedy(ids, None, 6)
    assert full.offloaded == 0
    del full
    monkeypatch.chdir(tmp_path)  # nothing may be written: no offload folder anywhere
    # a budget of a third of the model: automatic offload, the rest read from the checkpoint
    budget = model.tensors.total_params() * 4 // 3
    monkeypatch.setenv(MEMORY_BUDGET_ENV, str(budget))
    offloaded = ReferenceModel.placed(model, "cpu", torch.float32, "auto")
    assert offloaded.offloaded > 0 and "disk" in offloaded.device_map.values()
    torch.testing.assert_close(offloaded.logits(ids), want, atol=1e-5, rtol=1e-5)
    assert offloaded.greedy(ids, None, 6) == want_greedy
    assert list(tmp_path.iterdir()) == []


def test_forced_offload_gives_the_same_verdicts(example_ckpt, bundles, tmp_path):
    """--offload disk: the reference and each torch backend run with their last layers on
    disk (the GGUF dequantised per forward); the numbers stay those of the in-memory run."""
    gguf, st = bundles
    runs = {}
    for offload in ("never", "disk"):
        out = tmp_path / f"{offload}.json"
        result = CliRunner().invoke(main, [
            "verify", str(example_ckpt), str(gguf), str(st), "--device", "cpu", "-q",
            "--backend", "gguf_torch", "--backend", "safetensors", "--offload", offload,
            "--report-json", str(out)])
        assert result.exit_code == 0, result.output
        runs[offload] = json.loads(out.read_text())
    notes = [s["note"] for s in runs["disk"]["stages"]]
    assert all("disk" in n for n in notes), notes
    assert not any(s["note"] for s in runs["never"]["stages"])
    for a, b in zip(runs["never"]["targets"], runs["disk"]["targets"], strict=True):
        assert a["status"] == b["status"] == "pass"
        for metric in ("mean_kld", "top1", "greedy"):
            assert b["overall"][metric] == pytest.approx(a["overall"][metric], abs=1e-6)


GPU_CHECK = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True,
                          timeout=120)


def test_gpu_check_script_parses_and_plans_every_run():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)]).returncode == 0
    assert _gpu_check("--help").returncode == 0
    plan = _gpu_check("--dry-run")
    assert plan.returncode == 0, plan.stderr
    runs = [line for line in plan.stderr.splitlines() if line.startswith("+ mmconvert verify")]
    assert len(runs) == 4 and all("--device cuda" in r for r in runs)
    for shape in ("0.6b", "8b"):
        for dtype in ("float32", "bfloat16"):
            assert sum(f"<{shape} checkpoint>" in r and f"--dtype {dtype}" in r
                       for r in runs) == 1
    one = _gpu_check("--dry-run", "--shapes", "8b", "--dtypes", "bfloat16", "--outtype", "f16")
    assert one.stderr.count("+ mmconvert verify") == 1 and "--outtype f16" in one.stderr
    for bad in (["--bogus"], ["--shapes", "70b"], ["--dtypes", "float16"], ["--shapes"]):
        result = _gpu_check(*bad)
        assert result.returncode == 2 and result.stderr.startswith("error: "), bad


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_gpu_check_refuses_clearly_without_cuda():
    result = _gpu_check("--shapes", "0.6b")
    assert result.returncode == 2
    assert "error: no CUDA device" in result.stderr
    assert "+ mmconvert" not in result.stderr  # nothing generated or converted first


_REFERENCE_PEAK = """
import sys
import torch
from mmconvert.convert.readers import read_checkpoint
from mmconvert.verify.cases import default_cases
from mmconvert.verify.harness import run_reference

def rss(field):
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) * 1024

model = read_checkpoint(sys.argv[1])
cases = default_cases(model, generate=2)[:3]
import transformers.models.qwen3.modeling_qwen3, accelerate.big_modeling  # noqa: E401
base = rss("VmRSS")
run_reference(model, cases, "cpu", torch.float32, lambda line: None, offload="auto")
print("GROWTH", rss("VmHWM") - base)
"""


def test_an_offloaded_reference_stays_within_its_memory_budget(tmp_path):
    """A checkpoint four times its weight budget (MMCONVERT_VERIFY_MEMORY_BUDGET): the
    reference's peak resident memory grows by no more than the budget and a small, fixed
    allowance, with every disk-offloaded layer read, cast, run and dropped per forward.

    At 14B verify was killed at 23.2 GB on a 24 GB machine. Without ``formats.heap.MODELS`` glibc
    keeps the freed layers resident in fragmented arenas: this run then grows by 332 MB
    against a 98 MB budget (64 MB with it)."""
    from testkit.checkpoints import ExampleOptions, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", ExampleOptions(
        hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        head_dim=128, intermediate_size=3072, shards=2))
    model = read_checkpoint(ckpt)
    fp32 = model.tensors.total_params() * 4
    budget = fp32 // 4
    done = subprocess.run([sys.executable, "-c", _REFERENCE_PEAK, str(ckpt)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, MEMORY_BUDGET_ENV: str(budget)})
    assert done.returncode == 0, done.stderr[-2000:]
    growth = int(next(ln for ln in done.stdout.splitlines()
                      if ln.startswith("GROWTH")).split()[1])
    allowance = 64 << 20  # activations, logits, hooks, the interpreter's own growth
    assert growth <= budget + allowance, (growth / 2**20, budget / 2**20)


def test_a_quantized_tensor_is_dequantized_a_chunk_at_a_time(tmp_path, monkeypatch):
    """The dequantized reference reads each GGUF tensor through gguf-py's kernels, which make
    float32 temporaries of all they are given: decoded whole, a 14B output matrix (3 GB)
    would take 9 GB. In chunks the peak is the result and one chunk's temporaries, and the
    values are those of one whole decode."""
    import tracemalloc

    import gguf
    import numpy as np

    from mmconvert.formats import gguf_reader

    rows, cols = 1024, 2048
    values = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32)
    path = tmp_path / "one.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    qtype = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("w", gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf_reader.GGUFReader(path)
    whole = gguf.quants.dequantize(reader.tensor_bytes("w").reshape(rows, -1), qtype)
    monkeypatch.setattr(gguf_reader, "DECODE_CHUNK_BYTES", 256 << 10)
    tracemalloc.start()
    try:
        got = reader.tensor_array("w")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= rows * cols * 4 + (2 << 20), peak / 2**20  # 8 MB result + < 2 MB
    np.testing.assert_array_equal(got, whole)
