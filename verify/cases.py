"""The inputs logits are compared on: deterministic, seeded cases built from the checkpoint.

:func:`default_cases` covers, for any checkpoint: plain text; each modality alone (at its
declared ``input_dim``); several modalities with several items (1-D and 2-D); the prepend rule
(no placeholder in the prompt); the chat template rendered with jinja2; and a prompt of at
least 512 tokens. The same seed gives the same ids and embeddings on every machine, which is
what lets a reference saved on a GPU box be compared with a bundle on a CPU-only CI runner.

A user's own cases come from a safetensors file (:func:`load_cases_file`, format in
``docs/verification.md``): the file's ``__metadata__["mmconvert.cases"]`` is a JSON document
listing the cases; every embedding item is a tensor of the file, referenced by its name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmconvert.convert.model import CanonicalModel
from mmconvert.errors import CasesError
from mmconvert.runtime.fusion import fusion_positions

CASES_KEY = "mmconvert.cases"
CASES_VERSION = 1
DEFAULT_GREEDY_TOKENS = 8
LONG_PROMPT_TOKENS = 512

TEXT_PROMPT = ("The quick brown fox jumps over the lazy dog. 你好，世界！Numbers 12345 and "
               "code: def f(x): return x * 2")
LONG_TEXT = (
    "Multimodal models read precomputed embeddings of images, audio and other signals. "
    "A small projector maps each embedding into the hidden size of the language model, and the "
    "projected rows replace placeholder tokens in the prompt. 多模态模型可以理解图像和声音。 "
    "for i in range(10):\n    print(i * 2, [1, 2, 3])\n"
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 42 3.14159 and emoji 🙂 🚀 🎉 with   spaces.\n"
)


@dataclass
class Case:
    """One prompt with its embedding items.

    ``input_ids`` is the prompt as token ids (placeholders included); ``continuation`` is filled
    by the reference: its ``generate`` greedy tokens, appended before logits are compared so
    that greedy agreement is measured in the same forward pass.
    """

    name: str
    description: str
    input_ids: list[int]
    mm_inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    generate: int = DEFAULT_GREEDY_TOKENS
    continuation: list[int] = field(default_factory=list)

    @property
    def full_ids(self) -> list[int]:
        return self.input_ids + self.continuation

    @property
    def n_rows(self) -> int:
        return sum(1 if t.dim() == 1 else t.shape[0] for items in self.mm_inputs.values()
                   for t in items)

    def fused_length(self, placeholder_id: int | None) -> int:
        """Length of the fused sequence (prepended rows count when there is no placeholder)."""
        ids = self.full_ids
        has_placeholder = placeholder_id is not None and placeholder_id in ids
        return len(ids) + (self.n_rows if self.n_rows and not has_placeholder else 0)


# -------------------------------------------------------------------------------------------
# tokenizer and chat template


def load_tokenizer(model: CanonicalModel):
    """The checkpoint's HF tokenizer (``tokenizers``: what transformers' fast tokenizer runs)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model.tokenizer.directory / "tokenizer.json"))


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text``; special tokens written in the text become their ids."""
    return list(tokenizer.encode(text, add_special_tokens=False).ids)


def render_chat(template: str, messages: list[dict[str, Any]], model: CanonicalModel,
                add_generation_prompt: bool = True) -> str:
    """Render a chat template the way transformers does (sandboxed jinja2, trimmed blocks),
    bounded in time and size (formats/chat_template.py); any failure is a ChatTemplateError."""
    from mmconvert.formats.chat_template import render, template_file

    cfg = model.tokenizer.tokenizer_config

    def token(kind: str) -> str:
        value = cfg.get(f"{kind}_token")
        return (value.get("content") if isinstance(value, dict) else value) or ""

    return render(template, str(template_file(model.tokenizer.directory)), messages=messages,
                  add_generation_prompt=add_generation_prompt, bos_token=token("bos"),
                  eos_token=token("eos"))


# -------------------------------------------------------------------------------------------
# default cases


def _items(gen: torch.Generator, input_dim: int, rows: list[int]) -> list[torch.Tensor]:
    """Embedding items; ``0`` rows means a 1-D item (one row given as ``[input_dim]``)."""
    return [torch.randn(input_dim, generator=gen) if n == 0 else
            torch.randn(n, input_dim, generator=gen) for n in rows]


def _rows(items: list[torch.Tensor]) -> int:
    return sum(1 if t.dim() == 1 else t.shape[0] for t in items)


def default_cases(model: CanonicalModel, seed: int = 0,
                  generate: int = DEFAULT_GREEDY_TOKENS) -> list[Case]:
    """The built-in cases for ``model`` (deterministic for a given ``seed``)."""
    tok = load_tokenizer(model)
    ph_id = model.multimodal_token_id
    ph = model.multimodal_token
    modalities = list(model.projectors)
    gen = torch.Generator().manual_seed(seed)
    cases = [Case("text", "text only, no embeddings (multilingual, digits, code)",
                  encode(tok, TEXT_PROMPT), generate=generate)]

    for name in modalities:
        spec = model.projectors[name]
        items = _items(gen, spec.input_dim, [3])
        if ph_id is not None:
            prompt = f"Describe this {name} input: {ph * 3} in one sentence."
            cases.append(Case(f"{name}-alone", f"modality {name} alone: one item of 3 rows at "
                              f"input_dim {spec.input_dim}, placeholders inline",
                              encode(tok, prompt), {name: items}, generate))
        else:
            cases.append(Case(f"{name}-alone", f"modality {name} alone, prepended",
                              encode(tok, f"Describe this {name} input."), {name: items}, generate))

    mixed = {name: _items(gen, model.projectors[name].input_dim, [2, 0]) for name in modalities}
    if ph_id is not None:
        parts = []
        for name in modalities:
            for k, item in enumerate(mixed[name]):
                parts.append(f"{name} item {k}: {ph * _rows([item])}.")
        cases.append(Case("mixed", "every modality with two items (2-D and 1-D), placeholders "
                          "spread through the text", encode(tok, "Compare " + " ".join(parts)),
                          mixed, generate))
    cases.append(Case("prepend", "every modality, no placeholder in the prompt: rows prepended",
                      encode(tok, "What do these inputs have in common?"),
                      {n: [t.clone() for t in items] for n, items in mixed.items()}, generate))

    template = model.tokenizer.chat_template
    if template:
        chat_mm = {name: _items(gen, model.projectors[name].input_dim, [2]) for name in modalities}
        marks = "".join(ph * 2 for _ in modalities) if ph_id is not None else ""
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"{marks}What is in these inputs?"}]
        text = render_chat(template, messages, model)
        cases.append(Case("chat", "the checkpoint's chat template (jinja2), a system and a user "
                          "turn, generation prompt", encode(tok, text), chat_mm, generate))

    long_ids = encode(tok, LONG_TEXT)
    while len(long_ids) < LONG_PROMPT_TOKENS + 16:
        long_ids = long_ids + encode(tok, LONG_TEXT)
    limit = model.text.max_position_embeddings - generate - 8
    long_ids = long_ids[:max(16, min(LONG_PROMPT_TOKENS + 16, limit))]
    first = modalities[0]
    long_mm = {first: _items(gen, model.projectors[first].input_dim, [2])}
    if ph_id is not None:
        middle = len(long_ids) // 2
        long_ids = long_ids[:middle] + [ph_id, ph_id] + long_ids[middle:]
    cases.append(Case("long", f"a prompt of {len(long_ids)} tokens with one {first} item "
                      "in the middle", long_ids, long_mm, generate))
    return cases


# -------------------------------------------------------------------------------------------
# cases files (user cases; golden references reuse the same layout)


def cases_to_file_parts(cases: list[Case], prefix: str = "input"
                        ) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """(tensors, JSON case list) in the cases-file layout; items stored as float32."""
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for index, case in enumerate(cases):
        mm = {}
        for modality, items in case.mm_inputs.items():
            keys = []
            for k, item in enumerate(items):
                key = f"{prefix}.{index}.{modality}.{k}"
                tensors[key] = item.detach().float().contiguous().cpu()
                keys.append(key)
            mm[modality] = keys
        entries.append({"name": case.name, "description": case.description,
                        "input_ids": list(case.input_ids), "mm": mm,
                        "generate": case.generate, "continuation": list(case.continuation)})
    return tensors, entries


def write_cases_file(path: Path, cases: list[Case]) -> None:
    """Write ``cases`` as a cases file (ids stored, so it replays without a tokenizer)."""
    from safetensors.torch import save_file

    from mmconvert.formats.bundle import follow_umask

    tensors, entries = cases_to_file_parts(cases)
    doc = {"version": CASES_VERSION, "cases": entries}
    save_file(tensors, str(path), metadata={CASES_KEY: json.dumps(doc)})
    follow_umask(path)  # the safetensors library writes 0600


def cases_from_entries(entries: list[dict[str, Any]], tensors: dict[str, torch.Tensor],
                       model: CanonicalModel | None, where: str,
                       default_generate: int = DEFAULT_GREEDY_TOKENS) -> list[Case]:
    """Cases from a JSON case list and the tensors it names (see docs/verification.md)."""
    cases = []
    tok = None
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CasesError(f"{where}: case {index} is not a JSON object")
        name = str(entry.get("name") or f"case{index}")
        if "input_ids" in entry:
            ids = [int(i) for i in entry["input_ids"]]
        elif "prompt" in entry or "messages" in entry:
            if model is None:
                raise CasesError(f"{where}: case {name!r} needs a tokenizer")
            tok = tok or load_tokenizer(model)
            if "messages" in entry:
                if not model.tokenizer.chat_template:
                    raise CasesError(f"{where}: case {name!r} has messages but the checkpoint "
                                     "has no chat template")
                text = render_chat(model.tokenizer.chat_template, entry["messages"], model,
                                   bool(entry.get("add_generation_prompt", True)))
            else:
                text = str(entry["prompt"])
            ids = encode(tok, text)
        else:
            raise CasesError(f"{where}: case {name!r} has none of input_ids, prompt, messages")
        mm: dict[str, list[torch.Tensor]] = {}
        for modality, keys in (entry.get("mm") or {}).items():
            if model is not None and modality not in model.projectors:
                raise CasesError(f"{where}: case {name!r} uses modality {modality!r}; the "
                                 f"checkpoint has {', '.join(model.projectors)}")
            items = []
            for key in keys:
                if key not in tensors:
                    raise CasesError(f"{where}: case {name!r} names tensor {key!r}, which the "
                                     "file does not hold")
                # a fresh, 64-byte aligned copy like the items a full run generates: tensors
                # read from a safetensors file sit at the file's offsets (8-byte aligned), and
                # on AVX2 the matmul kernels round unaligned inputs differently (~2e-6)
                item = tensors[key].float().clone()
                if model is not None and item.shape[-1] != model.projectors[modality].input_dim:
                    raise CasesError(
                        f"{where}: case {name!r}: tensor {key!r} has shape {list(item.shape)}; "
                        f"modality {modality!r} takes input_dim "
                        f"{model.projectors[modality].input_dim}")
                if item.dim() not in (1, 2):
                    raise CasesError(f"{where}: tensor {key!r} must be [n, input_dim] or "
                                     "[input_dim]")
                items.append(item)
            mm[modality] = items
        case = Case(name, str(entry.get("description") or "user case"), ids, mm,
                    int(entry.get("generate", default_generate)),
                    [int(i) for i in entry.get("continuation") or []])
        if not case.input_ids:
            raise CasesError(f"{where}: case {name!r} has an empty prompt")
        if model is not None:  # refused now, not after the reference ran the cases before it
            try:
                fusion_positions(case.full_ids, model.multimodal_token_id, case.n_rows)
            except ValueError as exc:
                raise CasesError(f"{where}: case {name!r}: {exc}") from None
        cases.append(case)
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise CasesError(f"{where}: case names must be unique")
    return cases


def load_cases_file(path: Path, model: CanonicalModel | None,
                    default_generate: int = DEFAULT_GREEDY_TOKENS) -> list[Case]:
    """Cases from a safetensors cases file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CasesError(f"{path}: cases file not found")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as exc:
        raise CasesError(f"{path}: not a safetensors cases file ({exc})") from exc
    if CASES_KEY not in metadata:
        raise CasesError(f"{path}: no {CASES_KEY!r} entry in the safetensors metadata "
                         "(see docs/verification.md for the cases file format)")
    try:
        doc = json.loads(metadata[CASES_KEY])
    except json.JSONDecodeError as exc:
        raise CasesError(f"{path}: {CASES_KEY} is not JSON ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list) or not doc["cases"]:
        raise CasesError(f"{path}: {CASES_KEY} must be an object with a non-empty 'cases' list")
    return cases_from_entries(doc["cases"], tensors, model, str(path), default_generate)
