"""Running a text GGUF with projected rows in llama.cpp: fused prompts, logits, generation.

One implementation of "load a GGUF safely, decode token runs and embedding runs, get logits":
model loading and decoding are :mod:`mmconvert.runtime.llama_lib`'s (no extra buffer types,
which crash Q8_0/Q4 files on AMX CPUs; an F32 KV cache and no flash attention, so an F32 GGUF
reproduces torch to a few 1e-6). This module adds what a runner needs on top: the fusion rule as
llama.cpp decodes it (token runs and ``llama_batch.embd`` runs with continuing positions),
llama.cpp's sampler chain, and the stop set.

llama.cpp runs in this process: a runner that crashes takes only itself down, unlike the
verifier, which must report a crash and goes through a worker process.
"""

from __future__ import annotations

import codecs
import ctypes
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmconvert.errors import LlamaRuntimeError
from mmconvert.formats.gguf_constants import Keys
from mmconvert.formats.gguf_reader import read_gguf_keys
from mmconvert.runtime import llama_lib
from mmconvert.runtime.fusion import fusion_positions

Run = tuple[str, np.ndarray]  # ("tokens", int ids [n]) or ("embd", float32 rows [n, n_embd])
EOS_KEYS = (Keys.Tokenizer.EOS_IDS, Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID,
            Keys.Tokenizer.EOM_ID)
# what a runner reads from the file itself (llama.cpp exposes no array keys)
METADATA_KEYS = (*EOS_KEYS, Keys.Tokenizer.BOS_ID, Keys.Tokenizer.CHAT_TEMPLATE,
                 Keys.General.SAMPLING_TEMP, Keys.General.SAMPLING_TOP_K,
                 Keys.General.SAMPLING_TOP_P)


def fused_runs(ids: Sequence[int], placeholder_id: int | None, rows: np.ndarray) -> list[Run]:
    """The prompt as llama.cpp decodes it: runs of token ids and runs of projected rows.

    ``rows`` (``[N, n_embd]``) replace the placeholder tokens one per row, or are prepended when
    the prompt has none (:func:`mmconvert.runtime.fusion.fusion_positions`, whose ``ValueError``
    for any other count propagates).
    """
    fused, where = fusion_positions(ids, placeholder_id, len(rows))
    runs: list[Run] = []
    start = 0
    for i in range(1, len(fused) + 1):
        if i == len(fused) or (where[i] is None) != (where[start] is None):
            if where[start] is None:
                runs.append(("tokens", np.asarray(fused[start:i], dtype=np.int32)))
            else:
                runs.append(("embd", np.asarray(rows[where[start]:where[i - 1] + 1],
                                                dtype=np.float32)))
            start = i
    return runs


@dataclass
class Sampling:
    """Greedy when ``temp <= 0``; else llama.cpp's chain top-k -> top-p -> temp -> dist."""

    temp: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    seed: int | None = None  # None: llama.cpp picks one at random

    @property
    def greedy(self) -> bool:
        return self.temp <= 0


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    stop: str = "max_tokens"  # max_tokens | eos | context
    stop_token: int | None = None
    prompt_positions: int = 0
    prompt_seconds: float = 0.0
    generate_seconds: float = 0.0
    seed: int | None = None


class TextModel:
    """A text GGUF loaded in llama.cpp (``with TextModel(path) as model: ...``)."""

    def __init__(self, path: str | Path, n_threads: int | None = None):
        reason = llama_lib.unavailable()
        if reason:
            raise LlamaRuntimeError(reason)
        self.path = Path(path)
        self.n_threads = n_threads
        self._stack = ExitStack()
        try:
            self.model = self._stack.enter_context(llama_lib.load_model(self.path))
        except RuntimeError as exc:
            raise LlamaRuntimeError(f"{exc} (is it a complete text GGUF?)") from exc
        self.lib = llama_lib._lib()
        self.vocab = llama_lib.vocab_of(self.model)
        self.n_vocab = llama_lib.n_vocab(self.vocab)
        self.n_embd = int(self.lib.llama_model_n_embd(self.model))
        self.n_ctx_train = int(self.lib.llama_model_n_ctx_train(self.model))
        try:
            self.metadata = read_gguf_keys(self.path, METADATA_KEYS)  # those the file has
        except ValueError as exc:
            raise LlamaRuntimeError(f"{self.path}: {exc}") from exc
        self.context: llama_lib.Context | None = None

    def __enter__(self) -> TextModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.context is not None:
            self.context.close()
            self.context = None
        self._stack.close()
        self.model = None

    # -- vocabulary and metadata -----------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, special tokens parsed, no bos added."""
        return llama_lib.tokenize(self.vocab, text)

    def token_text(self, token: int) -> str:
        return self.lib.llama_vocab_get_text(self.vocab, token).decode("utf-8", "replace")

    def piece(self, token: int, special: bool = False) -> bytes:
        """The bytes ``token`` stands for in generated text (control tokens are empty unless
        ``special``)."""
        size = 64
        while True:
            buf = (ctypes.c_char * size)()
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, size, 0, special)
            if n >= 0:
                return bytes(buf[:n])
            size = -n

    def stop_ids(self) -> set[int]:
        """Every id that ends generation: the bundle's eos list, eos/eot/eom, and whatever
        llama.cpp itself treats as end of generation."""
        stop = set(llama_lib.eog_ids(self.vocab))
        for key in EOS_KEYS:
            value = self.metadata.get(key, [])
            stop.update(value if isinstance(value, list) else [value])
        return {int(t) for t in stop if 0 <= int(t) < self.n_vocab}

    # -- running ---------------------------------------------------------------------------

    def open_context(self, n_ctx: int) -> llama_lib.Context:
        """A context of ``n_ctx`` positions (reused when the current one is as large)."""
        if self.context is not None and self.context.n_ctx >= n_ctx:
            return self.context
        if self.context is not None:
            self.context.close()
            self.context = None
        try:
            self.context = llama_lib.Context(self.model, n_ctx)
        except RuntimeError as exc:
            raise LlamaRuntimeError(f"{self.path.name}: {exc} of {n_ctx} positions") from exc
        if self.n_threads:
            self.lib.llama_set_n_threads(self.context.ctx, self.n_threads, self.n_threads)
        return self.context

    def logits(self, runs: Sequence[Run]) -> np.ndarray:
        """Logits ``[positions, n_vocab]`` of every position of the fused sequence."""
        total = sum(len(v) for _, v in runs)
        return self.open_context(max(total, 1)).logits(list(runs))

    def generate(self, runs: Sequence[Run], max_tokens: int, sampling: Sampling,
                 stop_ids: set[int], on_token: Callable[[int], None] | None = None,
                 n_ctx: int | None = None) -> Generation:
        """Decode the prompt, then sample up to ``max_tokens`` tokens, stopping before any of
        ``stop_ids`` (not included) or when the context is full."""
        total = sum(len(v) for _, v in runs)
        n_ctx = n_ctx or total + max(max_tokens, 1)
        if total >= n_ctx or total == 0:
            raise LlamaRuntimeError(f"the prompt has {total} positions: it needs at least one "
                                    f"and must leave room in the context of {n_ctx}")
        context = self.open_context(n_ctx)
        context.clear()
        out = Generation(prompt_positions=total)
        sampler = self._sampler(sampling)
        try:
            out.seed = None if sampling.greedy else int(self.lib.llama_sampler_get_seed(sampler))
            self._generate(context, runs, max_tokens, sampler, stop_ids, on_token, out)
        except RuntimeError as exc:  # llama_decode failed: not something a retry fixes
            raise LlamaRuntimeError(f"{self.path.name}: {exc}") from exc
        finally:
            self.lib.llama_sampler_free(sampler)
        return out

    def _generate(self, context: llama_lib.Context, runs: Sequence[Run], max_tokens: int,
                  sampler, stop_ids: set[int], on_token: Callable[[int], None] | None,
                  out: Generation) -> None:
        started = time.perf_counter()
        pos = 0
        for kind, values in runs:
            context.decode(kind, values, pos, all_logits=False)
            pos += len(values)
        out.prompt_seconds = time.perf_counter() - started
        started = time.perf_counter()
        while len(out.tokens) < max_tokens:
            if pos >= context.n_ctx:
                out.stop = "context"
                break
            token = int(self.lib.llama_sampler_sample(sampler, context.ctx, -1))
            if token in stop_ids:
                out.stop, out.stop_token = "eos", token
                break
            out.tokens.append(token)
            if on_token is not None:
                on_token(token)
            if len(out.tokens) < max_tokens:
                context.decode("tokens", [token], pos, all_logits=False)
                pos += 1
        out.generate_seconds = time.perf_counter() - started

    def _sampler(self, s: Sampling):
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if s.greedy:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if s.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(s.top_k))
        if s.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(s.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(s.temp))
        seed = lib.LLAMA_DEFAULT_SEED if s.seed is None else s.seed & 0xFFFFFFFF
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain


class TextStream:
    """Token ids -> text as it can be shown: UTF-8 sequences split over tokens are held back
    until complete."""

    def __init__(self, model: TextModel):
        self.model = model
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.model.piece(token))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
