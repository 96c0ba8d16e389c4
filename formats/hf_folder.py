"""The non-tensor files of the Hugging Face bundle: configs, tokenizer, remote code.

The folder must serve two readers at once. Plain transformers (and vLLM, llama.cpp's converter,
...) see an ordinary Qwen3 folder: ``config.json`` with ``architectures: [Qwen3ForCausalLM]`` and
only standard keys they understand. ``trust_remote_code=True`` follows ``auto_map`` to
``modeling_mmqwen3.py``, which reads the projector description stored under
:data:`CONFIG_KEY` and the weights in ``multimodal_projector/model.safetensors``. The layout is
documented in ``docs/hf-bundle.md``. The configs' contents are built from the canonical model
in :mod:`mmconvert.convert.hf_config`; this module holds the format's names and writes files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

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


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_files(folder: Path, *, config: dict[str, Any], generation_config: dict[str, Any],
                   tokenizer_dir: Path, tokenizer_files: list[str]) -> list[str]:
    """Write every non-tensor file of the bundle into ``folder``; return their names: the two
    configs, the tokenizer files copied from ``tokenizer_dir`` and the remote code (the card,
    ``README.md``, is written for every bundle kind by ``publish.model_card``)."""
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", generation_config)
    written = ["config.json", "generation_config.json"]
    for name in tokenizer_files:  # contents, never a link, and only from inside
        copy_inside(tokenizer_dir, name, folder / name)
        written.append(name)
    shutil.copyfile(TEMPLATE_DIR / MODELING_FILE, folder / MODELING_FILE)
    written.append(MODELING_FILE)
    return written
