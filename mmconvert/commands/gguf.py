"""``to-gguf``: the product's main command.

Imports stay inside the command so that ``mmconvert --help`` is instant, and nothing on this
path imports torch or transformers (each would cost 60-220 MB of RSS for no work done).
"""

from __future__ import annotations

from pathlib import Path

import click

from mmconvert.cli import user_errors
from mmconvert.commands.options import (
    ByteBar,
    PushRequest,
    dry_run_option,
    echo_err,
    echo_warning,
    fold_linear_option,
    force_option,
    out_option,
    progress_option,
    push_options,
    quantize_options,
    size_arg,
    source_options,
    strict_option,
    wrote_line,
)
from mmconvert.commands.push import push_after_export
from mmconvert.formats.gguf_constants import OUTTYPES, PROJECTOR_OUTTYPES

OUTTYPE_CHOICES = list(OUTTYPES)


@click.command("to-gguf")
@click.argument("ckpt", type=click.Path(path_type=Path))
@out_option("gguf")
@click.option("--outtype", "outtypes", multiple=True,
              type=click.Choice(OUTTYPE_CHOICES, case_sensitive=False),
              help="Type of the text model's weight matrices; repeat for several files from one "
                   "read of the source. auto: BF16 (F16 for an F16 source). q2_k ... q6_k, "
                   "iq4_nl, iq4_xs: llama-quantize's mixtures, each tensor the type it would "
                   "choose (docs/quantization.md). [default: auto]")
@click.option("--projector-outtype", type=click.Choice(list(PROJECTOR_OUTTYPES),
                                                       case_sensitive=False),
              default="f16", show_default=True, help="Type of the projector's linear weights.")
@click.option("--split-max-size", default=None,
              help="Split each text GGUF into shards of at most this much tensor data "
                   "(e.g. 2G, 500M), named <file>-00001-of-0000N.gguf as llama.cpp expects.")
@click.option("--name", default=None,
              help="Model name for general.name and file names [default: the checkpoint "
                   "folder's name].")
@click.option("--pre-tokenizer", default=None, metavar="NAME",
              help="llama.cpp pre-tokenizer name (e.g. qwen2) when detection does not "
                   "recognise the tokenizer.")
@quantize_options
@click.option("--imatrix", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Importance matrix (llama.cpp's imatrix.gguf or legacy .dat; `mmconvert "
                   "imatrix` writes one): quantized tensors use its weights as llama-quantize "
                   "--imatrix does.")
@fold_linear_option()
@source_options
@strict_option
@click.option("--checksums/--no-checksums", default=True, show_default=True,
              help="Record the sha256 of every source and output file in mmconvert.json "
                   "(outputs are hashed while written, sources once per file version).")
@force_option()
@dry_run_option("Print the plan and files and write nothing.")
@push_options
@user_errors
@progress_option
def to_gguf_cmd(ckpt: Path, out: Path | None, outtypes: tuple[str, ...],
                projector_outtype: str, split_max_size: str | None, name: str | None,
                pre_tokenizer: str | None, imatrix: Path | None, fold_linear: bool, read: dict,
                quantize: dict,
                strict: bool,
                checksums: bool, force: bool, dry_run: bool, push: PushRequest,
                progress: ByteBar | None) -> None:
    """Write GGUF files for llama.cpp: the Qwen3 text model with its full tokenizer (one file
    per --outtype), the projector GGUF for the embedding-only modalities
    (docs/gguf-projector.md) and mmconvert.json.

    \b
    Example:
      mmconvert to-gguf ckpt/ --outtype f16 --outtype q8_0
      mmconvert to-gguf ckpt/ --outtype q4_k_m --outtype q6_k
    """
    from mmconvert import api

    result = api.to_gguf(ckpt, out, outtypes=outtypes, projector_outtype=projector_outtype,
                         split_max_size=size_arg("--split-max-size", split_max_size), name=name,
                         pre_tokenizer=pre_tokenizer, fold_linear=fold_linear,
                         checksums=checksums, force=force, strict=strict, dry_run=dry_run,
                         log=echo_err, warn=echo_warning, progress=progress, imatrix=imatrix,
                         **quantize,
                         **read)
    if dry_run:
        click.echo(result.plan)
        return
    click.echo(wrote_line(out, result.out, result.files))
    push_after_export(result.out, push)


COMMANDS = [to_gguf_cmd]
