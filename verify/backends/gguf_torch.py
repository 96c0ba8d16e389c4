"""GGUF through gguf-py and torch: every tensor dequantised, then the same Qwen3 forward and
projectors as the reference, configured from the GGUF metadata. Fast and needs no llama.cpp;
it checks the bytes and what the files declare, :mod:`.gguf_llama` checks the runtime."""

from __future__ import annotations

from typing import Any

import torch

from mmconvert.convert.model import CanonicalModel
from mmconvert.verify.backends import BundleTensor, Runner, Target, register
from mmconvert.verify.backends.gguf_common import GGUFBundle, gguf_targets
from mmconvert.verify.backends.torch_forward import build_forward, case_logits, placement_note
from mmconvert.verify.cases import Case


class GGUFTorchRunner(Runner):
    def __init__(self, target: Target, model: CanonicalModel):
        super().__init__(target, model)
        self.bundle = GGUFBundle(target, model)
        self.forward = None

    def facts(self) -> dict[str, Any]:
        return self.bundle.facts()

    def tensors(self) -> list[BundleTensor]:
        return self.bundle.tensors()

    def prepare(self, tensors: dict[str, BundleTensor], device: str, dtype: torch.dtype) -> None:
        self.forward = build_forward(self.bundle.text_spec, self.bundle.projector_specs,
                                     self.bundle.placeholder_id, tensors, device, dtype,
                                     self.model.text.rope_layout, self.offload)

    def logits(self, case: Case) -> torch.Tensor:
        return case_logits(self.forward, case)

    def extra_checks(self) -> list[tuple[str, bool | None, str]]:
        return [self.bundle.vocab_check()]

    def holder(self) -> object | None:
        return None if self.forward is None else self.forward.lm

    def placement_note(self) -> str:
        return placement_note(self.forward)

    def close(self) -> None:
        self.forward = None


register("gguf", "gguf_torch", gguf_targets("gguf_torch"), GGUFTorchRunner)
