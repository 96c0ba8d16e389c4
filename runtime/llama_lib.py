"""The few llama.cpp calls verify makes, through llama-cpp-python's low-level (ctypes) API.

llama-cpp-python is an optional extra: :func:`unavailable` says why it cannot be used (its
message is what reports show for skipped llama.cpp checks).

Everything here runs inside a worker process (:class:`LlamaProcess`, serving
``python -m mmconvert.runtime.llama_lib``): a broken GGUF can crash llama.cpp (a segfault cannot
be caught in Python), and a verifier must report that as a failure of the bundle, not die.

Models load without llama.cpp's "extra" CPU buffer types (runtime repacking, AMX): on this
project's CI machines (AMX-capable CPUs in a sandbox) they crash on the first decode of any
Q8_0/Q4_x file, and the plain CPU buffers compute the same quantized dot products.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from mmconvert.errors import MissingExtraError, install_hint

_LOG_CALLBACK = None  # kept alive: llama.cpp holds a pointer to it
GGML_TYPE_F32 = 0
FLASH_ATTN_DISABLED = 0  # enum llama_flash_attn_type: -1 auto, 0 disabled, 1 enabled


def unavailable() -> str | None:
    """None when llama_cpp imports, else the reason (for a 'skipped' line)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return str(MissingExtraError("llama.cpp (run, the gguf_llama backend)", "llama"))
    except Exception as exc:  # installed, but its shared library fails to load
        return (f"llama-cpp-python is installed but does not load ({type(exc).__name__}: "
                f"{exc}); reinstall it: {install_hint('llama')}")
    return None


def _lib():
    import llama_cpp

    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        # llama.cpp logs every tensor it loads to stderr; verify prints its own progress
        @llama_cpp.llama_log_callback
        def quiet(level, text, user_data):  # noqa: ARG001
            return None

        _LOG_CALLBACK = quiet
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
    return llama_cpp


@contextmanager
def load_model(path: Path, vocab_only: bool = False, gpu: bool = False) -> Iterator[object]:
    """A llama.cpp model handle for ``path`` (the first shard of a split model)."""
    lib = _lib()
    params = lib.llama_model_default_params()
    params.vocab_only = vocab_only
    params.use_extra_bufts = False  # see the module docstring
    params.n_gpu_layers = 999 if gpu and lib.llama_supports_gpu_offload() else 0
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {path}")
    try:
        yield model
    finally:
        lib.llama_model_free(model)


def vocab_of(model) -> object:
    return _lib().llama_model_get_vocab(model)


def n_vocab(vocab) -> int:
    return int(_lib().llama_vocab_n_tokens(vocab))


def tokenize(vocab, text: str) -> list[int]:
    """llama.cpp's token ids of ``text`` (special tokens parsed, no bos added)."""
    lib = _lib()
    data = text.encode("utf-8")
    size = len(data) + 16
    while True:
        buf = (lib.llama_token * size)()
        n = lib.llama_tokenize(vocab, data, len(data), buf, size, False, True)
        if n >= 0:
            return list(buf[:n])
        size = -n


def eog_ids(vocab) -> set[int]:
    """Every id llama.cpp treats as end of generation."""
    lib = _lib()
    return {i for i in range(n_vocab(vocab)) if lib.llama_vocab_is_eog(vocab, i)}


class Context:
    """A llama.cpp context that returns logits for every position of a mixed sequence of token
    runs and embedding runs (``llama_batch.embd``), one sequence at a time."""

    def __init__(self, model, n_ctx: int):
        lib = _lib()
        self.lib = lib
        self.model = model
        self.n_ctx = n_ctx
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx
        params.n_ubatch = n_ctx
        params.n_seq_max = 1
        # exact attention: llama.cpp's defaults (an F16 KV cache, and a CPU flash-attention
        # kernel that rounds through F16) move the example's logits by ~2.4e-3 even for an F32
        # GGUF; that is a runtime setting, not the bundle, and would hide behind the F32
        # threshold (1e-3). With both off an F32 GGUF matches torch to ~2e-6.
        params.type_k = GGML_TYPE_F32
        params.type_v = GGML_TYPE_F32
        params.flash_attn_type = FLASH_ATTN_DISABLED
        threads = max(1, os.cpu_count() or 1)
        params.n_threads = threads
        params.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_embd = int(lib.llama_model_n_embd(model))
        self.n_vocab = n_vocab(vocab_of(model))

    def logits(self, runs: list[tuple[str, np.ndarray]]) -> np.ndarray:
        """``runs``: ("tokens", int ids [n]) or ("embd", float32 rows [n, n_embd]), in order.
        Returns ``[total, n_vocab]`` float32 logits."""
        self.clear()
        total = sum(len(values) for _, values in runs)
        if total > self.n_ctx:
            raise ValueError(f"{total} positions exceed the context of {self.n_ctx}")
        out = np.empty((total, self.n_vocab), dtype=np.float32)
        pos = 0
        for kind, values in runs:
            out[pos:pos + len(values)] = self.decode(kind, values, pos)
            pos += len(values)
        return out

    def clear(self) -> None:
        """Forget the sequence in the KV cache."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, kind: str, values, pos: int, all_logits: bool = True) -> np.ndarray:
        """Append one run (as in :meth:`logits`) at positions ``pos, pos + 1, ...`` to the
        sequence in the KV cache (generation decodes run by run); returns its logits
        ``[n, n_vocab]``, or with ``all_logits=False`` only the last position's ``[1, n_vocab]``."""
        lib = self.lib
        n = len(values)
        if n == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        if pos + n > self.n_ctx:
            raise ValueError(f"{pos + n} positions exceed the context of {self.n_ctx}")
        batch = lib.llama_batch_init(n, self.n_embd if kind == "embd" else 0, 1)
        try:
            if kind == "embd":
                rows = np.ascontiguousarray(values, dtype=np.float32)
                if rows.shape[1] != self.n_embd:
                    raise ValueError(f"embedding rows of width {rows.shape[1]}, the model "
                                     f"takes {self.n_embd}")
                ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            for i in range(n):
                if kind == "tokens":
                    batch.token[i] = int(values[i])
                batch.pos[i] = pos + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or i == n - 1
            batch.n_tokens = n
            status = lib.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode returned {status}")
            wanted = range(n) if all_logits else (n - 1,)
            return np.stack([np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, i),
                                                   shape=(self.n_vocab,)) for i in wanted])
        finally:
            lib.llama_batch_free(batch)

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None


# -------------------------------------------------------------------------------------------
# the worker process


class LlamaCrash(RuntimeError):
    """llama.cpp died (or answered nothing) while running a bundle."""


class LlamaProcess:
    """A llama.cpp model in a child process; requests are pickled over its stdin/stdout."""

    def __init__(self, path: Path, gpu: bool = False, vocab_only: bool = False):
        import subprocess
        import sys

        self.path = Path(path)
        self.proc = subprocess.Popen([sys.executable, "-m", "mmconvert.runtime.llama_lib"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.info = self.call("load", str(path), gpu, vocab_only)

    def call(self, *request):
        import pickle

        try:
            pickle.dump(request, self.proc.stdin)
            self.proc.stdin.flush()
            status, value = pickle.load(self.proc.stdout)
        except (BrokenPipeError, EOFError, pickle.UnpicklingError) as exc:
            code = self.proc.wait(timeout=30)
            tail = self.proc.stderr.read().decode("utf-8", "replace").strip().splitlines()[-3:]
            what = f"signal {-code}" if code < 0 else f"exit status {code}"
            raise LlamaCrash(f"llama.cpp crashed ({what}) running {self.path.name}"
                             + (f": {' | '.join(tail)}" if tail else "")) from exc
        if status != "ok":
            raise RuntimeError(f"llama.cpp worker: {value}")
        return value

    def close(self) -> None:
        if self.proc.poll() is None:
            with suppress(LlamaCrash, RuntimeError):  # it is going away either way
                self.call("close")
            self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


def _serve() -> None:
    """The worker loop: one model, requests until 'close' or end of input."""
    import pickle
    import sys

    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything the library prints goes to stderr, not into the protocol
    requests = sys.stdin.buffer
    stack = None
    model = context = None
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            break
        op, args = request[0], request[1:]
        try:
            if op == "load":
                path, gpu, vocab_only = args
                stack = load_model(Path(path), vocab_only=vocab_only, gpu=gpu)
                model = stack.__enter__()
                vocab = vocab_of(model)
                reply = {"n_vocab": n_vocab(vocab)}
            elif op == "logits":
                runs, n_ctx = args
                if context is None or context.n_ctx < n_ctx:
                    if context is not None:
                        context.close()
                    context = Context(model, n_ctx)
                reply = context.logits(runs)
            elif op == "tokenize":
                reply = [tokenize(vocab_of(model), text) for text in args[0]]
            elif op == "eog":
                reply = eog_ids(vocab_of(model))
            elif op == "close":
                pickle.dump(("ok", None), channel)
                channel.flush()
                break
            else:
                raise ValueError(f"unknown request {op!r}")
            pickle.dump(("ok", reply), channel)
        except Exception as exc:  # reported to the parent, which decides what it means
            pickle.dump(("error", str(exc) or type(exc).__name__), channel)
        channel.flush()
    if context is not None:
        context.close()
    if stack is not None:
        stack.__exit__(None, None, None)


if __name__ == "__main__":
    _serve()
