"""LLaVA-style checkpoints over a Qwen3 text model (``model_type: llava``).

The projector is ``multi_modal_projector.linear_1`` -> act -> ``linear_2``; the vision tower
is not exported (the projector consumes precomputed features, like every modality here), so
its tensors are skipped with a warning. Both transformers layouts are read: the older
``language_model.model.*`` / ``language_model.lm_head`` and the newer ``model.language_model.*``
/ ``model.multi_modal_projector.*`` / ``lm_head``. The modality is named ``vision`` and its
placeholder is the config's ``image_token_index`` (one placeholder per projected row, as
LLaVA's processor expands ``<image>``).
"""

from __future__ import annotations

from pathlib import Path

from mmconvert.convert.config_values import config_dict, config_int
from mmconvert.convert.model import CanonicalModel, ProjectorLayer, ProjectorSpec
from mmconvert.convert.readers import ReadOptions, register
from mmconvert.convert.readers.assemble import assemble, find_base_dir
from mmconvert.convert.readers.common import (
    find_weight_files,
    load_json,
    load_tokenizer_spec,
    open_weight_files,
    parse_activation,
)
from mmconvert.convert.readers.names import unwrap_names
from mmconvert.errors import CheckpointError

MODALITY = "vision"
LAYOUTS = (  # (LM prefix -> canonical prefix), projector prefix, lm_head name
    ({"language_model.model.": "model.", "language_model.lm_head.": "lm_head."},
     "multi_modal_projector.", "vision_tower."),
    ({"model.language_model.": "model.", "lm_head.": "lm_head."},
     "model.multi_modal_projector.", "model.vision_tower."),
)


class LlavaQwen3Reader:
    name = "llava"
    description = "LLaVA-style multi_modal_projector.linear_1/linear_2 over a Qwen3 text model"

    def detect(self, path: Path, options: ReadOptions) -> bool:
        cfg = load_json(path / "config.json", "config")
        text_config = cfg.get("text_config") or {}
        return (cfg.get("model_type") == "llava" and isinstance(text_config, dict)
                and text_config.get("model_type") in ("qwen3", None))

    def read(self, path: Path, options: ReadOptions) -> CanonicalModel:
        cfg = load_json(path / "config.json", "config")
        text_config = config_dict(cfg, "text_config", str(path / "config.json"), default=None) or {}
        if "hidden_size" not in text_config:
            raise CheckpointError(f"{path}: LLaVA config has no usable text_config")
        files = find_weight_files(path)
        if not files:
            raise CheckpointError(f"{path}: no weights (model.safetensors or pytorch_model.bin)")
        roots = ("language_model.", "model.language_model.", "multi_modal_projector.",
                 "model.multi_modal_projector.", "vision_tower.", "model.vision_tower.", "lm_head.")
        sources, stripped = unwrap_names(open_weight_files(files), roots)
        warnings = [f"stripped training-wrapper prefixes {', '.join(stripped)}"] if stripped else []
        lm_map, proj_prefix, tower_prefix = next(
            (layout for layout in LAYOUTS if f"{layout[1]}linear_1.weight" in sources), (None, "", ""))
        if lm_map is None:
            raise CheckpointError(f"{path}: no multi_modal_projector.linear_1.weight found")
        lm, tower = {}, 0
        for name, ref in sources.items():
            if name.startswith(proj_prefix):
                continue
            if name.startswith(tower_prefix):
                tower += 1
                continue
            src = next((p for p in lm_map if name.startswith(p)), None)
            if src is None:
                raise CheckpointError(f"{path}: tensor {name!r} is neither LM, projector nor tower")
            canonical = lm_map[src] + name[len(src):]
            lm[canonical] = ref.renamed(canonical)
        if tower:
            warnings.append(f"vision tower not exported ({tower} tensors): the projector "
                            "consumes precomputed vision features")
        hidden = config_int(text_config, "hidden_size", str(path / "config.json"))
        spec, proj_refs = self._projector(cfg, sources, proj_prefix, hidden, path)
        tokenizer_dir = path if (path / "tokenizer.json").is_file() else find_base_dir(cfg, options.base)
        if tokenizer_dir is None:
            raise CheckpointError(f"{path}: missing tokenizer (tokenizer.json); pass --base DIR")
        _, vocab = load_tokenizer_spec(tokenizer_dir)
        by_id = {i: t for t, i in vocab.items()}
        token_id = cfg.get("image_token_index", cfg.get("image_token_id"))
        mm_config = {**cfg, "multimodal_token": by_id.get(token_id, "<image>"),
                     "base_model_name": cfg.get("_name_or_path") or text_config.get("_name_or_path")}
        return assemble(dialect=self.name, source=path, mm_config=mm_config,
                        text_config=text_config, text_where=f"{path / 'config.json'}#text_config",
                        lm=lm, projectors={MODALITY: spec}, projector_refs=proj_refs,
                        base_dir=tokenizer_dir if tokenizer_dir != path else None,
                        weight_files=files, rope_layout=options.rope_layout, warnings=warnings)

    @staticmethod
    def _projector(cfg, sources, prefix, hidden, path):
        w1, w2 = sources[f"{prefix}linear_1.weight"], sources.get(f"{prefix}linear_2.weight")
        if w2 is None:
            raise CheckpointError(f"{path}: {prefix}linear_2.weight missing")
        if w2.shape[0] != hidden:
            raise CheckpointError(f"{path}: linear_2 maps to {w2.shape[0]}, the text model's "
                                  f"hidden size is {hidden}")
        bias = f"{prefix}linear_1.bias" in sources
        input_dim, mid = w1.shape[1], w1.shape[0]
        act = parse_activation(cfg.get("projector_hidden_act", "gelu"), str(path / "config.json"))
        layers = [ProjectorLayer("linear", "fc1", input_dim, mid, bias=bias),
                  ProjectorLayer("act", "act", mid, mid, activation=act),
                  ProjectorLayer("linear", "fc2", mid, hidden, bias=bias)]
        spec = ProjectorSpec(modality=MODALITY, input_dim=input_dim, hidden_dim=mid,
                             output_dim=hidden, activation=act, layer_norm=False, layers=layers)
        refs = []
        for layer, src in (("fc1", "linear_1"), ("fc2", "linear_2")):
            for part in ("weight", "bias") if bias else ("weight",):
                name = f"{prefix}{src}.{part}"
                if name not in sources:
                    raise CheckpointError(f"{path}: {name} missing")
                refs.append(sources[name].renamed(f"mm.{MODALITY}.{layer}.{part}"))
        extra = sorted(n for n in sources if n.startswith(prefix) and
                       n.rsplit(".", 2)[-2] not in ("linear_1", "linear_2"))
        if extra:
            raise CheckpointError(f"{path}: unexpected projector tensors {', '.join(extra[:3])}")
        return spec, refs


register(LlavaQwen3Reader())
