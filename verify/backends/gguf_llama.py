"""GGUF through llama.cpp (llama-cpp-python): the runtime users actually run.

Text runs are decoded as tokens (llama.cpp's own embedding lookup); projected rows, computed
from the projector GGUF as ``docs/gguf-projector.md`` specifies, are injected through
``llama_batch.embd``; logits are requested for every position. llama.cpp runs in a worker
process (:class:`mmconvert.runtime.llama_lib.LlamaProcess`) so that a bundle that crashes it
fails verification instead of killing it. Reported as skipped when llama_cpp cannot be
imported.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mmconvert.convert.model import CanonicalModel
from mmconvert.runtime import llama_lib
from mmconvert.runtime.fusion import as_rows, fusion_positions
from mmconvert.verify.backends import BundleTensor, Runner, Target, register
from mmconvert.verify.backends.gguf_common import GGUFBundle, gguf_targets
from mmconvert.verify.cases import Case
from mmconvert.verify.reference import project
from mmconvert.verify.tokenizer_parity import eog_check, tokenizer_parity

MIN_CONTEXT = 1024


class LlamaRunner(Runner):
    def __init__(self, target: Target, model: CanonicalModel):
        super().__init__(target, model)
        self.bundle = GGUFBundle(target, model)
        self.path = target.options["text"][0]
        self.weights: dict[str, torch.Tensor] = {}
        self.process: llama_lib.LlamaProcess | None = None
        self.gpu = False

    def facts(self) -> dict[str, Any]:
        return self.bundle.facts()

    def tensors(self) -> list[BundleTensor]:
        return self.bundle.tensors()

    def prepare(self, tensors: dict[str, BundleTensor], device: str, dtype: torch.dtype) -> None:
        # the projector runs in float32 here whatever the reference dtype: llama.cpp gets rows
        # in float32 and computes in float32
        self.weights = {n: torch.from_numpy(np.array(bt.load())) for n, bt in tensors.items()
                        if n.startswith("mm.")}
        self.gpu = device.startswith("cuda")
        self.process = llama_lib.LlamaProcess(self.path, gpu=self.gpu)

    def _projected(self, case: Case) -> torch.Tensor | None:
        specs = self.bundle.projector_specs
        unknown = set(case.mm_inputs) - set(specs)
        if unknown:
            raise ValueError(f"the projector GGUF has no modality {sorted(unknown)}")
        rows = [project(specs[m], self.weights, as_rows(item).float())
                for m in specs for item in case.mm_inputs.get(m, [])]
        return torch.cat(rows) if rows else None

    @torch.no_grad()
    def logits(self, case: Case) -> torch.Tensor:
        projected = self._projected(case)
        n_rows = 0 if projected is None else projected.shape[0]
        ids, where = fusion_positions(case.full_ids, self.bundle.placeholder_id, n_rows)
        runs: list[tuple[str, np.ndarray]] = []
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or (where[i] is None) != (where[start] is None):
                if where[start] is None:
                    runs.append(("tokens", np.asarray(ids[start:i], dtype=np.int64)))
                else:
                    index = [r for r in where[start:i] if r is not None]
                    runs.append(("embd", projected[index].numpy()))
                start = i
        if self.process is None or self.process.proc.poll() is not None:
            self.process = llama_lib.LlamaProcess(self.path, gpu=self.gpu)  # after a crash
        n_ctx = max(MIN_CONTEXT, 256 * -(-len(ids) // 256))
        return torch.from_numpy(self.process.call("logits", runs, n_ctx))

    def extra_checks(self) -> list[tuple[str, bool | None, str]]:
        source = self.process if self.process and self.process.proc.poll() is None else self.path
        return [self.bundle.vocab_check(), tokenizer_parity(source, self.model),
                eog_check(source, self.model)]

    def holder(self) -> object | None:
        return self.process  # the worker holding the model; closed, it is gone

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None


def llama_targets(bundle, manifest) -> list[Target]:
    targets = gguf_targets("gguf_llama")(bundle, manifest)
    reason = llama_lib.unavailable()
    for t in targets:
        t.skip = reason
    return targets


register("gguf", "gguf_llama", llama_targets, LlamaRunner)
