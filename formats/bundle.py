"""Writing a bundle folder atomically and safely, and its ``mmconvert.json`` manifest.

What :class:`BundleDir` guarantees (docs/architecture.md, "Output folders"):

- OUT is never an input: an OUT that is, contains or lies inside the checkpoint, ``--base``,
  ``--projector``, ``--projector-config``, an adapter's base or any source file read is
  refused, comparing real paths (relative spellings, ``..`` and symlinks all resolve). So is
  the current folder (renaming it away is EBUSY, and would strand the user's shell).
- ``force`` replaces only what mmconvert wrote: a folder whose ``mmconvert.json`` says
  ``"tool": "mmconvert"`` and lists every file in it, unchanged (size, and sha256 for small
  files). Anything else in OUT is a refusal naming the files; a replacement is reported.
- One run per OUT (:mod:`mmconvert.formats.bundle_lock`); stale ``.OUT.partial-PID`` /
  ``.OUT.old-PID`` folders of runs that no longer hold the lock are removed on start.
- Everything is written into ``.OUT.partial-PID`` and renamed into place at the end, so an
  error, Ctrl-C or a full disk leaves nothing under OUT or beside it. OUT is checked again just
  before the rename: if it changed during the run it is left alone, and the finished output is
  kept beside it as ``OUT.new-PID`` (nothing of the user's nor of the run's is lost).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mmconvert import __version__
from mmconvert.errors import OutputError
from mmconvert.formats.bundle_lock import BundleLock
from mmconvert.formats.hashing import sha256_file, sha256_files, sha256_sources
from mmconvert.formats.safe_json import loads_limited

MANIFEST = "mmconvert.json"
HASH_CHECKED_BYTES = 1 << 20  # files up to this size must match their recorded sha256 too
NAMED_FILES = 3  # foreign files named in a refusal

Input = tuple[str, Path]  # (what it is, e.g. "checkpoint", its path as given)
Listing = dict[str, tuple]  # relative path -> (kind, size, mtime_ns, inode)


def umask() -> int:
    """The process's umask, read without changing it where Linux tells it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the one way to read it is to set it, then put it back
    os.umask(mask)
    return mask


def follow_umask(root: Path) -> None:
    """Give every file under ``root`` (or ``root`` itself, a file) the mode ``open()`` gives a
    new file, ``0o666 & ~umask``: libraries writing 0600 (the safetensors library does) or
    0644 regardless of the umask would otherwise mix modes in one bundle. Links are left."""
    root = Path(root)
    mask = umask()
    paths = [root] if not root.is_dir() else [
        Path(d) / name for d, _, names in os.walk(root) for name in names]
    for path in paths:
        st = os.lstat(path)
        mode = stat.S_IMODE(st.st_mode)
        wanted = (0o666 | (mode & 0o111)) & ~mask  # an executable file stays executable
        if stat.S_ISREG(st.st_mode) and mode != wanted:
            os.chmod(path, wanted)


def named_inputs(checkpoint: Path | None = None, base: Path | None = None,
                 projector: Path | None = None,
                 projector_config: Path | None = None) -> list[Input]:
    """The inputs a user named on the command line, labelled for error messages."""
    named = [("checkpoint", checkpoint), ("--base folder", base), ("--projector", projector),
             ("--projector-config", projector_config)]
    return [(role, Path(p)) for role, p in named if p is not None]


def model_inputs(model) -> list[Input]:
    """Every folder and file the reader of ``model`` (a :class:`CanonicalModel`) opened."""
    found: list[Input] = [("source folder", Path(model.source))]
    tok_dir = Path(model.tokenizer.directory)
    if os.path.realpath(tok_dir) != os.path.realpath(model.source):
        found.append(("base folder", tok_dir))
    found += [("source file", Path(p)) for p in model.source_files]
    found += [(f"{role.replace('_', ' ')} file", Path(p))
              for role, p in model.source_files_from.items()]
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_not_an_input(out: Path, shown: Path, inputs: Iterable[Input]) -> None:
    """Refuse a real OUT path that is, contains or lies inside an input (or the current folder)."""
    for role, given in inputs:
        real = Path(os.path.realpath(given))
        relation = ("is" if real == out else "contains" if _inside(real, out)
                    else "lies inside" if _inside(out, real) else None)
        if relation:
            raise OutputError(f"{shown}: {relation} the {role}; choose an output folder outside "
                              f"every input\n{role}: {given}")
    if _inside(Path(os.path.realpath(os.getcwd())), out):
        raise OutputError(f"{shown}: is the current folder or holds it; name the output from "
                          f"outside it (e.g. cd .. and -o {out.name})")


def listing(folder: Path) -> Listing:
    """What ``folder`` holds, without following links ({} when it does not exist)."""
    found: Listing = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            kind = "link" if os.path.islink(path) else "dir" if name in dirs else "file"
            found[os.path.relpath(path, folder)] = (kind, st.st_size, st.st_mtime_ns, st.st_ino)
    return found


def _our_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder``'s manifest if it is one mmconvert wrote (else None: the folder is not ours)."""
    path = folder / MANIFEST
    if path.is_symlink() or not path.is_file() or path.stat().st_size > 64 << 20:
        return None
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError):
        return None
    if manifest is None or manifest.get("tool") != "mmconvert" or \
            not isinstance(manifest.get("outputs"), list):
        return None
    return manifest


def foreign_files(folder: Path, held: Listing, manifest: dict[str, Any] | None) -> list[str]:
    """Entries of ``folder`` that mmconvert did not write there, or that changed since."""
    listed = {o["path"]: o for o in (manifest or {}).get("outputs", [])
              if isinstance(o, dict) and isinstance(o.get("path"), str)}
    listed_dirs = {str(parent) for p in listed for parent in Path(p).parents}
    foreign = []
    for rel, (kind, size, _, _) in sorted(held.items()):
        entry = listed.get(rel)
        if manifest is not None and (rel == MANIFEST or kind == "dir" and rel in listed_dirs):
            continue
        if kind == "file" and entry is not None and entry.get("bytes") == size and (
                size > HASH_CHECKED_BYTES or entry.get("sha256") is None
                or sha256_file(folder / rel) == entry["sha256"]):
            continue
        foreign.append(rel)
    return foreign


def _names(rels: list[str]) -> str:
    shown = ", ".join(r if len(r) <= 60 else r[:57] + "..." for r in rels[:NAMED_FILES])
    return shown + (f" and {len(rels) - NAMED_FILES} more" if len(rels) > NAMED_FILES else "")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BundleDir:
    """``with BundleDir(out, force, inputs) as tmp:`` write under ``tmp``; renamed to ``out`` at
    the end (see the module docstring for what is checked and guaranteed).

    ``inputs``: (role, path) of everything the run reads (:func:`named_inputs`,
    :func:`model_inputs`); ``log`` gets the one-line notes (stderr by default).
    """

    def __init__(self, out: Path, force: bool = False, inputs: Iterable[Input] = (),
                 log: Callable[[str], None] | None = None):
        self.out = Path(os.path.realpath(out))  # work where the bytes go: links, .. resolved
        self.shown = Path(out) if Path(out).name not in ("", "..") else self.out  # messages
        self.force = force
        self.inputs = list(inputs)
        self.log = log or _say
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        self._lock = BundleLock(self.out, self.shown)
        self._before: Listing = {}  # what OUT held when the run started
        self._replacing = ""  # "mmconvert <kind> bundle" when force replaces an earlier one

    def __enter__(self) -> Path:
        check_not_an_input(self.out, self.shown, self.inputs)
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"{self.shown}: exists and is not a folder")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock.acquire()
        try:
            self._restore_moved_aside()
            self._check_out()
            self._remove_stale()
            self.tmp.mkdir()
        except BaseException:
            self._lock.release()
            raise
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self._lock.release()
        refused = _write_refusal(exc) if exc is not None else None
        if refused is not None:
            raise OutputError(f"{self.shown}: {refused} while writing; nothing was "
                              "kept") from exc

    def _stale(self) -> list[tuple[str, int, Path]]:
        """(``partial`` | ``old``, pid, path) of earlier runs' folders for this OUT. We hold the
        lock, so none of them is being written: their runs died or never locked (PID reuse
        does not matter)."""
        pattern = re.compile(rf"\.{re.escape(self.out.name)}\.(partial|old)-(\d+)")
        with os.scandir(self.out.parent) as entries:
            found = [(m[1], int(m[2]), Path(e.path)) for e in entries
                     if (m := pattern.fullmatch(e.name)) and int(m[2]) != os.getpid()
                     and e.is_dir(follow_symlinks=False)]
        return found

    def _restore_moved_aside(self) -> None:
        """A run killed between moving the earlier bundle aside and renaming the new one in left
        OUT missing: put the earlier bundle back before anything else."""
        for kind, _, path in self._stale():
            if kind == "old" and not os.path.lexists(self.out):
                os.rename(path, self.out)
                self.log(f"restored {self.shown} from {path.name}, moved aside by an "
                         "interrupted run")

    def _check_out(self) -> None:
        if not self.out.is_dir() or not os.listdir(self.out):
            return
        manifest = _our_manifest(self.out)
        if manifest is None:  # not ours at all: name what is there, without walking it all
            self._refuse_foreign(sorted(os.listdir(self.out)))
        self._before = listing(self.out)
        self._refuse_foreign(foreign_files(self.out, self._before, manifest))
        kind = manifest.get("kind")
        kind = kind if isinstance(kind, str) and re.fullmatch(r"[\w-]{1,20}", kind) else ""
        self._replacing = f"mmconvert {kind} bundle" if kind else "mmconvert bundle"
        if not self.force:
            raise OutputError(f"{self.shown}: holds an earlier {self._replacing}; pass --force "
                              "to replace it")

    def _refuse_foreign(self, foreign: list[str]) -> None:
        if foreign:
            raise OutputError(f"{self.shown}: holds files mmconvert did not write; not "
                              f"replacing it\nnot ours, or changed since: {_names(foreign)}"
                              "\n--force replaces only a bundle mmconvert wrote; move these "
                              "files or choose another output folder")

    def _remove_stale(self) -> None:
        for _, pid, path in self._stale():
            shutil.rmtree(path, ignore_errors=True)
            why = "does not hold the lock" if _alive(pid) else "is gone"
            self.log(f"removed stale {path.name} beside {self.shown} (process {pid} {why})")

    def _commit(self) -> None:
        follow_umask(self.tmp)
        if listing(self.out) != self._before:
            self._keep_and_refuse()
        if not self._before:
            try:  # onto a missing or empty OUT: fails if anything appeared in it meanwhile
                os.rename(self.tmp, self.out)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    self._keep_and_refuse()
                raise
            return
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        os.rename(self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except OSError:
            os.rename(old, self.out)
            raise
        files = sum(kind != "dir" for kind, *_ in self._before.values())
        if listing(old) == self._before:
            shutil.rmtree(old, ignore_errors=True)
            self.log(f"replaced earlier {self._replacing} {self.shown} ({files} files)")
        else:  # written to in the instant it was moved aside: keep it where the user sees it
            kept = self.out.parent / f"{self.out.name}.old-{os.getpid()}"
            os.rename(old, kept)
            self.log(f"replaced earlier {self._replacing} {self.shown}; it changed while being "
                     f"replaced, so it was kept as {kept}")

    def _keep_and_refuse(self) -> None:
        """OUT changed during the run: leave it alone, keep the finished output beside it."""
        now = listing(self.out)
        changed = sorted(set(now) ^ set(self._before)
                         | {r for r in now if r in self._before and now[r] != self._before[r]})
        kept = self.out.parent / f"{self.out.name}.new-{os.getpid()}"
        os.rename(self.tmp, kept)
        raise OutputError(f"{self.shown}: changed during the run; left as it is\n"
                          f"new, removed or changed: {_names(changed)}\n"
                          f"the finished output is in {kept}")


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _write_refusal(exc: BaseException) -> str | None:
    """The reason, when the file system refused a write (disk full, quota, read-only).

    Worker threads re-raise the ``OSError`` itself; the safetensors library (``mmconvert
    example``) wraps it as ``SafetensorError: ... I/O error: ... (os error 28)``.
    """
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and type(exc).__name__ == "SafetensorError":
        found = re.search(r"\(os error (\d+)\)", str(exc))
        code = int(found[1]) if found else None
    return os.strerror(code) if code in WRITE_ERRNOS else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_marker_manifest(folder: Path, kind: str) -> None:
    """``mmconvert.json`` for output that is not a converted model (``mmconvert example``): it
    lists the files, so that ``--force`` may later replace the folder and nothing added to it."""
    outputs = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    hashes = sha256_files(outputs)
    manifest = {"tool": "mmconvert", "version": __version__, "kind": kind,
                "outputs": [{"path": str(p.relative_to(folder)), "sha256": hashes[str(p)],
                             "bytes": p.stat().st_size} for p in outputs]}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def manifest_sources(model) -> list[Path]:
    """The files a bundle is made from: weights, config, tokenizer, generation config."""
    sources = [Path(p) for p in model.source_files]
    sources += [Path(p) for role, p in model.source_files_from.items()
                if role in ("config", "tokenizer", "generation_config", "adapter")
                and Path(p).is_file()]
    return list(dict.fromkeys(sources))


def write_manifest(folder: Path, *, kind: str, model, options: dict[str, Any],
                   transforms: list[str], extra: dict[str, Any] | None = None,
                   source_hashes: dict[str, str] | None = None,
                   output_hashes: dict[str, str] | None = None,
                   checksums: bool = True) -> dict[str, Any]:
    """Write ``mmconvert.json``: tool version, sources with sha256, transforms, outputs with sha256.

    ``model`` is the :class:`CanonicalModel` converted. Output paths are relative to ``folder``.
    ``source_hashes`` / ``output_hashes`` (relative name -> sha256) are hashes already known,
    e.g. computed while writing (see :mod:`mmconvert.formats.hashing`); the rest are computed,
    sources through the hash cache.
    ``checksums=False`` records sizes with ``"sha256": null`` (hashing re-reads every byte of
    input and output, which costs more than a whole GGUF conversion).
    """
    seen = manifest_sources(model)
    outputs = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    if checksums:
        hashes = dict(source_hashes or {})
        hashes.update(sha256_sources(p for p in seen if str(p) not in hashes))
        known = {str(folder / k): v for k, v in (output_hashes or {}).items()}
        out_hashes = {**known, **sha256_files(p for p in outputs if str(p) not in known)}
    else:
        hashes = dict.fromkeys(map(str, seen))
        out_hashes = dict.fromkeys(map(str, outputs))
    manifest = {
        "tool": "mmconvert",
        "version": __version__,
        "kind": kind,
        "dialect": model.dialect,
        "base_model": model.base_model_name,
        "options": options,
        "sources": [{"path": str(p), "sha256": hashes[str(p)], "bytes": p.stat().st_size}
                    for p in seen],
        "transforms": transforms,
        "outputs": [{"path": str(p.relative_to(folder)), "sha256": out_hashes[str(p)],
                     "bytes": p.stat().st_size} for p in outputs],
        "special_ids": {"bos": model.special.bos, "eos": model.special.eos,
                        "pad": model.special.pad},
        "multimodal_token": model.multimodal_token,
        "multimodal_token_id": model.multimodal_token_id,
    }
    if extra:
        manifest.update(extra)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def add_output(folder: Path, rel: str) -> None:
    """List file ``rel`` of ``folder`` (written after the manifest, e.g. the model card) in
    ``mmconvert.json``, hashed like the other outputs (sizes only under ``--no-checksums``)."""
    path = Path(folder) / MANIFEST
    manifest = json.loads(path.read_text(encoding="utf-8"))
    outputs = [o for o in manifest["outputs"] if o.get("path") != rel]
    hashed = any(o.get("sha256") for o in outputs)
    written = Path(folder) / rel
    outputs.append({"path": rel, "sha256": sha256_file(written) if hashed else None,
                    "bytes": written.stat().st_size})
    manifest["outputs"] = sorted(outputs, key=lambda o: Path(o["path"]))
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder``'s ``mmconvert.json`` (None when there is none). A file that is not a JSON
    object, or is nested too deep to decode, is a ``ValueError`` (never a RecursionError)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    manifest = loads_limited(path.read_text(encoding="utf-8"))
    if not isinstance(manifest, dict):
        raise ValueError(f"{MANIFEST} is not a JSON object")
    return manifest
