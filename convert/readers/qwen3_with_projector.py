"""A plain Qwen3 Hugging Face folder plus a separate projector file (``--projector FILE``).

The projector file (safetensors or a weights-only pickle) holds the seed's projector tensors
named ``[multimodal_projector.]projectors.<modality>.<index>.{weight,bias}``; its config JSON
(``--projector-config``, else ``<file stem>.json`` or ``projector_config.json`` beside it)
carries ``modality_configs``, ``projector_hidden_act``, ``use_layer_norm`` and
``multimodal_token``, as in the multimodal config.
"""

from __future__ import annotations

from pathlib import Path

from mmconvert.convert.config_values import config_int
from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.readers import ReadOptions, register
from mmconvert.convert.readers.assemble import assemble
from mmconvert.convert.readers.common import find_weight_files, load_json, open_weight_files
from mmconvert.convert.readers.names import split_fused_gate_up, stack_experts
from mmconvert.convert.readers.projectors import projector_tensors, seed_projectors
from mmconvert.errors import CheckpointError

PROJECTOR_PREFIXES = ("multimodal_projector.projectors.", "projectors.", "")


def projector_config_path(projector: Path, given: Path | None) -> Path:
    if given is not None:
        return given
    for candidate in (projector.with_suffix(".json"), projector.parent / "projector_config.json"):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"{projector}: no projector config found; pass --projector-config "
                          f"FILE (looked for {projector.with_suffix('.json').name} and "
                          "projector_config.json beside it)")


class Qwen3WithProjectorReader:
    name = "qwen3+projector"
    description = "a plain Qwen3 folder (model_type qwen3 or qwen3_moe) with --projector FILE"

    def detect(self, path: Path, options: ReadOptions) -> bool:
        cfg = load_json(path / "config.json", "config")
        if cfg.get("model_type") not in ("qwen3", "qwen3_moe"):
            return False
        if options.projector is None:
            raise CheckpointError(f"{path}: a plain Qwen3 folder; pass --projector FILE with "
                                  "the trained projector weights")
        return True

    def read(self, path: Path, options: ReadOptions) -> CanonicalModel:
        text_config = load_json(path / "config.json", "config")
        projector = options.projector
        assert projector is not None
        if not projector.is_file():
            raise CheckpointError(f"{projector}: projector file not found")
        cfg_path = projector_config_path(projector, options.projector_config)
        # a --projector-config is the user's own choice; one found beside --projector must
        # resolve inside the projector's folder like every checkpoint file
        proj_config = load_json(cfg_path, "projector config",
                                user_named=options.projector_config is not None)
        files = find_weight_files(path)
        if not files:
            raise CheckpointError(f"{path}: no weights (model.safetensors or pytorch_model.bin)")
        lm, _ = split_fused_gate_up(open_weight_files(files))
        try:
            lm, _ = stack_experts(lm)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
        proj_sources = open_weight_files([projector])
        hidden = config_int(text_config, "hidden_size", str(path / "config.json"))
        projectors = seed_projectors(proj_config, hidden, str(cfg_path))
        prefix = next((p for p in PROJECTOR_PREFIXES
                       if any(n.startswith(p + next(iter(projectors)) + ".") for n in proj_sources)),
                      None)
        if prefix is None:
            raise CheckpointError(f"{projector}: no tensors for modality "
                                  f"{next(iter(projectors))!r} (expected names like "
                                  f"projectors.{next(iter(projectors))}.0.weight)")
        proj_refs = []
        for modality, spec in projectors.items():
            mcfg = proj_config["modality_configs"][modality] or {}
            proj_refs += projector_tensors(spec, proj_sources, f"{prefix}{modality}.",
                                           str(projector), bool(mcfg.get("gate_up_gate_first",
                                                                         True)))
        known = {r.source_name for r in proj_refs}
        stray = sorted(set(proj_sources) - known)
        if stray:
            raise CheckpointError(f"{projector}: tensors for no declared modality: "
                                  f"{', '.join(stray[:3])}")
        mm_config = {**proj_config, "base_model_name": proj_config.get("base_model_name")
                     or text_config.get("_name_or_path") or str(path)}
        return assemble(dialect=self.name, source=path, mm_config=mm_config,
                        text_config=text_config, text_where=str(path / "config.json"), lm=lm,
                        projectors=projectors, projector_refs=proj_refs, base_dir=options.base,
                        weight_files=files + [projector], rope_layout=options.rope_layout,
                        warnings=[])


register(Qwen3WithProjectorReader())
