"""``mmconvert verify``: logit parity of bundles against their source checkpoint (options,
the terminal report and the exit code over :func:`mmconvert.api.verify`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from mmconvert.api import BACKENDS
from mmconvert.cli import user_errors
from mmconvert.commands.options import echo_err, source_options, stderr_bar


class CaseBars:
    """A tqdm bar per verify stage (the reference's pass over the cases, then each target's),
    as :class:`mmconvert.verify.harness.StageProgress`; log lines printed while one is open go
    above it. Only on a terminal: the command makes none for a pipe or with ``--quiet``."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, stage: str, total: int) -> None:
        self.end()
        self._bar = stderr_bar(total, stage, "case")

    def step(self, item: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(item, refresh=False)
            self._bar.update(1)

    def end(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()

    def echo(self, line: str) -> None:
        if self._bar is None:
            echo_err(line)
        else:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)


@click.command("verify")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.argument("bundles", nargs=-1, type=click.Path(path_type=Path))
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="Where torch runs (auto: CUDA when available). A model "
              "larger than one GPU is spread by accelerate over the GPUs and CPU.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16"]), default="float32",
              show_default=True, help="Reference compute dtype (bfloat16 for models too big "
              "for fp32; looser thresholds then apply).")
@click.option("--offload", type=click.Choice(["auto", "never", "disk"]), default="auto",
              show_default=True, help="Layers that do not fit in RAM stay on disk, read in place "
              "from the checkpoint or bundle each forward (auto: when the model is larger than "
              "the memory available; disk: always on CPU runs; never: load everything).")
@click.option("--max-kld", type=click.FloatRange(min=0), default=None,
              help="Quality gate: fail a quantized bundle whose mean KLD against the source "
                   "exceeds this (its quantization loss; off by default).")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None,
              help="Quality gate: fail a quantized bundle whose top-1 agreement with the "
                   "source is below this fraction, e.g. 0.9 (off by default).")
@click.option("--imatrix", "imatrix", type=click.Path(path_type=Path), default=None,
              help="The importance-matrix FILE a GGUF bundle was quantized with (to-gguf "
                   "--imatrix): its weighted tensors are then checked byte for byte too.")
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
@click.option("-q", "--quiet", is_flag=True,
              help="No progress on stderr (lines, and a bar per stage when stderr is a "
                   "terminal).")
@user_errors
def verify_cmd(ckpt: Path, bundles: tuple[Path, ...], device: str, dtype: str, offload: str,
               max_kld: float | None, min_top1: float | None, imatrix: Path | None,
               cases_opt: str,
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
    A quantized GGUF is judged on its conversion (runtime against the reference forward on
    its own dequantized weights); its loss against the source is reported, and fails only
    above --max-kld / --min-top1.
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

    bars = None if quiet or not sys.stderr.isatty() else CaseBars()
    log = None if quiet else bars.echo if bars else echo_err
    try:
        result = api.verify(ckpt, bundles, device=device, dtype=dtype, cases=cases_opt,
                            greedy_tokens=greedy_tokens, thresholds=thresholds,
                            backends=backends, reference=reference,
                            save_reference=save_reference, report_json=report_json, junit=junit,
                            markdown=markdown, trust_bundle_code=trust_bundle_code, log=log,
                            warn=bars.echo if bars else echo_err, progress=bars,
                            offload=offload, max_kld=max_kld, min_top1=min_top1,
                            imatrix=imatrix, **read)
    finally:  # an error or Ctrl-C: the bar goes before the error line is printed
        if bars is not None:
            bars.end()
    if not bundles:
        return
    from mmconvert.verify.report import terminal_report  # torch: after api.verify checked it

    click.echo(terminal_report(result))
    sys.exit(0 if result.passed else 1)


COMMANDS = [verify_cmd]
