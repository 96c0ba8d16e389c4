"""The real Qwen2/Qwen3 vocabulary, rebuilt offline from the ``dashscope`` wheel.

No model hub is reachable from the test machines, but ``dashscope`` ships
``dashscope/resources/qwen.tiktoken``: the 151 643 byte-level BPE ranks of Qwen's tokenizer.
A tiktoken rank file has no merge list, so the merges are derived here: the merge that creates
token ``t`` of rank ``r`` is the last step of running BPE on ``t``'s bytes with only the ranks
below ``r``. The result is a ``tokenizer.json`` equivalent to Qwen3's (Qwen2 split regex with
single digits, NFC, byte-level pre-tokenizer/decoder, Qwen3's 26 added tokens from
``<|endoftext|>`` = 151643 upward) plus ``<|multimodal|>`` = 151669, as the seed adds it.

Deriving merges and serialising the tokenizer take a few seconds, so the files are cached under
``$MMCONVERT_TEST_CACHE`` (default ``~/.cache/mmconvert-tests``), keyed by the rank file's
sha256 and :data:`FORMAT_VERSION`.

Public: :func:`build_qwen_tokenizer` (the benchmark imports it) and
:func:`write_qwen_vocab_checkpoint`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

from mmconvert.convert.example import CHAT_TEMPLATE
from mmconvert.formats.gguf_vocab import QWEN2_SPLIT_REGEX
from testkit.checkpoints import ExampleOptions

FORMAT_VERSION = 1
QWEN_BPE_SIZE = 151_643
# Qwen3's added tokens, in id order from 151643; False marks the non-special ones
QWEN3_ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False),
    ("</tool_call>", False), ("<|fim_prefix|>", True), ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True), ("<|fim_pad|>", True), ("<|repo_name|>", True),
    ("<|file_sep|>", True), ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
]
MULTIMODAL_TOKEN = "<|multimodal|>"
ENDOFTEXT_ID = QWEN_BPE_SIZE  # 151643
IM_END_ID = QWEN_BPE_SIZE + 2  # 151645


def tiktoken_path() -> Path:
    """The rank file inside the installed ``dashscope`` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("dashscope is not installed (pip install dashscope): it carries "
                                "the Qwen BPE ranks (resources/qwen.tiktoken)")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the dashscope wheel")
    return path


def read_ranks(path: Path) -> list[bytes]:
    """Token bytes in rank order (a tiktoken file is ``base64 rank`` lines, ranks 0..N-1)."""
    tokens: list[bytes] = []
    for line in path.read_bytes().splitlines():
        if not line:
            continue
        b64, rank = line.split()
        if int(rank) != len(tokens):
            raise ValueError(f"{path}: ranks are not consecutive at {rank!r}")
        tokens.append(base64.b64decode(b64))
    return tokens


def byte_to_unicode() -> list[str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies:
    printable Latin-1 bytes stand for themselves, the other 68 take code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = [""] * 256
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def derive_merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    """The merge (left, right) that creates every multi-byte token, in rank order.

    For token ``t`` of rank ``r``, BPE on ``t``'s bytes restricted to ranks ``< r`` must end in
    exactly two parts; those are its merge. Parts are kept as ranks and the pair ranks of
    neighbours are cached in a list, so each step re-examines only the two pairs next to the
    merge instead of the whole word.
    """
    rank_of = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[bytes, bytes]] = []
    for rank, token in enumerate(tokens):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        pair = [rank_of.get(parts[i] + parts[i + 1], rank) for i in range(len(parts) - 1)]
        while len(parts) > 2:
            best = min(pair)
            if best >= rank:
                break
            i = pair.index(best)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
            del pair[i]
            if i < len(pair):
                pair[i] = rank_of.get(parts[i] + parts[i + 1], rank)
            if i > 0:
                pair[i - 1] = rank_of.get(parts[i - 1] + parts[i], rank)
        if len(parts) != 2:
            raise ValueError(f"rank {rank}: token {token!r} is not reachable by one merge "
                             f"(BPE stops at {len(parts)} parts)")
        merges.append((parts[0], parts[1]))
    return merges


def tokenizer_json(tokens: list[bytes], merges: list[tuple[bytes, bytes]]) -> dict:
    """Qwen3's ``tokenizer.json`` structure for these ranks and merges (plus the multimodal
    token), written as plain JSON: faster than going through the ``tokenizers`` builder."""
    table = byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    added = [(content, special) for content, special in QWEN3_ADDED_TOKENS]
    added.append((MULTIMODAL_TOKEN, True))
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": QWEN_BPE_SIZE + i, "content": content, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": special}
            for i, (content, special) in enumerate(added)
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT_REGEX}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                           "use_regex": False},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {text(t): i for i, t in enumerate(tokens)},
            "merges": [[text(a), text(b)] for a, b in merges],
        },
    }


def tokenizer_config() -> dict:
    """Qwen3's ``tokenizer_config.json`` essentials (ChatML template kept short)."""
    added = [*QWEN3_ADDED_TOKENS, (MULTIMODAL_TOKEN, True)]
    return {
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {
            str(QWEN_BPE_SIZE + i): {"content": c, "lstrip": False, "normalized": False,
                                     "rstrip": False, "single_word": False, "special": s}
            for i, (c, s) in enumerate(added)},
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "errors": "replace", "model_max_length": 131072,
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }


def cache_root() -> Path:
    return Path(os.environ.get("MMCONVERT_TEST_CACHE") or Path.home() / ".cache" / "mmconvert-tests")


def _build_into(folder: Path, ranks_file: Path) -> None:
    tokens = read_ranks(ranks_file)
    if len(tokens) != QWEN_BPE_SIZE:
        raise ValueError(f"{ranks_file}: {len(tokens)} ranks, expected {QWEN_BPE_SIZE}")
    merges = derive_merges(tokens)
    data = json.dumps(tokenizer_json(tokens, merges), ensure_ascii=False, separators=(",", ":"))
    (folder / "tokenizer.json").write_text(data, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_qwen_tokenizer(directory: str | Path) -> Path:
    """Write Qwen3's ``tokenizer.json`` and ``tokenizer_config.json`` (with ``<|multimodal|>``
    = 151669, so ``len(tokenizer)`` is 151 670) into ``directory``; return ``directory``.

    The first call derives the merges (a few seconds) into the cache; later calls copy.
    """
    ranks_file = tiktoken_path()
    digest = hashlib.sha256(ranks_file.read_bytes()).hexdigest()[:16]
    cached = cache_root() / f"qwen-tokenizer-v{FORMAT_VERSION}-{digest}"
    if not (cached / "tokenizer.json").is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.parent / f".{cached.name}.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _build_into(tmp, ranks_file)
        try:
            os.rename(tmp, cached)
        except OSError:  # another process won the race: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(cached / name, directory / name)
    return directory


def qwen_vocab_size() -> int:
    """``len(tokenizer)`` of :func:`build_qwen_tokenizer`'s output."""
    return QWEN_BPE_SIZE + len(QWEN3_ADDED_TOKENS) + 1


def write_qwen_vocab_checkpoint(out: str | Path, opts: ExampleOptions | None = None) -> Path:
    """The example checkpoint (small LM, seed layout) with Qwen3's real tokenizer instead of
    the toy one, and the embedding (and lm_head) resized to its 151 670 tokens, as the seed does
    after adding ``<|multimodal|>``. Special ids follow Qwen3's configs."""
    from testkit.checkpoints import moe_text_config as text_config
    from testkit.checkpoints import variant_state_dict as random_state_dict
    from testkit.checkpoints import write_json as _write_json
    from testkit.checkpoints import write_weights

    opts = opts or ExampleOptions()
    if not opts.embed_text_config or not opts.resize_vocab:
        raise ValueError("write_qwen_vocab_checkpoint supports embedded text config, resized vocab")
    out = Path(out)
    build_qwen_tokenizer(out)
    rows = qwen_vocab_size()
    ids = {"<|endoftext|>": ENDOFTEXT_ID, "<|im_end|>": IM_END_ID}
    tcfg = text_config(opts, rows, ids)
    tcfg["eos_token_id"] = IM_END_ID  # Qwen3's config.json
    _write_json(out / "generation_config.json", {
        "bos_token_id": ENDOFTEXT_ID, "pad_token_id": ENDOFTEXT_ID,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID], "do_sample": True, "temperature": 0.6,
        "top_k": 20, "top_p": 0.95})
    _write_json(out / "config.json", {
        "model_type": "multimodal_qwen3", "architectures": ["MultimodalQwen3Model"],
        "base_model_name": "Qwen/Qwen3-0.6B", "modality_configs": opts.modalities,
        "projector_hidden_act": opts.activation, "use_layer_norm": opts.layer_norm,
        "projector_dropout": 0.1, "fusion_strategy": "early", "multimodal_token": MULTIMODAL_TOKEN,
        "max_multimodal_length": 32, "text_config": tcfg})
    write_weights(out, random_state_dict(opts, rows), opts)
    return out
