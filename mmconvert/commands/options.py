"""Options and parsers the commands share: how to read the checkpoint, ``--out``, ``--force``,
``--dry-run``, ``--strict``, ``--quiet`` (the progress bar), sizes, and ``--push-to`` with its
friends.

Decorators that gather several options hand the command one argument instead:
:func:`source_options` gives ``read`` (a dict of :class:`mmconvert.api.ReadKwargs`, only the
options given) and :func:`push_options` gives ``push`` (a :class:`PushRequest`). Nothing here
imports :mod:`mmconvert.cli` or another command, so any module may import this one first.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from mmconvert.publish.bundle_summary import VERIFY_JSON, VERIFY_MARKDOWN

DTYPE_CHOICES = ["auto", "float32", "float16", "bfloat16"]
TOKEN_HELP = ("Hugging Face token [default: HF_TOKEN, else the `hf auth login` token]. Prefer "
              "those: a token on the command line shows in shell history and `ps`.")
READ_KEYS = ("base", "projector", "projector_config", "rope_layout")


def echo_warning(line: str) -> None:
    """A warning from the API, printed as the commands always have: ``warning: ...`` on stderr."""
    click.echo(f"warning: {line}", err=True)


def echo_err(line: str) -> None:
    click.echo(line, err=True)


def source_options(fn: Callable) -> Callable:
    """``--base``, ``--projector``, ``--projector-config``, ``--rope-layout``: how to read the
    checkpoint (every command that reads one); the command receives them as ``read``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {key: kwargs.pop(key) for key in READ_KEYS}
        return fn(*args, read={k: v for k, v in given.items() if v is not None}, **kwargs)

    wrapper = click.option("--rope-layout", type=click.Choice(["neox", "interleaved"]),
                           default=None,
                           help="Rope layout the source's Q/K were trained with (default: the "
                                "checkpoint's flag, else neox as in HF Qwen3).")(wrapper)
    wrapper = click.option("--projector-config",
                           type=click.Path(path_type=Path, dir_okay=False), default=None,
                           help="JSON config of --projector (modality_configs, ...).")(wrapper)
    wrapper = click.option("--projector", type=click.Path(path_type=Path, dir_okay=False),
                           default=None, help="Projector weights for a plain Qwen3 folder.")(
        wrapper)
    wrapper = click.option("--base", type=click.Path(path_type=Path, file_okay=False),
                           default=None,
                           help="Base Qwen3 folder (config, tokenizer, generation config) when "
                                "the checkpoint does not embed them.")(wrapper)
    return wrapper


QUANTIZE_KEYS = ("output_tensor_type", "token_embedding_type", "tensor_types", "pure")


def quantize_options(fn: Callable) -> Callable:
    """llama-quantize's overrides of the K-quant mixtures: ``--output-tensor-type``,
    ``--token-embedding-type``, ``--tensor-type PATTERN=TYPE`` (repeatable) and ``--pure``; the
    command receives them as ``quantize`` (a dict of :func:`mmconvert.api.to_gguf` keywords).
    Values are checked by the API, so a bad one is one ``error:`` line."""
    from mmconvert.formats.gguf_mixtures import OVERRIDE_TYPES

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, quantize={key: kwargs.pop(key) for key in QUANTIZE_KEYS}, **kwargs)

    options = [
        click.option("--output-tensor-type", metavar="TYPE", default=None,
                     help="K-quant mixtures: the type of output.weight (e.g. q8_0), as "
                          "llama-quantize's option; a tied token_embd follows it too."),
        click.option("--token-embedding-type", metavar="TYPE", default=None,
                     help="K-quant mixtures: the type of token_embd.weight, as "
                          "llama-quantize's option."),
        click.option("--tensor-type", "tensor_types", metavar="PATTERN=TYPE", multiple=True,
                     help="K-quant mixtures: tensors whose name contains a match of the regular "
                          "expression PATTERN (lower-cased, as llama-quantize) get TYPE, then "
                          "the usual block-size fallback; repeatable, the first match wins. "
                          "E.g. --tensor-type 'attn_v=q8_0' --tensor-type 'blk\\.0\\.=q6_k'. "
                          f"TYPE, here and above: {', '.join(t.lower() for t in OVERRIDE_TYPES)}."),
        click.option("--pure", is_flag=True,
                     help="K-quant mixtures: every quantized tensor gets the mixture's base "
                          "type (no per-tensor rules), as llama-quantize --pure."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def stderr_bar(total: int, desc: str, unit: str, **options: Any) -> Any:
    """A tqdm bar on stderr that clears its line when closed; the commands open one only on a
    terminal."""
    from tqdm import tqdm  # only here: importing it costs the commands' start-up

    try:
        columns, lines = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        columns = lines = 0
    # a terminal that reports no size (`script` without one, some CI runners) would get
    # no bar from tqdm at all: give it 80 columns; else follow resizes
    size = ({"dynamic_ncols": True} if columns > 0 and lines > 0
            else {"ncols": columns if columns > 0 else 80, "nrows": 20})
    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, **size,
                **options)


class ByteBar:
    """A tqdm bar over the bytes an export writes, as the API's ``progress`` factory: called with
    the total it opens the bar and returns its ``update``; the bar closes (and clears its line)
    once the total is reached, so the command's final line prints on a clean terminal."""

    def __init__(self, desc: str = "writing"):
        self.desc = desc
        self._bar: Any = None
        self._lock = threading.Lock()

    def __call__(self, total: int) -> Callable[[int], None]:
        self.close()
        self._bar = stderr_bar(total, self.desc, "B", unit_scale=True, unit_divisor=1024)
        return self.update

    def update(self, n: int) -> None:
        with self._lock:
            bar = self._bar
            if bar is not None:
                bar.update(n)
                if bar.n >= bar.total:
                    self.close()

    def close(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()


def progress_option(fn: Callable) -> Callable:
    """``-q/--quiet`` for the converting commands; the command receives ``progress``: a
    :class:`ByteBar` when stderr is a terminal and not ``--quiet``, else None. Goes below
    ``user_errors``, so that a refusal or Ctrl-C closes the bar before its line is printed."""

    @functools.wraps(fn)
    def wrapper(*args: Any, quiet: bool, **kwargs: Any) -> Any:
        bar = None if quiet or not sys.stderr.isatty() else ByteBar()
        try:
            return fn(*args, progress=bar, **kwargs)
        finally:
            if bar is not None:
                bar.close()

    return click.option("-q", "--quiet", is_flag=True,
                        help="No progress bar (one is shown only when stderr is a "
                             "terminal).")(wrapper)


def strict_option(fn: Callable) -> Callable:
    """``--strict`` for the commands that write weights (the NaN/Inf policy of
    :mod:`mmconvert.formats.nonfinite`, applied by the API)."""
    return click.option("--strict", is_flag=True,
                        help="Refuse (exit 2, nothing written) weights holding NaN or Inf, "
                             "which are otherwise written with a warning per tensor.")(fn)


def out_option(kind: str) -> Callable:
    return click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False),
                        default=None,
                        help=f"Output folder [default: <ckpt>-{kind} beside the checkpoint].")


def force_option(what: str = "bundle") -> Callable:
    return click.option("--force", is_flag=True,
                        help=f"Replace OUT if it holds an earlier mmconvert {what} "
                             "(nothing else).")


def dry_run_option(help: str = "Print the plan and write nothing.") -> Callable:
    return click.option("--dry-run", is_flag=True, help=help)


def dtype_option(help: str) -> Callable:
    return click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto",
                        show_default=True, help=help)


def fold_linear_option(help: str = "Fold projector linear layers that follow each other with "
                                   "nothing in between (a low-rank down/up pair) into one "
                                   "matrix, computed in float64.") -> Callable:
    return click.option("--fold-linear", is_flag=True, help=help)


def size_arg(flag: str, text: str | None) -> int | None:
    """A size option (``5GB``, ``500M``, ``2GiB``) in bytes; an ``error: FLAG: ...`` line
    (:class:`~mmconvert.errors.OutputError`) when it is not one."""
    from mmconvert.api import size_bytes

    return size_bytes(text, flag)


# -- --push-to and friends -------------------------------------------------------------------


@dataclass(frozen=True)
class PushRequest:
    """What ``--push-to`` and friends asked for (``repo`` is None: only ``--verify``, if set).
    ``read``: the command's read options as (name, value) pairs, for ``--verify``."""

    repo: str | None = None
    private: bool = False
    create_pr: bool = False
    token: str | None = None
    verify: bool = False
    ckpt: Path | None = None
    read: tuple[tuple[str, Any], ...] = ()


def check_repo_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: a malformed Hub id is a usage error of the option."""
    from mmconvert.errors import UsageError
    from mmconvert.publish.hub import check_repo_id as check

    if value is None:
        return None
    try:
        return check(value)
    except UsageError as exc:
        raise click.BadParameter(str(exc)) from None


def token_option(name: str) -> Callable:
    return click.option("--token", name, default=None, metavar="TOKEN", help=TOKEN_HELP)


def push_options(fn: Callable) -> Callable:
    """Add ``--push-to OWNER/NAME``, ``--private``, ``--create-pr``, ``--token`` and ``--verify``
    to a converting command; it receives them as one ``push: PushRequest`` keyword (with the
    command's ``ckpt`` and ``read`` options, so that ``--verify`` reads the checkpoint alike)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, push_to: str | None, push_private: bool, push_create_pr: bool,
                push_token: str | None, push_verify: bool, **kwargs: Any) -> Any:
        request = PushRequest(push_to, push_private, push_create_pr, push_token, push_verify,
                              kwargs.get("ckpt"), tuple(kwargs.get("read", {}).items()))
        if push_to is None and (push_private or push_create_pr or push_token):
            raise click.UsageError("--private, --create-pr and --token need --push-to")
        return fn(*args, push=request, **kwargs)

    options = [
        click.option("--push-to", "push_to", metavar="OWNER/NAME", default=None,
                     callback=check_repo_id,
                     help="After writing, push the bundle to this Hub repo (created if missing)."),
        click.option("--private", "push_private", is_flag=True,
                     help="With --push-to: create the repo private."),
        click.option("--create-pr", "push_create_pr", is_flag=True,
                     help="With --push-to: open a pull request instead of committing to main."),
        token_option("push_token"),
        click.option("--verify", "push_verify", is_flag=True,
                     help=f"Verify the bundle against CKPT (writes {VERIFY_MARKDOWN} and "
                          f"{VERIFY_JSON} into it, shown on the model card); nothing is pushed "
                          "if it fails."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def wrote_line(out: Path | None, written: Path, files: list[str], limit: int = 8) -> str:
    """``wrote N files to OUT: a, b, ...``, the one line every converting command prints: OUT
    as the user gave it (the default one relative to the current folder when near it) and the
    file names: all of up to ``limit + 2``, else the first ``limit`` and how many more."""
    shown = str(out) if out is not None else os.path.relpath(written)
    if out is None and shown.startswith(os.path.join("..", "..")):
        shown = str(written)
    if len(files) <= limit + 2:
        limit = len(files)
    names = ", ".join(files[:limit])
    if len(files) > limit:
        names += f" and {len(files) - limit} more"
    return f"wrote {len(files)} files to {shown}: {names}"
