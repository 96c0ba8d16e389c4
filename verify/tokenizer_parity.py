"""Tokenizer parity: the HF tokenizer against the GGUF vocabulary as llama.cpp runs it.

A GGUF whose pre-tokenizer name, token list or merges are off still loads and runs; it just
tokenizes differently, so prompts silently turn into other ids. The built-in corpus exercises
every class the pre-tokenizers disagree on (Latin, CJK, Cyrillic, Arabic, Devanagari, emoji
with joiners, digit runs, whitespace runs, code) plus every special token of the tokenizer.
The end-of-generation check asks llama.cpp which ids stop generation and requires every eos id
the checkpoint resolves to be among them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mmconvert.convert.model import CanonicalModel

if TYPE_CHECKING:
    from mmconvert.runtime.llama_lib import LlamaProcess

CORPUS = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's done; WE'VE SEEN IT'S TRUE, don't you think?",
    "你好，世界！多模态模型可以理解图像和声音。今天天气很好。",
    "日本語のテキストと한국어 텍스트. Привет, мир! مرحبا بالعالم नमस्ते दुनिया",
    "Emoji: 🙂 🚀 🎉 👩‍💻 👍🏽 and accents: àéîõü ß Δδ",
    "Digits 0 1 2 3 42 365 2048 1234567 3.14159 1,000,000 2026-11-21 0x1F",
    "    four leading spaces,\ttabs\t\tand\n\n\nnewlines   trailing   \r\n",
    "def forward(self, x):\n    return self.fc2(self.act(self.fc1(x)))  # comment\n",
    "for i in range(10):\n\tprint(i * 2, \"value\", [1, 2, 3]) if i >= 5 else None\n",
    "<|im_start|>user\nDescribe <|multimodal|><|multimodal|> please.<|im_end|>\n"
    "<|im_start|>assistant\n",
)


def corpus_for(model: CanonicalModel) -> list[str]:
    """The built-in corpus plus one line holding every special added token of the tokenizer."""
    specials = [t["content"] for t in model.tokenizer.added_tokens if t["special"]]
    return list(CORPUS) + (["".join(f"{s} x" for s in specials)] if specials else [])


def _ask(gguf: Path | LlamaProcess, *request):
    """Ask a running llama.cpp worker, or one started just for this (vocabulary only)."""
    from mmconvert.runtime.llama_lib import LlamaProcess

    if isinstance(gguf, LlamaProcess):
        return gguf.call(*request)
    process = LlamaProcess(gguf, vocab_only=True)
    try:
        return process.call(*request)
    finally:
        process.close()


def tokenizer_parity(gguf: Path | LlamaProcess, model: CanonicalModel
                     ) -> tuple[str, bool | None, str]:
    """(check name, passed, message): llama.cpp's ids == the HF tokenizer's on the corpus."""
    from mmconvert.runtime import llama_lib
    from mmconvert.verify.cases import encode, load_tokenizer

    reason = llama_lib.unavailable()
    if reason:
        return ("tokenizer parity", None, reason)
    hf = load_tokenizer(model)
    mismatches = []
    texts = corpus_for(model)
    ids = _ask(gguf, "tokenize", texts)
    for text, got in zip(texts, ids):
        want = encode(hf, text)
        if got != want:
            first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                         min(len(got), len(want)))
            mismatches.append(f"{text[:24]!r}: llama.cpp {got[first:first + 4]} vs HF "
                              f"{want[first:first + 4]} at token {first}")
    if mismatches:
        return ("tokenizer parity", False, f"{len(mismatches)} of {len(texts)} texts tokenize "
                "differently in llama.cpp: " + "; ".join(mismatches[:3]))
    return ("tokenizer parity", True, f"{len(texts)} texts tokenize identically")


def eog_check(gguf: Path | LlamaProcess, model: CanonicalModel
              ) -> tuple[str, bool | None, str]:
    """(check name, passed, message): every checkpoint eos id stops llama.cpp's generation."""
    from mmconvert.runtime import llama_lib

    reason = llama_lib.unavailable()
    if reason:
        return ("end of generation", None, reason)
    eog = set(_ask(gguf, "eog"))
    want = set(model.special.eos)
    missing = sorted(want - eog)
    extra = sorted(eog - want)
    if missing:
        return ("end of generation", False,
                f"eos ids {missing} of the checkpoint do not stop generation in llama.cpp "
                f"(its end-of-generation set is {sorted(eog)})")
    note = f"; llama.cpp also stops on {extra} (by token text)" if extra else ""
    return ("end of generation", True, f"llama.cpp stops on every eos id {sorted(want)}{note}")
