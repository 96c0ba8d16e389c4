"""The real llama.cpp (llama-cpp-python) loads every text GGUF we write, tokenizes like the HF
tokenizer, and stops on every eos id.

llama.cpp 0.3.36's CPU backend crashes (SIGSEGV in ``ggml_backend_amx_mul_mat``) when it runs
Q8_0/Q4 matmuls through its AMX "extra buffer" on CPUs that have AMX, also on files its own
``llama-quantize`` writes; loading with ``use_extra_bufts = False`` avoids that path.
"""

import json
import shutil
from contextlib import contextmanager

import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from mmconvert.cli import main
from mmconvert.convert.readers import read_checkpoint
from testkit.qwen_vocab import write_qwen_vocab_checkpoint

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say it's DONE; we've seen THAT'S true.",
    "你好，世界！多模态模型可以理解图像和声音。今天天气很好。",
    "日本語のテキストと한국어 텍스트, Привет мир, مرحبا بالعالم",
    "def forward(self, x):\n    return self.fc2(self.act(self.fc1(x)))\n",
    "for i in range(10):\n\tprint(i * 2, \"value\", [1, 2, 3])  # comment\r\n",
    "Emoji: 🙂 🚀 🎉 👩‍💻 👍🏽 — and ✨sparkles✨",
    "whitespace runs:    four spaces,\t\ttabs\n\n\nnewlines   \n  ",
    "digits 0 1 2 3 12345 3.14159 1,000,000 2026-11-21 0x1F",
    "  leading and trailing spaces  ",
    "Grüße aus München, ça va? ¿Dónde está la biblioteca? Ελληνικά",
]


@contextmanager
def llama(path, **kw):
    """A loaded llama.cpp model (extra buffer types off: see the module docstring)."""
    defaults = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=False, n_ctx=64, verbose=False,
                              **kw)
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = defaults
    try:
        yield llm
    finally:
        llm.close()


def convert(ckpt, out, *args):
    result = CliRunner().invoke(main, ["to-gguf", str(ckpt), "-o", str(out), *map(str, args)])
    assert result.exit_code == 0, result.output
    return out


def texts_with_specials(model):
    specials = [t["content"] for t in model.tokenizer.added_tokens]
    mixed = [f"{specials[i % len(specials)]}{text}{specials[(i + 1) % len(specials)]}"
             for i, text in enumerate(CORPUS)]
    return CORPUS + mixed + ["".join(specials), " ".join(specials)]


def check_gguf(path, ckpt, *, first_shard=None):
    """Load ``path`` in llama.cpp; tokenization and the EOG set against the HF tokenizer."""
    model = read_checkpoint(ckpt)
    hf = Tokenizer.from_file(str(model.tokenizer.directory / "tokenizer.json"))
    with llama(first_shard or path) as llm:
        assert llm.n_vocab() == model.text.vocab_size
        for text in texts_with_specials(model):
            want = hf.encode(text, add_special_tokens=False).ids
            got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            assert got == want, text
        vocab = llm._model.vocab
        for eos in model.special.eos:
            assert llama_cpp.llama_vocab_is_eog(vocab, eos), eos
        assert llama_cpp.llama_vocab_eos(vocab) == model.special.eos_id


@pytest.fixture(scope="module")
def qwen_ckpt(tmp_path_factory):
    return write_qwen_vocab_checkpoint(tmp_path_factory.mktemp("qwen") / "qwenmm")


@pytest.mark.parametrize("variant, options, outtypes", [
    ("default", {}, ["f32", "f16", "bf16", "q8_0"]),
    ("tied", {"tied": True, "activation": "silu"}, ["q4_0", "q5_1"]),
    ("padded-vocab", {"resize_vocab": False}, ["q4_1", "q5_0"]),
])
def test_llama_cpp_loads_and_tokenizes(make_checkpoint, tmp_path, variant, options, outtypes):
    ckpt = make_checkpoint(**options)
    out = convert(ckpt, tmp_path / "o", *[a for t in outtypes for a in ("--outtype", t)])
    texts = sorted(p for p in out.glob("ckpt-*.gguf"))
    assert len(texts) == len(outtypes)
    for path in texts:
        check_gguf(path, ckpt)


def yarn_scaling(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 1024}
    (ckpt / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("variant, args, edit", [
    ("interleaved-rope", ["--rope-layout", "interleaved", "--outtype", "q4_1"], None),
    ("yarn", ["--outtype", "q5_0", "--name", "My Model"], yarn_scaling),
    ("projector-q8", ["--outtype", "bf16", "--projector-outtype", "q8_0"], None),
])
def test_llama_cpp_loads_other_variants(example_ckpt, tmp_path, variant, args, edit):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_ckpt, ckpt)
    if edit:
        edit(ckpt)
    out = convert(ckpt, tmp_path / "o", *args)
    (path,) = [p for p in out.glob("*.gguf") if not p.name.startswith("mmproj-")]
    check_gguf(path, ckpt)


def test_llama_cpp_with_the_real_qwen_vocabulary(qwen_ckpt, tmp_path):
    out = convert(qwen_ckpt, tmp_path / "o", "--outtype", "f16", "--outtype", "q8_0")
    texts = sorted(out.glob("qwenmm-*.gguf"))
    assert [p.name.rsplit("-", 1)[1] for p in texts] == ["F16.gguf", "Q8_0.gguf"]
    for path in texts:
        check_gguf(path, qwen_ckpt)


def test_llama_cpp_stops_on_extra_eos_ids(example_ckpt, tmp_path):
    """eos ids whose text llama.cpp does not know are reachable through eot/eom."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(example_ckpt, ckpt)
    gen = json.loads((ckpt / "generation_config.json").read_text())
    gen["eos_token_id"] = [*gen["eos_token_id"], 300, 301]
    (ckpt / "generation_config.json").write_text(json.dumps(gen))
    out = convert(ckpt, tmp_path / "o", "--outtype", "f16")
    check_gguf(next(out.glob("ckpt-*.gguf")), ckpt)


def test_llama_cpp_loads_split_output(example_ckpt, tmp_path):
    out = convert(example_ckpt, tmp_path / "o", "--outtype", "f16", "--split-max-size", "60K")
    shards = sorted(out.glob("ckpt-124K-F16-*-of-*.gguf"))
    assert len(shards) >= 3
    check_gguf(shards[0], example_ckpt)
    with llama(shards[0], logits_all=True) as llm:
        llm.eval([1, 2, 3])


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_llama_cpp_runs_the_model(example_ckpt, tmp_path, outtype):
    """A forward pass runs on quantized files (their parity is the verify harness's job)."""
    import numpy as np

    out = convert(example_ckpt, tmp_path / "o", "--outtype", outtype)
    (path,) = out.glob("ckpt-*.gguf")
    with llama(path, logits_all=True) as llm:
        llm.eval([5, 6, 7, 8])
        scores = np.asarray(llm.scores[:4])
    assert scores.shape == (4, read_checkpoint(example_ckpt).text.vocab_size)
    assert np.isfinite(scores).all() and scores.std() > 0


@pytest.mark.parametrize("variant, options", [
    ("dense", {}), ("tied", {"tied": True}),
    ("moe", {"num_experts": 4, "num_experts_per_tok": 2}),
])
def test_f32_gguf_logits_match_the_independent_reference(make_checkpoint, tmp_path, variant,
                                                         options):
    """Tensor names, orientations and hyper-parameters are right: llama.cpp on the F32 file
    (F32 KV cache) reproduces transformers on the source checkpoint."""
    import numpy as np

    from tests.independent_reference import SeedModel

    ckpt = make_checkpoint(**options)
    out = convert(ckpt, tmp_path / "o", "--outtype", "f32")
    (path,) = out.glob("ckpt-*.gguf")
    ids = [5, 17, 42, 99, 3, 250, 7, 7, 1]
    want = SeedModel(ckpt).logits(ids, None).numpy()
    with llama(path, logits_all=True, type_k=0, type_v=0) as llm:  # 0: GGML_TYPE_F32
        llm.eval(ids)
        got = np.asarray(llm.scores[:len(ids)])
    assert np.abs(got - want).max() <= 1e-4


def test_moe_gguf_loads_and_tokenizes(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(num_experts=4, num_experts_per_tok=2)
    out = convert(ckpt, tmp_path / "o", "--outtype", "q8_0")
    check_gguf(next(out.glob("ckpt-*.gguf")), ckpt)
