"""The non-tensor files of the Hugging Face bundle: configs, tokenizer, remote code, model card.

The folder must serve two readers at once. Plain transformers (and vLLM, llama.cpp's converter,
...) see an ordinary Qwen3 folder: ``config.json`` with ``architectures: [Qwen3ForCausalLM]`` and
only standard keys they understand. ``trust_remote_code=True`` follows ``auto_map`` to
``modeling_mmqwen3.py``, which reads the projector description stored under
:data:`CONFIG_KEY` and the weights in ``multimodal_projector.safetensors``. The layout is
documented in ``docs/hf-bundle.md``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from mmconvert.convert.model import CanonicalModel, ProjectorLayer, ProjectorSpec
from mmconvert.formats.safe_paths import copy_inside

TEMPLATE_DIR = Path(__file__).parent / "templates"
MODELING_FILE = "modeling_mmqwen3.py"
MODEL_CLASS = "MultimodalQwen3ForCausalLM"
MOE_MODEL_CLASS = "MultimodalQwen3MoeForCausalLM"
CONFIG_KEY = "multimodal_config"  # config.json key holding the projector description
PROJECTOR_FORMAT = "mmconvert.multimodal_projector"
PROJECTOR_FORMAT_VERSION = 1  # linear, layer_norm and act layers only
PROJECTOR_FORMAT_VERSION_GATED = 2  # also glu and tanh_gate layers (and folded linears)
FUSION_RULE = ("projected rows (modalities in the order of `modalities`, items in "
               "list order, rows in item order) replace the placeholder tokens, one row per "
               "placeholder; a prompt without placeholders gets all rows prepended; any other "
               "placeholder count is an error")
# keys of the source Qwen3 config carried over unchanged when present (they change behaviour)
PASSTHROUGH_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types",
                    "attention_dropout", "initializer_range", "use_cache",
                    "router_aux_loss_coef", "output_router_logits")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _layer_dict(layer: ProjectorLayer, spec: ProjectorSpec) -> dict[str, Any]:
    if layer.kind == "linear":
        out = {"kind": "linear", "name": layer.name, "in_dim": layer.in_dim,
               "out_dim": layer.out_dim, "bias": layer.bias}
        if layer.folded_from:
            out["folded_from"] = list(layer.folded_from)
        return out
    if layer.kind == "layer_norm":
        return {"kind": "layer_norm", "name": layer.name, "dim": layer.out_dim,
                "eps": layer.eps if layer.eps is not None else spec.layer_norm_eps,
                "bias": layer.bias}
    if layer.kind == "glu":
        return {"kind": "glu", "name": layer.name, "in_dim": layer.in_dim,
                "out_dim": layer.out_dim, "activation": layer.activation or spec.activation,
                "bias": layer.bias}
    if layer.kind == "tanh_gate":
        return {"kind": "tanh_gate", "name": layer.name, "dim": layer.out_dim,
                "per_channel": layer.per_channel, "complementary": layer.complementary}
    if layer.kind == "act":
        return {"kind": "act", "name": layer.name,
                "activation": layer.activation or spec.activation}
    raise ValueError(f"projector layer kind {layer.kind!r} has no HF bundle form")


def format_version(specs: dict[str, ProjectorSpec]) -> int:
    """The lowest ``multimodal_config`` version that describes these projectors, so bundles
    without the newer layer kinds stay readable by version-1 code."""
    newer = any(x.kind in ("glu", "tanh_gate") or x.folded_from
                for spec in specs.values() for x in spec.layers)
    return PROJECTOR_FORMAT_VERSION_GATED if newer else PROJECTOR_FORMAT_VERSION


def projector_config(model: CanonicalModel, weights_file: str, tensor_prefix: str,
                     specs: dict[str, ProjectorSpec] | None = None) -> dict[str, Any]:
    """The self-describing projector + fusion description stored in ``config.json``.

    ``specs``: the projectors as the bundle stores them (e.g. with linear maps folded);
    default the checkpoint's. Modalities are a list (not an object) because their order is
    part of the fusion rule and not every JSON reader keeps object order.
    """
    specs = specs or model.projectors
    return {
        "format": PROJECTOR_FORMAT,
        "format_version": format_version(specs),
        "weights": weights_file,
        "tensor_prefix": tensor_prefix,
        "hidden_size": model.text.hidden_size,
        "placeholder_token": model.multimodal_token,
        "placeholder_token_id": model.multimodal_token_id,
        "fusion_strategy": model.fusion_strategy,
        "fusion_rule": FUSION_RULE,
        "max_multimodal_length": model.max_multimodal_length,
        "activations": {"relu": "max(x, 0)", "gelu": "exact erf GELU (torch.nn.GELU())",
                        "gelu_tanh": "tanh-approximated GELU", "tanh": "tanh(x)",
                        "silu": "x * sigmoid(x)"},
        "modalities": [
            {"name": name, "input_dim": spec.input_dim, "hidden_dim": spec.hidden_dim,
             "output_dim": spec.output_dim, "activation": spec.activation,
             "layer_norm": spec.layer_norm, "dropout": spec.dropout,
             "layers": [_layer_dict(layer, spec) for layer in spec.layers]}
            for name, spec in specs.items()
        ],
    }


def _rope_entries(model: CanonicalModel) -> dict[str, Any]:
    """Both spellings: ``rope_theta``/``rope_scaling`` (what Hub Qwen3 configs and older
    transformers read) and ``rope_parameters`` (what transformers 5 writes)."""
    t = model.text
    scaling = dict(t.rope_scaling) if t.rope_scaling else None
    params: dict[str, Any] = {"rope_type": "default"}
    if scaling:
        params.update(scaling)
        params["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
    params["rope_theta"] = t.rope_theta
    return {"rope_theta": t.rope_theta, "rope_scaling": scaling, "rope_parameters": params}


def _moe_entries(model: CanonicalModel) -> dict[str, Any]:
    """Qwen3-MoE keys as Hub configs spell them (``num_experts``; transformers 5 maps it to
    ``num_local_experts``); nothing for a dense model."""
    t = model.text
    if not t.is_moe:
        return {}
    return {"num_experts": t.num_experts, "num_experts_per_tok": t.num_experts_per_tok,
            "moe_intermediate_size": t.moe_intermediate_size,
            "norm_topk_prob": t.norm_topk_prob, "decoder_sparse_step": t.decoder_sparse_step,
            "mlp_only_layers": list(t.mlp_only_layers)}


def hf_config(model: CanonicalModel, config_dtype: str, projector: dict[str, Any]
              ) -> dict[str, Any]:
    """``config.json``: a standard Qwen3 (or Qwen3-MoE) config plus ``auto_map`` and the
    projector key."""
    t = model.text
    raw = t.raw_config or {}
    cfg: dict[str, Any] = {
        "architectures": ["Qwen3MoeForCausalLM" if t.is_moe else "Qwen3ForCausalLM"],
        "model_type": "qwen3_moe" if t.is_moe else "qwen3",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "hidden_act": t.hidden_act,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        **_rope_entries(model),
        "attention_bias": t.attention_bias,
        **_moe_entries(model),
        "tie_word_embeddings": model.tied,
        **{k: raw[k] for k in PASSTHROUGH_KEYS if k in raw},
        "bos_token_id": model.special.bos_id,
        "eos_token_id": model.special.eos_id,
        "pad_token_id": model.special.pad_id,
        "torch_dtype": config_dtype,
        "dtype": config_dtype,
        "auto_map": {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}."
                                             f"{MOE_MODEL_CLASS if t.is_moe else MODEL_CLASS}"},
        CONFIG_KEY: projector,
    }
    return cfg


def generation_config(model: CanonicalModel) -> dict[str, Any]:
    """The source's generation config with the merged special ids (full eos list)."""
    gen = {k: v for k, v in model.generation_config.items() if k != "transformers_version"}
    special = model.special
    for key, value in (("bos_token_id", special.bos_id), ("pad_token_id", special.pad_id),
                       ("eos_token_id", special.eos if len(special.eos) > 1 else special.eos_id)):
        if value is None:
            gen.pop(key, None)
        else:
            gen[key] = value
    return gen


def base_model_id(name: str | None) -> str | None:
    """``base_model`` for the card: only a Hub id (``owner/name``), never a local path."""
    if not name or Path(name).exists() or not HUB_ID.match(name):
        return None
    return name


def _card_yaml(model: CanonicalModel) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=base_model_id(model.base_model_name),
        base_model_relation="finetune" if base_model_id(model.base_model_name) else None,
        library_name="transformers", pipeline_tag="text-generation",
        tags=["multimodal", "qwen3", "mmconvert", "early-fusion", "custom_code"],
    )
    return data.to_yaml()


def _layer_label(layer: ProjectorLayer, spec: ProjectorSpec) -> str:
    if layer.kind == "linear":
        return f"Linear({layer.in_dim}→{layer.out_dim})"
    if layer.kind == "layer_norm":
        return "LayerNorm"
    if layer.kind == "glu":
        return f"{layer.activation}(gate)·up ({layer.in_dim}→{layer.out_dim})"
    if layer.kind in ("tanh_gate", "scale"):
        return "(1 − tanh g)·x" if layer.complementary else "tanh(g)·x"
    return layer.activation or spec.activation


def _modality_rows(model: CanonicalModel) -> list[str]:
    rows = ["| modality | input dim | projector | output dim | placeholder |",
            "|---|---|---|---|---|"]
    # a "|" ends a table cell even inside a code span: escape it
    token = f"`{model.multimodal_token}`".replace("|", "\\|") + f" (id {model.multimodal_token_id})"
    for name, spec in model.projectors.items():
        steps = " → ".join(_layer_label(layer, spec) for layer in spec.layers)
        rows.append(f"| `{name}` | {spec.input_dim} | {steps} | {spec.output_dim} | {token} |")
    return rows


def model_card(model: CanonicalModel, *, repo_id: str, dtype: str,
               parity_table: str | None = None) -> str:
    """The bundle's ``README.md``: YAML front matter, modalities, usage and provenance.

    ``repo_id`` is what the usage snippets load (a folder name here, the Hub id when pushing);
    ``parity_table`` is optional markdown (e.g. from ``mmconvert verify``) embedded verbatim.
    """
    first = next(iter(model.projectors))
    example = {name: spec.input_dim for name, spec in model.projectors.items()}
    mm_lines = ", ".join(
        f'"{name}": [torch.randn({dim}), torch.randn(2, {dim})]' if name == first else
        f'"{name}": [torch.randn(3, {dim})]' for name, dim in example.items())
    ph = model.multimodal_token
    base = model.base_model_name or "a Qwen3 model"
    lines = [
        "---", _card_yaml(model).rstrip(), "---", "",
        f"# {repo_id.rstrip('/').split('/')[-1]}", "",
        f"A multimodal Qwen3 model: per-modality projector MLPs over a Qwen3 language model "
        f"(base: `{base}`). Precomputed embeddings of each modality are projected into the "
        "language model's hidden size and spliced into the prompt (early fusion).", "",
        "Converted with mmconvert; `mmconvert.json` lists the source files, their sha256 and "
        "the transforms applied.", "",
        "## Modalities", "", *_modality_rows(model), "",
        f"Fusion ({model.fusion_strategy}): {FUSION_RULE}. The projector description lives under `{CONFIG_KEY}` in "
        "`config.json`; its weights are in `multimodal_projector.safetensors`.", "",
        "## Usage with transformers", "",
        "Multimodal (the remote code in `modeling_mmqwen3.py` adds the projectors):", "",
        "```python", "import torch",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)',
        f"mm_inputs = {{{mm_lines}}}",
        "# one placeholder per item; tokenize_prompt expands each to the item's row count",
        f'prompt = "{" ".join([ph] * (len(example) + 1))} Describe these inputs."',
        "input_ids = model.tokenize_prompt(tokenizer, prompt, mm_inputs)",
        "logits = model(input_ids=input_ids, mm_inputs=mm_inputs).logits",
        "out = model.generate(input_ids, mm_inputs=mm_inputs, max_new_tokens=32, do_sample=False)",
        "print(tokenizer.decode(out[0, input_ids.shape[1]:]))", "```", "",
        "Text only, as a plain Qwen3 model (no remote code):", "",
        "```python",
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")', "```", "",
        "## Usage with vLLM (prompt embeddings)", "",
        "The folder is a standard Qwen3 model for vLLM. Compute the fused prompt embeddings with "
        "the remote code (`model`, `input_ids` and `mm_inputs` as above) and pass them as "
        "`prompt_embeds`:", "",
        "```python", "from vllm import LLM", "",
        f'llm = LLM(model="{repo_id}", enable_prompt_embeds=True)',
        "embeds = model.embed_multimodal(input_ids, mm_inputs)[0]  # [T, hidden]",
        'outputs = llm.generate({"prompt_embeds": embeds.to(torch.bfloat16)})', "```", "",
        f"or serve it with `vllm serve {repo_id} --enable-prompt-embeds` and send the tensor "
        "(`torch.save`, base64) as `prompt_embeds` to the Completions API.", "",
        "## Files", "",
        "| file | content |", "|---|---|",
        "| `config.json` | Qwen3 config + `auto_map` + `multimodal_config` |",
        "| `model.safetensors` (or shards + index) | the language model |",
        "| `multimodal_projector.safetensors` | the projectors |",
        "| `modeling_mmqwen3.py` | remote code for `trust_remote_code=True` |",
        "| tokenizer files, `generation_config.json` | with the multimodal token and merged eos ids |",
        "| `mmconvert.json` | conversion manifest |", "",
        f"Weights dtype: `{dtype}`.", "",
    ]
    if parity_table:
        lines += ["## Logit parity", "", parity_table.strip(), ""]
    return "\n".join(lines)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_files(folder: Path, model: CanonicalModel, *, config_dtype: str, repo_id: str,
                   weights_file: str, tensor_prefix: str,
                   specs: dict[str, ProjectorSpec] | None = None) -> list[str]:
    """Write every non-tensor file of the bundle into ``folder``; return their names.
    ``specs``: the projectors as stored (see :func:`projector_config`)."""
    projector = projector_config(model, weights_file, tensor_prefix, specs)
    _write_json(folder / "config.json", hf_config(model, config_dtype, projector))
    _write_json(folder / "generation_config.json", generation_config(model))
    written = ["config.json", "generation_config.json"]
    for name in model.tokenizer.files:  # contents, never a link, and only from inside
        copy_inside(model.tokenizer.directory, name, folder / name)
        written.append(name)
    shutil.copyfile(TEMPLATE_DIR / MODELING_FILE, folder / MODELING_FILE)
    written.append(MODELING_FILE)
    (folder / "README.md").write_text(model_card(model, repo_id=repo_id, dtype=config_dtype),
                                      encoding="utf-8")
    written.append("README.md")
    return written
