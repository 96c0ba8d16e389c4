"""``mmconvert verify``: logit parity of bundles against their source checkpoint (options,
the terminal report and the exit code over :func:`mmconvert.api.verify`)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mmconvert.api import BACKENDS
from mmconvert.cli import user_errors
from mmconvert.commands.options import echo_err, source_options


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
               junit: Path | None, markdown: Path | None, trust_bundle_code: bool, read: dict,
               quiet: bool) -> None:
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
    from mmconvert import api
    from mmconvert.verify.report import terminal_report

    result = api.verify(ckpt, bundles, device=device, dtype=dtype, cases=cases_opt,
                        greedy_tokens=greedy_tokens, thresholds=thresholds, backends=backends,
                        reference=reference, save_reference=save_reference,
                        report_json=report_json, junit=junit, markdown=markdown,
                        trust_bundle_code=trust_bundle_code, log=None if quiet else echo_err,
                        warn=echo_err, **read)
    if not bundles:
        return
    click.echo(terminal_report(result))
    sys.exit(0 if result.passed else 1)


COMMANDS = [verify_cmd]
