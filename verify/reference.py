"""The reference forward pass of a canonical model, in torch.

transformers' own ``Qwen3ForCausalLM`` runs the language model; the projectors are evaluated
from their :class:`ProjectorSpec` (the same data every writer exports). Weights come from the
canonical tensor table, so the reference sees exactly the source checkpoint's values.

:class:`TorchMultimodalQwen3` is the same forward built from any set of canonical tensors: the
GGUF and safetensors backends feed it the bundle's tensors (dequantised), so the source and a
bundle differ only in the numbers, never in the code that runs them.

Placement: one device (``cpu``, ``cuda``, ``cuda:1``), or accelerate's ``device_map`` when the
model does not fit on one GPU (:func:`choose_placement`). Tensors are streamed: each is read
from its file, cast and put on its device one at a time, so the weights never exist twice.

A model larger than the memory left (:func:`plan_placement`, ``--offload``) keeps what fits in
RAM (and on the GPUs) and leaves the rest on disk where it already lies: accelerate's
``dispatch_model`` runs those layers through hooks that fetch their weights from
:class:`SourceWeights` just before each forward and drop them after. :class:`SourceWeights`
reads each tensor from its source file (the checkpoint's safetensors, or a bundle's GGUF,
dequantised) through the canonical loaders, so nothing is copied to an offload folder, unlike
``load_checkpoint_and_dispatch(offload_folder=...)``, which writes every disk-bound weight
into ``.dat`` files first.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from mmconvert.convert.model import CanonicalModel, ProjectorSpec, TextSpec
from mmconvert.formats.dtypes import to_torch
from mmconvert.runtime.fusion import as_rows, fusion_positions

TensorLoader = Callable[[], torch.Tensor]
# headroom left on each GPU for activations and logits when spreading a model with accelerate
GPU_HEADROOM = 0.80


def activation(name: str, x: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":  # nn.GELU(): the exact erf form
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "tanh":
        return torch.tanh(x)
    if name == "silu":
        return torch.nn.functional.silu(x)
    raise ValueError(f"unknown activation {name}")


def project(spec: ProjectorSpec, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Run one modality's projector; ``weights`` maps canonical names to tensors (the layer
    kinds are defined in :mod:`mmconvert.convert.model`)."""
    linear = torch.nn.functional.linear
    for layer in spec.layers:
        prefix = f"mm.{spec.modality}.{layer.name}."
        if layer.kind == "linear":
            x = linear(x, weights[prefix + "weight"], weights.get(prefix + "bias"))
        elif layer.kind == "layer_norm":
            x = torch.nn.functional.layer_norm(x, (layer.out_dim,), weights[prefix + "weight"],
                                               weights.get(prefix + "bias"), layer.eps or 1e-5)
        elif layer.kind == "act":
            x = activation(layer.activation or spec.activation, x)
        elif layer.kind == "glu":
            gate = linear(x, weights[prefix + "gate.weight"], weights.get(prefix + "gate.bias"))
            up = linear(x, weights[prefix + "up.weight"], weights.get(prefix + "up.bias"))
            x = activation(layer.activation or spec.activation, gate) * up
        elif layer.kind == "tanh_gate":
            t = torch.tanh(weights[prefix + "gate"])
            x = x * ((1 - t) if layer.complementary else t)
        elif layer.kind == "scale":
            x = x * weights[prefix + "scale"]
        else:
            raise ValueError(f"unknown projector layer kind {layer.kind}")
    return x


def qwen3_config(text: TextSpec, dtype: torch.dtype = torch.float32):
    """transformers' config for ``text``: Qwen3, or Qwen3-MoE when it has experts."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": text.rope_theta}
    if text.rope_scaling:
        rope.update(text.rope_scaling)
        rope["rope_theta"] = text.rope_theta
    common = dict(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim, rms_norm_eps=text.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=text.max_position_embeddings,
        tie_word_embeddings=text.tie_word_embeddings, attention_bias=text.attention_bias,
        hidden_act=text.hidden_act, dtype=dtype,
    )
    if not text.is_moe:
        return Qwen3Config(**common)
    return Qwen3MoeConfig(**common, num_experts=text.num_experts,
                          num_experts_per_tok=text.num_experts_per_tok,
                          moe_intermediate_size=text.moe_intermediate_size,
                          norm_topk_prob=text.norm_topk_prob,
                          decoder_sparse_step=text.decoder_sparse_step,
                          mlp_only_layers=list(text.mlp_only_layers))


def transformers_loaders(tensors: Mapping[str, TensorLoader]) -> dict[str, TensorLoader]:
    """Canonical LM tensors -> the parameter names transformers holds in memory.

    Canonical Qwen3-MoE experts are stacked per projection (``experts.gate_proj [E, I, H]``,
    ``experts.up_proj``); transformers 5 keeps gate and up fused (``experts.gate_up_proj
    [E, 2I, H]``, gate half first). Every other name is already transformers'.
    """
    out: dict[str, TensorLoader] = {}
    for name, load in tensors.items():
        if name.startswith("mm.") or name.endswith(".mlp.experts.up_proj"):
            continue
        if name.endswith(".mlp.experts.gate_proj"):
            prefix = name[: -len("gate_proj")]

            def fused(gate=load, up=tensors[prefix + "up_proj"]) -> torch.Tensor:
                return torch.cat([gate(), up()], dim=1)

            out[prefix + "gate_up_proj"] = fused
        else:
            out[name] = load
    return out


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; anything else is checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device "
                         f"(torch {torch.__version__}); use --device cpu or auto")
    return device


def choose_placement(model_bytes: int, device: str, gpu_free: list[int] | None = None
                     ) -> tuple[str, dict[int | str, int] | None]:
    """(main device, accelerate ``max_memory`` or None).

    A model that fits one GPU (with :data:`GPU_HEADROOM`) runs there; a bigger one is spread
    by accelerate over every GPU and then CPU memory. CPU runs are never spread.
    """
    if not device.startswith("cuda"):
        return device, None
    if gpu_free is None:
        gpu_free = [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]
    index = int(device.split(":")[1]) if ":" in device else 0
    if model_bytes <= GPU_HEADROOM * gpu_free[index]:
        return f"cuda:{index}", None
    budget: dict[int | str, int] = {i: int(GPU_HEADROOM * free) for i, free in enumerate(gpu_free)}
    import psutil

    budget["cpu"] = int(0.9 * psutil.virtual_memory().available)
    return f"cuda:{index}", budget


OFFLOAD_CHOICES = ("auto", "never", "disk")
# bytes of RAM a run may use for weights (tests and small machines); default: what the kernel
# reports available, less MEMORY_MARGIN
MEMORY_BUDGET_ENV = "MMCONVERT_VERIFY_MEMORY_BUDGET"
# left free for activations, logits, the stored reference and the interpreter itself
MEMORY_MARGIN = 2 * 2**30


def cpu_budget() -> int:
    """Bytes of RAM that weights may take (``$MMCONVERT_VERIFY_MEMORY_BUDGET`` when set)."""
    forced = os.environ.get(MEMORY_BUDGET_ENV)
    if forced:
        try:
            return max(int(float(forced)), 0)
        except ValueError:
            from mmconvert.errors import UsageError

            raise UsageError(f"${MEMORY_BUDGET_ENV}={forced[:40]!r}: expected a number of "
                             "bytes") from None
    import psutil

    return max(psutil.virtual_memory().available - MEMORY_MARGIN, 0)


def weight_bytes(numels: Iterable[int], dtype: torch.dtype) -> tuple[int, int]:
    """(all the weights, the largest tensor) in bytes of ``dtype``, from element counts."""
    counts = list(numels)
    size = torch.finfo(dtype).bits // 8
    return sum(counts) * size, max(counts, default=0) * size


def plan_placement(model_bytes: int, device: str, offload: str = "auto",
                   gpu_free: list[int] | None = None, *, largest_bytes: int = 0
                   ) -> tuple[str, dict[int | str, int] | None]:
    """(main device, accelerate ``max_memory`` or None) with the RAM budget applied.

    ``offload``: ``never`` places as :func:`choose_placement` does (a CPU run loads everything
    into RAM); ``auto`` caps RAM at :func:`cpu_budget`, so what does not fit stays on disk;
    ``disk`` forces that on a CPU run even when the model fits (at most half in RAM), to
    exercise or to spare memory.

    ``largest_bytes`` (the largest tensor, in the compute dtype) comes off the RAM budget:
    accelerate keeps room for the largest module it fetches from disk, but not for what
    reading it takes on the way (the source bytes before their cast: half of it from bf16),
    so a disk-offloaded forward would otherwise peak above the budget by that much.
    """
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload {offload!r}: expected one of {', '.join(OFFLOAD_CHOICES)}")
    main, max_memory = choose_placement(model_bytes, device, gpu_free)
    if offload == "never":
        return main, max_memory
    budget = max(cpu_budget() - largest_bytes, 0)
    if offload == "disk":
        budget = min(budget, model_bytes // 2)
    if max_memory is not None:  # spread over the GPUs already: RAM is the next tier
        max_memory["cpu"] = min(int(max_memory.get("cpu", budget)), budget)
        return main, max_memory
    if main.startswith("cuda") or (model_bytes <= budget and offload != "disk"):
        return main, None
    return main, {"cpu": budget}


class SourceWeights(Mapping):
    """Offloaded parameters, read where they lie each time accelerate needs them.

    accelerate's hooks call ``weights[name]`` before a disk-offloaded module runs and drop the
    tensor after it; each read goes through the model's own loader (a byte-range read of the
    source file, the rope permutation, a dequantisation), then one cast to the compute dtype.
    """

    def __init__(self, loaders: Mapping[str, TensorLoader], dtype: torch.dtype):
        self.loaders = dict(loaders)
        self.dtype = dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.loaders[name]().to(self.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.loaders)

    def __len__(self) -> int:
        return len(self.loaders)


def canonical_to_neox(name: str, tensor: torch.Tensor, text: TextSpec) -> torch.Tensor:
    """Rows of Q/K (and their per-head norms) from interleaved-pair to rotate-half order.

    transformers' Qwen3 rotates halves; a source trained with interleaved pairs computes the
    same attention scores once Q and K rows are reordered the same way in every head (the dot
    product is invariant under a shared permutation, and so is the per-head RMSNorm when its
    weight follows), so the reference stays exact without a second rope implementation.
    """
    from mmconvert.convert.transforms import interleaved_to_neox

    heads = {"self_attn.q_proj.weight": text.num_attention_heads,
             "self_attn.k_proj.weight": text.num_key_value_heads,
             "self_attn.q_proj.bias": text.num_attention_heads,
             "self_attn.k_proj.bias": text.num_key_value_heads,
             "self_attn.q_norm.weight": 1, "self_attn.k_norm.weight": 1}
    for suffix, n in heads.items():
        if name.endswith(suffix):
            return torch.from_numpy(interleaved_to_neox(tensor.float().numpy(), n)).to(tensor.dtype)
    return tensor


class TorchMultimodalQwen3:
    """A multimodal Qwen3 (transformers Qwen3 + the projectors) from canonical-named tensors.

    ``tensors`` maps canonical names to zero-argument loaders returning CPU torch tensors; each
    is called once. ``device_map`` (accelerate) spreads the LM; ``max_memory`` asks accelerate
    to infer one within those budgets.
    """

    def __init__(self, text: TextSpec, projectors: dict[str, ProjectorSpec],
                 placeholder_id: int | None, tensors: Mapping[str, TensorLoader],
                 device: str = "cpu", dtype: torch.dtype = torch.float32,
                 device_map: dict[str, Any] | None = None,
                 max_memory: dict[int | str, int] | None = None):
        from transformers import Qwen3ForCausalLM, Qwen3MoeForCausalLM

        self.text = text
        self.projectors = projectors
        self.placeholder_id = placeholder_id
        self.device = device
        self.dtype = dtype
        config = qwen3_config(text, dtype)
        config._attn_implementation = "eager"
        with torch.device("meta"):
            lm = (Qwen3MoeForCausalLM if text.is_moe else Qwen3ForCausalLM)(config)
        tied = "lm_head.weight" not in tensors
        lm_loaders = transformers_loaders(tensors)
        if max_memory is not None and device_map is None:
            from accelerate import infer_auto_device_map

            device_map = infer_auto_device_map(
                lm, max_memory=max_memory, dtype=dtype,
                no_split_module_classes=["Qwen3DecoderLayer", "Qwen3MoeDecoderLayer"])
        self.device_map = device_map
        offloaded: dict[str, TensorLoader] = {}
        if device_map is None:
            state = {n: load().to(device=device, dtype=dtype) for n, load in lm_loaders.items()}
            if tied:
                state["lm_head.weight"] = state["model.embed_tokens.weight"]
            lm.load_state_dict(state, strict=True, assign=True)
        else:
            offloaded = self._load_mapped(lm, lm_loaders, tied)
        # non-persistent buffers (rotary inv_freq) were created on meta: rebuild them
        rotary_device = self._device_of("model.rotary_emb")
        lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config).to(rotary_device)
        if device_map is not None:
            from accelerate import dispatch_model

            # an empty offload index with the weights as state_dict: accelerate reads disk
            # modules from SourceWeights and never writes an offload folder
            lm = dispatch_model(lm, device_map=device_map, main_device=self._device_of("lm_head"),
                                state_dict=SourceWeights(offloaded, dtype) if offloaded else None,
                                offload_index={} if offloaded else None)
        self.offloaded = len(offloaded)  # parameters left on disk
        self.lm = lm.eval()
        self.embed_device = self._device_of("model.embed_tokens")
        self.projector_weights = {n: tensors[n]().to(device=self.embed_device, dtype=dtype)
                                  for n in tensors if n.startswith("mm.")}

    def _placement_of(self, module: str) -> str:
        """Where accelerate put ``module``: a device, or ``disk``."""
        if self.device_map is None:
            return self.device
        best = max((k for k in self.device_map if k == "" or module == k or
                    module.startswith(k + ".")), key=len, default=None)
        if best is None:  # a module accelerate did not list sits with the first one
            best = next(iter(self.device_map))
        where = self.device_map[best]
        return f"cuda:{where}" if isinstance(where, int) else str(where)

    def _device_of(self, module: str) -> str:
        """Where ``module`` computes: a disk-offloaded one on the main device."""
        where = self._placement_of(module)
        return self.device if where == "disk" else where

    def _load_mapped(self, lm, loaders: Mapping[str, TensorLoader], tied: bool
                     ) -> dict[str, TensorLoader]:
        """Load what accelerate placed on a device; return the loaders of what stays on disk."""
        from accelerate.utils import set_module_tensor_to_device

        loaders = dict(loaders)
        share = tied and self._placement_of("lm_head") == \
            self._placement_of("model.embed_tokens") != "disk"
        if tied and not share:  # tied across devices or on disk: each place reads its own
            loaders["lm_head.weight"] = loaders["model.embed_tokens.weight"]
        offloaded: dict[str, TensorLoader] = {}
        for name, load in loaders.items():
            module = name.rsplit(".", 1)[0]
            if self._placement_of(module) == "disk":
                offloaded[name] = load
                continue
            set_module_tensor_to_device(lm, name, self._device_of(module), value=load(),
                                        dtype=self.dtype)
        if share:
            lm.lm_head.weight = lm.model.embed_tokens.weight
        return offloaded

    # -- forward ---------------------------------------------------------------------------

    @torch.no_grad()
    def project(self, modality: str, item: torch.Tensor) -> torch.Tensor:
        spec = self.projectors[modality]
        x = as_rows(item).to(device=self.embed_device, dtype=self.dtype)
        if x.shape[-1] != spec.input_dim:
            raise ValueError(f"modality {modality!r} takes input_dim {spec.input_dim}, got an "
                             f"item of shape {list(item.shape)}")
        return project(spec, self.projector_weights, x)

    @torch.no_grad()
    def fused_embeddings(self, input_ids: list[int],
                         mm_inputs: dict[str, list[torch.Tensor]] | None = None
                         ) -> tuple[torch.Tensor, list[int], list[int | None]]:
        """(inputs_embeds [1, T, H], fused token ids, per-position projected row index)."""
        unknown = set(mm_inputs or {}) - set(self.projectors)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; the model has "
                             f"{list(self.projectors)}")
        rows = [self.project(modality, item) for modality in self.projectors
                for item in (mm_inputs or {}).get(modality, [])]
        projected = torch.cat(rows) if rows else None
        ids, where = fusion_positions(input_ids, self.placeholder_id,
                                      0 if projected is None else projected.shape[0])
        embeds = self.lm.model.embed_tokens(torch.tensor([ids], device=self.embed_device))
        if projected is not None:
            index = [i for i, r in enumerate(where) if r is not None]
            embeds[0, index] = projected[[where[i] for i in index]].to(embeds.dtype)
        return embeds, ids, where

    @torch.no_grad()
    def logits(self, input_ids: list[int], mm_inputs: dict[str, list[torch.Tensor]] | None = None
               ) -> torch.Tensor:
        """Logits ``[T, vocab]`` (fp32, CPU) for every position of the fused sequence."""
        embeds, _, _ = self.fused_embeddings(input_ids, mm_inputs)
        out = self.lm(inputs_embeds=embeds, use_cache=False)
        return out.logits[0].float().cpu()

    @torch.no_grad()
    def greedy(self, input_ids: list[int], mm_inputs: dict[str, list[torch.Tensor]] | None,
               n: int, exclude: tuple[int, ...] = ()) -> list[int]:
        """``n`` greedy tokens after the prompt (KV cache; ``exclude`` ids never chosen, so a
        generated placeholder cannot change the fusion of the extended prompt)."""
        if n <= 0:
            return []
        embeds, _, _ = self.fused_embeddings(input_ids, mm_inputs)
        out = self.lm(inputs_embeds=embeds, use_cache=True)
        tokens: list[int] = []
        for step in range(n):
            last = out.logits[0, -1].float()
            if exclude:
                last[list(exclude)] = float("-inf")
            token = int(last.argmax())
            tokens.append(token)
            if step + 1 < n:
                ids = torch.tensor([[token]], device=self.embed_device)
                out = self.lm(input_ids=ids, past_key_values=out.past_key_values, use_cache=True)
        return tokens


def canonical_loaders(model: CanonicalModel) -> dict[str, TensorLoader]:
    """Zero-argument torch loaders for every canonical tensor of ``model`` (rope layout undone)."""
    interleaved = model.text.rope_layout == "interleaved"

    def loader(ref) -> TensorLoader:
        def load() -> torch.Tensor:
            tensor = to_torch(ref.read(), ref.dtype)
            return canonical_to_neox(ref.name, tensor, model.text) if interleaved else tensor
        return load

    return {ref.name: loader(ref) for ref in model.tensors.refs()}


class ReferenceModel(TorchMultimodalQwen3):
    """The source checkpoint's exact semantics in torch (fp32 by default)."""

    def __init__(self, model: CanonicalModel, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, device_map: dict[str, Any] | None = None,
                 max_memory: dict[int | str, int] | None = None):
        self.model = model
        super().__init__(model.text, model.projectors, model.multimodal_token_id,
                         canonical_loaders(model), device=device, dtype=dtype,
                         device_map=device_map, max_memory=max_memory)

    @classmethod
    def placed(cls, model: CanonicalModel, device: str = "auto",
               dtype: torch.dtype = torch.float32, offload: str = "auto") -> ReferenceModel:
        """On ``device`` (``auto``: CUDA when available), spread by accelerate when too big,
        the layers that do not fit in RAM left on disk (:func:`plan_placement`)."""
        device = resolve_device(device)
        nbytes, largest = weight_bytes((r.numel for r in model.tensors.refs()), dtype)
        main, max_memory = plan_placement(nbytes, device, offload, largest_bytes=largest)
        return cls(model, device=main, dtype=dtype, max_memory=max_memory)
