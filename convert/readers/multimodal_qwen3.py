"""The reference layout: what ``MultimodalQwen3Model.save_pretrained()`` writes.

``config.json`` with ``model_type: multimodal_qwen3``; weights named
``language_model.model.*``, ``language_model.lm_head.weight`` and
``multimodal_projector.projectors.<modality>.<index>.{weight,bias}`` (or the tensors of the
other projector types, :mod:`mmconvert.convert.readers.projectors`).
"""

from __future__ import annotations

from pathlib import Path

from mmconvert.convert.config_values import config_bool, config_int, shown
from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.readers import ReadOptions, register
from mmconvert.convert.readers.assemble import assemble, find_base_dir, text_config_for
from mmconvert.convert.readers.common import find_weight_files, load_json, open_weight_files
from mmconvert.convert.readers.names import split_fused_gate_up, stack_experts, unwrap_names
from mmconvert.convert.readers.projectors import projector_tensors, seed_projectors
from mmconvert.errors import CheckpointError

LM_PREFIX = "language_model."
PROJECTOR_PREFIX = "multimodal_projector.projectors."


class MultimodalQwen3Reader:
    name = "multimodal_qwen3"
    description = "config.json model_type multimodal_qwen3 (MultimodalQwen3Model.save_pretrained)"

    def detect(self, path: Path, options: ReadOptions) -> bool:
        return load_json(path / "config.json", "config").get("model_type") == "multimodal_qwen3"

    def read(self, path: Path, options: ReadOptions) -> CanonicalModel:
        mm_config = load_json(path / "config.json", "config")
        warnings: list[str] = []
        if (path / "training_state.pt").exists():
            warnings.append("training_state.pt ignored (optimizer state; never unpickled)")
        base_dir = find_base_dir(mm_config, options.base)
        text_config, text_where = text_config_for(path, mm_config, base_dir)
        files = find_weight_files(path)
        if not files:
            raise CheckpointError(f"{path}: no weights (model.safetensors[.index.json] or "
                                  "pytorch_model.bin[.index.json])")
        sources, stripped = unwrap_names(open_weight_files(files), (LM_PREFIX, PROJECTOR_PREFIX))
        if stripped:
            warnings.append(f"stripped training-wrapper prefixes {', '.join(stripped)} from tensor names")
        lm = {}
        for name, ref in sources.items():
            if name.startswith(LM_PREFIX):
                lm[name[len(LM_PREFIX):]] = ref.renamed(name[len(LM_PREFIX):])
            elif not name.startswith(PROJECTOR_PREFIX):
                raise CheckpointError(f"{path}: tensor {shown(name)} belongs to neither the language "
                                      "model nor the projectors")
        where = str(path / "config.json")
        gate_first = config_bool(mm_config, "gate_up_gate_first", where, default=True)
        lm, fused = split_fused_gate_up(lm, gate_first=gate_first)
        try:
            lm, _ = stack_experts(lm, gate_first=gate_first)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        if fused:
            warnings.append(f"split {fused} fused gate_up_proj tensors into gate_proj/up_proj")
        hidden = config_int(text_config, "hidden_size", text_where)
        projectors = seed_projectors(mm_config, hidden, where)
        proj_refs = []
        for modality, spec in projectors.items():
            mcfg = mm_config["modality_configs"][modality]
            first = config_bool(mcfg, "gate_up_gate_first", where, default=gate_first,
                                label=f"modality_configs.{modality}.gate_up_gate_first")
            proj_refs += projector_tensors(spec, sources, f"{PROJECTOR_PREFIX}{modality}.",
                                           str(path), first)
        stray = sorted(n for n in sources if n.startswith(PROJECTOR_PREFIX)
                       and n[len(PROJECTOR_PREFIX):].split(".")[0] not in projectors)
        if stray:
            more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
            raise CheckpointError(f"{path}: projector tensors for a modality not in "
                                  f"modality_configs: {shown(stray[0])}{more}")
        return assemble(dialect=self.name, source=path, mm_config=mm_config,
                        text_config=text_config, text_where=text_where, lm=lm,
                        projectors=projectors, projector_refs=proj_refs, base_dir=base_dir,
                        weight_files=files, rope_layout=options.rope_layout, warnings=warnings)


register(MultimodalQwen3Reader())
