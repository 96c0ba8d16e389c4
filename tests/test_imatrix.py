"""Importance matrices: llama.cpp's GGUF and legacy ``.dat`` formats (read, write, hostile
files), the fit check against a model, ``mmconvert imatrix`` (statistics checked against an
independent torch computation) and ``to-gguf --imatrix`` (bytes equal to libggml's and to
llama.cpp's own quantizer fed the same weights)."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mmconvert.cli import format_error, main
from mmconvert.errors import ImatrixError
from mmconvert.formats.imatrix import (
    Imatrix,
    ImatrixEntry,
    WeightSlot,
    fit_imatrix,
    imatrix_gguf_bytes,
    read_imatrix,
    requires_imatrix,
    stats_imatrix,
    write_imatrix_gguf,
)

RNG = np.random.default_rng(7)


def sample_stats() -> Imatrix:
    return stats_imatrix(
        {"blk.0.attn_q.weight": RNG.random((1, 64)) * 100,
         "blk.0.ffn_up_exps.weight": RNG.random((4, 32)) * 100},
        {"blk.0.attn_q.weight": np.array([512]),
         "blk.0.ffn_up_exps.weight": np.array([10, 0, 3, 7])},
        ["data/calib.txt"], 3, 512)


def write_legacy(path: Path, entries: dict[str, tuple[int, np.ndarray]],
                 trailer: tuple[int, str] | None = (3, "calib.txt")) -> Path:
    """A ``.dat`` file laid out as llama.cpp's ``save_imatrix_legacy`` writes it."""
    out = bytearray(struct.pack("<i", len(entries)))
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, values.size)
        out += np.asarray(values, "<f4").tobytes()
    if trailer is not None:
        raw = trailer[1].encode()
        out += struct.pack("<ii", trailer[0], len(raw)) + raw
    path.write_bytes(bytes(out))
    return path


def put(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    assert len(format_error(message).splitlines()[0]) <= 200
    return message


# --- the formats --------------------------------------------------------------------------

def test_gguf_round_trip_and_weights(tmp_path):
    stats = sample_stats()
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, stats)
    back = read_imatrix(path)
    assert not back.legacy and back.datasets == ["data/calib.txt"]
    assert (back.chunk_count, back.chunk_size) == (3, 512)
    for name, e in stats.entries.items():
        assert np.array_equal(back.entries[name].sums, e.sums)
        assert np.array_equal(back.entries[name].counts, e.counts)
    # llama-quantize: sums / count per expert in float32, an expert without tokens all ones
    w = back.weights("blk.0.ffn_up_exps.weight")
    sums = stats.entries["blk.0.ffn_up_exps.weight"].sums.reshape(4, 32)
    assert np.array_equal(w[:32], sums[0] / np.float32(10))
    assert np.array_equal(w[32:64], np.ones(32, np.float32))
    assert np.array_equal(w[96:], sums[3] / np.float32(7))
    assert w.dtype == np.float32 and w.shape == (128,)


def test_gguf_layout_is_llama_imatrix(tmp_path):
    """gguf-py reads our file as llama-imatrix's: keys in its order, a dense entry as 1-D
    tensors (ggml_n_dims trims the trailing 1), an expert entry [n_per_row, n_expert]."""
    from gguf import GGUFReader

    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, sample_stats())
    r = GGUFReader(path)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert keys == ["general.type", "imatrix.datasets", "imatrix.chunk_count",
                    "imatrix.chunk_size"]
    shapes = {t.name: list(t.shape) for t in r.tensors}
    assert shapes == {"blk.0.attn_q.weight.in_sum2": [64], "blk.0.attn_q.weight.counts": [1],
                      "blk.0.ffn_up_exps.weight.in_sum2": [32, 4],
                      "blk.0.ffn_up_exps.weight.counts": [1, 4]}
    assert all(t.tensor_type.name == "F32" for t in r.tensors)


@pytest.mark.llama
def test_libggml_gguf_parser_accepts_ours(tmp_path):
    """ggml's own gguf_init_from_file (what common_imatrix_load calls) reads our file."""
    from tests.ggml_c import libggml

    lib = libggml().lib

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = (ctypes.c_char_p, Params)
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = (ctypes.c_void_p,)
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
    lib.gguf_get_val_u32.restype = ctypes.c_uint32
    lib.gguf_get_val_u32.argtypes = (ctypes.c_void_p, ctypes.c_int64)
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = (ctypes.c_void_p, ctypes.c_int64)
    lib.gguf_free.argtypes = (ctypes.c_void_p,)
    path = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(path, sample_stats())
    ctx = lib.gguf_init_from_file(str(path).encode(), Params(True, None))
    assert ctx, "gguf_init_from_file refused our imatrix"
    try:
        assert lib.gguf_get_n_tensors(ctx) == 4
        assert lib.gguf_get_val_u32(ctx, lib.gguf_find_key(ctx, b"imatrix.chunk_size")) == 512
        names = {lib.gguf_get_tensor_name(ctx, i).decode() for i in range(4)}
        assert "blk.0.ffn_up_exps.weight.in_sum2" in names
    finally:
        lib.gguf_free(ctx)


def test_legacy_dat(tmp_path):
    values = RNG.random(64).astype(np.float32) * 5
    experts = RNG.random(96).astype(np.float32)
    path = write_legacy(tmp_path / "imatrix.dat", {"blk.0.attn_q.weight": (4, values),
                                                   "blk.1.ffn_down_exps.weight": (2, experts),
                                                   "blk.0.attn_k.weight": (0, values)})
    im = read_imatrix(path)
    assert im.legacy and im.datasets == ["calib.txt"] and im.chunk_count == 3
    assert np.array_equal(im.weights("blk.0.attn_q.weight"), values / np.float32(4))
    assert np.array_equal(im.weights("blk.1.ffn_down_exps.weight"), experts / np.float32(2))
    assert np.array_equal(im.weights("blk.0.attn_k.weight"), values)  # ncall 0: as stored
    # the trailer is optional (files of older llama.cpp versions)
    bare = read_imatrix(write_legacy(tmp_path / "old.dat", {"blk.0.attn_q.weight": (1, values)},
                                     trailer=None))
    assert bare.datasets == [] and bare.chunk_count == 0


def _gguf_with(tmp_path: Path, tensors: dict[str, np.ndarray], keys: bool = True,
               dtype: str = "F32") -> Path:
    """A GGUF file holding ``tensors`` as they are (gguf-py's writer)."""
    import gguf

    path = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(path), arch="unused")
    if keys:
        w.add_array("imatrix.datasets", ["x"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 512)
    for name, data in tensors.items():
        w.add_tensor(name, data.astype(np.float16 if dtype == "F16" else np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


HOSTILE = {
    "truncated gguf": lambda p: put(p / "t.gguf",
        imatrix_gguf_bytes(sample_stats())[:200]),
    "huge entry count": lambda p: put(p / "h.dat",
        struct.pack("<i", 2**31 - 1) + b"\0" * 64),
    "huge value count": lambda p: put(p / "v.dat",
        struct.pack("<ii", 1, 3) + b"abc" + struct.pack("<ii", 1, 2**30) + b"\0" * 16),
    "negative name length": lambda p: put(p / "n.dat",
        struct.pack("<ii", 1, -5) + b"\0" * 32),
    "name with a slash": lambda p: write_legacy(p / "s.dat", {"../../etc/passwd": (1, np.ones(4))}),
    "name with a NUL": lambda p: write_legacy(p / "z.dat", {"blk.0\0x": (1, np.ones(4))}),
    "truncated values": lambda p: put(p / "tv.dat",
        write_legacy(p / "full.dat", {"blk.0.attn_q.weight": (1, np.ones(64))},
                     trailer=None).read_bytes()[:100]),
    "trailing garbage": lambda p: put(p / "g.dat",
        write_legacy(p / "ok.dat", {"blk.0.attn_q.weight": (1, np.ones(4))}).read_bytes()
        + b"junk"),
    "duplicate entry": lambda p: put(p / "d.dat",
        struct.pack("<i", 2) + 2 * (struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 1, 1)
                                    + b"\0\0\0\0")),
    "empty file": lambda p: put(p / "e.dat", b""),
    "no metadata": lambda p: _gguf_with(p, {"a.weight.in_sum2": np.ones(4),
                                            "a.weight.counts": np.ones(1)}, keys=False),
    "sums without counts": lambda p: _gguf_with(p, {"a.weight.in_sum2": np.ones(4)}),
    "F16 sums": lambda p: _gguf_with(p, {"a.weight.in_sum2": np.ones(4),
                                         "a.weight.counts": np.ones(1)}, dtype="F16"),
    "sums not whole rows": lambda p: _gguf_with(p, {"a.weight.in_sum2": np.ones(5),
                                                    "a.weight.counts": np.ones(2)}),
    "negative counts": lambda p: _gguf_with(p, {"a.weight.in_sum2": np.ones(4),
                                                "a.weight.counts": -np.ones(1)}),
    "negative sums": lambda p: _gguf_with(p, {"a.weight.in_sum2": -np.ones(4),
                                              "a.weight.counts": np.ones(1)}),
    "no entries": lambda p: _gguf_with(p, {"a.weight": np.ones(4)}),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_files_refused_in_one_line(tmp_path, case):
    path = HOSTILE[case](tmp_path)
    with pytest.raises(ImatrixError) as exc:
        read_imatrix(path)
    one_line(exc)


def test_non_finite_weights_refused():
    im = Imatrix({"a.weight": ImatrixEntry(np.array([1, np.inf], np.float32),
                                           np.array([1]))})
    with pytest.raises(ImatrixError, match="non-finite") as exc:
        im.weights("a.weight")
    one_line(exc)


# --- fitting a model ------------------------------------------------------------------------

SLOTS = [WeightSlot("blk.0.attn_q.weight", (64, 64), "Q4_K"),
         WeightSlot("blk.0.ffn_up_exps.weight", (4, 96, 32), "Q4_K"),
         WeightSlot("blk.0.attn_k.weight", (32, 64), "Q4_K"),
         WeightSlot("blk.0.ffn_gate_inp.weight", (4, 64), "F32", uses_imatrix=False),
         WeightSlot("token_embd.weight", (300, 64), "Q6_K")]


def test_fit_weights_and_missing_warning():
    fit = fit_imatrix(sample_stats(), SLOTS, ["blk.0.attn_norm.weight"])
    assert set(fit.weights) == {"blk.0.attn_q.weight", "blk.0.ffn_up_exps.weight"}
    assert fit.weights["blk.0.ffn_up_exps.weight"].shape == (128,)
    (warning,) = fit.warnings
    assert "no entry for 1 of 3 quantized tensors (blk.0.attn_k.weight)" in warning


def test_fit_refuses_other_models():
    other = stats_imatrix({"blk.9.attn_q.weight": np.ones((1, 64))},
                          {"blk.9.attn_q.weight": np.array([1])}, [], 1, 512)
    with pytest.raises(ImatrixError, match="does not have") as exc:
        fit_imatrix(other, SLOTS)
    one_line(exc)
    wrong = stats_imatrix({"blk.0.ffn_up_exps.weight": np.ones((2, 32))},
                          {"blk.0.ffn_up_exps.weight": np.array([1, 1])}, [], 1, 512)
    with pytest.raises(ImatrixError, match="needs 128") as exc:
        fit_imatrix(wrong, SLOTS)
    one_line(exc)


def test_fit_token_embd_size_forgiven_and_required_types():
    stats = stats_imatrix({"token_embd.weight": np.ones((1, 300))},
                          {"token_embd.weight": np.array([1])}, [], 1, 512)
    fit = fit_imatrix(stats, SLOTS)
    assert "token_embd.weight" not in fit.weights
    assert any("not used" in w for w in fit.warnings)
    assert requires_imatrix("blk.0.attn_q.weight", "IQ2_XS")
    assert requires_imatrix("blk.0.attn_q.weight", "Q2_K", "Q2_K_S")
    assert not requires_imatrix("blk.0.attn_q.weight", "Q2_K", "Q2_K")
    assert not requires_imatrix("token_embd.weight", "IQ2_XS")
    slots = [WeightSlot("blk.0.attn_k.weight", (32, 64), "IQ2_XS", requires_imatrix=True),
             *SLOTS[:2]]
    with pytest.raises(ImatrixError, match="IQ2_XS needs") as exc:
        fit_imatrix(sample_stats(), slots)
    one_line(exc)


# --- mmconvert imatrix ----------------------------------------------------------------------

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards", "quietly", "judge", "boxing", "matches", "in", "the", "old", "town", "square"]


def calibration_text(n_words: int = 400, seed: int = 0) -> str:
    gen = np.random.default_rng(seed)
    return " ".join(gen.choice(WORDS, n_words))


def _chunks(ref, ids, chunk, n, mm_inputs=None):
    """The fused input embeddings of each chunk, built by the reference's own fusion."""
    embeds, _, _ = ref.fused_embeddings(ids, mm_inputs)
    return [embeds[:, c * chunk:(c + 1) * chunk] for c in range(n)]


def test_compute_dense_matches_hidden_states(example_ckpt):
    """Counts are the tokens of the chunks run; attn_q/k/v sums equal the squares of
    input_layernorm(hidden_states[i]) from a plain forward with output_hidden_states."""
    import torch

    from mmconvert.convert.readers import read_checkpoint
    from mmconvert.verify.imatrix_compute import compute_imatrix, tokenize_calibration
    from mmconvert.verify.reference import ReferenceModel

    model = read_checkpoint(example_ckpt)
    ids = tokenize_calibration(model, calibration_text())
    chunk, n = 32, 3
    assert len(ids) >= chunk * (n + 1)  # so --chunks, not the text, limits the run
    result = compute_imatrix(model, ids, chunk_size=chunk, max_chunks=n, device="cpu")
    im = result.imatrix
    assert (result.chunks, im.chunk_count, im.chunk_size) == (n, n, chunk)
    layers = model.text.num_hidden_layers
    kinds = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    assert set(im.entries) == {f"blk.{i}.{k}.weight" for i in range(layers) for k in kinds}
    assert all(e.counts.tolist() == [chunk * n] for e in im.entries.values())
    ref = ReferenceModel(model)
    expected = [torch.zeros(model.text.hidden_size, dtype=torch.float64) for _ in range(layers)]
    with torch.no_grad():
        for embeds in _chunks(ref, ids, chunk, n):
            hidden = ref.lm.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
            for i in range(layers):
                x = ref.lm.model.layers[i].input_layernorm(hidden[i])[0]
                expected[i] += x.double().square().sum(0)
    for i in range(layers):
        for k in ("attn_q", "attn_k", "attn_v"):
            got = im.entries[f"blk.{i}.{k}.weight"].sums
            np.testing.assert_allclose(got, expected[i].numpy(), rtol=2e-5)
    # llama-quantize's weights are then the mean square per column
    w = im.weights("blk.0.attn_q.weight")
    np.testing.assert_allclose(w, expected[0].numpy() / (chunk * n), rtol=2e-5)


def test_compute_moe_per_expert(make_checkpoint):
    """Experts: only the tokens the router sends to each expert count (any of its top-k
    slots); gate and up see the same inputs; the router's own input is a dense entry."""
    import torch

    from mmconvert.convert.readers import read_checkpoint
    from mmconvert.verify.imatrix_compute import compute_imatrix, tokenize_calibration
    from mmconvert.verify.reference import ReferenceModel

    model = read_checkpoint(make_checkpoint(num_experts=4, num_experts_per_tok=2))
    ids = tokenize_calibration(model, calibration_text(seed=1))
    chunk, n = 32, 2
    im = compute_imatrix(model, ids, chunk_size=chunk, max_chunks=n, device="cpu").imatrix
    ref = ReferenceModel(model)
    seen: dict[int, list] = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda mod, args, i=i: seen.setdefault(i, []).append(args[0].detach()))
        for i, layer in enumerate(ref.lm.model.layers)]
    with torch.no_grad():
        for embeds in _chunks(ref, ids, chunk, n):
            ref.lm.model(inputs_embeds=embeds)
    for h in hooks:
        h.remove()
    for i, inputs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]).double()
        router = ref.lm.model.layers[i].mlp.gate.weight.double()
        top = torch.topk(torch.softmax(x @ router.T, -1), 2, dim=-1).indices
        gate = im.entries[f"blk.{i}.ffn_gate_exps.weight"]
        up = im.entries[f"blk.{i}.ffn_up_exps.weight"]
        assert np.array_equal(gate.sums, up.sums) and np.array_equal(gate.counts, up.counts)
        assert int(gate.counts.sum()) == chunk * n * 2
        for e in range(4):
            routed = (top == e).any(-1)
            assert int(gate.counts[e]) == int(routed.sum())
            want = x[routed].square().sum(0).numpy()
            np.testing.assert_allclose(gate.sums.reshape(4, -1)[e], want, rtol=2e-5, atol=1e-6)
        inp = im.entries[f"blk.{i}.ffn_gate_inp.weight"]
        assert inp.counts.tolist() == [chunk * n]
        np.testing.assert_allclose(inp.sums, x.square().sum(0).numpy(), rtol=2e-5)
        down = im.entries[f"blk.{i}.ffn_down_exps.weight"]
        assert np.array_equal(down.counts, gate.counts)
        assert down.sums.size == 4 * model.text.moe_intermediate_size


def test_cli_imatrix_with_embeddings(example_ckpt, tmp_path):
    """``mmconvert imatrix`` writes a file llama-quantize's loader format reads back; with
    --embeddings the projected rows lead the first chunk (no placeholder: prepended), so
    layer 0's attn_q sums are those of input_layernorm over the fused embeddings."""
    import torch

    from mmconvert.convert.readers import read_checkpoint
    from mmconvert.runtime.run_inputs import load_embeddings
    from mmconvert.verify.imatrix_compute import tokenize_calibration
    from mmconvert.verify.reference import ReferenceModel

    text = tmp_path / "calib.txt"
    text.write_text(calibration_text(300, seed=2))
    from safetensors.numpy import save_file

    emb = tmp_path / "inputs.safetensors"
    gen = np.random.default_rng(3)  # the example's modalities: m1 takes 48 values, m2 80
    save_file({"m1": gen.standard_normal((3, 48)).astype(np.float32),
               "m2": gen.standard_normal((2, 80)).astype(np.float32)}, str(emb))
    out = tmp_path / "im.gguf"
    args = ["imatrix", str(example_ckpt), "--calibration", str(text), "-o", str(out),
            "--chunk-size", "32", "--chunks", "2", "--device", "cpu", "-q"]
    r = CliRunner().invoke(main, args + ["--embeddings", str(emb)])
    assert r.exit_code == 0, r.output
    im = read_imatrix(out)
    assert im.datasets == [str(text)] and im.chunk_count == 2
    model = read_checkpoint(example_ckpt)
    ref = ReferenceModel(model)
    items = {m: [torch.from_numpy(a) for a in v] for m, v in load_embeddings(emb).items()}
    ids = tokenize_calibration(model, text.read_text())
    with torch.no_grad():
        x = torch.cat([ref.lm.model.layers[0].input_layernorm(c)[0]
                       for c in _chunks(ref, ids, 32, 2, items)]).double()
    np.testing.assert_allclose(im.entries["blk.0.attn_q.weight"].sums,
                               x.square().sum(0).numpy(), rtol=2e-5)
    # an existing output is kept without --force; a text shorter than a chunk is refused
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--force" in again.output
    short = tmp_path / "short.txt"
    short.write_text("too short")
    r = CliRunner().invoke(main, [*args[:3], str(short), "-o", str(tmp_path / "x.gguf"),
                                  *args[6:]])
    assert r.exit_code == 2 and "shorter than one chunk" in r.output, r.output


# --- to-gguf --imatrix ----------------------------------------------------------------------

ROWS_256 = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, head_dim=64,
                num_key_value_heads=2, num_hidden_layers=2)
IMATRIX_VARIANTS = {"dense": ROWS_256,
                    "moe": dict(ROWS_256, num_experts=4, moe_intermediate_size=256)}


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)),
                     np.ascontiguousarray(t.data).view(np.uint8).reshape(-1))
            for t in GGUFReader(path).tensors}


def llama_quantize_with_imatrix(src: Path, out: Path, mixture: str, im: Imatrix) -> Path:
    """llama.cpp's own quantizer (the C API behind llama-quantize) fed the weight vectors
    llama-quantize's load_imatrix builds, as a {NULL, NULL, 0}-terminated array."""
    import llama_cpp

    from mmconvert.formats.gguf_constants import file_type

    names = sorted(im.entries)
    vectors = [np.ascontiguousarray(im.weights(n), np.float32) for n in names]
    entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    keep = [n.encode() for n in names]
    for entry, name, vec in zip(entries, keep, vectors):
        entry.name = name
        entry.data = vec.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = vec.size
    entries[len(names)].name = None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(file_type(mixture))
    params.nthread = 2
    params.imatrix = ctypes.cast(entries, type(params.imatrix))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(),
                                        ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({mixture}) with an imatrix failed"
    del keep, vectors
    return out


@pytest.mark.llama
@pytest.mark.parametrize("variant", IMATRIX_VARIANTS)
def test_to_gguf_imatrix_bytes_equal_llama_quantize(make_checkpoint, tmp_path, variant):
    """to-gguf --imatrix: every tensor's bytes equal (1) libggml's ggml_quantize_chunk of the
    F32 GGUF's weights with llama-quantize's weight vector for it (per expert for 3-D
    experts) and (2) llama.cpp's own llama_model_quantize given the same imatrix."""
    from mmconvert import api
    from mmconvert.convert.readers import read_checkpoint
    from mmconvert.verify.imatrix_compute import compute_imatrix, tokenize_calibration
    from tests.ggml_c import libggml

    ckpt = make_checkpoint(**IMATRIX_VARIANTS[variant])
    model = read_checkpoint(ckpt)
    ids = tokenize_calibration(model, calibration_text(600, seed=4))
    stats = compute_imatrix(model, ids, chunk_size=64, max_chunks=2, device="cpu").imatrix
    imfile = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(imfile, stats)
    im = read_imatrix(imfile)
    f32 = api.to_gguf(ckpt, tmp_path / "f32", outtypes=["f32"], checksums=False)
    f32_path = tmp_path / "f32" / next(f for f in f32.files if f.endswith("-F32.gguf"))
    mixtures = ["q4_k_m", "iq4_xs"]
    ours = api.to_gguf(ckpt, tmp_path / "q", outtypes=mixtures, imatrix=imfile,
                       checksums=False, warn=lambda line: None)
    source = _tensors(f32_path)
    lib = libggml()
    weighted = 0
    for mixture in mixtures:
        mine = _tensors(tmp_path / "q" / next(f for f in ours.files
                                              if f.endswith(f"-{mixture.upper()}.gguf")))
        theirs = _tensors(llama_quantize_with_imatrix(f32_path, tmp_path / f"{mixture}.gguf",
                                                      mixture.upper(), im))
        assert set(mine) == set(theirs)
        for name, (ggml_type, shape, data) in mine.items():
            assert theirs[name][0] == ggml_type, (mixture, name)
            assert np.array_equal(theirs[name][2], data), f"{mixture} {name}: not llama.cpp's"
            if name not in im.entries or ggml_type in ("F32", "F16", "BF16"):
                continue
            rows = source[name][2].view(np.float32).reshape(shape)
            w = im.weights(name)
            n = shape[-1]
            experts = rows if len(shape) == 3 else rows[None]
            expected = np.concatenate([
                lib.quantize(experts[e], ggml_type, imatrix=w[e * n:(e + 1) * n]).reshape(-1)
                for e in range(experts.shape[0])])
            assert np.array_equal(expected, data), f"{mixture} {name}: not libggml's"
            weighted += 1
    assert weighted >= 2 * 7 * ROWS_256["num_hidden_layers"] - 2


def test_to_gguf_refuses_an_imatrix_of_another_model(example_ckpt, tmp_path):
    imfile = tmp_path / "other.gguf"
    write_imatrix_gguf(imfile, sample_stats())  # names experts the dense example lacks
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["to-gguf", str(example_ckpt), "-o", str(out), "--outtype",
                                  "q4_0", "--imatrix", str(imfile), "-q"])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and "does not have" in r.output.splitlines()[0]
    assert not out.exists()


@pytest.mark.llama
def test_verify_checks_an_imatrix_bundle_with_its_imatrix(example_ckpt, tmp_path):
    """An imatrix-quantized bundle: verify without the matrix leaves the weighted tensors
    unchecked (saying why) and still passes on logits; with it, every tensor is compared byte
    for byte and passes; with another matrix, the tensor check fails the bundle."""
    from mmconvert import api
    from mmconvert.convert.readers import read_checkpoint
    from mmconvert.verify.imatrix_compute import compute_imatrix, tokenize_calibration

    model = read_checkpoint(example_ckpt)
    ids = tokenize_calibration(model, calibration_text(300, seed=2))
    stats = compute_imatrix(model, ids, chunk_size=64, max_chunks=2, device="cpu").imatrix
    good = tmp_path / "imatrix.gguf"
    write_imatrix_gguf(good, stats)
    other = tmp_path / "other.gguf"
    for e in stats.entries.values():
        e.sums[:] = RNG.uniform(0.1, 10.0, e.sums.shape).astype(np.float32) * e.counts[0]
    write_imatrix_gguf(other, stats)
    bundle = tmp_path / "q"
    api.to_gguf(example_ckpt, bundle, outtypes=["q4_0"], imatrix=good, checksums=False,
                warn=lambda line: None)

    def run(imatrix):
        return api.verify(example_ckpt, [bundle], backends=["gguf_torch"], imatrix=imatrix,
                          log=lambda line: None, warn=lambda line: None)

    without = run(None)
    assert without.passed
    notes = [m for r in without.targets for name, ok, m in r.checks if name == "tensor check"]
    assert len(notes) == 1 and "imatrix.gguf" in notes[0] and "pass --imatrix FILE" in notes[0]
    with_it = run(good)
    assert with_it.passed
    assert not [m for r in with_it.targets for name, ok, m in r.checks if name == "tensor check"]
    wrong = run(other)
    assert not wrong.passed
    assert any(d.status == "mismatch" and d.dtype == "Q4_0"
               for r in wrong.targets for d in r.tensor_diffs)
