"""``example``, ``inspect`` and ``to-safetensors``: options and printing over
:mod:`mmconvert.api`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mmconvert.cli import user_errors
from mmconvert.commands.options import (
    ByteBar,
    PushRequest,
    dry_run_option,
    dtype_option,
    echo_warning,
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


@click.command("example")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@force_option("output")
@user_errors
def example_cmd(out: Path, force: bool) -> None:
    """Write a tiny deterministic multimodal Qwen3 checkpoint (two modalities, real BPE
    tokenizer with the multimodal token) into OUT, to try every command without a download."""
    from mmconvert import api

    api.example(out, force=force)
    click.echo(f"wrote example checkpoint to {out}")


def _format_inspect(s: dict) -> str:
    t = s["text"]
    lines = [
        f"dialect:          {s['dialect']}",
        f"source:           {s['source']}",
        f"base model:       {s['base_model_name']}",
        f"text model:       Qwen3, {t['num_hidden_layers']} layers, hidden {t['hidden_size']}, "
        f"ffn {t['intermediate_size']}, heads {t['num_attention_heads']}/{t['num_key_value_heads']} "
        f"(q/kv), head_dim {t['head_dim']}",
        f"                  rope theta {t['rope_theta']:g} ({t['rope_layout']} layout), "
        f"rms eps {t['rms_norm_eps']:g}, context {t['max_position_embeddings']}",
        f"vocab:            {s['vocab']['embedding_rows']} embedding rows, "
        f"{s['vocab']['tokenizer_size']} tokenizer tokens",
        f"embeddings:       {'tied' if s['tied_embeddings'] else 'untied (lm_head stored)'}",
        f"placeholder:      {s['multimodal_token']} = id {s['multimodal_token_id']} "
        f"(fusion: {s['fusion_strategy']})",
    ]
    for kind in ("bos", "eos", "pad"):
        ids = s["special_ids"][kind]
        prov = "; ".join(f"{Path(f).name}={v}" for f, v in s["special_ids"]["provenance"][kind])
        lines.append(f"{kind + ':':<18}{ids or '-'}  ({prov or 'not set'})")
    lines.append("modalities:")
    for name, m in s["modalities"].items():
        kinds = " -> ".join(layer["name"] for layer in m["layers"])
        lines.append(f"  {name}: input {m['input_dim']} -> hidden {m['hidden_dim']} -> "
                     f"{m['output_dim']}, {m['projector_type']}, act {m['activation'] or 'none'}, "
                     f"layer norm {'on' if m['layer_norm'] else 'off'}, "
                     f"{m['parameters']:,} params ({kinds})")
    p = s["parameters"]
    lines.append(f"parameters:       {p['language_model']:,} LM + {p['projectors']:,} projectors "
                 f"in {s['tensors']} tensors")
    lines.append("dtypes:           " + ", ".join(f"{k} x{v}" for k, v in s["dtypes"].items()))
    for step, count in s["read_transforms"].items():
        lines.append(f"transform:        {step} on {count} tensors (while reading)")
    if "plans" in s:
        from mmconvert.convert.plan_summary import format_planned

        lines += format_planned(s["plans"], s.get("fold_linear", False))
    lines.append("files:")
    lines += [f"  {role}: {path}" for role, path in s["files"].items()]
    for w in s["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


@click.command("inspect")
@click.argument("ckpt", type=click.Path(path_type=Path))
@source_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a summary.")
@click.option("--fold-linear", is_flag=True,
              help="Show the plans as to-gguf/to-hf --fold-linear would make them.")
@user_errors
def inspect_cmd(ckpt: Path, read: dict, as_json: bool, fold_linear: bool) -> None:
    """Describe a checkpoint: dialect, Qwen3 text spec, modalities, special ids and where each
    came from, dtypes, parameter counts, warnings, and every transform each export (gguf, hf,
    safetensors) would apply. Reads headers only."""
    from mmconvert import api

    summary = api.inspect(ckpt, fold_linear=fold_linear, **read)
    click.echo(json.dumps(summary, indent=2) if as_json else _format_inspect(summary))


@click.command("to-safetensors")
@click.argument("ckpt", type=click.Path(path_type=Path))
@out_option("safetensors")
@dtype_option("Cast floating tensors (auto keeps them).")
@click.option("--naming", type=click.Choice(["source", "hf"]), default="source", show_default=True,
              help="source: the checkpoint's own names (loads back into the training code); "
                   "hf: the HF bundle's names.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Shard size limit.")
@source_options
@strict_option
@force_option()
@dry_run_option()
@push_options
@user_errors
@progress_option
def to_safetensors_cmd(ckpt: Path, out: Path | None, dtype: str, naming: str,
                       max_shard_size: str, read: dict, strict: bool, force: bool,
                       dry_run: bool, push: PushRequest, progress: ByteBar | None) -> None:
    """Write every tensor (language model and projectors) as sharded safetensors with an
    index. Pickled inputs become safetensors without executing anything; tied tensors are
    written once."""
    from mmconvert import api

    result = api.to_safetensors(ckpt, out, dtype=dtype, naming=naming,
                                max_shard_size=size_arg("--max-shard-size", max_shard_size),
                                force=force, strict=strict, dry_run=dry_run,
                                warn=echo_warning, progress=progress, **read)
    if dry_run:
        click.echo(result.plan)
        return
    click.echo(wrote_line(out, result.out, result.files))
    push_after_export(result.out, push)


COMMANDS = [example_cmd, inspect_cmd, to_safetensors_cmd]
