"""Computing an importance matrix with the reference forward pass (``mmconvert imatrix``).

What llama.cpp's ``llama-imatrix`` collects (``tools/imatrix/imatrix.cpp`` of the pinned
version), and how this follows it:

* per matmul weight of the blocks (``blk.*``: attn_q/k/v/output, ffn_gate/up/down, the MoE
  router ffn_gate_inp and the experts), the sum over tokens of each input column squared, and
  the number of tokens summed. For the 3-D experts (``ffn_*_exps``, ``MUL_MAT_ID``) one row of
  sums and one count per expert, over only the tokens routed to that expert. ``output.weight``
  is collected by llama.cpp only with ``--process-output`` and not here; ``token_embd`` is a
  lookup, never a matmul input. Names are the text GGUF's (:mod:`mmconvert.convert.plan_gguf`).
* the text is tokenized whole; chunks of ``chunk_size`` tokens (``-c``, default 512) each run
  from an empty context (positions from 0), ``floor(tokens / chunk_size)`` of them, at most
  ``chunks``; the first token of each chunk becomes BOS when the tokenizer adds one (not for
  Qwen). Every token of a chunk counts (llama.cpp's "first half of the chunk" is only for
  its perplexity estimate, which is not computed here, so one full chunk is enough where
  llama-imatrix insists on two).
* differences: special tokens in the text are parsed (llama-imatrix's ``--parse-special``: the
  multimodal placeholder is one); sums accumulate in float64 and are rounded to float32 once
  (llama.cpp adds float32 squares token by token); activations come from the fp32 torch
  reference, not from a quantized GGUF.

With ``mm_inputs`` (``--embeddings``) the projected rows are fused into the calibration text as
the runtime fuses them (:mod:`mmconvert.runtime.fusion`: placeholders replaced in order, or
rows prepended) before it is cut into chunks, so the language model's statistics include the
positions that hold projected rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mmconvert.convert.model import CanonicalModel
from mmconvert.convert.plan_gguf import architecture, gguf_tensor_name
from mmconvert.errors import ImatrixError
from mmconvert.formats.imatrix import Imatrix, stats_imatrix
from mmconvert.runtime.fusion import fusion_positions
from mmconvert.verify.reference import ReferenceModel

DEFAULT_CHUNK_SIZE = 512  # llama-imatrix's default -c
_LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
            "mlp": ("gate_proj", "up_proj", "down_proj")}


@dataclass
class Collector:
    """float64 accumulators on the model's device: GGUF name -> (n_mat, n_per_row) sums and
    (n_mat,) token counts."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, x: torch.Tensor, n_mat: int = 1, expert: int = 0) -> None:
        x = x.reshape(-1, x.shape[-1])
        if name not in self.sums:
            self.sums[name] = torch.zeros(n_mat, x.shape[-1], dtype=torch.float64,
                                          device=x.device)
            self.counts[name] = torch.zeros(n_mat, dtype=torch.int64, device=x.device)
        self.sums[name][expert] += x.double().square().sum(0)
        self.counts[name][expert] += x.shape[0]

    def as_numpy(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return ({n: s.cpu().numpy() for n, s in self.sums.items()},
                {n: c.cpu().numpy() for n, c in self.counts.items()})


def _linear_hook(collector: Collector, name: str):
    def hook(module, args):
        collector.add(name, args[0].detach())
    return hook


def _experts_hook(collector: Collector, layer: int):
    """transformers' fused experts module: ``forward(hidden [T, H], top_k_index [T, k],
    top_k_weights)``; per expert, the tokens routed to it (any of its k slots) feed gate/up,
    and ``act(gate) * up`` of those tokens feeds down (recomputed here from the same weights)."""
    gate_name = f"blk.{layer}.ffn_gate_exps.weight"
    up_name, down_name = gate_name.replace("gate_exps", "up_exps"), \
        gate_name.replace("gate_exps", "down_exps")

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        n_expert = module.gate_up_proj.shape[0]
        for expert in range(n_expert):
            tokens = (index == expert).any(dim=-1).nonzero().flatten()
            x = hidden[tokens]
            for name in (gate_name, up_name):
                collector.add(name, x, n_expert, expert)
            gate, up = torch.nn.functional.linear(x, module.gate_up_proj[expert]).chunk(2, -1)
            collector.add(down_name, module.act_fn(gate) * up, n_expert, expert)
    return hook


def attach_hooks(lm, text, collector: Collector) -> list:
    """Forward pre-hooks on every matmul weight of transformers' Qwen3 / Qwen3-MoE ``lm``."""
    handles = []
    for i, layer in enumerate(lm.model.layers):
        for block, names in _LINEARS.items():
            for proj in names:
                module = getattr(getattr(layer, block), proj, None)
                if module is None:
                    continue
                name = gguf_tensor_name(f"model.layers.{i}.{block}.{proj}.weight")
                handles.append(module.register_forward_pre_hook(_linear_hook(collector, name)))
        if text.is_moe and hasattr(layer.mlp, "experts"):
            router = layer.mlp.gate
            handles.append(router.register_forward_pre_hook(
                _linear_hook(collector, gguf_tensor_name(f"model.layers.{i}.mlp.gate.weight"))))
            handles.append(layer.mlp.experts.register_forward_pre_hook(
                _experts_hook(collector, i), with_kwargs=True))
    return handles


@dataclass
class ImatrixResult:
    imatrix: Imatrix
    chunks: int
    tokens: int  # of the fused calibration sequence
    device: str
    notes: list[str]


def chunk_plan(n_tokens: int, chunk_size: int, max_chunks: int | None) -> int:
    """How many chunks llama-imatrix's loop runs: whole chunks only, at most ``max_chunks``."""
    if chunk_size < 16:  # llama.cpp collects nothing from batches of fewer than 16 tokens
        raise ImatrixError(f"--chunk-size {chunk_size}: llama.cpp collects nothing from fewer "
                           "than 16 tokens; use 16 or more (llama-imatrix's default is 512)")
    n = n_tokens // chunk_size
    if max_chunks is not None and max_chunks > 0:
        n = min(n, max_chunks)
    if n < 1:
        raise ImatrixError(f"the calibration text is {n_tokens} tokens long, shorter than one "
                           f"chunk of {chunk_size}: use a longer text or a smaller --chunk-size")
    return n


def compute_imatrix(model: CanonicalModel, token_ids: list[int], *,
                    mm_inputs: dict[str, list[torch.Tensor]] | None = None,
                    chunk_size: int = DEFAULT_CHUNK_SIZE, max_chunks: int | None = None,
                    device: str = "auto", datasets: tuple[str, ...] = (),
                    progress: Callable[[int], None] | None = None,
                    start: Callable[[int], None] | None = None) -> ImatrixResult:
    """Statistics over the chunks of ``token_ids`` (the whole tokenized calibration text).

    ``start(n_chunks)`` is called once the chunk count is known, ``progress(1)`` after each
    chunk. Raises :class:`ImatrixError` when the text is shorter than one chunk.
    """
    architecture(model)  # the same refusals as to-gguf: its names must exist in the GGUF
    ref = ReferenceModel.placed(model, device)
    notes: list[str] = []
    projected = _projected_rows(ref, mm_inputs)
    try:
        ids, where = fusion_positions(list(token_ids), model.multimodal_token_id,
                                      0 if projected is None else projected.shape[0])
    except ValueError as exc:
        raise ImatrixError(f"--calibration: {exc}") from None
    n_chunks = chunk_plan(len(ids), chunk_size, max_chunks)
    if chunk_size > model.text.max_position_embeddings:
        notes.append(f"--chunk-size {chunk_size} is longer than the model's "
                     f"max_position_embeddings ({model.text.max_position_embeddings})")
    bos = model.special.bos_id if model.tokenizer.tokenizer_config.get("add_bos_token") is True \
        else None
    collector = Collector()
    handles = attach_hooks(ref.lm, model.text, collector)
    if start is not None:
        start(n_chunks)
    try:
        with torch.no_grad():
            for c in range(n_chunks):
                a, b = c * chunk_size, (c + 1) * chunk_size
                chunk_ids, chunk_where = list(ids[a:b]), list(where[a:b])
                if bos is not None:  # llama-imatrix: the first token of each chunk is BOS
                    chunk_ids[0], chunk_where[0] = bos, None
                embeds = ref.lm.model.embed_tokens(
                    torch.tensor([chunk_ids], device=ref.embed_device))
                rows = [i for i, r in enumerate(chunk_where) if r is not None]
                if rows:
                    embeds[0, rows] = projected[[chunk_where[i] for i in rows]].to(embeds.dtype)
                ref.lm.model(inputs_embeds=embeds, use_cache=False)
                if progress is not None:
                    progress(1)
    finally:
        for h in handles:
            h.remove()
    sums, counts = collector.as_numpy()
    starved = {n: int((c == 0).sum()) for n, c in counts.items() if (c == 0).any()}
    if starved:
        names = sorted(starved)
        notes.append(f"{len(names)} expert tensors have experts no calibration token was "
                     f"routed to (e.g. {names[0]}: {starved[names[0]]} experts); llama-quantize "
                     "uses weights of 1 for those")
    imatrix = stats_imatrix(sums, counts, datasets, n_chunks, chunk_size)
    return ImatrixResult(imatrix, n_chunks, len(ids), ref.device, notes)


def _projected_rows(ref: ReferenceModel, mm_inputs: dict[str, list[torch.Tensor]] | None
                    ) -> torch.Tensor | None:
    """Every item's projected rows in fusion order (modalities in the config's order)."""
    if not mm_inputs:
        return None
    unknown = set(mm_inputs) - set(ref.projectors)
    if unknown:
        raise ImatrixError(f"--embeddings: unknown modalities {sorted(unknown)}; the model has "
                           f"{list(ref.projectors)}")
    rows = []
    for modality in ref.projectors:
        for item in mm_inputs.get(modality, []):
            try:
                rows.append(ref.project(modality, item))
            except ValueError as exc:
                raise ImatrixError(f"--embeddings: {exc}") from None
    return torch.cat(rows) if rows else None


def tokenize_calibration(model: CanonicalModel, text: str) -> list[int]:
    """The calibration text as token ids, by the checkpoint's own tokenizer (special tokens,
    the placeholder among them, parsed)."""
    from mmconvert.verify.cases import encode, load_tokenizer

    return encode(load_tokenizer(model), text)
