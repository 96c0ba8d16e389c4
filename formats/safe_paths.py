"""Every file mmconvert reads from a checkpoint resolves inside the folder it belongs to.

A checkpoint is someone else's data. An index entry ``../../secret.safetensors``, or a
tokenizer file symlinked to ``/etc/passwd`` or a private key, must not be read, and above all
not copied into a bundle that is then pushed to the Hub. So a file is opened only when its
real path (every symlink followed) lies inside the folder: the checkpoint, or the folder or
file the user named with a flag (``--base``, ``--projector``, ...).

The one exception is the Hugging Face cache, where every downloaded file is a symlink out of
its snapshot into the repository's blob store::

    models--org--name/snapshots/REV/config.json -> ../../blobs/SHA256

A folder at ``<repo>/snapshots/<rev>`` (or below it) may therefore also read files inside
``<repo>/blobs/``, and nothing else outside itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mmconvert.errors import UnsafePathError

HF_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def plain_file_name(name: object, where: str) -> str:
    """``name`` when it is a bare file name (what a weight index may list), else refuse.

    ``where`` names the index entry in the error, e.g. ``"model.safetensors.index.json:
    weight_map['lm_head.weight']"``.
    """
    if not isinstance(name, str):
        raise UnsafePathError(f"{where} is {_shown(name)}, not a file name", name=where)
    if not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        raise UnsafePathError(f"{where} is {_shown(name)}, not a plain file name in the "
                              "index's folder", name=where)
    return name


def allowed_roots(folder: Path) -> list[Path]:
    """Where files of ``folder`` may really live: the folder, and the blob store of the
    Hugging Face cache repository when the folder is one of its snapshots."""
    real = Path(folder).resolve()
    roots = [real]
    for snapshot in (real, *real.parents):
        repo = snapshot.parent.parent
        if snapshot.parent.name == "snapshots" and repo.name.startswith(HF_CACHE_REPO_PREFIXES):
            roots.append(repo / "blobs")
            break
    return roots


def resolve_inside(folder: Path, name: str | Path) -> Path:
    """The real path of ``folder / name``, refusing one that leaves ``folder``.

    ``name`` is relative and has no ``..``; symlinks are followed and the target must stay in
    :func:`allowed_roots`. The file need not exist (the caller reports a missing file).
    Raises :class:`UnsafePathError` naming the file.
    """
    folder = Path(folder)
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts or "\0" in str(name):
        raise UnsafePathError(f"{_shown(str(name))}: not a path inside {folder}", path=folder)
    logical = folder / relative
    try:
        real = logical.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before 3.13)
        raise UnsafePathError(f"{logical}: cannot resolve the link ({exc})", path=logical) from exc
    roots = allowed_roots(folder)
    if not any(real.is_relative_to(root) for root in roots):
        raise UnsafePathError(
            f"{relative}: links outside its folder; refused (nothing outside is read or copied)"
            f"\n{logical} -> {real}"
            "\nreplace the link with the file itself, or pass the folder it lives in",
            path=logical)
    return real


def checked_path(folder: Path, name: str | Path) -> Path:
    """``folder / name`` (the path as the user sees it) once :func:`resolve_inside` passed."""
    resolve_inside(folder, name)
    return Path(folder) / name


def copy_inside(folder: Path, name: str | Path, destination: Path) -> None:
    """Copy the contents of ``folder / name`` (never a link) to ``destination``, refusing a
    file that resolves outside ``folder``."""
    shutil.copyfile(resolve_inside(folder, name), destination, follow_symlinks=True)


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
