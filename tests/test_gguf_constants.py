"""The GGUF constants module: gguf-py's names where it has them, cheap to import, and every
type mmconvert writes backed by a quant class."""

from __future__ import annotations

import subprocess
import sys

import gguf

from mmconvert.convert.model import LAYER_KINDS
from mmconvert.formats import gguf_constants as gc
from mmconvert.formats import quants


def test_gguf_py_names_are_gguf_py_objects():
    assert gc.GGMLQuantizationType is gguf.GGMLQuantizationType
    assert gc.GGML_QUANT_SIZES is gguf.GGML_QUANT_SIZES
    assert gc.LlamaFileType is gguf.LlamaFileType
    assert gc.GGUFValueType is gguf.GGUFValueType
    assert gc.TokenType is gguf.TokenType
    assert issubclass(gc.Keys, gguf.Keys)
    assert gc.Keys.General.ARCHITECTURE == "general.architecture"
    assert gc.Keys.Tokenizer.EOS_ID == gguf.Keys.Tokenizer.EOS_ID
    assert gc.Keys.Projector.MODALITIES == "mmproj-embed.modalities"


def test_import_loads_neither_gguf_nor_numpy():
    code = ("import sys, mmconvert.formats.gguf_constants as c; c.OUTTYPES; c.PRECISION_ORDER\n"
            "assert not {'gguf', 'numpy'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_written_type_has_a_quant_class_and_a_file_type():
    assert set(gc.PRECISION_ORDER) == set(quants.TYPES)
    for outtype in gc.OUTTYPES[:-1]:  # every file mmconvert writes has its file type
        assert gc.file_type_name(gc.file_type(outtype.upper())) == outtype.upper()
    assert gc.file_type("F32") == 0 and gc.file_type("Q8_0") == 7 and gc.file_type("BF16") == 32
    assert gc.file_type("Q4_K_M") == 15 and gc.file_type("IQ4_XS") == 30
    assert gc.file_type_name(10_000) is None
    # outtypes: the types written whole, the llama-quantize mixtures (whose 256-block base
    # types are written only inside one), then auto
    whole = [t.lower() for t in gc.PRECISION_ORDER if t not in gc.MIXTURE_BASE.values()]
    assert (*whole, *(m.lower() for m in gc.MIXTURE_BASE), "auto") == gc.OUTTYPES
    assert {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q6_k", "iq4_xs"} <= set(gc.OUTTYPES)
    assert len(set(gc.OUTTYPES)) == len(gc.OUTTYPES)


def test_precision_rank_of_a_mixture_is_its_base_type():
    assert gc.base_type("q4_k_m") == "Q4_K" and gc.base_type("Q8_0") == "Q8_0"
    assert gc.precision_rank("F32") == 0
    assert gc.precision_rank("Q8_0") < gc.precision_rank("Q4_0")
    assert gc.precision_rank("Q4_K_M") == gc.precision_rank("Q4_K") == \
        gc.precision_rank("q4_k_s")
    assert gc.precision_rank("nonsense") == len(gc.PRECISION_ORDER)


def test_precision_order_goes_by_bits_per_weight():
    bits = [quants.TYPES[t].bits_per_weight for t in gc.PRECISION_ORDER]
    assert bits == sorted(bits, reverse=True)


def test_projector_gguf_kinds_are_canonical_kinds():
    assert set(gc.PROJECTOR_LAYER_KINDS) <= set(LAYER_KINDS)
    assert gc.PROJECTOR_SPEC_VERSION == 3
