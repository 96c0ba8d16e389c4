"""``imatrix``: an importance matrix from the reference forward pass over a calibration text,
written in llama.cpp's GGUF imatrix format (``to-gguf --imatrix`` and ``llama-quantize
--imatrix`` both read it). Needs torch and transformers (the [verify] extra); imports stay
inside the command so that ``mmconvert --help`` is instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from mmconvert.cli import user_errors
from mmconvert.commands.options import echo_err, echo_warning, source_options, stderr_bar


@click.command("imatrix")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--calibration", type=click.Path(path_type=Path, dir_okay=False), required=True,
              help="UTF-8 text file the statistics are collected over (llama-imatrix's -f).")
@click.option("--embeddings", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="safetensors file of precomputed embeddings (as `mmconvert run` takes): their "
                   "projected rows replace the calibration text's placeholders (or go before "
                   "it), so the statistics include them.")
@click.option("-o", "--out", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("imatrix.gguf"), show_default=True, help="The imatrix file to write.")
@click.option("--chunk-size", type=click.IntRange(min=16), default=512, show_default=True,
              help="Tokens per chunk, each run from an empty context (llama-imatrix's -c).")
@click.option("--chunks", type=click.IntRange(min=1), default=None,
              help="Most chunks to process [default: every whole chunk of the text].")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto",
              show_default=True, help="Where the reference forward runs (auto: CUDA when "
                                      "torch sees a GPU).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("-q", "--quiet", is_flag=True,
              help="No progress bar (one is shown only when stderr is a terminal).")
@source_options
@user_errors
def imatrix_cmd(ckpt: Path, calibration: Path, embeddings: Path | None, out: Path,
                chunk_size: int, chunks: int | None, device: str, force: bool, quiet: bool,
                read: dict) -> None:
    """Compute an importance matrix for CKPT: per matmul weight of the language model (and per
    expert), the sums of squared input activations and their token counts over chunks of the
    --calibration text, as llama.cpp's llama-imatrix collects them (docs/quantization.md).

    \b
    Example:
      mmconvert imatrix ckpt/ --calibration wiki.train.raw -o imatrix.gguf
      mmconvert to-gguf ckpt/ --outtype q4_k_m --imatrix imatrix.gguf
    """
    from mmconvert.errors import ImatrixError, OutputError, import_extra

    import_extra("torch", extra="verify", job="mmconvert imatrix")
    import_extra("transformers", extra="verify", job="mmconvert imatrix")
    from mmconvert.api import read_options
    from mmconvert.convert.readers import read_checkpoint
    from mmconvert.formats.imatrix import write_imatrix_gguf
    from mmconvert.verify.imatrix_compute import compute_imatrix, tokenize_calibration
    from mmconvert.verify.reference import resolve_device

    if out.exists() and not force:
        raise OutputError(f"{out}: exists; add --force to replace it", path=out)
    if out.exists() and out.resolve() in {calibration.resolve(), *(
            [embeddings.resolve()] if embeddings else [])}:
        raise OutputError(f"{out}: is an input of this run", path=out)
    try:
        text = calibration.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ImatrixError(f"--calibration {calibration}: no such file",
                           path=calibration) from None
    except UnicodeDecodeError as exc:
        raise ImatrixError(f"--calibration {calibration}: not UTF-8 text ({exc.reason} at byte "
                           f"{exc.start})", path=calibration) from None
    try:
        device = resolve_device(device)
    except ValueError as exc:
        raise ImatrixError(str(exc)) from None
    model = read_checkpoint(ckpt, read_options(**read))
    mm_inputs, text = _multimodal(model, embeddings, text)
    ids = tokenize_calibration(model, text)
    bar = _Bar() if not quiet and sys.stderr.isatty() else None
    try:
        result = compute_imatrix(model, ids, mm_inputs=mm_inputs, chunk_size=chunk_size,
                                 max_chunks=chunks, device=device, datasets=(str(calibration),),
                                 start=bar.start if bar else None,
                                 progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    for note in result.notes:
        echo_warning(note)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        write_imatrix_gguf(partial, result.imatrix)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    echo_err(f"imatrix: {len(result.imatrix.entries)} entries from {result.chunks} chunks of "
             f"{chunk_size} tokens ({result.tokens} in the text) on {result.device}")
    click.echo(f"wrote {out}")


def _multimodal(model, embeddings: Path | None, text: str):
    """(items per modality as torch tensors, the text with per-item placeholders expanded)."""
    if embeddings is None:
        return None, text
    import torch

    from mmconvert.errors import ImatrixError, RunInputError
    from mmconvert.runtime.run_inputs import expand_placeholders, load_embeddings

    items = load_embeddings(embeddings)
    rows = [1 if a.ndim == 1 else a.shape[0] for m in model.projectors
            for a in items.get(m, [])]
    token = model.multimodal_token
    try:
        text = expand_placeholders(text, token, rows) if token else text
    except RunInputError as exc:
        raise ImatrixError(f"--calibration: {exc}") from None
    return {m: [torch.from_numpy(a) for a in v] for m, v in items.items()}, text


class _Bar:
    """A tqdm bar over the chunks (opened once their number is known)."""

    def __init__(self) -> None:
        self._bar = None

    def start(self, total: int) -> None:
        self._bar = stderr_bar(total, "imatrix", "chunk")

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.close()


COMMANDS = [imatrix_cmd]
