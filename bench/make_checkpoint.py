"""Generate the benchmark input: a Qwen3-0.6B-shaped multimodal checkpoint (seed layout) and a
plain Qwen3 HF folder holding the same language-model bytes (for llama.cpp's converter).

Weights are random bf16 drawn as random bits (sign, a narrow exponent range, mantissa: finite
values in +-[2^-7, 2), exact in f16) and streamed to both safetensors files a chunk at a time, so
generating 1.2 GB needs ~tens of MB of memory. The result is cached under ``bench/_work/``
keyed by every parameter; a second call returns at once.

    python bench/make_checkpoint.py                 # full Qwen3-0.6B shape
    python bench/make_checkpoint.py --layers 2      # a quick small variant
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / "_work"
GENERATOR_VERSION = 1  # bump when the bytes written change
MULTIMODAL_TOKEN = "<|multimodal|>"
CHUNK_ELEMENTS = 8 << 20  # bf16 values generated per step (16 MB)


@dataclass(frozen=True)
class Shape:
    """What to generate (defaults: Qwen3-0.6B, tied embeddings, padded vocab)."""

    hidden: int = 1024
    layers: int = 28
    heads: int = 16
    kv_heads: int = 8
    head_dim: int = 128
    intermediate: int = 3072
    vocab: int = 151_936  # embedding rows; ignored when resize_vocab
    resize_vocab: bool = False  # embedding rows = len(tokenizer) incl. the multimodal token
    tied: bool = True
    seed: int = 0
    modalities: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "m1": {"input_dim": 768}, "m2": {"input_dim": 1280, "hidden_dim": 2048}})

    def key(self) -> str:
        raw = json.dumps({"v": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(raw.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    mm: Path  # multimodal_qwen3 checkpoint (what ``mmconvert`` reads)
    hf: Path  # plain Qwen3 folder with the same LM bytes (what llama.cpp's converter reads)

    def lm_bytes(self) -> int:
        return (self.hf / "model.safetensors").stat().st_size


# ---------------------------------------------------------------- tokenizer

def write_tokenizer(directory: Path) -> int:
    """Qwen's real vocabulary (``testkit/qwen_vocab.py``) plus the multimodal token; returns
    ``len(tokenizer)``."""
    from tokenizers import AddedToken, Tokenizer

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        from testkit.qwen_vocab import build_qwen_tokenizer
    except ImportError as exc:
        raise SystemExit(f"testkit/qwen_vocab.py (build_qwen_tokenizer) is not available: {exc}"
                         ) from exc
    path = Path(build_qwen_tokenizer(directory))
    if path.is_dir():
        path = path / "tokenizer.json"
    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(MULTIMODAL_TOKEN) is None:
        tok.add_special_tokens([AddedToken(MULTIMODAL_TOKEN, special=True, normalized=False)])
        tok.save(str(directory / "tokenizer.json"))
    mm_id = tok.token_to_id(MULTIMODAL_TOKEN)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg.setdefault("tokenizer_class", "Qwen2Tokenizer")
    cfg.setdefault("eos_token", "<|im_end|>")
    cfg.setdefault("pad_token", "<|endoftext|>")
    cfg.setdefault("add_bos_token", False)
    cfg.setdefault("bos_token", None)
    decoder = cfg.setdefault("added_tokens_decoder", {})
    decoder[str(mm_id)] = {"content": MULTIMODAL_TOKEN, "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tok.get_vocab_size(with_added_tokens=True)


# ---------------------------------------------------------------- tensors

def lm_tensors(s: Shape, rows: int) -> list[tuple[str, tuple[int, ...]]]:
    """HF Qwen3 names (without the ``language_model.`` prefix) and shapes, file order."""
    h, d = s.hidden, s.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (rows, h))]
    for i in range(s.layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (s.heads * d, h)),
                (p + "self_attn.k_proj.weight", (s.kv_heads * d, h)),
                (p + "self_attn.v_proj.weight", (s.kv_heads * d, h)),
                (p + "self_attn.o_proj.weight", (h, s.heads * d)),
                (p + "self_attn.q_norm.weight", (d,)),
                (p + "self_attn.k_norm.weight", (d,)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (s.intermediate, h)),
                (p + "mlp.up_proj.weight", (s.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, s.intermediate))]
    out.append(("model.norm.weight", (h,)))
    if not s.tied:
        out.append(("lm_head.weight", (rows, h)))
    return out


def projector_tensors(s: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """Seed names with layer norm: 0 Linear, 1 LayerNorm, (2 act, 3 Dropout), 4 Linear, 5 LayerNorm."""
    out: list[tuple[str, tuple[int, ...]]] = []
    for name, m in s.modalities.items():
        p = f"multimodal_projector.projectors.{name}."
        hid = m.get("hidden_dim") or s.hidden
        for index, shape in ((0, (hid, m["input_dim"])), (1, (hid,)), (4, (s.hidden, hid)),
                             (5, (s.hidden,))):
            out += [(f"{p}{index}.weight", shape), (f"{p}{index}.bias", (shape[0],))]
    return out


def random_bf16(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` finite bf16 bit patterns: random sign and mantissa, exponent 120..127."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    exponent = (bits >> np.uint16(4)) & np.uint16(0x7)  # 3 bits from the middle
    return (bits & np.uint16(0x807F)) | ((exponent + np.uint16(120)) << np.uint16(7))


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw


def chunks(seed: int, index: int, numel: int) -> Iterator[bytes]:
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
    for start in range(0, numel, CHUNK_ELEMENTS):
        yield random_bf16(rng, min(CHUNK_ELEMENTS, numel - start)).tobytes()


def write_weights(s: Shape, rows: int, mm_file: Path, hf_file: Path) -> None:
    """Stream the same random LM bytes into both files (projectors only into ``mm_file``)."""
    lm = lm_tensors(s, rows)
    proj = projector_tensors(s)
    with open(mm_file, "wb") as mm, open(hf_file, "wb") as hf:
        mm.write(safetensors_header([("language_model." + n, sh) for n, sh in lm] + proj))
        hf.write(safetensors_header(lm))
        for index, (_, shape) in enumerate(lm):
            for data in chunks(s.seed, index, math.prod(shape)):
                mm.write(data)
                hf.write(data)
        for index, (_, shape) in enumerate(proj, start=len(lm)):
            for data in chunks(s.seed, index, math.prod(shape)):
                mm.write(data)


# ---------------------------------------------------------------- configs

def _json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def text_config(s: Shape, rows: int) -> dict:
    """As Qwen3-0.6B's config.json (transformers 4.5x style keys)."""
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": rows,
        "hidden_size": s.hidden, "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim, "hidden_act": "silu",
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
        "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": s.tied, "use_cache": True, "bos_token_id": 151643,
        "eos_token_id": 151645, "torch_dtype": "bfloat16", "sliding_window": None,
        "use_sliding_window": False, "max_window_layers": s.layers, "initializer_range": 0.02,
    }


GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                     "eos_token_id": [151645, 151643], "temperature": 0.6, "top_k": 20,
                     "top_p": 0.95}


def mm_config(s: Shape, tcfg: dict) -> dict:
    return {
        "model_type": "multimodal_qwen3", "architectures": ["MultimodalQwen3Model"],
        "base_model_name": "Qwen/Qwen3-0.6B", "modality_configs": s.modalities,
        "projector_hidden_act": "gelu", "use_layer_norm": True, "projector_dropout": 0.1,
        "fusion_strategy": "early", "multimodal_token": MULTIMODAL_TOKEN,
        "max_multimodal_length": 64, "text_config": tcfg,
    }


# ---------------------------------------------------------------- entry point

def make_checkpoint(s: Shape | None = None, work: Path = WORK, quiet: bool = False) -> Checkpoint:
    """The cached checkpoint pair for ``s`` (generated on first use)."""
    s = s or Shape()
    root = work / f"ckpt-{s.key()}"
    ckpt = Checkpoint(root, root / "mm", root / "hf")
    if (root / "params.json").is_file():
        return ckpt
    tmp = work / f".tmp-ckpt-{s.key()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "mm").mkdir(parents=True)
    (tmp / "hf").mkdir()
    try:
        size = write_tokenizer(tmp / "hf")
        rows = size if s.resize_vocab else s.vocab
        if rows < size:
            raise SystemExit(f"--vocab {rows} is smaller than the tokenizer ({size} tokens)")
        tcfg = text_config(s, rows)
        _json(tmp / "hf" / "config.json", tcfg)
        _json(tmp / "hf" / "generation_config.json", GENERATION_CONFIG)
        for name in os.listdir(tmp / "hf"):
            shutil.copy2(tmp / "hf" / name, tmp / "mm" / name)
        _json(tmp / "mm" / "config.json", mm_config(s, tcfg))
        if not quiet:
            print(f"generating {root.name}: {s.layers} layers, hidden {s.hidden}, "
                  f"{rows} embedding rows ...", file=sys.stderr)
        write_weights(s, rows, tmp / "mm" / "model.safetensors", tmp / "hf" / "model.safetensors")
        _json(tmp / "params.json", {"generator_version": GENERATOR_VERSION, "rows": rows,
                                    "tokenizer_size": size, **asdict(s)})
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ckpt


def shape_args(parser: argparse.ArgumentParser) -> None:
    """Add the checkpoint-shape options (shared by the benchmark scripts)."""
    d = Shape()
    g = parser.add_argument_group("checkpoint shape (default: Qwen3-0.6B)")
    g.add_argument("--layers", type=int, default=d.layers, help="num_hidden_layers")
    g.add_argument("--hidden", type=int, default=d.hidden, help="hidden_size")
    g.add_argument("--intermediate", type=int, default=d.intermediate, help="intermediate_size")
    g.add_argument("--vocab", type=int, default=d.vocab, help="embedding rows (padded vocab)")
    g.add_argument("--resize-vocab", action="store_true",
                   help="embedding rows = len(tokenizer) incl. the multimodal token")
    g.add_argument("--untied", action="store_true", help="store a separate lm_head")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed of the weights")


def shape_from(args: argparse.Namespace) -> Shape:
    return Shape(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate,
                 vocab=args.vocab, resize_vocab=args.resize_vocab, tied=not args.untied,
                 seed=args.seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    shape_args(parser)
    parser.add_argument("--work", type=Path, default=WORK, help="cache folder [bench/_work]")
    args = parser.parse_args(argv)
    ckpt = make_checkpoint(shape_from(args), args.work)
    print(f"multimodal checkpoint: {ckpt.mm}\nQwen3 HF folder:       {ckpt.hf}")


if __name__ == "__main__":
    main()
