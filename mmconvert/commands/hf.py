"""``to-hf``: the Hugging Face bundle."""

from __future__ import annotations

from pathlib import Path

import click

from mmconvert.cli import load_model, source_options, strict_option, user_errors
from mmconvert.commands.push import PushRequest, push_after_export, push_options
from mmconvert.errors import OutputError


@click.command("to-hf")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Output folder (default: <CKPT>-hf beside the checkpoint).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              default="auto", show_default=True,
              help="Weight dtype; auto keeps the source's (config dtype follows).")
@click.option("--max-shard-size", default="5GB", show_default=True,
              help="Largest language-model shard (e.g. 5GB, 500MB, 2GiB); above it the weights "
                   "are split with model.safetensors.index.json.")
@click.option("--fold-linear", is_flag=True,
              help="Fold projector linear layers that follow each other with nothing in "
                   "between (a low-rank down/up pair) into one matrix, computed in float64.")
@source_options
@strict_option
@click.option("--force", is_flag=True,
              help="Replace OUT if it holds an earlier mmconvert bundle (nothing else).")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@push_options
@user_errors
def to_hf_cmd(ckpt: Path, out: Path | None, dtype: str, max_shard_size: str, fold_linear: bool,
              base, projector, projector_config, rope_layout, force: bool, dry_run: bool,
              push: PushRequest) -> None:
    """Write a Hugging Face folder: a standard Qwen3 model (loads with plain
    AutoModelForCausalLM, vLLM, ...) plus the projectors in multimodal_projector.safetensors and
    remote code, so that from_pretrained(OUT, trust_remote_code=True) takes
    mm_inputs={"m1": [tensor, ...], ...} in forward and generate. Also copies the tokenizer
    (with the multimodal token) and chat template, and writes generation_config.json with the
    merged eos ids, a model card README.md and mmconvert.json.

    \b
    Example:
      mmconvert to-hf ckpt/ -o ckpt-hf/ --dtype bfloat16
    """
    from mmconvert.convert.export_hf import export_hf
    from mmconvert.convert.plan_hf import plan_hf
    from mmconvert.formats.bundle import named_inputs
    from mmconvert.formats.safetensors_writer import parse_size

    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise OutputError(f"--max-shard-size: {exc}") from exc
    model = load_model(ckpt, base, projector, projector_config, rope_layout)
    for warning in model.warnings:
        click.echo(f"warning: {warning}", err=True)
    if dry_run:
        lm_plan, projector_plan = plan_hf(model, dtype, fold_linear)
        click.echo(lm_plan.describe())
        click.echo(projector_plan.describe())
        return
    if out is None:
        source = ckpt.resolve()
        out = source.parent / f"{source.name}-hf"
    files = export_hf(model, out, dtype=dtype, max_shard_bytes=shard_bytes, force=force,
                      fold_linear=fold_linear,
                      inputs=named_inputs(ckpt, base, projector, projector_config))
    click.echo(f"wrote {len(files)} files to {out}")
    push_after_export(out, push)


COMMANDS = [to_hf_cmd]
