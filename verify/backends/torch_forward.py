"""The forward pass shared by the backends that run a bundle's tensors in torch.

The bundle's tensors (already in the canonical layout) go into the same
:class:`TorchMultimodalQwen3` as the reference, so a difference in logits can only come from
the numbers or from what the bundle declares (hyper-parameters, projector layers, placeholder).
"""

from __future__ import annotations

import numpy as np
import torch

from mmconvert.convert.model import ProjectorSpec, TextSpec
from mmconvert.verify.backends import BundleTensor
from mmconvert.verify.cases import Case
from mmconvert.verify.reference import (
    TorchMultimodalQwen3,
    canonical_to_neox,
    plan_placement,
    weight_bytes,
)


def build_forward(text: TextSpec, projectors: dict[str, ProjectorSpec],
                  placeholder_id: int | None, tensors: dict[str, BundleTensor], device: str,
                  dtype: torch.dtype, rope_layout: str = "neox", offload: str = "auto"
                  ) -> TorchMultimodalQwen3:
    """``tensors`` are in the canonical layout, i.e. the source's rope layout: an interleaved
    source is permuted to rotate-half here exactly as the reference does. A model larger than
    the RAM left keeps its last layers on disk, each read (and dequantised) from the bundle's
    file when it runs, layer by layer (``offload``, see :func:`plan_placement`)."""

    def loader(bt: BundleTensor):
        def load() -> torch.Tensor:
            # gguf-py hands out read-only views of its memory map; torch wants writable memory
            tensor = torch.from_numpy(np.require(bt.load(), requirements="W"))
            if rope_layout == "interleaved":
                tensor = canonical_to_neox(bt.name, tensor, text)
            return tensor
        return load

    loaders = {name: loader(bt) for name, bt in tensors.items() if name}
    nbytes, largest = weight_bytes((bt.numel for bt in tensors.values()), dtype)
    main, max_memory = plan_placement(nbytes, device, offload, largest_bytes=largest)
    return TorchMultimodalQwen3(text, projectors, placeholder_id, loaders, device=main,
                                dtype=dtype, max_memory=max_memory)


def case_logits(forward: TorchMultimodalQwen3, case: Case) -> torch.Tensor:
    return forward.logits(case.full_ids, case.mm_inputs)


def placement_note(forward: TorchMultimodalQwen3 | None) -> str:
    if forward is None or not forward.device_map:
        return ""
    if forward.offloaded:
        return f"{forward.offloaded} tensors left on disk, read from the bundle per forward"
    return "accelerate device_map"
