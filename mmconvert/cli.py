"""The ``mmconvert`` command line. Each command lives in a small module of its own
(``mmconvert/commands/``, over :mod:`mmconvert.api`; the options they share in
``commands/options.py``); this file holds the group and the one-line error handling."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path

import click

from mmconvert import __version__
from mmconvert.errors import MMConvertError

MAX_ERROR_LINE = 200  # the first line of an error; the rest goes on indented lines below it
_LEADING_PATH = re.compile(r"^(/[^:\n]*?): ")


def format_error(message: str) -> str:
    """``error: <cause>`` on the first line (at most :data:`MAX_ERROR_LINE` characters), details
    indented on the lines after it.

    Most messages start with the file they are about; a long absolute path would push the
    cause off the first line, so it is shortened to the file name and given in full below.
    A first line still too long is cut at the last clause break that fits.
    """
    first, *rest = message.strip().splitlines() or [""]
    first = first.strip()
    if len(first) + len("error: ") > MAX_ERROR_LINE and (m := _LEADING_PATH.match(first)):
        path = m.group(1)
        first = f"{Path(path).name or path}: {first[m.end():]}"
        rest.insert(0, f"file: {path}")
    while len(first) + len("error: ") > MAX_ERROR_LINE:
        first, tail = _split_clause(first, MAX_ERROR_LINE - len("error: "))
        rest.insert(0, tail)
    return "\n".join([f"error: {first}", *(f"  {line}" for line in rest)])


# where a too-long first line may break, best first: (separator, what ends the first line)
_CLAUSE_BREAKS = (("; ", ";"), (". ", "."), (": ", ":"), (" (", ""), (", ", ","), (" ", ""))


def _split_clause(line: str, width: int) -> tuple[str, str]:
    """``line`` cut to at most ``width`` characters at the best clause break, else hard."""
    for sep, keep in _CLAUSE_BREAKS:
        cut = line.rfind(sep, width // 3, width - len(keep))
        if cut > 0:
            rest = line[cut + 1:] if sep == " (" else line[cut + len(sep):]
            return line[:cut] + keep, rest.strip()
    return line[:width], line[width:]


def os_error_message(exc: OSError) -> str:
    """One line for an error the operating system raised: what failed, on which path."""
    reason = exc.strerror or exc.__class__.__name__
    where = ", ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{reason}: {where}" if where else f"{reason} ({exc})"


def report_error(exc: MMConvertError | OSError | KeyboardInterrupt) -> int:
    """Print the one ``error:`` line (further lines indented) for ``exc`` on stderr and return
    the exit code: the error's own (2), 2 for the OS refusing a write, 130 for Ctrl-C."""
    if isinstance(exc, MMConvertError):
        click.echo(format_error(str(exc)), err=True)
        return exc.exit_code
    if isinstance(exc, OSError):
        # the machine refused (disk full, read-only, busy, permission): not a bug of ours
        click.echo(format_error(os_error_message(exc)), err=True)
        return 2
    # a command writing an output folder leaves nothing under its name (formats/bundle.py)
    ctx = click.get_current_context(silent=True)
    writes = ctx is not None and ctx.info_name in ("to-gguf", "to-hf", "to-safetensors",
                                                   "example")
    click.echo("interrupted: nothing was written under the output name" if writes
               else "interrupted", err=True)
    return 130


def user_errors(fn: Callable) -> Callable:
    """Turn :class:`MMConvertError` (and the OS refusing a write, and Ctrl-C) into one
    ``error:`` line on stderr and its exit code (:func:`report_error`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MMConvertError, OSError, KeyboardInterrupt) as exc:
            sys.exit(report_error(exc))

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mmconvert")
def main() -> None:
    """Package multimodal Qwen3 checkpoints (per-modality projectors over a Qwen3 LLM) as
    Hugging Face, safetensors and GGUF bundles, and prove their logits match the original.

    \b
    Quick start:
      mmconvert example ckpt/          # a tiny checkpoint to try everything on
      mmconvert inspect ckpt/
      mmconvert to-gguf ckpt/ -o out/  # text GGUF + projector GGUF
      mmconvert verify ckpt/ out/      # logit parity of the bundle
    """


def _register_commands() -> None:
    from mmconvert.commands import core, gguf, hf, imatrix, push, run, verify

    for module in (core, hf, gguf, verify, push, run, imatrix):
        for command in module.COMMANDS:
            main.add_command(command)


_register_commands()
