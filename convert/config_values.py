"""Typed reads of config values: every number, flag and table mmconvert takes from a
checkpoint's JSON goes through one of these, so that a value of the wrong type or size ends in
one :class:`CheckpointError` line naming the key and the file, never in a traceback, a hang or
a value a writer cannot store.

The rules, the same for every file (``config.json``, its ``text_config`` and
``modality_configs``, ``tokenizer_config.json``, ``generation_config.json``):

* ``null`` means "not set": the documented default applies (or, for a required key, it is
  refused as missing).
* An integer is a JSON integer: ``true``, ``3.5``, ``1e9`` (a float) and ``"7"`` are refused.
  Counts must lie in ``minimum..maximum``; the default maximum is :data:`INT32_MAX`, what
  llama.cpp's and transformers' 32-bit fields hold. Counts that size tensors are further bound
  by the tensors actually present (:func:`mmconvert.convert.readers.common.check_lm_tensors`).
* A flag is a JSON boolean (``"false"`` and ``0`` are refused: ``bool("false")`` is true).
* A float is a JSON number (an integer is fine), finite unless said otherwise.
* Echoed values are cut to :data:`SHOWN_CHARS` characters, so an error line stays short.
"""

from __future__ import annotations

import math
from typing import Any

from mmconvert.errors import CheckpointError

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
SHOWN_CHARS = 60


class _Missing:
    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Missing()


def _refused(where: str, key: str, problem: str) -> CheckpointError:
    """The error for config key ``key`` of file ``where`` (both kept as attributes)."""
    return CheckpointError(f"{where}: {key} {problem}", path=where.split("#")[0], name=key)


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (a user's value echoed in an error)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _lookup(cfg: dict[str, Any], key: str, where: str, default: Any) -> tuple[bool, Any]:
    """(is set, value); refuses a missing required key."""
    value = cfg.get(key)
    if value is not None:
        return True, value
    if default is REQUIRED:
        raise _refused(where, key, "is missing")
    return False, default


def check_int(value: Any, key: str, where: str, *, minimum: int | None = 1,
              maximum: int = INT32_MAX) -> int:
    """``value`` as a count in ``minimum..maximum`` (see the module docstring)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _refused(where, key, f"must be an integer, got {shown(value)}")
    if (minimum is not None and value < minimum) or value > maximum:
        low = "" if minimum is None else f"{minimum}.."
        raise _refused(where, key, f"= {shown(value)} is out of range "
                              f"({low}{maximum})")
    return value


def config_int(cfg: dict[str, Any], key: str, where: str, *, default: Any = REQUIRED,
               minimum: int | None = 1, maximum: int = INT32_MAX, label: str | None = None
               ) -> Any:
    """``cfg[key]`` as a bounded integer; ``default`` when unset (required when omitted)."""
    found, value = _lookup(cfg, key, where, default)
    return check_int(value, label or key, where, minimum=minimum, maximum=maximum) \
        if found else value


def check_float(value: Any, key: str, where: str, *, minimum: float | None = None,
                above: float | None = None, below: float | None = None,
                finite: bool = True) -> float:
    """``value`` as a float: ``>= minimum``, ``> above``, ``< below``, finite unless told."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refused(where, key, f"must be a number, got {shown(value)}")
    number = float(value)
    if finite and not math.isfinite(number):
        raise _refused(where, key, f"must be a finite number, got {shown(value)}")
    bounds = [(minimum is not None and not number >= minimum, f">= {minimum}"),
              (above is not None and not number > above, f"> {above}"),
              (below is not None and not number < below, f"< {below}")]
    for broken, rule in bounds:
        if broken:
            raise _refused(where, key, f"= {shown(value)} must be {rule}")
    return number


def config_float(cfg: dict[str, Any], key: str, where: str, *, default: Any = REQUIRED,
                 minimum: float | None = None, above: float | None = None,
                 below: float | None = None, finite: bool = True, label: str | None = None
                 ) -> Any:
    """``cfg[key]`` as a float (see :func:`check_float`); ``default`` when unset."""
    found, value = _lookup(cfg, key, where, default)
    return check_float(value, label or key, where, minimum=minimum, above=above, below=below,
                       finite=finite) if found else value


_JSON_KINDS = {bool: "true or false", str: "a string", dict: "a JSON object"}


def _config_of(kind: type, cfg: dict[str, Any], key: str, where: str, default: Any,
               label: str | None) -> Any:
    """``cfg[key]`` when it is a JSON value of ``kind``; ``default`` when unset."""
    found, value = _lookup(cfg, key, where, default)
    if found and not isinstance(value, kind):
        raise _refused(where, label or key, f"must be {_JSON_KINDS[kind]}, got {shown(value)}")
    return value


def config_bool(cfg: dict[str, Any], key: str, where: str, *, default: Any = REQUIRED,
                label: str | None = None) -> Any:
    """``cfg[key]`` as a JSON boolean; ``default`` when unset."""
    return _config_of(bool, cfg, key, where, default, label)


def config_str(cfg: dict[str, Any], key: str, where: str, *, default: Any = REQUIRED,
               label: str | None = None) -> Any:
    """``cfg[key]`` as a string; ``default`` when unset."""
    return _config_of(str, cfg, key, where, default, label)


def config_dict(cfg: dict[str, Any], key: str, where: str, *, default: Any = REQUIRED,
                label: str | None = None) -> Any:
    """``cfg[key]`` as a JSON object; ``default`` when unset."""
    return _config_of(dict, cfg, key, where, default, label)


def config_int_list(cfg: dict[str, Any], key: str, where: str, *, minimum: int = 0,
                    maximum: int = INT32_MAX) -> list[int]:
    """``cfg[key]`` as a list of bounded integers (empty when unset)."""
    found, value = _lookup(cfg, key, where, [])
    if not found:
        return []
    if not isinstance(value, list):
        raise _refused(where, key, f"must be a list of integers, got {shown(value)}")
    return [check_int(v, f"{key}[{i}]", where, minimum=minimum, maximum=maximum)
            for i, v in enumerate(value)]
