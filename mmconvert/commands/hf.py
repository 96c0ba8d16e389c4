"""``to-hf``: the Hugging Face bundle."""

from __future__ import annotations

from pathlib import Path

import click

from mmconvert.cli import user_errors
from mmconvert.commands.options import (
    ByteBar,
    PushRequest,
    dry_run_option,
    dtype_option,
    echo_warning,
    fold_linear_option,
    force_option,
    out_option,
    progress_option,
    push_options,
    size_arg,
    source_options,
    strict_option,
    wrote_line,
)
from mmconvert.commands.push import push_after_export


@click.command("to-hf")
@click.argument("ckpt", type=click.Path(path_type=Path))
@out_option("hf")
@dtype_option("Weight dtype; auto keeps the source's (config dtype follows).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest language-model shard (e.g. 5GB, 500MB, 2GiB); above it the weights "
                   "are split with model.safetensors.index.json.")
@fold_linear_option()
@source_options
@strict_option
@force_option()
@dry_run_option()
@push_options
@user_errors
@progress_option
def to_hf_cmd(ckpt: Path, out: Path | None, dtype: str, max_shard_size: str, fold_linear: bool,
              read: dict, strict: bool, force: bool, dry_run: bool, push: PushRequest,
              progress: ByteBar | None) -> None:
    """Write a Hugging Face folder: a standard Qwen3 model (loads with plain
    AutoModelForCausalLM, vLLM, ...) plus the projectors in multimodal_projector/model.safetensors and
    remote code, so that from_pretrained(OUT, trust_remote_code=True) takes
    mm_inputs={"m1": [tensor, ...], ...} in forward and generate. Also copies the tokenizer
    (with the multimodal token) and chat template, and writes generation_config.json with the
    merged eos ids, a model card README.md and mmconvert.json.

    \b
    Example:
      mmconvert to-hf ckpt/ -o ckpt-hf/ --dtype bfloat16
    """
    from mmconvert import api

    result = api.to_hf(ckpt, out, dtype=dtype,
                       max_shard_size=size_arg("--max-shard-size", max_shard_size),
                       fold_linear=fold_linear, force=force, strict=strict, dry_run=dry_run,
                       warn=echo_warning, progress=progress, **read)
    if dry_run:
        click.echo(result.plan)
        return
    click.echo(wrote_line(out, result.out, result.files))
    push_after_export(result.out, push)


COMMANDS = [to_hf_cmd]
