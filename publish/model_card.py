"""The model card (``README.md``) of every bundle kind (HF, safetensors, GGUF): the one generator,
used by every export (:func:`write_bundle_card`, the card a bundle is written with) and by
``push`` (:func:`merge_card`, the card uploaded).

The card is the user's as much as ours: ``merge_card`` regenerates only the text between
:data:`BEGIN` and :data:`END` and the front-matter keys mmconvert owns; everything else a user
wrote (on the Hub or in the bundle) is kept byte for byte.

    >>> card = merge_card(existing_readme_or_None, summarize_bundle(folder), "me/my-model")
    >>> write_bundle_card(Path("out/gguf"), "my-model-GGUF")  # README.md, listed in the manifest
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from mmconvert import __version__
from mmconvert.formats.bundle import add_output
from mmconvert.publish.bundle_summary import CARD, BundleSummary, summarize_bundle

BEGIN = "<!-- mmconvert:begin -->"
END = "<!-- mmconvert:end -->"
# before a usage block that cannot run where the card is written (tests/test_doc_snippets.py
# runs every other block of a card, and lists these with their reasons)
SKIP = "<!-- snippet: skip {} -->"
LIBRARY = {"hf": "transformers", "safetensors": "safetensors", "gguf": "gguf"}
RELATION = {"hf": "finetune", "safetensors": "finetune", "gguf": "quantized"}
KIND_TITLE = {"hf": "Hugging Face (transformers) bundle", "safetensors": "safetensors bundle",
              "gguf": "GGUF bundle (llama.cpp)"}
OWNED_KEYS = ("base_model", "base_model_relation", "library_name", "pipeline_tag")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name: the one Hub-id pattern
# same pattern huggingface_hub's RepoCard uses to find the front matter
_FRONT_MATTER = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


class CardError(ValueError):
    """The existing card cannot be merged (its front matter is not a YAML mapping)."""


def hub_model_id(name: str | None) -> str | None:
    """``base_model`` must be a Hub id (``owner/name``); a local path is left out (also one
    spelt like an id, ``models/qwen3``, when it exists here)."""
    if not name or not HUB_ID.match(name) or name.startswith((".", "/")) or Path(name).exists():
        return None
    return name


def write_bundle_card(folder: Path, name: str) -> str:
    """Write the card of the bundle being written in ``folder`` (its manifest already there)
    and list it in ``mmconvert.json``; ``name`` is what the usage snippets load (the output
    folder's name; ``push`` puts the Hub id there). Returns the card's file name."""
    folder = Path(folder)
    text = merge_card(None, summarize_bundle(folder), name)
    (folder / CARD).write_text(text, encoding="utf-8")
    add_output(folder, CARD)
    return CARD


def card_metadata(summary: BundleSummary) -> dict[str, Any]:
    """The front-matter keys mmconvert owns for this bundle."""
    meta: dict[str, Any] = {}
    base = hub_model_id(summary.base_model)
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = RELATION[summary.kind]
    meta["library_name"] = LIBRARY[summary.kind]
    meta["pipeline_tag"] = "text-generation"
    tags = ["gguf"] if summary.kind == "gguf" else []
    tags += ["multimodal", "qwen3", "mmconvert"]
    if summary.kind == "hf":
        tags.append("custom_code")  # the bundle's remote code (trust_remote_code=True)
    meta["tags"] = tags
    return meta


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """``(metadata, body)`` of a card; a card without front matter has empty metadata."""
    match = _FRONT_MATTER.search(text)
    if not match:
        return {}, text
    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} of the front matter" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CardError(f"the existing README.md front matter is not valid YAML ({problem}"
                        f"{where})") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CardError("the existing README.md front matter is not a YAML mapping")
    return data, text[match.end():]


def merge_metadata(existing: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    """Keep every user key; set the keys we own (they describe the files we upload); tags are
    the union, the user's first."""
    merged = dict(existing)
    for key in OWNED_KEYS:
        if key in ours:
            merged[key] = ours[key]
    tags = existing.get("tags") or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    merged["tags"] = tags + [t for t in ours.get("tags", []) if t not in tags]
    return merged


def merge_card(existing: str | None, summary: BundleSummary, repo_id: str) -> str:
    """The card to upload: ``existing`` with our section and front-matter keys refreshed."""
    meta, body = split_front_matter(existing or "")
    meta = merge_metadata(meta, card_metadata(summary))
    section = card_section(summary, repo_id)
    end = body.find(END)
    start = body.rfind(BEGIN, 0, end) if end >= 0 else -1
    if start >= 0:  # the last begin marker before the first end marker: our previous section
        body = body[:start] + section + body[end + len(END):]
    elif body.strip():
        body = body.rstrip("\n") + "\n\n" + section + "\n"
    else:
        body = f"\n# {repo_id.split('/')[-1]}\n\n{section}\n"
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{front}---\n{body}"


def card_section(s: BundleSummary, repo_id: str) -> str:
    """The generated part of the card, markers included."""
    lines = [BEGIN,
             f"<!-- Written by mmconvert {__version__} from mmconvert.json: text between these "
             "markers is replaced on every push; write your own text outside them. -->", "",
             *_overview(s), *_files_table(s), *_modalities(s), *_usage(s, repo_id)]
    if s.parity_markdown:
        lines += ["## Logit parity", "", "From the `mmconvert verify` report in this repo:", "",
                  _demote_headings(s.parity_markdown), ""]
    lines += _provenance(s)
    return "\n".join(lines).rstrip("\n") + "\n" + END


def _overview(s: BundleSummary) -> list[str]:
    base = hub_model_id(s.base_model)
    base_text = f"[{base}](https://huggingface.co/{base})" if base else f"`{s.base_model or '?'}`"
    return [f"A multimodal Qwen3 model as a {KIND_TITLE[s.kind]}: per-modality projector MLPs "
            f"over a Qwen3 language model (base: {base_text}). Precomputed embeddings of each "
            "modality are projected to the language model's hidden size and replace the "
            "placeholder tokens of the prompt (early fusion).", ""]


def _files_table(s: BundleSummary) -> list[str]:
    gguf = s.kind == "gguf"
    lines = ["## Files", "", "| file | size | type |" if gguf else "| file | size |",
             "|---|---:|---|" if gguf else "|---|---:|"]
    for f in s.files:
        row = f"| `{_cell(f.path)}` | {_human_size(f.size)} |"
        lines.append(row + (f" {f.quant or '-'} |" if gguf else ""))
    return lines + [""]


def _modalities(s: BundleSummary) -> list[str]:
    token = f"`{s.placeholder}`" if s.placeholder else "the multimodal token"
    if s.placeholder_id is not None:
        token += f" (id {s.placeholder_id})"
    lines = ["## Modalities", ""]
    layered = any(m.layers for m in s.modalities)  # the bundle describes its layers
    if s.modalities:
        lines += ["| modality | input dim | output dim | placeholder |"
                  + (" projector |" if layered else ""),
                  "|---|---:|---:|---|" + ("---|" if layered else "")]
        lines += [f"| `{_cell(m.name)}` | {_dim(m.input_dim)} | {_dim(m.output_dim)} | "
                  f"{_cell(token)} |" + (f" {_cell(' → '.join(m.layers)) or '?'} |"
                                         if layered else "") for m in s.modalities]
    else:
        lines.append("See `mmconvert.json` and the bundle's config for the modalities.")
    lines += ["", f"Each item of a modality (`[n, input_dim]`) becomes `n` rows that replace `n` "
              f"placeholder tokens {token} in order (modalities in the order above, items in "
              "list order); a prompt without placeholders gets all rows prepended.", ""]
    return lines


def _usage(s: BundleSummary, repo_id: str) -> list[str]:
    first = s.modalities[0] if s.modalities else None
    dim = first.input_dim if first and first.input_dim else "INPUT_DIM"
    name = first.name if first else "MODALITY"
    ph = s.placeholder or "<|multimodal|>"
    local = repo_id.split("/")[-1]
    texts = [f for f in s.files if f.path.endswith(".gguf") and "mmproj" not in f.path]
    gguf_file = texts[0].path if texts else "MODEL.gguf"
    lines = ["## Usage", "", "### transformers", ""]
    if s.kind == "hf":
        items, count = _example_items(s, name, dim)
        lines += ["```python", "import torch",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
                  f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
                  f"mm_inputs = {{{items}}}",
                  "# one placeholder per item; tokenize_prompt expands each to the item's row count",
                  f'prompt = "{" ".join([ph] * count)} Describe these inputs."',
                  "input_ids = model.tokenize_prompt(tokenizer, prompt, mm_inputs)",
                  "out = model.generate(input_ids, mm_inputs=mm_inputs, max_new_tokens=32, "
                  "do_sample=False)",
                  "print(tokenizer.decode(out[0, input_ids.shape[1]:]))", "```", "",
                  "Without `trust_remote_code` the folder loads as a plain text-only Qwen3 "
                  f'(`AutoModelForCausalLM.from_pretrained("{repo_id}")`).', ""]
    elif s.kind == "gguf":
        blocker = transformers_gguf_blocker(s.folder / gguf_file) if texts else None
        if blocker:
            lines += ["transformers cannot load this text GGUF: " + blocker + ". Convert the "
                      "checkpoint with `mmconvert to-hf` for a transformers model.", ""]
        else:
            lines += ["transformers can dequantize the text GGUF (text only; the projectors are "
                      "in the `mmproj-*.gguf` file, see `mmconvert run` below):", "",
                      "```python", "from transformers import AutoModelForCausalLM", "",
                      f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", '
                      f'gguf_file="{gguf_file}")', "```", ""]
    else:
        names = ("the checkpoint's own tensor names: load them into the training code"
                 if s.manifest.get("naming", "source") == "source" else
                 "the HF bundle's tensor names, without its config")
        lines += [f"The weights keep {names}, or convert this folder with `mmconvert to-hf` "
                  "for a transformers model.", "",
                  SKIP.format("downloads from the Hub"),
                  "```python", "from huggingface_hub import snapshot_download",
                  "from safetensors.torch import load_file", "",
                  f'path = snapshot_download("{repo_id}")',
                  'state = load_file(f"{path}/model.safetensors")  # or every shard of the index',
                  "```", ""]
    lines += ["### vLLM (prompt embeddings)", "",
              "vLLM takes the fused prompt directly as embeddings: the token embeddings with the "
              "placeholder rows replaced by the projected rows (`[T, hidden]`).", ""]
    if s.kind == "safetensors":
        lines += ["Convert this folder with `mmconvert to-hf` first; the HF bundle's card shows "
                  "the vLLM call.", ""]
    else:
        model_arg = (f'model="{local}/{gguf_file}", '
                     f'tokenizer="{hub_model_id(s.base_model) or repo_id}"'
                     if s.kind == "gguf" else f'model="{repo_id}"')
        embeds = ("prompt_embeds = model.embed_multimodal(input_ids, mm_inputs)[0]  "
                  "# from the transformers example" if s.kind == "hf" else
                  "prompt_embeds = ...  # [T, hidden] float tensor, fused as described above")
        lines += [SKIP.format("needs vLLM (and a GPU or vLLM's CPU build)"), "```python",
                  "from vllm import LLM", "",
                  f"llm = LLM({model_arg}, enable_prompt_embeds=True)", embeds,
                  'outputs = llm.generate({"prompt_embeds": prompt_embeds})', "```", ""]
        if s.kind == "hf":
            lines += [f"or serve it with `vllm serve {repo_id} --enable-prompt-embeds` and send "
                      "the tensor (`torch.save`, base64) as `prompt_embeds` to the Completions "
                      "API.", ""]
    lines += ["### mmconvert run (llama.cpp)", "", SKIP.format("downloads from the Hub"),
              "```bash", f"hf download {repo_id} --local-dir {local}", "```", ""]
    bundle = local
    if s.kind != "gguf":
        bundle = f"{local}-gguf"
        lines += ["Convert it to GGUF first:", "", "```bash",
                  f"mmconvert to-gguf {local} -o {bundle} --outtype q8_0", "```", ""]
    items = _run_inputs(s)
    lines += ["The embeddings go in a safetensors file, a tensor `[rows, input_dim]` per item "
              "(named by its modality, or `MODALITY.K` for several items); random ones to try "
              "it:", ""]
    if not items:
        lines.append(SKIP.format("the bundle does not record its modalities' input dims"))
        items = '"MODALITY": np.random.randn(3, INPUT_DIM).astype(np.float32)'
    lines += ["```python", "import numpy as np", "from safetensors.numpy import save_file", "",
              f'save_file({{{items}}}, "inputs.safetensors")', "```", "",
              "```bash",
              f'mmconvert run {bundle} --prompt "{" ".join([ph] * max(len(s.modalities), 1))} '
              'Describe these." --embeddings inputs.safetensors --max-tokens 64', "```", "",
              "`mmconvert run` projects the embeddings with the projector GGUF and injects them "
              "into llama.cpp (through `llama-cpp-python`) at the placeholder positions, one "
              "placeholder per item.", ""]
    return lines


# What transformers' GGUF loader (5.23, integrations/ggml.py) does not read from our archs'
# keys: it builds the config with the default instead, and from_pretrained then fails on the
# weights' shapes unless the model happens to have that default.
# GGUF key (after the arch prefix) -> (the config field, transformers' default)
TRANSFORMERS_GGUF_UNREAD = {
    "qwen3": {"attention.key_length": ("head_dim", 128)},
    "qwen3moe": {"expert_feed_forward_length": ("moe_intermediate_size", 768)},
}


def transformers_gguf_blocker(text_gguf: Path) -> str | None:
    """Why ``from_pretrained(..., gguf_file=...)`` cannot load ``text_gguf``, or None when it can
    (checked against transformers 5.23 in ``tests/test_model_card.py``)."""
    from mmconvert.formats.gguf_reader import read_gguf_keys

    arch_key = "general.architecture"
    try:
        arch = read_gguf_keys(text_gguf, [arch_key]).get(arch_key)
        unread = TRANSFORMERS_GGUF_UNREAD.get(arch, {})
        values = read_gguf_keys(text_gguf, [f"{arch}.{k}" for k in unread] + ["split.count"])
    except (OSError, ValueError):
        return "the file is not readable GGUF"
    if (values.get("split.count") or 1) > 1:
        return "it is split into shards, and transformers reads one GGUF file"
    for key, (field, default) in unread.items():
        value = values.get(f"{arch}.{key}")
        if value is not None and value != default:
            return (f"its GGUF loader does not read `{arch}.{key}` and assumes {field} "
                    f"{default}, but this model's is {value}")
    return None


def _run_inputs(s: BundleSummary) -> str:
    """One random float32 item per modality (3 rows), as ``save_file``'s dict; empty when an
    input dim is unknown."""
    if not s.modalities or any(not m.input_dim for m in s.modalities):
        return ""
    return ", ".join(f'"{m.name}": np.random.randn(3, {m.input_dim}).astype(np.float32)'
                     for m in s.modalities)


def _example_items(s: BundleSummary, name: str, dim: Any) -> tuple[str, int]:
    """``mm_inputs`` for the usage snippet (two items of the first modality, one of each
    other) and how many items that is."""
    modalities = [(m.name, m.input_dim or "INPUT_DIM") for m in s.modalities] or [(name, dim)]
    items = ", ".join(f'"{m}": [torch.randn({d}), torch.randn(2, {d})]' if i == 0 else
                      f'"{m}": [torch.randn(3, {d})]' for i, (m, d) in enumerate(modalities))
    return items, len(modalities) + 1


def _provenance(s: BundleSummary) -> list[str]:
    m = s.manifest
    sources = m.get("sources") or []
    hashed = all(f.get("sha256") for f in [*sources, *(m.get("outputs") or [])])
    lines = ["## Provenance", "",
             f"Converted with mmconvert {m.get('version', '?')} from {len(sources)} source "
             f"file(s) (dialect `{m.get('dialect', '?')}`); `mmconvert.json` lists each source "
             f"and output with its {'sha256' if hashed else 'size'}."]
    if m.get("transforms"):
        lines.append("Transforms: " + ", ".join(f"`{t}`" for t in m["transforms"]) + ".")
    return lines + [""]


def _demote_headings(markdown: str) -> str:
    """The report's own title gives way to our ``## Logit parity``; other headings go below."""
    lines = markdown.strip().splitlines()
    if lines and lines[0].startswith("#"):
        lines = lines[1:]
    return "\n".join("##" + line if line.startswith("#") else line for line in lines).strip()


def _cell(text: str) -> str:
    """GitHub tables split cells on every ``|``, even inside code spans, unless escaped."""
    return text.replace("|", "\\|")


def _dim(value: int | None) -> str:
    return "?" if value is None else str(value)


def _human_size(n: int) -> str:
    units = ("B", "kB", "MB", "GB", "TB")
    size, i = float(n), 0
    while size >= 1000 and i < len(units) - 1:
        size, i = size / 1000, i + 1
    return f"{n} B" if i == 0 else f"{size:.1f} {units[i]}"
