"""The tokenizer as llama.cpp's ``gpt2`` (byte-level BPE) vocabulary in GGUF metadata.

Pre-tokenizer detection
-----------------------
llama.cpp splits text with a hard-coded regex per ``tokenizer.ggml.pre`` name before BPE, so
the name must be right or tokenization silently differs. As llama.cpp's converter does, the
tokenizer encodes a fixed check text and the sha256 of ``str(ids)`` is looked up in a table of
known tokenizers (:data:`KNOWN_PRE_HASHES`; our own check text, so our own hashes). An unknown
hash is still accepted as ``qwen2`` when ``tokenizer.json``'s pre-tokenizer is structurally
Qwen2's (Split on Qwen2's regex, then ByteLevel without its own regex): fine-tuned or resized
Qwen tokenizers and small BPEs trained with Qwen2's pre-tokenizer give other ids but split text
the same way. Anything else is refused; ``--pre-tokenizer NAME`` overrides.

End of generation
-----------------
llama.cpp 0.3.36 reads no eos *list*: its end-of-generation set is ``eos_token_id``,
``eot_token_id``, ``eom_token_id`` plus every token whose text is one of a fixed list
(``<|im_end|>``, ``<|endoftext|>``, ``<|eot_id|>``, ... see :data:`LLAMA_CPP_EOG_TEXTS`). So the
full list goes to ``tokenizer.ggml.eos_token_ids`` (for runners that read it, e.g. ``mmconvert
run``), and secondary eos ids llama.cpp would not find by their text are also written as
``eot_token_id`` then ``eom_token_id`` so that llama.cpp stops on them too.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mmconvert.errors import CheckpointError, UnsupportedError
from mmconvert.formats.gguf_constants import GGUFValueType, Keys, TokenType
from mmconvert.formats.gguf_writer import Metadata

# The split regex of Qwen2's pre-tokenizer (Qwen2/2.5/3 ``tokenizer.json``): the text
# llama.cpp's ``qwen2`` pre-tokenizer hard-codes
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Our check text: every class the pre-tokenizers disagree on (contractions, case, digit runs,
# punctuation runs, newlines vs spaces, CJK/Hangul/Cyrillic/Arabic/Devanagari, emoji with
# joiners, accents, code). Changing it invalidates every hash below.
PRE_CHECK_TEXT = (
    "Pre-tokenizer probe v1:\n"
    "I'm sure they'll say it's done, WE'VE SEEN IT'S TRUE; don't\u2019t you'd?\n"
    "Numbers: 7 42 365 2048 1234567 3.14159 1,000,000 0x1F 10e-3 \u00bd \u2167\n"
    "  leading spaces,\ttabs\t\t, trailing   \n\n\nthree newlines \r\n crlf \u00a0nbsp\n"
    "\u4f60\u597d\u4e16\u754c\uff01\u591a\u6a21\u6001\u6a21\u578b\u3002\u65e5\u672c\u8a9e\u306e"
    "\u30c6\u30ad\u30b9\u30c8\u3002\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8. "
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0645\u0631\u062d\u0628\u0627 "
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u00e0\u00e9\u00ee\u00f5\u00fc \u00df \u0394\u03b4\n"
    "\U0001F642\U0001F680 \U0001F469\u200d\U0001F4BB \U0001F44D\U0001F3FD !!! ??? ... --- ==> "
    "'''quoted''' \"double\"\n"
    "def f(a, b=2):\n    return a**b  # comment\n\tif x>=10: y = [1,2,3]\n"
)

# sha256(str(ids of PRE_CHECK_TEXT)) -> llama.cpp pre-tokenizer name
KNOWN_PRE_HASHES: dict[str, str] = {
    # Qwen2/Qwen2.5/Qwen3 (151 643 BPE ranks; testkit/qwen_vocab.py rebuilds it and checks this)
    "c6349f02595047ced2aaa326905de14b111644eb1a998b6c379da639495b93c6": "qwen2",
}

# Token texts llama.cpp 0.3.36 puts in its end-of-generation set by themselves (the list in
# its vendored src/llama-vocab.cpp; tests check the ones Qwen uses with llama_vocab_is_eog).
# "<|end|>" is left out: llama.cpp drops it again when "<|return|>"/"<|call|>" are present.
LLAMA_CPP_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
})


class TokenizerFiles(Protocol):
    """The tokenizer facts the vocabulary is built from (convert's ``TokenizerSpec``)."""

    @property
    def directory(self) -> Path: ...  # holds tokenizer.json

    @property
    def added_tokens(self) -> list[dict[str, Any]]: ...  # {id, content, special}

    @property
    def tokenizer_config(self) -> dict[str, Any]: ...

    @property
    def chat_template(self) -> str | None: ...

    @property
    def document(self) -> dict[str, Any] | None: ...  # tokenizer.json parsed; None: read it


class SpecialTokenIds(Protocol):
    """Resolved special ids, primary first (convert's ``SpecialIds``)."""

    @property
    def bos(self) -> list[int]: ...

    @property
    def eos(self) -> list[int]: ...

    @property
    def pad(self) -> list[int]: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def pad_id(self) -> int | None: ...


class VocabSource(Protocol):
    """What :func:`build_vocab` reads of a model (convert's ``CanonicalModel`` has it)."""

    @property
    def source(self) -> Path: ...  # named in errors

    @property
    def tokenizer(self) -> TokenizerFiles: ...

    @property
    def special(self) -> SpecialTokenIds: ...


@dataclass
class GGUFVocab:
    """Everything ``tokenizer.ggml.*`` needs, for a vocabulary of ``len(tokens)`` rows."""

    tokens: list[str]
    token_types: np.ndarray  # int32, one per token
    merges: list[str]
    pre: str
    pre_reason: str  # how ``pre`` was decided (in ``notes`` unless a known hash decided it)
    bos_id: int | None
    eos_ids: list[int]  # primary first
    pad_id: int | None
    eot_id: int | None = None
    eom_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    notes: list[str] = field(default_factory=list)

    def add_to(self, md: Metadata) -> None:
        """Write the ``tokenizer.*`` keys (in the order llama.cpp's converter uses)."""
        k = Keys.Tokenizer
        md.string(k.MODEL, "gpt2")
        md.string(k.PRE, self.pre)
        md.array(k.LIST, GGUFValueType.STRING, self.tokens)
        md.array(k.TOKEN_TYPE, GGUFValueType.INT32, self.token_types)
        md.array(k.MERGES, GGUFValueType.STRING, self.merges)
        if self.bos_id is not None:
            md.uint32(k.BOS_ID, self.bos_id)
        if self.eos_ids:
            md.uint32(k.EOS_ID, self.eos_ids[0])
            md.array(k.EOS_IDS, GGUFValueType.UINT32, self.eos_ids)
        if self.eot_id is not None:
            md.uint32(k.EOT_ID, self.eot_id)
        if self.eom_id is not None:
            md.uint32(k.EOM_ID, self.eom_id)
        if self.pad_id is not None:
            md.uint32(k.PAD_ID, self.pad_id)
        md.boolean(k.ADD_BOS, self.add_bos)
        md.boolean(k.ADD_EOS, self.add_eos)
        if self.chat_template:
            md.string(k.CHAT_TEMPLATE, self.chat_template)


def pre_check_hash(tok: dict[str, Any]) -> str:
    """sha256 of ``str(ids)`` for :data:`PRE_CHECK_TEXT` (no special tokens added), with the
    tokenizer ``tok`` (the parsed ``tokenizer.json``)."""
    from tokenizers import Tokenizer

    reduced = check_text_tokenizer(tok)
    ids = Tokenizer.from_str(json.dumps(reduced)).encode(PRE_CHECK_TEXT,
                                                         add_special_tokens=False).ids
    return hashlib.sha256(str(ids).encode()).hexdigest()


def check_text_tokenizer(tok: dict[str, Any]) -> dict[str, Any]:
    """``tok`` cut down to what can matter for :data:`PRE_CHECK_TEXT`: same ids, a few
    hundred tokens instead of 150k, so building it costs milliseconds and megabytes instead of
    0.3 s and 100 MB.

    Exact for byte-level BPE: a merge can only fire inside a pre-tokenized word, so its result
    is a substring of the (normalized, byte-level mapped) text; tokens and merges that are not
    substrings can never be used. Tokenizers this argument does not cover are used whole.
    """
    model = tok.get("model") or {}
    simple = (model.get("type") == "BPE" and _is_byte_level(tok)
              and tok.get("normalizer") in (None, {"type": "NFC"})
              and not model.get("continuing_subword_prefix")
              and not model.get("end_of_word_suffix"))
    if not simple:
        return tok
    table = _byte_chars()
    texts = {PRE_CHECK_TEXT, unicodedata.normalize("NFC", PRE_CHECK_TEXT)}
    mapped = "\n".join("".join(table[b] for b in t.encode("utf-8")) for t in texts)
    vocab = {t: i for t, i in (model.get("vocab") or {}).items() if t in mapped}
    merges = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        # both halves must be kept tokens too: two set lookups reject almost every merge
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    return {**tok, "model": {**model, "vocab": vocab, "merges": merges}}


def _byte_chars() -> list[str]:
    """The byte-level alphabet: byte -> the printable character byte-level BPE writes for it
    (printable Latin-1 bytes stand for themselves, the rest take code points from 256 up)."""
    keep = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = [], 0
    for b in range(256):
        if b in keep:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


def is_qwen2_pre_tokenizer(tok: dict[str, Any]) -> bool:
    """True when ``tokenizer.json`` splits text exactly as llama.cpp's ``qwen2`` does."""
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") != "Sequence" or len(pre.get("pretokenizers") or []) != 2:
        return False
    split, byte_level = pre["pretokenizers"]
    return (split.get("type") == "Split"
            and (split.get("pattern") or {}).get("Regex") == QWEN2_SPLIT_REGEX
            and split.get("behavior") == "Isolated" and not split.get("invert")
            and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex") is False
            and not byte_level.get("add_prefix_space")
            and (tok.get("normalizer") in (None, {"type": "NFC"})))


def detect_pre_tokenizer(tokenizer_file: Path, tok: dict[str, Any], override: str | None
                         ) -> tuple[str, str]:
    """(llama.cpp pre-tokenizer name, why). Raises :class:`UnsupportedError` when unknown."""
    name, why, _ = _detect_pre_tokenizer(tokenizer_file, tok, override)
    return name, why


def _detect_pre_tokenizer(tokenizer_file: Path, tok: dict[str, Any], override: str | None
                          ) -> tuple[str, str, bool]:
    """:func:`detect_pre_tokenizer` and whether the user should check the choice (an override
    or the structural fallback decided it, not a known check-text hash)."""
    if override:
        return override, f"pre-tokenizer {override!r} from --pre-tokenizer", True
    digest = pre_check_hash(tok)
    if digest in KNOWN_PRE_HASHES:
        name = KNOWN_PRE_HASHES[digest]
        return name, f"pre-tokenizer {name!r}: check-text hash {digest[:12]} is known", False
    if is_qwen2_pre_tokenizer(tok):
        return "qwen2", (f"pre-tokenizer 'qwen2': check-text hash {digest[:12]} is not in the "
                         "table, but tokenizer.json's pre-tokenizer is Qwen2's (split regex + "
                         "byte-level)"), True
    raise UnsupportedError(
        f"{tokenizer_file}: pre-tokenizer not recognised (check-text hash {digest[:16]}, "
        f"pre_tokenizer type {(tok.get('pre_tokenizer') or {}).get('type')!r}); llama.cpp must "
        "know how this tokenizer splits text. If it matches one llama.cpp supports, pass "
        "--pre-tokenizer NAME (e.g. qwen2, llama3, gpt2)")


def _merges(model: dict[str, Any]) -> list[str]:
    merges = model.get("merges") or []
    return [m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in merges]


def _secondary_eos(eos: list[int], tokens: list[str]) -> list[int]:
    """Eos ids after the primary that llama.cpp would not recognise by their text."""
    return [i for i in eos[1:] if tokens[i] not in LLAMA_CPP_EOG_TEXTS]


def build_vocab(model: VocabSource, n_rows: int, pre_override: str | None = None
                ) -> GGUFVocab:
    """The GGUF vocabulary of ``model`` (e.g. a ``CanonicalModel``) with ``n_rows`` tokens:
    the embedding's rows, so ids beyond the tokenizer are ``[PAD{i}]`` (UNUSED)."""
    spec = model.tokenizer
    path = spec.directory / "tokenizer.json"
    tok = spec.document  # the reader's parse, when it kept it
    if tok is None:
        try:
            tok = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read the tokenizer ({exc})") from exc
    bpe = tok.get("model") or {}
    if bpe.get("type") != "BPE" or not _is_byte_level(tok):
        raise UnsupportedError(f"{path}: only byte-level BPE tokenizers (Qwen's) can be written "
                               f"as llama.cpp's gpt2 vocabulary; this one is "
                               f"{bpe.get('type')!r}")
    tokens: list[str | None] = [None] * n_rows
    types = np.full(n_rows, TokenType.NORMAL, dtype=np.int32)
    for text, i in (bpe.get("vocab") or {}).items():
        if i >= n_rows:
            raise CheckpointError(f"{path}: token id {i} >= the embedding's {n_rows} rows")
        tokens[i] = text
    for added in spec.added_tokens:
        i = added["id"]
        if i >= n_rows:
            raise CheckpointError(f"{path}: added token id {i} >= the embedding's {n_rows} rows")
        tokens[i] = added["content"]
        types[i] = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
    for i, text in enumerate(tokens):
        if text is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = TokenType.UNUSED
    full: list[str] = tokens  # type: ignore[assignment]
    pre, reason, worth_a_note = _detect_pre_tokenizer(path, tok, pre_override)
    special = model.special
    for kind, ids in (("bos", special.bos), ("eos", special.eos), ("pad", special.pad)):
        bad = [i for i in ids if not 0 <= i < n_rows]
        if bad:
            raise CheckpointError(f"{model.source}: {kind} token id {bad[0]} is outside the "
                                  f"vocabulary of {n_rows} tokens")
    secondary = _secondary_eos(special.eos, full)
    notes = [reason] if worth_a_note else []  # a known hash is no news: not printed
    if len(secondary) > 2:
        notes.append(f"eos ids {secondary[2:]} are only in tokenizer.ggml.eos_token_ids: "
                     "llama.cpp itself stops on eos, eot and eom only")
    cfg = spec.tokenizer_config
    return GGUFVocab(
        tokens=full, token_types=types, merges=_merges(bpe), pre=pre, pre_reason=reason,
        bos_id=special.bos_id, eos_ids=list(special.eos), pad_id=special.pad_id,
        eot_id=secondary[0] if secondary else None,
        eom_id=secondary[1] if len(secondary) > 1 else None,
        add_bos=cfg.get("add_bos_token") is True, add_eos=cfg.get("add_eos_token") is True,
        chat_template=spec.chat_template, notes=notes)


def _is_byte_level(tok: dict[str, Any]) -> bool:
    def has_byte_level(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has_byte_level(p) for p in node.get("pretokenizers") or [])

    return has_byte_level(tok.get("pre_tokenizer"))
