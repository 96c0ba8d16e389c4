"""JSON from checkpoints, parsed with the limits of the Rust libraries that read it too.

``json.loads`` recurses once per nesting level, so a file nested a few thousand deep ends in a
RecursionError. safetensors and tokenizers parse with serde_json, whose recursion limit lets
127 nested arrays/objects through and refuses the 128th; :func:`nesting_depth` measures a text
without recursing (C-speed passes over the bytes), so the same limit applies here before
``json.loads`` runs. :func:`loads_like_serde` also refuses what serde_json refuses and Python
accepts: ``NaN``/``Infinity``, numbers out of double range, lone UTF-16 surrogates.
"""

from __future__ import annotations

import gc
import json
import math
import re
from typing import Any

import numpy as np

MAX_DEPTH = 127  # serde_json (safetensors, tokenizers) refuses the 128th nested level
# bracket -> +1 / -1 as int8 bytes; everything but quotes and brackets is deleted first
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_STRUCTURAL = bytes(c for c in range(256) if c not in b'"[]{}')
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_CHUNK = 1 << 22


class JSONTooDeep(ValueError):
    """The text nests arrays/objects deeper than :data:`MAX_DEPTH`."""


def nesting_depth(text: str) -> int:
    """The deepest nesting of arrays/objects in ``text`` (brackets inside strings ignored).

    Only C-speed passes: drop escaped backslashes and quotes (JSON escapes pair up from the
    left, as ``str.replace`` scans), keep the quotes and brackets, take the pieces between
    string literals, and sum +1/-1 over their brackets."""
    unescaped = text.replace("\\\\", "").replace('\\"', "")
    kept = unescaped.encode("utf-8", "surrogatepass").translate(None, _NOT_STRUCTURAL)
    # two adjacent quotes change no bracket's inside/outside parity: dropping them first
    # leaves only the (rare) strings that hold brackets to split on
    kept = kept.replace(b'""', b"")
    steps = b"".join(kept.split(b'"')[::2]).translate(_STEPS)
    depth = peak = 0
    for start in range(0, len(steps), _CHUNK):  # chunks keep the int64 running sum small
        chunk = np.frombuffer(steps, np.int8, min(_CHUNK, len(steps) - start), start)
        running = np.cumsum(chunk, dtype=np.int64) + depth
        peak = max(peak, int(running.max()))
        depth = int(running[-1])
    return peak


def check_depth(text: str, max_depth: int = MAX_DEPTH) -> None:
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JSONTooDeep(f"nested {depth} levels deep (the limit is {max_depth})")


def loads_limited(text: str, **kwargs: Any) -> Any:
    """``json.loads`` after the depth check: never a RecursionError."""
    check_depth(text)
    return json.loads(text, **kwargs)


class JSONObject(dict):
    """A parsed object that remembers every (key, value) pair, duplicates included."""

    pairs: list[tuple[str, Any]]

    @property
    def duplicates(self) -> set[str]:
        if len(self.pairs) == len(self):
            return set()
        seen: set[str] = set()
        return {k for k, _ in self.pairs if k in seen or seen.add(k)}

    def duplicated(self, key: str) -> bool:
        return len(self.pairs) != len(self) and sum(k == key for k, _ in self.pairs) > 1


def _object(pairs: list[tuple[str, Any]]) -> JSONObject:
    obj = JSONObject(pairs)  # the last of duplicate keys wins, as in serde_json's maps
    obj.pairs = pairs
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range: {text[:20]}")
    return value


def _integer(text: str) -> int | float:
    if len(text) < 300 and text != "-0":  # the common case, kept cheap
        return int(text)
    if text == "-0":  # serde_json reads -0 as the double -0.0: not an unsigned integer
        return -0.0
    if math.isinf(float(text)):  # serde_json falls back to a double past u64, then refuses
        raise ValueError(f"number out of range: {text[:20]}...")
    return int(text)


def loads_like_serde(text: str) -> Any:
    """Parse ``text`` as serde_json would: objects become :class:`JSONObject`."""
    collecting = gc.isenabled()
    gc.disable()  # a header of 100k tensors is 100k small objects: GC passes would dominate
    try:
        obj = loads_limited(text, object_pairs_hook=_object, parse_constant=_refuse_constant,
                            parse_float=_finite_float, parse_int=_integer)
    finally:
        if collecting:
            gc.enable()
    if _SURROGATE_ESCAPE.search(text):
        # a lone surrogate only comes from a \u escape; encoding the result finds it
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("lone surrogate in a \\u escape") from exc
    return obj
