"""The ``mmconvert`` command line. Each command lives in a small module of its own; this file
holds the group, the options every command shares and the one-line error handling."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path

import click

from mmconvert import __version__
from mmconvert.convert.errors import MMConvertError


def source_options(fn: Callable) -> Callable:
    """Options that say how to read the checkpoint (shared by every converting command)."""
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


def user_errors(fn: Callable) -> Callable:
    """Turn :class:`MMConvertError` into one line on stderr and its exit code (2)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MMConvertError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
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
    from mmconvert.convert import cmd_core, cmd_gguf, cmd_hf, cmd_push, cmd_run
    from mmconvert.verify import cmd_verify

    for module in (cmd_core, cmd_hf, cmd_gguf, cmd_verify, cmd_push, cmd_run):
        for command in module.COMMANDS:
            main.add_command(command)


_register_commands()
