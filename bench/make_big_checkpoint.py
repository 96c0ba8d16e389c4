"""Generate real-size benchmark inputs: Qwen3-8B, Qwen3-14B and a Qwen3-30B-A3B-shaped MoE.

One copy of the weights serves both converters: a plain Qwen3 Hugging Face folder (what
llama.cpp's ``convert_hf_to_gguf.py`` reads) laid out like the published checkpoints
(``model-0000k-of-0000n.safetensors`` shards of at most ``--shard-gb`` filled in module order,
tensors sorted by name inside each shard as the safetensors library writes them, and
``model.safetensors.index.json``), plus the seed's projectors in ``projector.safetensors`` with
their config in ``projector.json`` (mmconvert reads the pair: ``to-gguf HF --projector
projector.safetensors``). The tokenizer is Qwen's real vocabulary with the multimodal token,
as in ``bench/make_checkpoint.py``. The MoE stores its experts as transformers 5 holds them
(``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``).

Weights stream to disk a chunk at a time (~100 MB of memory whatever the size): random bf16
bit patterns with a random exponent per row on top of a narrow per-value spread, so rows have
different scales as in a trained matrix and block quantization has something to do (drawn
once per row length, then reused as windows of rows at random places, each XOR-ed with a
random sign/mantissa pattern: one pass over the bytes per chunk); norms are in [1, 2).
Finite, exact in f16, seeded: the same arguments give the same bytes. Disk speed, about.

    python bench/make_big_checkpoint.py 8b                     # ~16.4 GB, 5 shards
    python bench/make_big_checkpoint.py 14b --out /work/bigtmp
    python bench/make_big_checkpoint.py 30b-a3b --layers 4     # MoE cut to 4 of 48 layers

The result is cached under ``--out`` keyed by every parameter (``params.json``); delete the
folder when done (``--remove``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoint import (  # noqa: E402 - bench scripts import each other by path
    GENERATION_CONFIG,
    MULTIMODAL_TOKEN,
    Shape,
    projector_tensors,
    safetensors_header,
    text_config,
    write_tokenizer,
)

GENERATOR_VERSION = 1  # bump when the bytes written change
CHUNK_VALUES = 8 << 20  # bf16 values written per step (16 MB)
POOL_VALUES = 8 << 20  # random values drawn per row length (16 MB), reused by windows
DEFAULT_OUT = Path("/work/bigtmp") if Path("/work").is_dir() else Path(__file__).parent / "_work"


@dataclass(frozen=True)
class BigShape:
    """A published Qwen3 shape (the text model) and the seed's two projectors."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int = 128
    vocab: int = 151_936
    tied: bool = False
    experts: int = 0  # > 0: Qwen3-MoE
    experts_per_tok: int = 0
    moe_intermediate: int = 0
    full_layers: int = 0  # the published depth (layers may be cut below it)
    seed: int = 0

    def key(self) -> str:
        raw = json.dumps({"v": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:12]

    def label(self) -> str:
        cut = f"-{self.layers}of{self.full_layers}L" if self.layers != self.full_layers else ""
        return f"{self.name}{cut}"


SHAPES = {
    "8b": BigShape("qwen3-8b", 36, 4096, 12288, 32, 8, full_layers=36),
    "14b": BigShape("qwen3-14b", 40, 5120, 17408, 40, 8, full_layers=40),
    "30b-a3b": BigShape("qwen3-30b-a3b", 48, 2048, 6144, 32, 4, experts=128, experts_per_tok=8,
                        moe_intermediate=768, full_layers=48),
}


def lm_tensors(s: BigShape) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes in module order (the order shards are filled in)."""
    h, d = s.hidden, s.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (s.vocab, h))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (s.heads * d, h)),
                (p + "self_attn.k_proj.weight", (s.kv_heads * d, h)),
                (p + "self_attn.v_proj.weight", (s.kv_heads * d, h)),
                (p + "self_attn.o_proj.weight", (h, s.heads * d)),
                (p + "self_attn.q_norm.weight", (d,)),
                (p + "self_attn.k_norm.weight", (d,))]
        if s.experts:
            out += [(p + "mlp.gate.weight", (s.experts, h)),
                    (p + "mlp.experts.gate_up_proj", (s.experts, 2 * s.moe_intermediate, h)),
                    (p + "mlp.experts.down_proj", (s.experts, h, s.moe_intermediate))]
        else:
            out += [(p + "mlp.gate_proj.weight", (s.intermediate, h)),
                    (p + "mlp.up_proj.weight", (s.intermediate, h)),
                    (p + "mlp.down_proj.weight", (h, s.intermediate))]
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not s.tied:
        out.append(("lm_head.weight", (s.vocab, h)))
    return out


def nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * 2


def lm_bytes(s: BigShape) -> int:
    return sum(nbytes(shape) for _, shape in lm_tensors(s))


def shard(tensors: list[tuple[str, tuple[int, ...]]], max_bytes: int
          ) -> list[list[tuple[str, tuple[int, ...]]]]:
    """transformers' sharding: module order, a new shard when the next tensor would overflow;
    inside a shard the safetensors library sorts by name."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        if groups[-1] and size + nbytes(shape) > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes(shape)
    return [sorted(g) for g in groups]


# ---------------------------------------------------------------- values


_POOLS: dict[tuple[int, int], np.ndarray] = {}


def _pool(seed: int, cols: int) -> np.ndarray:
    """``POOL_VALUES`` random bf16 patterns as rows of ``cols``, each row with its own scale:
    sign and 7 mantissa bits random, exponent 0..3 above the row's, rows 0..7 apart (values
    in +-[2^-14, 2^-3): finite and exact in f16). Drawn once per row length."""
    if (seed, cols) not in _POOLS:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, cols])))
        rows = max(1, POOL_VALUES // cols)
        bits = rng.bit_generator.random_raw((rows * cols + 3) // 4).view(np.uint16)
        bits = bits[:rows * cols].reshape(rows, cols)
        row_exp = rng.integers(0, 8, size=(rows, 1), dtype=np.uint16)
        exponent = ((bits >> np.uint16(7)) & np.uint16(0x3)) + row_exp + np.uint16(113)
        _POOLS[(seed, cols)] = (bits & np.uint16(0x807F)) | (exponent << np.uint16(7))
    return _POOLS[(seed, cols)]


def weight_chunks(seed: int, name: str, shape: tuple[int, ...]):
    """The tensor's bf16 bit patterns (uint16), a whole number of rows at a time: windows of
    rows from the pool at random places, each XOR-ed with a random sign/mantissa pattern per
    column (the rows keep their scale, the values differ): one pass per chunk."""
    digest = hashlib.sha256(name.encode()).digest()
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
        [seed, int.from_bytes(digest[:8], "little")])))
    cols = shape[-1]
    rows = math.prod(shape) // cols
    if len(shape) == 1:  # a norm: positive, in [1, 2)
        bits = rng.integers(0, 1 << 7, size=cols, dtype=np.uint16)
        yield bits | np.uint16(127 << 7)
        return
    pool = _pool(seed, cols)
    step = max(1, min(len(pool), CHUNK_VALUES // cols))
    for start in range(0, rows, step):
        n = min(step, rows - start)
        at = int(rng.integers(0, len(pool) - n + 1))
        mask = rng.integers(0, 1 << 16, size=cols, dtype=np.uint16) & np.uint16(0x807F)
        yield pool[at:at + n] ^ mask


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    with open(path, "wb") as f:
        f.write(safetensors_header(tensors))
        for name, shape in tensors:
            for data in weight_chunks(seed, name, shape):
                f.write(memoryview(data).cast("B"))


# ---------------------------------------------------------------- configs


def hf_config(s: BigShape) -> dict:
    as_small = Shape(hidden=s.hidden, layers=s.layers, heads=s.heads, kv_heads=s.kv_heads,
                     head_dim=s.head_dim, intermediate=s.intermediate, vocab=s.vocab,
                     tied=s.tied)
    cfg = text_config(as_small, s.vocab)
    if s.experts:
        cfg.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                   num_experts=s.experts, num_experts_per_tok=s.experts_per_tok,
                   moe_intermediate_size=s.moe_intermediate, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001,
                   output_router_logits=False)
    return cfg


def projector_config(s: BigShape) -> dict:
    modalities = Shape().modalities
    return {"modality_configs": modalities, "projector_hidden_act": "gelu",
            "use_layer_norm": True, "projector_dropout": 0.1, "fusion_strategy": "early",
            "multimodal_token": MULTIMODAL_TOKEN, "max_multimodal_length": 64,
            "base_model_name": f"Qwen/{s.name}"}


def _json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class BigCheckpoint:
    root: Path
    hf: Path  # plain Qwen3 folder (both converters read it)
    projector: Path  # the seed's projectors (mmconvert's --projector)

    def weight_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.hf.glob("*.safetensors"))

    def mmconvert_args(self) -> list[str]:
        return [str(self.hf), "--projector", str(self.projector)]


def make_big_checkpoint(s: BigShape, out: Path = DEFAULT_OUT, shard_gb: float = 4.0,
                        quiet: bool = False) -> BigCheckpoint:
    """The cached checkpoint for ``s`` under ``out`` (generated on first use)."""
    root = Path(out) / f"big-{s.label()}-{s.key()}"
    ckpt = BigCheckpoint(root, root / "hf", root / "projector.safetensors")
    if (root / "params.json").is_file():
        return ckpt
    need = lm_bytes(s) + (1 << 30)
    free = shutil.disk_usage(Path(out) if Path(out).exists() else Path(out).parent).free
    if need > free:
        raise SystemExit(f"{s.label()} needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free "
                         f"under {out}")
    tmp = Path(out) / f".tmp-{root.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "hf").mkdir(parents=True)
    start = time.perf_counter()
    try:
        size = write_tokenizer(tmp / "hf")
        if size > s.vocab:
            raise SystemExit(f"vocab {s.vocab} is smaller than the tokenizer ({size} tokens)")
        _json(tmp / "hf" / "config.json", hf_config(s))
        _json(tmp / "hf" / "generation_config.json", GENERATION_CONFIG)
        groups = shard(lm_tensors(s), int(shard_gb * 1e9))
        names = ([f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                  for i in range(len(groups))] if len(groups) > 1 else ["model.safetensors"])
        for file, group in zip(names, groups):
            if not quiet:
                print(f"  {s.label()}: {file} ({sum(nbytes(sh) for _, sh in group) / 1e9:.2f} "
                      "GB)", file=sys.stderr)
            write_safetensors(tmp / "hf" / file, group, s.seed)
        if len(groups) > 1:
            _json(tmp / "hf" / "model.safetensors.index.json", {
                "metadata": {"total_size": lm_bytes(s)},
                "weight_map": dict(sorted((n, f) for f, g in zip(names, groups) for n, _ in g))})
        proj = projector_tensors(replace(Shape(), hidden=s.hidden))  # the seed's names
        write_safetensors(tmp / "projector.safetensors", proj, s.seed)
        _json(tmp / "projector.json", projector_config(s))
        _json(tmp / "params.json", {"generator_version": GENERATOR_VERSION, "shards": len(groups),
                                    "lm_bytes": lm_bytes(s), "tokenizer_size": size,
                                    "seconds": round(time.perf_counter() - start, 1),
                                    **asdict(s)})
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ckpt


def layers_for_disk(s: BigShape, out: Path, room_factor: float = 2.2,
                    keep_free: int = 8 << 30) -> int:
    """As many layers as fit with room for a same-size output (``room_factor`` x the
    source) and ``keep_free`` bytes left over."""
    free = shutil.disk_usage(out if out.exists() else out.parent).free - keep_free
    fixed = lm_bytes(replace(s, layers=0))
    per_layer = lm_bytes(replace(s, layers=1)) - fixed
    return max(1, min(s.full_layers, int((free / room_factor - fixed) // per_layer)))


def shape_for(name: str, layers: int | None = None, seed: int = 0,
              out: Path = DEFAULT_OUT) -> BigShape:
    s = replace(SHAPES[name], seed=seed)
    if layers is None and s.experts:
        layers = layers_for_disk(s, out)
    return replace(s, layers=layers or s.layers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None,
                        help="num_hidden_layers [the published depth; 30b-a3b: what the disk "
                             "allows with room for an output of the same size]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-gb", type=float, default=4.0, help="largest shard [4.0 GB]")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"[{DEFAULT_OUT}]")
    parser.add_argument("--remove", action="store_true", help="delete it instead")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    s = shape_for(args.shape, args.layers, args.seed, args.out)
    root = args.out / f"big-{s.label()}-{s.key()}"
    if args.remove:
        shutil.rmtree(root, ignore_errors=True)
        print(f"removed {root}")
        return
    start = time.perf_counter()
    ckpt = make_big_checkpoint(s, args.out, args.shard_gb)
    print(f"{s.label()}: {ckpt.weight_bytes() / 1e9:.2f} GB in {ckpt.hf} "
          f"({time.perf_counter() - start:.0f} s)\n"
          f"mmconvert to-gguf {' '.join(ckpt.mmconvert_args())} -o OUT")


if __name__ == "__main__":
    main()
