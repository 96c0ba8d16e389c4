"""A PEFT LoRA adapter folder over a base checkpoint, merged before export.

``adapter_config.json`` (``peft_type: LORA``) + ``adapter_model.safetensors`` (or ``.bin``).
The base is ``--base DIR`` or the adapter's ``base_model_name_or_path`` when that is a local
folder; it is read by whichever reader fits it, then every targeted weight becomes a lazy
merged tensor ``W + scale * B @ A`` with ``scale = lora_alpha / r`` (``/ sqrt(r)`` when
``use_rslora``; ``rank_pattern``/``alpha_pattern`` honoured). ``modules_to_save`` tensors (a
trained projector, say) replace the base's. The merge runs in float32 and is cast back to the
base tensor's dtype, as PEFT's ``merge_and_unload`` does.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from mmconvert.convert.config_values import (
    check_float,
    check_int,
    config_bool,
    config_dict,
    config_float,
    config_int,
    shown,
)
from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.readers import ReadOptions, read_checkpoint, register
from mmconvert.convert.readers.common import find_weight_files, load_json, open_weight_files
from mmconvert.convert.tensors import TensorRef, TensorTable
from mmconvert.errors import CheckpointError, UnsupportedError
from mmconvert.formats.dtypes import FLOAT_DTYPES, convert, to_float32
from mmconvert.formats.safe_paths import checked_path

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def lora_scale(cfg: dict, module: str, where: str = "adapter_config.json") -> float:
    """``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA), with per-module patterns."""
    r = config_int(cfg, "r", where, default=8)
    alpha = config_float(cfg, "lora_alpha", where, default=8.0)
    for table, key in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        for pattern, value in (config_dict(cfg, table, where, default=None) or {}).items():
            if _matches(pattern, module, f"{where}: {table}"):
                if key == "r":
                    r = check_int(value, f"{table}[{shown(pattern)}]", where)
                else:
                    alpha = check_float(value, f"{table}[{shown(pattern)}]", where)
    rslora = config_bool(cfg, "use_rslora", where, default=False)
    return alpha / (math.sqrt(r) if rslora else r)


def _matches(pattern: str, module: str, where: str) -> bool:
    """PEFT's rule: a pattern names a module by a regex over its dotted name's tail."""
    try:
        return re.search(rf"(^|\.){pattern}$", module) is not None
    except re.error as exc:
        raise CheckpointError(f"{where}: {shown(pattern)} is not a valid pattern ({exc})") from exc


def merged(base: TensorRef, a: TensorRef, b: TensorRef, scale: float, fan_in_fan_out: bool) -> TensorRef:
    def merge(w: np.ndarray) -> np.ndarray:
        delta = to_float32(b.read(), b.dtype) @ to_float32(a.read(), a.dtype)
        if fan_in_fan_out:
            delta = delta.T
        out = to_float32(w, base.dtype) + np.float32(scale) * delta
        return convert(out.astype(np.float32), "F32", base.dtype)

    return base.derive(base.name, f"lora_merge(scale={scale:g})", merge, base.shape)


class PeftLoraReader:
    name = "peft-lora"
    description = "a PEFT LoRA adapter folder (adapter_config.json) over a base checkpoint (--base)"

    def detect(self, path: Path, options: ReadOptions) -> bool:
        return (path / "adapter_config.json").is_file()

    def read(self, path: Path, options: ReadOptions) -> CanonicalModel:
        cfg = load_json(path / "adapter_config.json", "adapter config")
        if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
            raise UnsupportedError(f"{path}: peft_type {cfg.get('peft_type')!r}; only LORA adapters merge")
        if cfg.get("use_dora"):
            raise UnsupportedError(f"{path}: DoRA adapters are not supported (use_dora: true)")
        base = options.base
        if base is None and cfg.get("base_model_name_or_path") and \
                Path(cfg["base_model_name_or_path"]).is_dir():
            base = Path(cfg["base_model_name_or_path"])
        if base is None:
            raise CheckpointError(f"{path}: a LoRA adapter needs its base checkpoint: pass --base DIR "
                                  f"(adapter says {cfg.get('base_model_name_or_path')!r})")
        model = read_checkpoint(base, replace(options, base=None))
        files = find_weight_files(path, stem="adapter_model") or (
            [checked_path(path, "adapter_model.bin")] if (path / "adapter_model.bin").is_file()
            else [])
        if not files:
            raise CheckpointError(f"{path}: no adapter_model.safetensors or adapter_model.bin")
        adapter = {k.removeprefix(PEFT_PREFIX).replace(".modules_to_save.default", ""): v
                   for k, v in open_weight_files(files).items()}
        by_source = {ref.source_name: ref for ref in model.tensors.refs()}
        table = TensorTable({n: model.tensors[n] for n in model.tensors})
        pairs: dict[str, dict[str, TensorRef]] = {}
        replaced = 0
        merged_names: list[str] = []
        for key, ref in adapter.items():
            m = LORA_KEY.match(key)
            if m:
                pairs.setdefault(m["module"], {})[m["ab"]] = ref
                continue
            if "lora_" in key:
                raise UnsupportedError(f"{path}: adapter tensor {key!r} is not a LoRA A/B weight "
                                       "(embedding or magnitude adapters are not supported)")
            target = by_source.get(key)
            if target is None:
                raise CheckpointError(f"{path}: modules_to_save tensor {key!r} has no counterpart in {base}")
            if tuple(ref.shape) != tuple(target.shape):
                raise CheckpointError(f"{path}: {key} has shape {list(ref.shape)}, base has "
                                      f"{list(target.shape)}")
            table.replace(replace(ref, name=target.name, source_name=target.source_name,
                                  derivation=("modules_to_save",)))
            replaced += 1
        for module, ab in pairs.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{path}: {module} has lora_{''.join(ab)} without its pair")
            target = by_source.get(f"{module}.weight")
            if target is None:
                raise CheckpointError(f"{path}: LoRA targets {module}.weight, absent from {base}")
            if target.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{path}: {module}.weight is not a float tensor")
            a, b = ab["A"], ab["B"]
            fan_in_fan_out = config_bool(cfg, "fan_in_fan_out", str(path), default=False)
            out_dim, in_dim = target.shape if not fan_in_fan_out else target.shape[::-1]
            if a.shape[1] != in_dim or b.shape[0] != out_dim or a.shape[0] != b.shape[1]:
                raise CheckpointError(f"{path}: {module} LoRA shapes A{list(a.shape)} B{list(b.shape)} "
                                      f"do not fit the base weight {list(target.shape)}")
            table.replace(merged(table[target.name], a, b, lora_scale(cfg, module, str(path / 'adapter_config.json')), fan_in_fan_out))
            merged_names.append(target.name)
        if model.tied and "model.embed_tokens.weight" in merged_names:
            model.warnings.append("LoRA merged into the tied embedding: the output matrix changes too")
        model.tensors = table
        model.dialect = f"{self.name}+{model.dialect}"
        model.source_files = list(model.source_files) + files
        model.source_files_from["adapter"] = str(path / "adapter_config.json")
        model.warnings.append(f"merged {len(pairs)} LoRA modules (r={cfg.get('r')}, alpha="
                              f"{cfg.get('lora_alpha')}{', rsLoRA' if cfg.get('use_rslora') else ''})"
                              f" and {replaced} modules_to_save tensors from {path}")
        return model


register(PeftLoraReader())
