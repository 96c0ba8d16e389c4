"""The reference forward: placement (single device, accelerate device_map), greedy decoding,
and the rope-layout identity the reference relies on for interleaved sources."""

import pytest
import torch

from mmconvert.convert.readers import ReadOptions, read_checkpoint
from mmconvert.convert.transforms import interleaved_to_neox
from mmconvert.verify.reference import (
    GPU_HEADROOM,
    ReferenceModel,
    choose_placement,
    resolve_device,
)
from tests.independent_reference import SeedModel

GiB = 1 << 30


def test_placement_policy():
    assert choose_placement(10 * GiB, "cpu") == ("cpu", None)
    assert choose_placement(10 * GiB, "cuda", gpu_free=[80 * GiB]) == ("cuda:0", None)
    assert choose_placement(10 * GiB, "cuda:1", gpu_free=[1 * GiB, 80 * GiB]) == ("cuda:1", None)
    main, budget = choose_placement(100 * GiB, "cuda", gpu_free=[80 * GiB, 80 * GiB])
    assert main == "cuda:0"
    assert budget[0] == budget[1] == int(GPU_HEADROOM * 80 * GiB) and budget["cpu"] > 0


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_accelerate_device_map_gives_the_same_logits(example_ckpt):
    """The device_map path (what spreads a model over GPUs and CPU) on CPU-only machines."""
    model = read_checkpoint(example_ckpt)
    plain = ReferenceModel(model)
    layers = {f"model.layers.{i}": "cpu" for i in range(model.text.num_hidden_layers)}
    mapped = ReferenceModel(model, device_map={"model.embed_tokens": "cpu", **layers,
                                               "model.norm": "cpu", "model.rotary_emb": "cpu",
                                               "lm_head": "cpu"})
    inferred = ReferenceModel(model, max_memory={"cpu": 1 << 30})
    ph = model.multimodal_token_id
    mm = {"m1": [torch.randn(2, 48)], "m2": [torch.randn(80)]}
    ids = [5, ph, ph, 9, ph, 11]
    want = plain.logits(ids, mm)
    assert torch.equal(mapped.logits(ids, mm), want)
    assert torch.equal(inferred.logits(ids, mm), want)
    assert inferred.device_map is not None


def test_tied_model_under_a_device_map(make_checkpoint):
    model = read_checkpoint(make_checkpoint(tied=True))
    mapped = ReferenceModel(model, max_memory={"cpu": 1 << 30})
    assert mapped.lm.lm_head.weight.data_ptr() == mapped.lm.model.embed_tokens.weight.data_ptr()
    seed = SeedModel(make_checkpoint(tied=True))
    assert (mapped.logits([3, 4, 5]) - seed.logits([3, 4, 5])).abs().max() < 1e-5


def test_greedy_matches_the_full_forward(example_ckpt):
    model = read_checkpoint(example_ckpt)
    ref = ReferenceModel(model)
    ph = model.multimodal_token_id
    mm = {"m2": [torch.randn(2, 80, generator=torch.Generator().manual_seed(0))]}
    prompt = [7, 8, 9]
    tokens = ref.greedy(prompt, mm, 6, exclude=(ph,))
    assert ph not in tokens and len(tokens) == 6
    logits = ref.logits(prompt + tokens, mm)
    logits[:, ph] = -float("inf")
    n = logits.shape[0]
    assert logits[n - 7:n - 1].argmax(-1).tolist() == tokens


def _rope_interleaved(x, pos, theta):
    """Rotate pairs (x[2i], x[2i+1]) by pos * theta^(-2i/d): the interleaved layout."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos * freq
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * torch.cos(ang) - b * torch.sin(ang)
    out[..., 1::2] = a * torch.sin(ang) + b * torch.cos(ang)
    return out


def _rope_neox(x, pos, theta):
    """Rotate (x[i], x[i + d/2]) by the same angles: the rotate-half layout HF Qwen3 uses."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos * freq
    a, b = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([a * torch.cos(ang) - b * torch.sin(ang),
                      a * torch.sin(ang) + b * torch.cos(ang)], -1)


def test_interleaved_source_equals_permuted_neox():
    """What the reference does for an interleaved source: permuting each head's Q/K rows and
    its q/k norm weight to rotate-half order gives the same attention scores as interleaved
    rope on the original weights (a from-scratch check of the identity, per head)."""
    gen = torch.Generator().manual_seed(0)
    d, hidden = 16, 24
    wq, wk = torch.randn(d, hidden, generator=gen, dtype=torch.float64), \
        torch.randn(d, hidden, generator=gen, dtype=torch.float64)
    nq, nk = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5, \
        torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    x = torch.randn(5, hidden, generator=gen, dtype=torch.float64)

    def rms(v, w):
        return v / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w

    pos = torch.arange(5, dtype=torch.float64)[:, None]
    q = _rope_interleaved(rms(x @ wq.T, nq), pos, 1e4)
    k = _rope_interleaved(rms(x @ wk.T, nk), pos, 1e4)
    perm = {n: torch.from_numpy(interleaved_to_neox(t.numpy(), 1)) for n, t in
            (("wq", wq), ("wk", wk), ("nq", nq), ("nk", nk))}
    q2 = _rope_neox(rms(x @ perm["wq"].T, perm["nq"]), pos, 1e4)
    k2 = _rope_neox(rms(x @ perm["wk"].T, perm["nk"]), pos, 1e4)
    assert torch.allclose(q @ k.T, q2 @ k2.T, atol=1e-10)
    # and forgetting the norm permutation breaks it (what verify flags)
    q3 = _rope_neox(rms(x @ perm["wq"].T, nq), pos, 1e4)
    k3 = _rope_neox(rms(x @ perm["wk"].T, nk), pos, 1e4)
    assert not torch.allclose(q @ k.T, q3 @ k3.T, atol=1e-3)


def test_interleaved_reference_is_a_different_model(example_ckpt):
    neox = ReferenceModel(read_checkpoint(example_ckpt))
    inter = ReferenceModel(read_checkpoint(example_ckpt, ReadOptions(rope_layout="interleaved")))
    ids = list(range(5, 30))
    assert (neox.logits(ids) - inter.logits(ids)).abs().max() > 1e-2
    # position 0 has no rotation: the only difference there is the head-dim order, which the
    # dot products do not see
    assert torch.allclose(neox.logits(ids)[0], inter.logits(ids)[0], atol=1e-5)


def test_saved_inputs_are_replayed_from_aligned_memory(make_checkpoint, tmp_path):
    """Items read back from a reference or cases file must sit in fresh, 64-byte aligned
    memory as a full run's generated items do: CPU matmul kernels may round inputs at other
    alignments differently (a saved-reference verify then differs from a full run on AVX2)."""
    from mmconvert.convert.readers import read_checkpoint
    from mmconvert.verify.cases import default_cases, load_cases_file, write_cases_file

    model = read_checkpoint(make_checkpoint())
    path = tmp_path / "cases.safetensors"
    write_cases_file(path, default_cases(model, generate=0))
    items = [item for case in load_cases_file(path, model, 0)
             for items in case.mm_inputs.values() for item in items]
    assert items and all(item.data_ptr() % 64 == 0 for item in items)


def test_reference_and_cases_files_follow_the_umask(make_checkpoint, tmp_path):
    import os

    from mmconvert.convert.readers import read_checkpoint
    from mmconvert.verify.cases import default_cases, write_cases_file

    old = os.umask(0o022)
    try:
        path = tmp_path / "cases.safetensors"
        write_cases_file(path, default_cases(read_checkpoint(make_checkpoint()), generate=0))
        assert path.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
