"""``example``, ``inspect`` and ``to-safetensors``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mmconvert.cli import load_model, source_options, strict_option, user_errors
from mmconvert.commands.push import PushRequest, push_after_export, push_options
from mmconvert.errors import OutputError


@click.command("example")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("--force", is_flag=True,
              help="Replace OUT if it holds an earlier mmconvert output (nothing else).")
@user_errors
def example_cmd(out: Path, force: bool) -> None:
    """Write a tiny deterministic multimodal Qwen3 checkpoint (two modalities, real BPE
    tokenizer with the multimodal token) into OUT, to try every command without a download."""
    from mmconvert.convert.example import write_example
    from mmconvert.formats.bundle import BundleDir, write_marker_manifest

    with BundleDir(out, force) as tmp:
        write_example(tmp)
        write_marker_manifest(tmp, kind="example")  # ours: --force may replace it later
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
def inspect_cmd(ckpt: Path, base, projector, projector_config, rope_layout, as_json: bool,
                fold_linear: bool) -> None:
    """Describe a checkpoint: dialect, Qwen3 text spec, modalities, special ids and where each
    came from, dtypes, parameter counts, warnings, and every transform each export (gguf, hf,
    safetensors) would apply. Reads headers only."""
    from mmconvert.convert.plan_summary import planned_transforms

    model = load_model(ckpt, base, projector, projector_config, rope_layout)
    summary = model.summary()
    summary["plans"] = planned_transforms(model, fold_linear)
    summary["fold_linear"] = fold_linear
    click.echo(json.dumps(summary, indent=2) if as_json else _format_inspect(summary))


@click.command("to-safetensors")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Output folder [default: <ckpt>-safetensors].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
              default="auto", show_default=True, help="Cast floating tensors (auto keeps them).")
@click.option("--naming", type=click.Choice(["source", "hf"]), default="source", show_default=True,
              help="source: the checkpoint's own names (loads back into the training code); "
                   "hf: the HF bundle's names.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Shard size limit.")
@source_options
@strict_option
@click.option("--force", is_flag=True,
              help="Replace OUT if it holds an earlier mmconvert bundle (nothing else).")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@push_options
@user_errors
def to_safetensors_cmd(ckpt: Path, out, dtype, naming, max_shard_size, base, projector,
                       projector_config, rope_layout, force, dry_run, push: PushRequest) -> None:
    """Write every tensor (language model and projectors) as sharded safetensors with an
    index. Pickled inputs become safetensors without executing anything; tied tensors are
    written once."""
    from mmconvert.convert.export_safetensors import export_safetensors
    from mmconvert.convert.plan_safetensors import plan_safetensors
    from mmconvert.formats.bundle import named_inputs
    from mmconvert.formats.safetensors_writer import parse_size

    try:
        shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise OutputError(f"--max-shard-size: {exc}") from exc
    model = load_model(ckpt, base, projector, projector_config, rope_layout)
    if dry_run:
        click.echo(plan_safetensors(model, naming, dtype).describe())
        return
    if out is None:  # beside the checkpoint, also when CKPT is spelt `.`
        source = ckpt.resolve()
        out = source.parent / f"{source.name}-safetensors"
    files = export_safetensors(model, out, naming=naming, dtype=dtype, max_shard_bytes=shard_bytes,
                               force=force,
                               inputs=named_inputs(ckpt, base, projector, projector_config))
    click.echo(f"wrote {len(files)} files to {out}")
    push_after_export(out, push)


COMMANDS = [example_cmd, inspect_cmd, to_safetensors_cmd]
