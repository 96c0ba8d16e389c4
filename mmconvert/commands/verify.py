"""``mmconvert verify``: logit parity of bundles against their source checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mmconvert.cli import load_model, source_options, user_errors
from mmconvert.errors import UsageError

BACKENDS = ("safetensors", "hf", "gguf_torch", "gguf_llama")


@click.command("verify")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path))
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="Where torch runs (auto: CUDA when available). A model "
              "larger than one GPU is spread by accelerate over the GPUs and CPU.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Reference compute dtype (bfloat16 for models too big "
              "for fp32; looser thresholds then apply).")
@click.option("--cases", "cases_opt", default="default", show_default=True,
              help="'default' (built-in seeded cases) or a cases FILE (.safetensors, see "
                   "docs/verification.md).")
@click.option("--greedy-tokens", type=click.IntRange(0, 256), default=8, show_default=True,
              help="Greedy continuation length per case (compared in the same forward pass).")
@click.option("--threshold", "thresholds", multiple=True, metavar="[TYPE.]METRIC=VALUE",
              help="Override a threshold, e.g. mean_kld=2e-3 or Q8_0.top1=0.98 or F32.max_abs=off.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(BACKENDS),
              help="Only these backends (default: every backend of each bundle's kind).")
@click.option("--save-reference", type=click.Path(path_type=Path, dir_okay=False),
              help="Save the reference (inputs, fp32 logits, checkpoint hash) to this file.")
@click.option("--reference", type=click.Path(path_type=Path, dir_okay=False),
              help="Compare against a saved reference instead of running the checkpoint.")
@click.option("--report-json", type=click.Path(path_type=Path, dir_okay=False),
              help="Write the full report as JSON.")
@click.option("--junit", type=click.Path(path_type=Path, dir_okay=False),
              help="Write a JUnit XML report (for CI).")
@click.option("--markdown", type=click.Path(path_type=Path, dir_okay=False),
              help="Write a markdown summary (for model cards).")
@click.option("--trust-bundle-code", is_flag=True,
              help="Import an HF bundle's Python code even when it is not the "
                   "modeling_mmqwen3.py this mmconvert writes (edited, other files, auto_map "
                   "pointing elsewhere). It runs with your permissions: only for bundles you "
                   "trust. Without it such a bundle is refused (exit 2); with it, a warning.")
@source_options
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
@user_errors
def verify_cmd(ckpt: Path, bundles: tuple[Path, ...], device: str, dtype: str, cases_opt: str,
               greedy_tokens: int, thresholds: tuple[str, ...], backends: tuple[str, ...],
               save_reference: Path | None, reference: Path | None, report_json: Path | None,
               junit: Path | None, markdown: Path | None, trust_bundle_code: bool, base,
               projector, projector_config, rope_layout, quiet: bool) -> None:
    """Check that each BUNDLE (a folder written by to-hf, to-safetensors or to-gguf; its kind
    is read from mmconvert.json) computes the same logits as the checkpoint CKPT.

    \b
    Per bundle and backend: the facts it declares (hyper-parameters, eos ids, placeholder,
    projector layers), every tensor against its source, and logits on seeded cases
    (text, each modality, several items, prepend rule, chat template, a long prompt) with
    max|Δlogit|, NMSE, KLD, top-1/top-5 and greedy agreement, held to per-type thresholds.
    Exit status: 0 every bundle passes, 1 a parity failure, 2 a usage or input error.

    \b
    Before anything is read, each bundle's files must match its mmconvert.json (sizes and
    sha256; a bundle whose files differ is refused as tampered, not compared), and an HF
    bundle's remote code must be the one this mmconvert writes (see --trust-bundle-code).

    \b
    Examples:
      mmconvert verify ckpt/ out-gguf/ out-hf/
      mmconvert verify ckpt/ --save-reference ref.safetensors      # on a GPU box
      mmconvert verify ckpt/ out-gguf/ --reference ref.safetensors --junit verify.xml
    """
    import torch

    from mmconvert.verify import golden, report
    from mmconvert.verify.cases import default_cases, load_cases_file
    from mmconvert.verify.harness import discover_all, run_reference, verify_bundles
    from mmconvert.verify.reference import resolve_device
    from mmconvert.verify.thresholds import parse_override

    if not bundles and not save_reference:
        raise UsageError("nothing to do: give at least one BUNDLE, or --save-reference FILE")
    if reference and save_reference:
        raise UsageError("--reference and --save-reference exclude each other")
    if reference and cases_opt != "default":
        raise UsageError("--cases cannot be used with --reference: the reference file "
                         "carries its own cases")
    overrides = [parse_override(t) for t in thresholds]

    def log(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    try:
        device = resolve_device(device)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    torch_dtype = getattr(torch, dtype)
    model = load_model(ckpt, base, projector, projector_config, rope_layout)
    # then the bundles: a tampered one is refused before minutes of reference forward passes
    targets = discover_all(list(bundles), backends, trust_code=trust_bundle_code,
                           warn=lambda line: click.echo(line, err=True))
    # the cases next (they render the chat template): every refusal comes before any progress
    if not reference:
        if cases_opt == "default":
            cases = default_cases(model, generate=greedy_tokens)
        else:
            cases = load_cases_file(Path(cases_opt), model, greedy_tokens)
    log(f"hashing the checkpoint's source files ({len(golden.source_files(model))})")
    content_hash, files = golden.checkpoint_hash(model)
    if reference:
        ref = golden.load_reference(reference, model, content_hash, files)
        torch_dtype = getattr(torch, ref.dtype)
        log(f"reference: {reference} ({len(ref.cases)} cases, made on {ref.device}, "
            f"{ref.dtype})")
    else:
        ref = run_reference(model, cases, device, torch_dtype, log)
        log(f"reference: {len(cases)} cases in {ref.seconds:.2f}s")
    if save_reference:
        golden.save_reference(save_reference, ref, content_hash, files)
        log(f"saved reference to {save_reference}")
    if not bundles:
        return
    result = verify_bundles(model, targets, ref, content_hash, device, torch_dtype,
                            overrides, log)
    click.echo(report.terminal_report(result))
    if report_json:
        report.write_json(result, report_json)
    if junit:
        report.write_junit(result, junit)
    if markdown:
        report.write_markdown(result, markdown)
    sys.exit(0 if result.passed else 1)


COMMANDS = [verify_cmd]
