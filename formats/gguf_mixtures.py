"""llama-quantize's K-quant mixtures as data: which GGML type each tensor of a ``qwen3`` /
``qwen3moe`` GGUF gets for a file type (``Q4_K_M``, ...), as the pinned llama.cpp's
``llama_tensor_get_type`` (``src/llama-quant.cpp``) chooses it.

:data:`MIXTURES` holds, per file type, its base type (``llama_ftype_get_default_type``) and an
ordered list of :class:`Rule` (role, type, conditions): the first rule whose role matches the
tensor and whose conditions all hold gives the type, else the base type does. Rules shared by
every mixture come first (:data:`COMMON_RULES`). :func:`choose_types` evaluates them over a
model's tensors with llama-quantize's precedence (tensors it never quantizes, then
``--token-embedding-type`` / ``--output-tensor-type``, ``--tensor-type`` patterns, ``--pure``,
the rules, the block-size fallbacks of :data:`FALLBACKS`), and counts layers the way
llama-quant.cpp counts them. :func:`mixture_table` prints the table (``docs/quantization.md``).

Pure: no I/O, no numpy. Only the llama.cpp branches reachable from these file types and
architectures are here (no Falcon, LLaMA-70B, IQ1/IQ2/IQ3 or MXFP4 rules).

Example::

    facts = ModelFacts(n_layer=28, n_head=16, n_head_kv=8)
    choices = choose_types("Q4_K_M", [("blk.0.attn_v.weight", (1024, 1024))], facts)
    choices["blk.0.attn_v.weight"].ggml_type   # 'Q6_K' (layer 0 is a "more bits" layer)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from mmconvert.errors import UsageError
from mmconvert.formats.gguf_constants import MIXTURE_BASE

# ggml's block sizes (values per block) of every type a mixture, a fallback or an override can
# produce: the rules need them before any kernel exists (gguf-py's GGML_QUANT_SIZES agrees,
# tests/test_gguf_mixtures.py checks it)
BLOCK_SIZES = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q5_1": 32, "Q5_0": 32, "Q4_1": 32,
               "Q4_0": 32, "IQ4_NL": 32, "Q6_K": 256, "Q5_K": 256, "Q4_K": 256, "Q3_K": 256,
               "Q2_K": 256, "IQ4_XS": 256}
OVERRIDE_TYPES = tuple(BLOCK_SIZES)  # what --tensor-type & co. may name (mmconvert writes these)

# tensor_type_fallback: a type whose block does not divide the row length -> the 32-block type
# tried instead; a 32-block type that does not fit either becomes F16
FALLBACKS = {"IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0",
             "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


@dataclass(frozen=True)
class ModelFacts:
    """What the rules read about the model (llama.cpp's hparams)."""

    n_layer: int  # block_count (llama.cpp's n_layer_all)
    n_head: int
    n_head_kv: int
    n_expert: int = 0  # expert_count; 0 for a dense model

    @property
    def gqa(self) -> int:  # llama_hparams::n_gqa(): integer division, 0 without kv heads
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


@dataclass(frozen=True)
class Overrides:
    """llama-quantize's ``--output-tensor-type``, ``--token-embedding-type``, ``--tensor-type
    PATTERN=TYPE`` (in order; the first pattern found in a name wins) and ``--pure``."""

    output_tensor_type: str | None = None
    token_embedding_type: str | None = None
    tensor_types: tuple[tuple[str, str], ...] = ()
    pure: bool = False

    def __bool__(self) -> bool:
        return bool(self.output_tensor_type or self.token_embedding_type or self.tensor_types
                    or self.pure)

    def describe(self) -> str:
        parts = [f"--output-tensor-type {self.output_tensor_type.lower()}"
                 if self.output_tensor_type else "",
                 f"--token-embedding-type {self.token_embedding_type.lower()}"
                 if self.token_embedding_type else "",
                 *(f"--tensor-type {p}={t.lower()}" for p, t in self.tensor_types),
                 "--pure" if self.pure else ""]
        return " ".join(p for p in parts if p)

    def to_json(self) -> dict:
        return {"output_tensor_type": self.output_tensor_type,
                "token_embedding_type": self.token_embedding_type,
                "tensor_types": [f"{p}={t}" for p, t in self.tensor_types], "pure": self.pure}


NO_OVERRIDES = Overrides()


@dataclass(frozen=True)
class Rule:
    """``role`` tensors get ``ggml_type`` when every condition in ``when`` holds."""

    role: str
    ggml_type: str
    when: tuple[str, ...] = ()

    def describe(self) -> str:
        return self.ggml_type + (f" if {' and '.join(self.when)}" if self.when else "")


@dataclass(frozen=True)
class Mixture:
    name: str  # the file type (LLAMA_FTYPE_MOSTLY_<name>)
    base: str  # llama_ftype_get_default_type
    rules: tuple[Rule, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Choice:
    """A tensor's type (None: llama-quantize does not quantize it and keeps the input type)
    and why, for ``--dry-run``."""

    ggml_type: str | None
    reason: str


# -- roles: llama-quant.cpp's tensor_get_category, first match wins -------------------------

_CATEGORIES = (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
               ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
               ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
               ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))
_ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")  # category_is_attn_v: share attn_v's rules
ROLES = ("output", "token_embd", "attn_v", "attn_k", "attn_q", "attn_output", "ffn_down",
         "ffn_gate", "ffn_up")


def category(name: str) -> str:
    """llama-quant.cpp's category of a tensor name (``other`` when none)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((cat for needle, cat in _CATEGORIES if needle in name), "other")


def _role(cat: str, tied: bool) -> str:
    """The rule role of a category: a tied token embedding is the output projection too."""
    if cat == "token_embd" and tied:
        return "output"
    return "attn_v" if cat in _ATTN_V_LIKE else cat


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization for qwen3/qwen3moe names: 2-D and 3-D ``*weight`` tensors
    except norms and the MoE router (ggml's n_dims ignores leading size-1 numpy axes)."""
    dims = len(shape)
    while dims > 1 and shape[len(shape) - dims] == 1:
        dims -= 1
    return (dims >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


# -- conditions: (tensor index i, count n, facts, context) -> bool --------------------------

def use_more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's use_more_bits (C integer division)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class _Context:
    i: int  # attn_v: how many attn_v tensors went through the rules before; ffn_*: the layer
    n: int  # attn_v: attn_v tensors in the file; ffn_*: block_count
    facts: ModelFacts
    row: int  # row length (ggml's ne[0])
    base: str
    has_imatrix: bool


CONDITIONS: dict[str, tuple[str, Callable[[_Context], bool]]] = {
    "8_experts": ("the model has exactly 8 experts", lambda c: c.facts.n_expert == 8),
    "not_8_experts": ("not exactly 8 experts", lambda c: c.facts.n_expert != 8),
    "gqa>=4": ("n_head / n_head_kv >= 4", lambda c: c.facts.gqa >= 4),
    "i<2": ("i < 2", lambda c: c.i < 2),
    "i<4": ("i < 4", lambda c: c.i < 4),
    "i<n/16": ("i < n/16", lambda c: c.i < c.n // 16),
    "i<n/8": ("i < n/8", lambda c: c.i < c.n // 8),
    "more_bits": ("use_more_bits(i, n): i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2",
                  lambda c: use_more_bits(c.i, c.n)),
    "no_imatrix": ("no importance matrix given", lambda c: not c.has_imatrix),
    "row%base": ("the row length is not a multiple of the base type's block",
                 lambda c: c.row % BLOCK_SIZES[c.base] != 0),
}

# every mixture here, before its own rules (the 8-expert attn_v/attn_k bumps override anything
# the file type's own branch chose, so they may go first)
COMMON_RULES = (
    Rule("output", "Q8_0", ("row%base",)),
    Rule("output", "Q6_K"),
    Rule("attn_v", "Q8_0", ("8_experts",)),
    Rule("attn_k", "Q8_0", ("8_experts",)),
)
_MOE8_ATTN_OUTPUT = Rule("attn_output", "Q5_K", ("8_experts",))

_OWN_RULES: dict[str, tuple[Rule, ...]] = {
    "Q2_K": (Rule("attn_v", "Q4_K", ("gqa>=4",)), Rule("attn_v", "Q3_K"),
             Rule("ffn_down", "Q3_K"),
             _MOE8_ATTN_OUTPUT, Rule("attn_output", "Q3_K", ("not_8_experts",))),
    "Q3_K_S": (_MOE8_ATTN_OUTPUT,),
    "Q3_K_M": (Rule("attn_v", "Q5_K", ("i<2",)), Rule("attn_v", "Q4_K"),
               Rule("ffn_down", "Q5_K", ("i<n/16",)), Rule("ffn_down", "Q4_K"),
               _MOE8_ATTN_OUTPUT, Rule("attn_output", "Q4_K", ("not_8_experts",))),
    "Q3_K_L": (Rule("attn_v", "Q5_K"), Rule("ffn_down", "Q5_K"),
               Rule("attn_output", "Q5_K", ("not_8_experts",))),
    "Q4_K_S": (Rule("attn_v", "Q5_K", ("i<4",)), Rule("ffn_down", "Q5_K", ("i<n/8",)),
               _MOE8_ATTN_OUTPUT),
    "Q4_K_M": (Rule("attn_v", "Q6_K", ("more_bits",)), Rule("ffn_down", "Q6_K", ("more_bits",)),
               _MOE8_ATTN_OUTPUT),
    "Q5_K_S": (),
    "Q5_K_M": (Rule("attn_v", "Q6_K", ("more_bits",)), Rule("ffn_down", "Q6_K", ("more_bits",))),
    "Q6_K": (),
    "IQ4_NL": (Rule("attn_v", "Q5_K", ("gqa>=4",)),
               Rule("ffn_down", "Q5_K", ("i<n/8", "no_imatrix")), _MOE8_ATTN_OUTPUT),
    "IQ4_XS": (Rule("attn_v", "Q5_K", ("gqa>=4",)),
               Rule("ffn_down", "Q5_K", ("i<n/8", "no_imatrix")), _MOE8_ATTN_OUTPUT),
}

MIXTURES: dict[str, Mixture] = {name: Mixture(name, MIXTURE_BASE[name], COMMON_RULES + own)
                                for name, own in _OWN_RULES.items()}


# -- evaluation ----------------------------------------------------------------------------

_LAYER = re.compile(r"blk\.([+-]?\d+)")


def _layer(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def llama_order(name: str) -> tuple[int, str]:
    """The order llama-quantize visits tensors in (its loader's weights_map: by layer, tensors
    outside a layer first, then by name): the order its counters count in."""
    layer = _layer(name)
    return (-1 if layer is None else layer, name)


def fallback(ggml_type: str, row: int) -> tuple[str, str]:
    """tensor_type_fallback: (type, reason) for a row of ``row`` values."""
    if row % BLOCK_SIZES[ggml_type] == 0:
        return ggml_type, ""
    out = FALLBACKS.get(ggml_type, ggml_type)
    if BLOCK_SIZES[out] > 32:
        raise ValueError(f"no tensor type fallback is defined for {ggml_type}")
    if row % BLOCK_SIZES[out]:
        out = "F16"
    return out, f"; row of {row} is not a multiple of {BLOCK_SIZES[ggml_type]}: {ggml_type} -> {out}"


def _by_rules(mixture: Mixture, role: str, ctx: _Context) -> tuple[str, str]:
    for rule in mixture.rules:
        if rule.role == role and all(CONDITIONS[c][1](ctx) for c in rule.when):
            return rule.ggml_type, f"{role} rule: {rule.describe()}"
    return mixture.base, "base type"


def choose_types(ftype: str, tensors: Iterable[tuple[str, Sequence[int]]], facts: ModelFacts,
                 overrides: Overrides = NO_OVERRIDES, has_imatrix: bool = False
                 ) -> dict[str, Choice]:
    """Name -> :class:`Choice` for every tensor (numpy-order shapes), as llama-quantize would
    choose for file type ``ftype`` (a :data:`MIXTURES` key)."""
    mixture = MIXTURES[ftype]
    tensors = sorted(((n, tuple(s)) for n, s in tensors), key=lambda t: llama_order(t[0]))
    tied = all(name != "output.weight" for name, _ in tensors)
    n_attn_v = sum(category(name) in _ATTN_V_LIKE for name, _ in tensors)
    patterns = [(re.compile(p), p, t) for p, t in overrides.tensor_types]
    seen = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}  # llama's i_* counters
    out: dict[str, Choice] = {}
    for name, shape in tensors:
        cat = category(name)
        if not quantizable(name, shape):
            out[name] = Choice(None, "not quantized (1-D, norm or MoE router)")
            continue
        # these two are taken as given, without the fallback (llama-quantize fails later on a
        # row they do not fit; mmconvert refuses here)
        given = {"token_embd": (overrides.token_embedding_type, "--token-embedding-type"),
                 "output": (overrides.output_tensor_type, "--output-tensor-type")}.get(cat)
        if given and given[0]:
            _check_fits(given[0], shape, f"{given[1]} {given[0].lower()}", name)
            out[name] = Choice(given[0], given[1])
            continue
        match = next(((p, t) for rx, p, t in patterns if rx.search(name)), None)
        if match:
            chosen, why = match[1], f"--tensor-type {match[0]}={match[1]}"
        elif overrides.pure:
            chosen, why = mixture.base, "--pure"
        else:
            role = _role(cat, tied)
            if role == "output" and overrides.output_tensor_type:  # a tied token embedding
                chosen, why = overrides.output_tensor_type, "--output-tensor-type (tied)"
            else:
                chosen, why = _by_rules(mixture, role, _context(role, name, seen, n_attn_v,
                                                                facts, shape, mixture,
                                                                has_imatrix))
            if role in seen:
                seen[role] += 1
        chosen, fell = fallback(chosen, shape[-1])
        out[name] = Choice(chosen, why + fell)
    return out


def _check_fits(ggml_type: str, shape: tuple[int, ...], option: str, name: str) -> None:
    if shape[-1] % BLOCK_SIZES[ggml_type]:
        raise ValueError(f"{option}: rows of {name} hold {shape[-1]} values, not a multiple of "
                         f"the {ggml_type} block of {BLOCK_SIZES[ggml_type]}")


def _context(role: str, name: str, seen: dict[str, int], n_attn_v: int, facts: ModelFacts,
             shape: tuple[int, ...], mixture: Mixture, has_imatrix: bool) -> _Context:
    if role == "attn_v":
        i, n = seen["attn_v"], n_attn_v
    elif role in seen:  # ffn_*: the layer, counted, or read from the name with experts
        i, n = seen[role], facts.n_layer
        if max(1, facts.n_expert) > 1:
            layer = _layer(name)
            if layer is None or not 0 <= layer < facts.n_layer:
                raise ValueError(f"cannot tell the layer of {name} (block_count {facts.n_layer})")
            i = layer
    else:
        i, n = 0, 0
    return _Context(i, n, facts, shape[-1], mixture.base, has_imatrix)


# -- parsing the overrides -----------------------------------------------------------------

def parse_type(text: str, option: str) -> str:
    """A GGML type name as llama-quantize reads one (any case) -> its upper-case name."""
    name = text.strip().upper()
    if name not in OVERRIDE_TYPES:
        raise UsageError(f"{option} {text}: unknown type (choose one of "
                         f"{', '.join(t.lower() for t in OVERRIDE_TYPES)})")
    return name


def parse_tensor_type(spec: str) -> tuple[str, str]:
    """``PATTERN=TYPE`` -> (pattern, TYPE). As llama-quantize: split at the first ``=``, the
    pattern lower-cased, then searched anywhere in a tensor name as a regular expression."""
    pattern, sep, type_text = spec.partition("=")
    if not sep or not pattern or not type_text:
        raise UsageError(f"--tensor-type {spec}: expected PATTERN=TYPE (e.g. attn_v=q8_0)")
    pattern = pattern.lower()
    try:
        re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--tensor-type {spec}: {pattern!r} is not a regular expression "
                         f"({exc})") from None
    return pattern, parse_type(type_text, "--tensor-type")


def make_overrides(output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                   tensor_types: Iterable[str] = (), pure: bool = False) -> Overrides:
    """:class:`Overrides` from option values (types by name, specs ``PATTERN=TYPE``);
    :class:`~mmconvert.errors.UsageError` naming the option for a bad one."""
    return Overrides(
        parse_type(output_tensor_type, "--output-tensor-type") if output_tensor_type else None,
        parse_type(token_embedding_type, "--token-embedding-type")
        if token_embedding_type else None,
        tuple(parse_tensor_type(spec) for spec in tensor_types), bool(pure))


# -- the printable table ---------------------------------------------------------------------

_TABLE_ROLES = (("output", "output (and a tied token_embd)"), ("token_embd", "token_embd"),
                ("attn_v", "attn_v (attn_qkv)"), ("attn_k", "attn_k"),
                ("attn_output", "attn_output"), ("ffn_down", "ffn_down (ffn_down_exps)"))


def mixture_table() -> str:
    """The mixtures as markdown (``docs/quantization.md``): per role, its rules in order (the
    first that holds wins; ``base`` where none does), the conditions, the fallbacks and the
    order in which llama-quantize applies its options."""
    from mmconvert.formats.gguf_constants import file_type

    head = ["`--outtype`", "file_type", "base", *(label for _, label in _TABLE_ROLES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in MIXTURES.values():
        cells = [f"`{m.name.lower()}`", str(int(file_type(m.name))), m.base]
        for role, _ in _TABLE_ROLES:
            rules = [r for r in m.rules if r.role == role]
            text = [r.describe() for r in rules]
            if rules and rules[-1].when:
                text.append("else base")
            cells.append("; ".join(text) or "base")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every other weight matrix (attn_q, ffn_gate, ffn_up and their _exps) gets the "
              "base type; 1-D tensors, norms and the MoE router are not quantized (F32).", "",
              "Conditions (`i`, `n`: for attn_v, how many attn_v tensors went through these "
              "rules before this one, in llama-quantize's order, and how many the file has; for "
              "ffn_down, the layer and block_count):", ""]
    lines += [f"- `{key}`: {text}" for key, (text, _) in CONDITIONS.items()]
    lines += ["", "When a row is not a multiple of the chosen type's block: "
              + ", ".join(f"{a} → {b}" for a, b in FALLBACKS.items())
              + "; a 32-block type that does not fit either → F16.", "",
              "Precedence: not quantizable → kept; `--token-embedding-type` (token_embd) and "
              "`--output-tensor-type` (output) as given; the first `--tensor-type` pattern "
              "found in the name; `--pure` → base; the rules above (a tied token_embd takes "
              "`--output-tensor-type` here); then the fallback."]
    return "\n".join(lines)
