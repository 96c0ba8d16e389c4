"""OUT is never an input, ``--force`` replaces only our own bundles, one run per OUT at a time,
crashes leave nothing that lasts, and a full or read-only disk is one ``error:`` line.

Issue 9, items 1, 2, 8 (ENOSPC / EROFS / EBUSY) and 11. Each case runs the real CLI in a
subprocess (``tests/hostile/harness.py``); where a case needs something to happen *during* a
run, the subprocess runs the real CLI with a hook wrapped around ``BundleDir.__enter__`` (the
moment the output folder was checked and the temp folder made), which waits for or does that
thing and then carries on with the real code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from tests.dialect_builders import qwen3_with_projector
from tests.hostile.harness import REPO, CliResult, assert_refused, run_cli, tree_digest

CONVERTERS = ["to-gguf", "to-hf", "to-safetensors"]
WRITERS = [*CONVERTERS, "example"]
BIG = dict(hidden_size=512, num_hidden_layers=8, intermediate_size=1536, num_attention_heads=8,
           num_key_value_heads=4, head_dim=64)  # ~50 MB: writing it takes a noticeable while


def command(cmd: str, ckpt: Path, out: Path, *extra: str) -> list[str]:
    """The CLI arguments that write ``cmd``'s bundle from ``ckpt`` into ``out``."""
    if cmd == "example":
        return ["example", str(out), *extra]
    return [cmd, str(ckpt), "-o", str(out), *extra]


def leftovers(out: Path) -> list[str]:
    """Temp, moved-aside and lock files of OUT's runs beside it."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def after_notes(result: CliResult) -> CliResult:
    """``result`` without the notes a run printed while working, before it failed (e.g. the
    GGUF pre-tokenizer note), so that :func:`assert_refused` can check what follows."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.startswith("error:")), 0)
    return replace(result, stderr="".join(lines[first:]))


def assert_bundle_consistent(out: Path) -> dict:
    """OUT holds exactly the files its manifest lists, with the recorded sizes."""
    manifest = json.loads((out / "mmconvert.json").read_text())
    assert manifest["tool"] == "mmconvert"
    listed = {o["path"]: o["bytes"] for o in manifest["outputs"]}
    present = {str(p.relative_to(out)): p.stat().st_size for p in out.rglob("*")
               if p.is_file() and p.name != "mmconvert.json"}
    assert present == listed
    return manifest


@pytest.fixture
def ckpt(example_ckpt, tmp_path) -> Path:
    """A private copy of the example checkpoint under ``tmp_path/x/ck``."""
    return Path(shutil.copytree(example_ckpt, tmp_path / "x" / "ck"))


@pytest.fixture(scope="module")
def big_ckpt(make_checkpoint) -> Path:
    return make_checkpoint(**BIG)


# -- item 1: OUT is, contains or lies inside an input -------------------------------------------

@pytest.mark.parametrize("cmd", CONVERTERS)
def test_force_into_the_folder_that_holds_the_checkpoint_is_refused(ckpt, cmd):
    """The issue's case: ``mmconvert to-gguf /tmp/x/ck -o /tmp/x --force`` removed ck/ and notes.txt."""
    root = ckpt.parent
    (root / "notes.txt").write_text("keep\n")
    before = tree_digest(root)
    result = run_cli(*command(cmd, ckpt, root, "--force"))
    assert_refused(result, needle="contains", before=before, inputs=(root,))
    assert leftovers(root) == []


@pytest.mark.parametrize("cmd", CONVERTERS)
def test_out_is_the_checkpoint_is_refused(ckpt, cmd):
    before = tree_digest(ckpt)
    assert_refused(run_cli(*command(cmd, ckpt, ckpt, "--force")), needle="is the checkpoint",
                   before=before, inputs=(ckpt,))


def test_out_inside_the_checkpoint_is_refused(ckpt):
    before = tree_digest(ckpt)
    result = run_cli("to-gguf", ckpt, "-o", ckpt / "gguf", "--force")
    assert_refused(result, needle="inside", out=ckpt / "gguf", before=before, inputs=(ckpt,))


@pytest.mark.parametrize("cmd", CONVERTERS)
def test_dot_from_inside_the_checkpoint_is_refused(ckpt, cmd):
    before = tree_digest(ckpt)
    result = run_cli(cmd, ".", "-o", ".", "--force", cwd=ckpt)
    assert_refused(result, before=before, inputs=(ckpt,))


@pytest.mark.parametrize("force", [True, False])
def test_dot_as_out_is_refused_without_ebusy(ckpt, tmp_path, force):
    """``-o .`` from inside an earlier bundle: renaming the current folder was an EBUSY traceback."""
    out = tmp_path / "bundle"
    assert run_cli("to-gguf", ckpt, "-o", out).returncode == 0
    before = tree_digest(out)
    result = run_cli("to-gguf", ckpt, "-o", ".", *(["--force"] if force else []), cwd=out)
    assert_refused(result, needle="current folder", before=before, inputs=(out,))


def test_out_through_a_symlink_into_the_checkpoint_is_refused(ckpt, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(ckpt, target_is_directory=True)
    before = tree_digest(ckpt)
    for out in (link, link / "sub", tmp_path / "x" / ".." / "x" / "ck"):
        result = run_cli("to-gguf", ckpt, "-o", out, "--force")
        assert_refused(result, before=before, inputs=(ckpt,))
    # and the checkpoint spelt through the link, OUT spelt directly
    assert_refused(run_cli("to-hf", link, "-o", ckpt, "--force"), before=before, inputs=(ckpt,))


@pytest.mark.parametrize("pass_base", [True, False])
def test_out_is_the_base_folder_is_refused(make_checkpoint, tmp_path, pass_base):
    seed = make_checkpoint(embed_text_config=False).parent
    shutil.copytree(seed, tmp_path / "s")
    ckpt, base = tmp_path / "s" / "ckpt", tmp_path / "s" / "base"
    config = json.loads((ckpt / "config.json").read_text())
    config["base_model_name"] = str(base)  # the copy's own base, found without --base too
    (ckpt / "config.json").write_text(json.dumps(config))
    before = tree_digest(tmp_path / "s")
    args = ["--base", base] if pass_base else []
    result = run_cli("to-gguf", ckpt, *args, "-o", base, "--force")
    assert_refused(result, needle="base", before=before, inputs=(tmp_path / "s",))


def test_out_holding_the_projector_or_its_config_is_refused(example_ckpt, tmp_path):
    qwen, projector = qwen3_with_projector(example_ckpt, tmp_path / "d")
    pdir, cdir = tmp_path / "p", tmp_path / "c"
    pdir.mkdir()
    cdir.mkdir()
    projector = Path(shutil.move(projector, pdir / projector.name))
    config = Path(shutil.move(tmp_path / "d" / "projector.json", cdir / "projector.json"))
    before = tree_digest(tmp_path)
    for out in (pdir, cdir):
        result = run_cli("to-hf", qwen, "--projector", projector, "--projector-config", config,
                         "-o", out, "--force")
        assert_refused(result, needle="projector", before=before, inputs=(tmp_path,))


def test_out_is_the_adapters_base_is_refused(example_ckpt, tmp_path):
    from tests.dialect_builders import lora_adapter

    base = Path(shutil.copytree(example_ckpt, tmp_path / "base"))
    adapter = lora_adapter(base, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)  # found from the adapter, no --base
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    before = tree_digest(tmp_path)
    for out in (base, adapter):
        result = run_cli("to-safetensors", adapter, "-o", out, "--force")
        assert_refused(result, before=before, inputs=(tmp_path,))


# -- item 1: --force replaces only our own bundles ----------------------------------------------

@pytest.mark.parametrize("cmd", WRITERS)
def test_force_refuses_a_folder_of_foreign_files(ckpt, tmp_path, cmd):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("thesis.tex", "data.csv", "notes.txt", "more.txt"):
        (out / name).write_text(name)
    before = tree_digest(out)
    result = run_cli(*command(cmd, ckpt, out, "--force"))
    assert_refused(result, needle="data.csv, more.txt, notes.txt and 1 more", before=before,
                   inputs=(out,))
    assert leftovers(out) == []


@pytest.mark.parametrize("cmd", WRITERS)
def test_force_replaces_our_own_bundle_and_says_so(ckpt, tmp_path, cmd):
    out = tmp_path / "out"
    assert run_cli(*command(cmd, ckpt, out)).returncode == 0
    first = assert_bundle_consistent(out)
    files = len(first["outputs"]) + 1
    before = tree_digest(out)
    assert_refused(run_cli(*command(cmd, ckpt, out)), needle="--force", before=before,
                   inputs=(out,))
    result = run_cli(*command(cmd, ckpt, out, "--force"))
    assert result.returncode == 0, result.stderr
    assert f"replaced earlier mmconvert {first['kind']} bundle {out} ({files} files)" \
        in result.stderr, result.stderr
    assert_bundle_consistent(out)
    assert leftovers(out) == []


@pytest.mark.parametrize("cmd", WRITERS)
def test_force_keeps_a_bundle_the_user_added_to_or_edited(ckpt, tmp_path, cmd):
    out = tmp_path / "out"
    assert run_cli(*command(cmd, ckpt, out)).returncode == 0
    (out / "my-notes.md").write_text("mine\n")
    before = tree_digest(out)
    assert_refused(run_cli(*command(cmd, ckpt, out, "--force")), needle="my-notes.md",
                   before=before, inputs=(out,))
    (out / "my-notes.md").unlink()
    (out / "config.json").write_text('{"edited": "by hand"}\n')
    before = tree_digest(out)
    assert_refused(run_cli(*command(cmd, ckpt, out, "--force")), needle="config.json",
                   before=before, inputs=(out,))


def test_example_does_not_replace_a_checkpoint_it_did_not_mark(example_ckpt, tmp_path):
    """An example-shaped folder without our manifest is the user's (e.g. written by training)."""
    out = Path(shutil.copytree(example_ckpt, tmp_path / "ck"))
    before = tree_digest(out)
    assert_refused(run_cli("example", out, "--force"), before=before, inputs=(out,))


# -- item 2: OUT changing during the run, concurrent runs ---------------------------------------

HOOKED_RUN = r"""
import sys, time
from pathlib import Path
import mmconvert.formats.bundle as bundle

action, arg = sys.argv[1], Path(sys.argv[2])
real_enter = bundle.BundleDir.__enter__

def enter(self):
    tmp = real_enter(self)  # OUT checked, lock taken, temp folder made
    if action == "drop":  # the user saves a file into OUT while we convert
        arg.write_text("dropped during the run\n")
    else:  # hold the lock until the test says go
        (arg.parent / "entered").touch()
        deadline = time.monotonic() + 60
        while not arg.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    return tmp

bundle.BundleDir.__enter__ = enter
sys.argv = ["mmconvert", *sys.argv[3:]]
from mmconvert.cli import main
main()
"""


def hooked(action: str, arg: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", HOOKED_RUN, action, str(arg), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.parametrize("cmd", WRITERS)
@pytest.mark.parametrize("earlier", [False, True])
def test_a_file_dropped_into_out_during_the_run_is_kept(ckpt, tmp_path, cmd, earlier):
    out = tmp_path / "out"
    if earlier:  # an earlier bundle of ours, replaced with --force
        assert run_cli(*command(cmd, ckpt, out)).returncode == 0
    else:
        out.mkdir()
    dropped = out / "dropped.txt"
    before = tree_digest(out)
    proc = hooked("drop", dropped, command(cmd, ckpt, out, "--force"))
    stdout, stderr = proc.communicate(timeout=120)
    assert_refused(after_notes(CliResult(proc.returncode, stdout, stderr, 0)),
                   needle="changed during the run")
    assert "dropped.txt" in stderr, stderr
    assert dropped.read_text() == "dropped during the run\n"
    after = tree_digest(out)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.new-")]
    assert len(kept) == 1 and str(kept[0]) in stderr, (stderr, list(tmp_path.iterdir()))
    assert_bundle_consistent(kept[0])  # the finished output is kept, not lost
    del after[str(dropped)]
    assert after == before  # an earlier bundle in OUT is untouched too
    assert leftovers(out) == []


@pytest.mark.parametrize("cmd", WRITERS)
def test_a_second_run_into_the_same_out_fails_at_once_naming_the_first(ckpt, tmp_path, cmd):
    out = tmp_path / "out"
    go = tmp_path / "go"
    first = hooked("wait", go, command(cmd, ckpt, out, "--force"))
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "entered").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never started writing"
            time.sleep(0.02)
        for _ in range(3):
            second = run_cli(*command(cmd, ckpt, out, "--force"))
            assert_refused(second, needle=f"pid {first.pid}")
            assert cmd in second.stderr  # the first run's command is named too
            assert first.poll() is None  # refused at once, while the first still runs
    finally:
        go.touch()
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert_bundle_consistent(out)
    assert leftovers(out) == []


def test_racing_runs_never_clobber_each_other(ckpt, tmp_path):
    """Both started at once, with --force: each either wrote the whole bundle or was refused."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    for trial in range(4):
        outtype = ["f32", "q8_0"][trial % 2]
        procs = [subprocess.Popen([sys.executable, "-m", "mmconvert", "to-gguf", str(ckpt), "-o",
                                   str(out), "--force", "--outtype", t], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for t in (outtype, "bf16")]
        results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
        assert any(rc == 0 for rc, _ in results), results
        for rc, stderr in results:
            assert "Traceback" not in stderr, stderr
            assert rc == 0 or "another mmconvert run" in stderr, stderr
        manifest = assert_bundle_consistent(out)
        assert len([o for o in manifest["files"] if o["role"] == "text"]) == 1
        assert leftovers(out) == []


# -- item 11: stale temp folders, kill -9 -------------------------------------------------------

def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: no process has it (until the kernel reuses it, rare)


def test_stale_partial_folders_of_dead_or_lockless_runs_are_removed(ckpt, tmp_path):
    out = tmp_path / "out"
    assert run_cli("to-gguf", ckpt, "-o", out).returncode == 0  # .out.old-PID beside a missing
    dead = dead_pid()  # OUT would be put back instead (see the next test)
    stale = [tmp_path / f".out.partial-{dead}", tmp_path / f".out.old-{dead}",
             tmp_path / f".out.partial-{os.getpid()}"]  # alive, but holds no lock on OUT
    for folder in stale:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    unrelated = [tmp_path / f".out2.partial-{dead}", tmp_path / ".out.partial-mine"]
    for folder in unrelated:
        folder.mkdir()
    result = run_cli("to-gguf", ckpt, "-o", out, "--force")
    assert result.returncode == 0, result.stderr
    assert "removed stale" in result.stderr and str(dead) in result.stderr, result.stderr
    assert not any(p.exists() for p in stale)
    assert all(p.is_dir() for p in unrelated)
    assert_bundle_consistent(out)


def test_a_bundle_moved_aside_by_a_crashed_run_is_put_back(ckpt, tmp_path):
    """Killed between moving the old bundle aside and renaming the new one in: OUT is restored."""
    out = tmp_path / "out"
    assert run_cli("to-hf", ckpt, "-o", out).returncode == 0
    before = tree_digest(out)
    aside = tmp_path / f".out.old-{dead_pid()}"
    out.rename(aside)
    result = run_cli("to-hf", ckpt, "-o", out)  # no --force: the restored bundle is ours
    assert result.stderr.startswith(f"restored {out} from {aside.name}"), result.stderr
    assert_refused(after_notes(result), needle="pass --force")
    assert tree_digest(out) == before
    assert leftovers(out) == []


def wait_for_partial_data(proc: subprocess.Popen, out: Path, timeout: float = 60) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for partial in out.parent.glob(f".{out.name}.partial-*"):
            try:
                if any(f.stat().st_size > 0 for f in partial.iterdir()):
                    return partial
            except FileNotFoundError:
                pass
        time.sleep(0.001)
    raise AssertionError(f"never caught the run mid-write: {proc.communicate()}")


@pytest.mark.parametrize("cmd", CONVERTERS)
def test_kill_9_mid_write_leaves_nothing_under_out_and_the_next_run_cleans_up(big_ckpt,
                                                                              tmp_path, cmd):
    out = tmp_path / "out"
    args = command(cmd, big_ckpt, out, *(["--outtype", "f32", "--outtype", "q8_0"]
                                         if cmd == "to-gguf" else ["--dtype", "float32"]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "mmconvert", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = wait_for_partial_data(proc, out)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert partial.is_dir()  # what a crash leaves: the next run must deal with it
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    assert f"removed stale {partial.name}" in result.stderr, result.stderr
    assert_bundle_consistent(out)
    assert leftovers(out) == []


# -- item 8: disk full, read-only ---------------------------------------------------------------

@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount_tmpfs(options) -> Path``: a fresh tmpfs (needs root and CAP_SYS_ADMIN)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); "
                        "the disk-full and read-only cases need one")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.mark.parametrize("cmd", WRITERS)
def test_disk_full_is_one_line_and_leaves_nothing(ckpt, mount_tmpfs, cmd):
    small = mount_tmpfs("size=96k")
    out = small / "out"
    before = tree_digest(ckpt)
    result = after_notes(run_cli(*command(cmd, ckpt, out)))
    assert_refused(result, needle="No space left", out=out, before=before, inputs=(ckpt,))
    assert os.listdir(small) == []


@pytest.mark.parametrize("cmd", WRITERS)
def test_read_only_destination_is_one_line_and_leaves_nothing(ckpt, tmp_path, mount_tmpfs, cmd):
    if os.geteuid() == 0:  # root ignores permission bits: use a read-only file system
        parent = mount_tmpfs("ro,size=1m")
    else:
        parent = tmp_path / "ro"
        parent.mkdir()
        parent.chmod(0o555)
    out = parent / "out"
    before = tree_digest(ckpt)
    result = run_cli(*command(cmd, ckpt, out))
    assert_refused(result, out=out, before=before, inputs=(ckpt,))
    assert "Read-only" in result.stderr or "Permission denied" in result.stderr, result.stderr
    assert os.listdir(parent) == []
