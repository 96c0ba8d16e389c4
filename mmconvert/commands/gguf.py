"""``to-gguf``: the product's main command.

Imports stay inside the command so that ``mmconvert --help`` is instant, and nothing on this
path imports torch or transformers (each would cost 60-220 MB of RSS for no work done).
"""

from __future__ import annotations

from pathlib import Path

import click

from mmconvert.cli import load_model, source_options, strict_option, user_errors
from mmconvert.commands.push import PushRequest, push_after_export, push_options
from mmconvert.errors import OutputError

OUTTYPE_CHOICES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "auto"]


@click.command("to-gguf")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Output folder [default: <ckpt>-gguf].")
@click.option("--outtype", "outtypes", multiple=True,
              type=click.Choice(OUTTYPE_CHOICES, case_sensitive=False),
              help="Type of the text model's weight matrices; repeat for several files from one "
                   "read of the source. auto: BF16 (F16 for an F16 source). [default: auto]")
@click.option("--projector-outtype", type=click.Choice(["f32", "f16", "q8_0"],
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
@click.option("--fold-linear", is_flag=True,
              help="Fold projector linear layers that follow each other with nothing in "
                   "between (a low-rank down/up pair) into one matrix, computed in float64.")
@source_options
@strict_option
@click.option("--checksums/--no-checksums", default=True, show_default=True,
              help="Record the sha256 of every source and output file in mmconvert.json "
                   "(outputs are hashed while written, sources once per file version).")
@click.option("--force", is_flag=True,
              help="Replace OUT if it holds an earlier mmconvert bundle (nothing else).")
@click.option("--dry-run", is_flag=True, help="Print the plan and files and write nothing.")
@push_options
@user_errors
def to_gguf_cmd(ckpt: Path, out, outtypes, projector_outtype, split_max_size, name,
                pre_tokenizer, fold_linear, base, projector, projector_config, rope_layout,
                checksums, force, dry_run, push: PushRequest) -> None:
    """Write GGUF files for llama.cpp: the Qwen3 text model with its full tokenizer (one file
    per --outtype), the projector GGUF for the embedding-only modalities
    (docs/gguf-projector.md) and mmconvert.json.

    \b
    Example:
      mmconvert to-gguf ckpt/ --outtype f16 --outtype q8_0
    """
    from mmconvert.convert.export_gguf import export_gguf, prepare_gguf
    from mmconvert.formats.bundle import named_inputs
    from mmconvert.formats.safetensors_writer import parse_size

    split_bytes = None
    if split_max_size:
        try:
            split_bytes = parse_size(split_max_size)
        except ValueError as exc:
            raise OutputError(f"--split-max-size: {exc}") from exc
    outtypes = tuple(t.lower() for t in outtypes) or ("auto",)
    model = load_model(ckpt, base, projector, projector_config, rope_layout)
    options = dict(outtypes=outtypes, projector_outtype=projector_outtype.lower(), name=name,
                   split_max_bytes=split_bytes, pre_tokenizer=pre_tokenizer,
                   fold_linear=fold_linear)
    if dry_run:
        click.echo(prepare_gguf(model, **options).describe())
        return
    if out is None:  # beside the checkpoint, also when CKPT is spelt `.`
        source = ckpt.resolve()
        out = source.parent / f"{source.name}-gguf"
    files = export_gguf(model, out, force=force, checksums=checksums,
                        log=lambda m: click.echo(m, err=True),
                        inputs=named_inputs(ckpt, base, projector, projector_config), **options)
    click.echo(f"wrote {len(files)} files to {out}: {', '.join(files)}")
    push_after_export(out, push)


COMMANDS = [to_gguf_cmd]
