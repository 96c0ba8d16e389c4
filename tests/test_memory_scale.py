"""Peak RSS of a conversion does not grow with the model (issue 12: flat in model size).

Two generated checkpoints of the same ~24 MB-per-layer shape, 4 and 16 layers (sharded), are
converted in a fresh process each (``to-gguf`` to F16 and Q8_0 at once, split into several
GGUF files, and ``to-hf`` into several shards), which prints its own ``VmHWM`` (the kernel's
high-water mark of its resident memory, exact, not sampled) when it ends.

The bound: the 16-layer run may use at most ``BOUND`` more than the 4-layer one. The 12 extra
layers weigh 290 MB, so a converter holding even a third of the weights (or a slice per
tensor, or the encoded output) fails. A streaming one holds ``workers x CHUNK_BYTES`` times
the encoders' expansion whatever the depth, and both runs here use the same number of workers,
so the difference does not depend on the machine's cores or memory; what remains is
bookkeeping per tensor (a few KB each: names, plans, futures), well under the bound.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testkit.checkpoints import ExampleOptions, write_checkpoint

LAYER_BYTES = 2 * (1024 * 1024 * 2 + 512 * 1024 * 2 + 3 * 3072 * 1024)  # q, o, k, v, mlp; bf16
BOUND = 80 << 20

_MEASURED = """
import sys
from mmconvert.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("VMHWM_KB", hwm, file=sys.stderr)
sys.exit(code)
"""


def peak_rss(args: list[str]) -> int:
    done = subprocess.run([sys.executable, "-c", _MEASURED, *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(ln for ln in done.stderr.splitlines() if ln.startswith("VMHWM_KB"))
    return int(line.split()[1]) * 1024


def checkpoint(root: Path, layers: int) -> Path:
    return write_checkpoint(root / f"ckpt-{layers}", ExampleOptions(
        hidden_size=1024, num_hidden_layers=layers, num_attention_heads=8,
        num_key_value_heads=4, head_dim=128, intermediate_size=3072, shards=3))


@pytest.mark.parametrize("command", ["to-gguf", "to-hf"])
def test_peak_rss_does_not_grow_with_layers(tmp_path, monkeypatch, command):
    monkeypatch.setenv("MMCONVERT_NO_HASH_CACHE", "1")  # sources hashed, as by default, cold
    extra = (["--outtype", "f16", "--outtype", "q8_0", "--split-max-size", "40M"]
             if command == "to-gguf" else ["--max-shard-size", "40MB"])
    peaks = {}
    for layers in (4, 16):
        ckpt = checkpoint(tmp_path, layers)
        out = tmp_path / f"out-{layers}"
        peaks[layers] = peak_rss([command, str(ckpt), "-o", str(out), "-q", *extra])
        assert len(list(out.rglob("*.gguf" if command == "to-gguf" else "*.safetensors"))) > 3
    grown = peaks[16] - peaks[4]
    print(f"{command}: peak RSS {peaks[4] / 2**20:.0f} MiB (4 layers), {peaks[16] / 2**20:.0f} MiB (16)")
    assert 12 * LAYER_BYTES > 3 * BOUND  # the bound is well below what the extra layers weigh
    assert grown < BOUND, (f"peak RSS grew by {grown / 2**20:.0f} MiB from 4 to 16 layers "
                           f"({peaks[4] / 2**20:.0f} -> {peaks[16] / 2**20:.0f} MiB)")


_FAULTS = """
import resource, sys
from mmconvert import api
from mmconvert.formats import heap
if sys.argv[1] == "after-verify":
    heap.use(heap.MODELS)  # what verify leaves behind in a process that converts next
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
api.to_gguf(sys.argv[2], sys.argv[3], outtypes=["f16"], checksums=False)
print("FAULTS", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_conversion_after_verify_reuses_its_slice_buffers(tmp_path):
    """verify sets glibc to unmap what it frees (formats.heap.MODELS); a conversion that
    follows in the same process (the API, a notebook) sets the streaming policy back, so its
    slice buffers are reused instead of mapped and page-faulted in afresh (3.3 times the
    page faults without that, measured here; each costs system time)."""
    ckpt = checkpoint(tmp_path, 4)
    faults = {}
    for mode in ("fresh", "after-verify"):
        done = subprocess.run([sys.executable, "-c", _FAULTS, mode, str(ckpt),
                               str(tmp_path / mode)], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        faults[mode] = int(next(ln for ln in done.stdout.splitlines()
                                if ln.startswith("FAULTS")).split()[1])
    assert faults["after-verify"] < 1.5 * faults["fresh"], faults
