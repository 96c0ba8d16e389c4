"""Every GGUF fact mmconvert uses, in one place: gguf-py's ``gguf.constants`` where it has the
name, and what it lacks (the projector GGUF of ``docs/gguf-projector.md``, the types and
outtypes mmconvert writes, their precision order).

From gguf-py, unchanged: :class:`GGMLQuantizationType` (ggml.h's ``enum ggml_type``),
:data:`GGML_QUANT_SIZES` (type -> (block size, type size)), :class:`LlamaFileType` (llama.h's
``enum llama_ftype``), :class:`GGUFValueType`, :class:`TokenType`, :data:`GGUF_MAGIC` (the
file's first four bytes as a little-endian u32), :data:`GGUF_VERSION` (the version written),
:data:`GGUF_DEFAULT_ALIGNMENT`. :class:`Keys` is gguf-py's ``Keys`` (``Keys.General.ARCHITECTURE``,
``Keys.LLM.BLOCK_COUNT.format(arch=...)``, ``Keys.Split.LLM_KV_SPLIT_NO``, ...) plus
``Keys.Tokenizer.EOS_IDS`` and ``Keys.Projector`` (:class:`ProjectorKeys`).

Importing this module costs nothing: the ``mmconvert`` CLI reads :data:`OUTTYPES` when it
starts, and ``import gguf`` (its package imports numpy and yaml) takes ~0.2 s. The names from
gguf-py are loaded on first use (PEP 562), by code that reads or writes GGUF anyway.

Example::

    from mmconvert.formats.gguf_constants import GGMLQuantizationType, Keys, file_type
    GGMLQuantizationType.Q8_0.value         # 8
    file_type("Q8_0")                       # LlamaFileType.MOSTLY_Q8_0 (7)
    Keys.LLM.BLOCK_COUNT.format(arch="qwen3")  # 'qwen3.block_count'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguf.constants import (  # noqa: F401
        GGML_QUANT_SIZES,
        GGUF_DEFAULT_ALIGNMENT,
        GGUF_MAGIC,
        GGUF_VERSION,
        GGMLQuantizationType,
        GGUFValueType,
        LlamaFileType,
        TokenType,
    )

# The GGML types mmconvert writes, most precise first: F16 keeps more mantissa than BF16,
# block types go by bits per weight (a K-quant before a legacy type of the same size: its
# scales are searched). ``run`` picks the first a bundle has; ``verify`` holds a target to the
# thresholds of its least precise file. Each has a class in formats/quants.py.
PRECISION_ORDER = ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K",
                   "IQ4_NL", "Q4_0", "IQ4_XS", "Q3_K", "Q2_K")
# llama-quantize's K-quant mixtures mmconvert writes (formats/gguf_mixtures.py has their
# per-tensor rules): file type (LLAMA_FTYPE_MOSTLY_<name>) -> its base type
# (llama_ftype_get_default_type), the least precise type in the file
MIXTURE_BASE = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
                "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
                "Q6_K": "Q6_K", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS"}
# ``to-gguf --outtype`` values (``auto``: BF16, or F16 for an F16 source): the types written
# whole, then the mixtures (a 256-block type is only written as part of one, as llama-quantize
# does: its ``q6_k`` is the mixture with a Q6_K output)
OUTTYPES = (*(t.lower() for t in PRECISION_ORDER if t not in MIXTURE_BASE.values()),
            *(m.lower() for m in MIXTURE_BASE), "auto")
# ``--projector-outtype`` values (docs/gguf-projector.md): the exact types, Q8_0 and the
# K-quants worth a projector (Q4_K and up: the projector is a sliver of the bundle, and its
# error reaches every projected row); PROJECTOR_WEIGHT_TYPES lists what a reader must decode
PROJECTOR_OUTTYPES = ("f32", "f16", "q8_0", "q6_k", "q5_k", "q4_k")
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION
# the llama.cpp architectures of mmconvert's text GGUFs (gguf-py's MODEL_ARCH_NAMES spelling)
TEXT_ARCH, TEXT_MOE_ARCH = "qwen3", "qwen3moe"
TEXT_ARCHS = (TEXT_ARCH, TEXT_MOE_ARCH)
# a scalar GGUF value's struct format (little-endian; numpy reads the same codes), by
# GGUFValueType name; STRING and ARRAY have none
VALUE_FORMATS = {"UINT8": "<B", "INT8": "<b", "UINT16": "<H", "INT16": "<h", "UINT32": "<I",
                 "INT32": "<i", "FLOAT32": "<f", "BOOL": "<?", "UINT64": "<Q", "INT64": "<q",
                 "FLOAT64": "<d"}


# -- the projector GGUF (docs/gguf-projector.md) --------------------------------------------

PROJECTOR_ARCH = "mmproj-embed"
PROJECTOR_TYPE = "mmproj"  # its general.type
FUSION_RULE = "replace-placeholders-else-prepend"
# layer kind as the file stores it -> the spec version that introduced it; a file is stamped
# with the lowest version that describes it (docs/gguf-projector.md, "Versioning")
PROJECTOR_LAYER_KINDS = {"linear": 1, "layer_norm": 1, "act": 1, "glu": 2, "scale": 2}
# GGML type of a projector weight matrix -> the spec version that introduced it: the
# ``--projector-outtype`` types and the K-quants' 32-block fallbacks (Q4_K -> Q5_0, Q5_K -> Q5_1,
# Q6_K -> Q8_0, as llama-quantize falls back); 1-D tensors are always F32
PROJECTOR_WEIGHT_TYPES = {"F32": 1, "F16": 1, "Q8_0": 1, "Q6_K": 3, "Q5_K": 3, "Q4_K": 3,
                          "Q5_1": 3, "Q5_0": 3}
PROJECTOR_SPEC_VERSION = max(*PROJECTOR_LAYER_KINDS.values(),
                             *PROJECTOR_WEIGHT_TYPES.values())  # the newest, written and read
PROJECTOR_WIDENING_KINDS = ("linear", "glu")  # the kinds that may change the width
PROJECTOR_ACTIVATED_KINDS = ("act", "glu")  # the kinds with an entry in layer.activations
PROJECTOR_ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "tanh", "silu")  # the spec's table


class ProjectorKeys:
    """The projector GGUF's own keys; ``{m}`` is a modality name."""

    SPEC_VERSION = f"{PROJECTOR_ARCH}.spec_version"
    EMBEDDING_LENGTH = f"{PROJECTOR_ARCH}.embedding_length"
    MODALITIES = f"{PROJECTOR_ARCH}.modalities"
    FUSION = f"{PROJECTOR_ARCH}.fusion"
    PLACEHOLDER_TOKEN = f"{PROJECTOR_ARCH}.placeholder.token"
    PLACEHOLDER_TOKEN_ID = f"{PROJECTOR_ARCH}.placeholder.token_id"
    INPUT_DIM = f"{PROJECTOR_ARCH}.{{m}}.input_dim"
    HIDDEN_DIM = f"{PROJECTOR_ARCH}.{{m}}.hidden_dim"
    OUTPUT_DIM = f"{PROJECTOR_ARCH}.{{m}}.output_dim"
    # per-layer arrays: LAYER.format(m=modality, column="kinds")
    LAYER = f"{PROJECTOR_ARCH}.{{m}}.layer.{{column}}"
    LAYER_COLUMNS = ("names", "kinds", "in_dims", "out_dims", "activations", "eps", "has_bias")
    OPTIONAL_LAYER_COLUMNS = ("gates", "folded_from")  # informational (spec version 2)


# -- from gguf-py, loaded on first use --------------------------------------------------------

_FROM_GGUF_PY = ("GGMLQuantizationType", "GGML_QUANT_SIZES", "LlamaFileType", "GGUFValueType",
                 "TokenType", "GGUF_MAGIC", "GGUF_VERSION", "GGUF_DEFAULT_ALIGNMENT")


def _keys() -> type:
    from gguf.constants import Keys as GGUFKeys

    class Keys(GGUFKeys):
        """gguf-py's GGUF keys, plus the ones mmconvert writes that it has no name for."""

        class Tokenizer(GGUFKeys.Tokenizer):
            EOS_IDS = "tokenizer.ggml.eos_token_ids"  # every eos id, the primary first

        Projector = ProjectorKeys

    return Keys


def __getattr__(name: str) -> Any:
    if name in _FROM_GGUF_PY:
        import gguf.constants

        value = getattr(gguf.constants, name)
    elif name == "Keys":
        value = _keys()
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_FROM_GGUF_PY, "Keys"])


def base_type(quant: str) -> str:
    """The least precise type of a file: a mixture's base type (``Q4_K_M`` -> ``Q4_K``), else
    ``quant`` itself."""
    return MIXTURE_BASE.get(quant.upper(), quant.upper())


def precision_rank(quant: str) -> int:
    """Where a file of ``quant`` (a type or a mixture) goes in :data:`PRECISION_ORDER`, by its
    least precise type (0 is the most precise); ``len(PRECISION_ORDER)`` when unknown."""
    base = base_type(quant)
    return PRECISION_ORDER.index(base) if base in PRECISION_ORDER else len(PRECISION_ORDER)


def file_type(ggml_type: str) -> LlamaFileType:
    """llama.cpp's ``general.file_type`` for a file whose weights are ``ggml_type``."""
    from gguf.constants import LlamaFileType

    return LlamaFileType[("ALL_" if ggml_type == "F32" else "MOSTLY_") + ggml_type]


def file_type_name(value: int) -> str | None:
    """The GGML type name of a ``general.file_type`` value (``7`` -> ``"Q8_0"``); ``None``
    for a value this gguf-py does not know."""
    from gguf.constants import LlamaFileType

    try:
        return LlamaFileType(int(value)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return None
