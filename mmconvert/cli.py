"""The ``mmconvert`` command line. Each command lives in a small module of its own; this file
holds the group, the options every command shares and the one-line error handling."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path

import click

from mmconvert import __version__
from mmconvert.errors import MMConvertError


def strict_option(fn: Callable) -> Callable:
    """``--strict`` for the commands that write weights: they run under the NaN/Inf policy of
    :mod:`mmconvert.formats.nonfinite` (a warning per tensor on stderr as the writers finish,
    or a refusal with ``--strict``)."""

    @functools.wraps(fn)
    def under_nonfinite_policy(*args, strict: bool = False, **kwargs):
        from mmconvert.formats.nonfinite import scanning

        with scanning(strict, lambda line: click.echo(f"warning: {line}", err=True)):
            return fn(*args, **kwargs)

    return click.option("--strict", is_flag=True,
                        help="Refuse (exit 2, nothing written) weights holding NaN or Inf, "
                             "which are otherwise written with a warning per tensor.")(
        under_nonfinite_policy)


def source_options(fn: Callable) -> Callable:
    """Options that say how to read the checkpoint (shared by every command that reads one)."""
    fn = click.option("--rope-layout", type=click.Choice(["neox", "interleaved"]), default=None,
                      help="Rope layout the source's Q/K were trained with (default: the "
                           "checkpoint's flag, else neox as in HF Qwen3).")(fn)
    fn = click.option("--projector-config", type=click.Path(path_type=Path, dir_okay=False),
                      default=None, help="JSON config of --projector (modality_configs, ...).")(fn)
    fn = click.option("--projector", type=click.Path(path_type=Path, dir_okay=False),
                      default=None, help="Projector weights for a plain Qwen3 folder.")(fn)
    fn = click.option("--base", type=click.Path(path_type=Path, file_okay=False), default=None,
                      help="Base Qwen3 folder (config, tokenizer, generation config) when the "
                           "checkpoint does not embed them.")(fn)
    return fn


def read_options(base, projector, projector_config, rope_layout):
    from mmconvert.convert.readers import ReadOptions

    return ReadOptions(base=base, projector=projector, projector_config=projector_config,
                       rope_layout=rope_layout)


def load_model(ckpt: Path, base=None, projector=None, projector_config=None, rope_layout=None):
    from mmconvert.convert.readers import read_checkpoint

    return read_checkpoint(ckpt, read_options(base, projector, projector_config, rope_layout))


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


def _split_clause(line: str, width: int) -> tuple[str, str]:
    """``line`` cut before ``width`` at a clause break ("; ", ": ", " (", ", ", " "), else hard."""
    for sep in ("; ", ". ", ": ", " (", ", ", " "):
        cut = line.rfind(sep, width // 3, width - 1)
        if cut > 0:
            keep = sep.rstrip() if sep.strip() in (";", ".", ":", ",") else ""
            return line[:cut] + keep, line[cut + len(sep) - (1 if sep == " (" else 0):].strip()
    return line[:width], line[width:]


def os_error_message(exc: OSError) -> str:
    """One line for an error the operating system raised: what failed, on which path."""
    reason = exc.strerror or exc.__class__.__name__
    where = ", ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{reason}: {where}" if where else f"{reason} ({exc})"


def user_errors(fn: Callable) -> Callable:
    """Turn :class:`MMConvertError` (and the OS refusing a write) into one ``error:`` line on
    stderr and exit code 2; a message's further lines are printed indented below it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MMConvertError as exc:
            click.echo(format_error(str(exc)), err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            # the machine refused (disk full, read-only, busy, permission): not a bug of ours
            click.echo(format_error(os_error_message(exc)), err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written under the output name", err=True)
            sys.exit(130)

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
    from mmconvert.commands import core, gguf, hf, push, run, verify

    for module in (core, hf, gguf, verify, push, run):
        for command in module.COMMANDS:
            main.add_command(command)


_register_commands()
