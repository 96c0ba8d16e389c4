"""``run``: generate from a GGUF bundle in llama.cpp, with projected embeddings spliced in.

No existing runtime understands an embedding-only projector, so this is what makes a bundle
usable: the projector GGUF runs in numpy (:mod:`mmconvert.runtime.mmproj`), its rows enter
llama.cpp through ``llama_batch.embd`` (:mod:`mmconvert.runtime.llama_runtime`). Nothing here
imports torch; imports stay inside the command so that ``mmconvert --help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mmconvert.cli import user_errors
from mmconvert.commands.options import echo_warning

DEFAULT_TOP_K = 40  # llama.cpp's defaults, when the GGUF has no general.sampling.* keys
DEFAULT_TOP_P = 0.95


@click.command("run")
@click.argument("out", type=click.Path(path_type=Path, file_okay=False))
@click.option("-p", "--prompt", required=True,
              help="Prompt text. Each <|multimodal|> (the bundle's placeholder token) stands "
                   "for one projected row, or for a whole item when there is one per item; "
                   "with none, all rows go before the prompt.")
@click.option("--embeddings", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="safetensors file of precomputed embeddings: a tensor named <modality> is "
                   "one item, tensors <modality>.0, <modality>.1, ... are items in that order; "
                   "each [n, input_dim] or [input_dim], float (docs/running.md).")
@click.option("--max-tokens", type=click.IntRange(min=0), default=128, show_default=True,
              help="Most tokens to generate.")
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-k", type=click.IntRange(min=0), default=None,
              help="Top-k when sampling (0: off) [default: the GGUF's general.sampling.top_k, "
                   f"else {DEFAULT_TOP_K}].")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0), default=None,
              help="Top-p when sampling (1: off) [default: the GGUF's general.sampling.top_p, "
                   f"else {DEFAULT_TOP_P}].")
@click.option("--seed", type=int, default=None, help="Sampling seed [default: random].")
@click.option("--chat", is_flag=True,
              help="Apply the GGUF's chat template to the prompt (one user turn, assistant "
                   "turn opened).")
@click.option("--system", default=None, help="System message for --chat.")
@click.option("--text-gguf", default=None, metavar="NAME",
              help="Which text GGUF of the bundle: its file name or type (e.g. q8_0) "
                   "[default: the most precise].")
@click.option("--n-ctx", type=click.IntRange(min=1), default=None,
              help="Context size [default: prompt + --max-tokens, within the model's].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads [default: all cores].")
@click.option("-v", "--verbose", is_flag=True,
              help="Print the prompt as it runs (template applied, placeholders expanded) and "
                   "its token ids to stderr.")
@user_errors
def run_cmd(out: Path, prompt: str, embeddings: Path | None, max_tokens: int, temp: float,
            top_k: int | None, top_p: float | None, seed: int | None, chat: bool,
            system: str | None, text_gguf: str | None, n_ctx: int | None,
            threads: int | None, verbose: bool) -> None:
    """Generate text from the GGUF bundle OUT (written by `mmconvert to-gguf`) with llama.cpp:
    the projector GGUF projects the --embeddings, the rows replace the prompt's placeholders
    (or are prepended), and generation stops at any of the bundle's eos ids. Text streams to
    stdout, timings go to stderr. Needs the [llama] extra
    (llama-cpp-python: pip install -e '.[llama]' in the mmconvert checkout).

    \b
    Example:
      mmconvert run out/ --embeddings emb.safetensors --chat \\
          --prompt "Describe <|multimodal|> in one line."
    """
    from mmconvert.runtime.llama_runtime import TextModel, TextStream
    from mmconvert.runtime.mmproj import read_projector_gguf
    from mmconvert.runtime.run_inputs import (
        RunInputError,
        build_prompt,
        choose_files,
        context_size,
        load_embeddings,
    )

    if system is not None and not chat:
        raise RunInputError("--system is a chat turn: add --chat")
    files = choose_files(out, text_gguf)
    items = load_embeddings(embeddings) if embeddings else {}
    projector = read_projector_gguf(files.projector) if files.projector else None
    if items and projector is None:
        raise RunInputError(f"--embeddings: {out} has no projector GGUF (the model has no "
                            "modalities)")
    # projected before llama.cpp starts: a wrong modality or width fails at once
    rows_per_item = projector.rows_per_item(items) if projector else []
    projected = projector.project(items) if projector and items else None
    with TextModel(files.text, n_threads=threads) as model:
        text, ids, runs = build_prompt(model, projector, prompt, chat, system, rows_per_item,
                                       projected, warn=echo_warning)
        positions = sum(len(v) for _, v in runs)
        n_ctx = context_size(n_ctx, positions, max_tokens, model.n_ctx_train)
        sampling = _sampling(model, temp, top_k, top_p, seed)
        click.echo(f"{files.text.name}: {positions} prompt positions ({sum(rows_per_item)} "
                   f"projected rows), context {n_ctx}, "
                   f"{'greedy' if sampling.greedy else _describe(sampling)}", err=True)
        if verbose:
            click.echo(f"prompt: {text!r}\ntoken ids: {ids}", err=True)
        stream = TextStream(model)
        try:
            result = model.generate(runs, max_tokens, sampling, model.stop_ids(),
                                    on_token=lambda t: click.echo(stream.push(t), nl=False),
                                    n_ctx=n_ctx)
        except KeyboardInterrupt:
            click.echo(stream.flush())
            click.echo("interrupted", err=True)
            sys.exit(130)
        click.echo(stream.flush())
        stop_text = model.token_text(result.stop_token) if result.stop_token is not None else ""
    _report(result, stop_text)


def _sampling(model, temp: float, top_k: int | None, top_p: float | None, seed: int | None):
    from mmconvert.formats.gguf_constants import Keys
    from mmconvert.runtime.llama_runtime import Sampling

    defaults = model.metadata
    return Sampling(
        temp=temp,
        top_k=top_k if top_k is not None else int(defaults.get(Keys.General.SAMPLING_TOP_K,
                                                               DEFAULT_TOP_K)),
        top_p=top_p if top_p is not None else float(defaults.get(Keys.General.SAMPLING_TOP_P,
                                                                 DEFAULT_TOP_P)),
        seed=seed)


def _describe(s) -> str:
    return f"temp {s.temp:g}, top-k {s.top_k}, top-p {s.top_p:g}"


def _report(result, stop_text: str) -> None:
    n = len(result.tokens)
    speed = n / result.generate_seconds if result.generate_seconds > 0 else 0.0
    prompt_speed = (result.prompt_positions / result.prompt_seconds
                    if result.prompt_seconds > 0 else 0.0)
    stop = {"eos": f"eos id {result.stop_token} {stop_text!r}",
            "max_tokens": "--max-tokens reached", "context": "context full"}[result.stop]
    seed = f", seed {result.seed}" if result.seed is not None else ""
    click.echo(f"prompt: {result.prompt_positions} positions in {result.prompt_seconds:.3f} s "
               f"({prompt_speed:.1f}/s); generated {n} tokens in {result.generate_seconds:.3f} s "
               f"({speed:.1f}/s); stop: {stop}{seed}", err=True)


COMMANDS = [run_cmd]
