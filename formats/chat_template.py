"""Chat templates rendered as transformers renders them, but bounded in time and size.

A chat template (``tokenizer_config.json``'s ``chat_template``, ``chat_template.jinja``, a GGUF's
``tokenizer.chat_template``) is code from the checkpoint. jinja2's
``ImmutableSandboxedEnvironment`` keeps it away from Python internals, not from looping forever
or filling memory, and a thread with a timeout cannot stop a CPU-bound render, so the bounds
are checked inside the render:

- every loop iteration, call, attribute or item lookup and filter is a *step* (at most
  ``MAX_STEPS``), and the wall clock is checked against a deadline every few steps;
- every string the template makes is charged to ``MAX_CHARS`` (loop bodies and macros by
  the size of their literal text), and no one value may exceed ``MAX_VALUE_CHARS``;
- operations whose result can be far larger than their inputs are checked before they run:
  ``*``, ``+``, ``**``, ``%`` and ``~``, ``str.format`` / printf widths, padding, ``replace``,
  ``join``, ``indent``, ``batch``;
- the output is streamed (``Template.generate``) and stops at ``MAX_OUTPUT_CHARS``.

Every failure (syntax, undefined names, ``raise_exception``, sandbox refusals, arithmetic,
recursion, memory, these limits) is one :class:`ChatTemplateError`.
"""

from __future__ import annotations

import functools
import json
import re
import string
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from jinja2 import nodes
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.utils import Namespace, _PassArg
from jinja2.visitor import NodeTransformer

from mmconvert.errors import ChatTemplateError

MAX_TEMPLATE_CHARS = 256 * 1024  # real chat templates are a few KiB
MAX_OUTPUT_CHARS = 2_000_000  # a prompt far longer than any context window
MAX_VALUE_CHARS = MAX_OUTPUT_CHARS
MAX_CHARS = 16_000_000  # all strings made during one render
MAX_STEPS = 500_000  # the Qwen3 template with tools takes a few hundred
MAX_SECONDS = 5.0
MAX_WIDTH = 1024  # format widths, padding, indent: real templates use single digits
MAX_INT_BITS = 4096
_CLOCK_EVERY = 256  # steps between two looks at the clock
_PADDING = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})
_WIDTH_FILTERS = frozenset({"center", "indent", "batch", "slice", "tojson"})
_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class _LimitError(Exception):
    """A bound of this module was reached (the message says which)."""


class _RaisedByTemplate(TemplateError):
    """``raise_exception(message)``, as HF templates use it to refuse a conversation."""


def template_file(directory: Path) -> Path:
    """The file a checkpoint's chat template is read from (``chat_template.jinja`` wins over
    ``tokenizer_config.json``, as in the readers and transformers)."""
    jinja = Path(directory) / "chat_template.jinja"
    return jinja if jinja.is_file() else Path(directory) / "tokenizer_config.json"


def render(template: str, source: str | None = None, /, **variables: Any) -> str:
    """``template`` rendered with ``variables`` (``messages``, ``add_generation_prompt``,
    ``bos_token``, ``tools``, ...); ``source`` names where it came from in errors.

    >>> render("{{ messages[0]['content'] }}!", messages=[{"role": "user", "content": "hi"}])
    'hi!'
    """
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"the template is {len(template):,} characters (limit "
                                f"{MAX_TEMPLATE_CHARS:,})", source)
    env = _BoundedEnvironment()
    try:
        compiled = env.from_string(template)
        env.budget.start()
        pieces, size = [], 0
        for piece in compiled.generate(**variables):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise _LimitError(f"output over {MAX_OUTPUT_CHARS:,} characters")
            pieces.append(piece)
        return "".join(pieces)
    except Exception as exc:  # noqa: BLE001 - the template is untrusted code: any failure is its own
        raise ChatTemplateError(_describe(exc), source) from exc


def _describe(exc: BaseException) -> str:
    """The cause in a few words, with the template line where it is known."""
    if isinstance(exc, TemplateSyntaxError):
        return _short(f"syntax error: {exc.message} (line {exc.lineno})")
    if isinstance(exc, (_RaisedByTemplate, _LimitError)) or type(exc) is TemplateError:
        text = str(exc)
    elif isinstance(exc, TemplateError):
        text = exc.message or type(exc).__name__
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    line = _template_line(exc)
    return _short(text + (f" (line {line})" if line else ""))


def _short(text: str, limit: int = 150) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _template_line(exc: BaseException) -> int | None:
    """The innermost template line in the traceback (jinja maps its frames to them)."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class _Budget:
    """Steps, characters and wall time left to one render."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.steps = self.chars = self._next_clock = 0

    def start(self) -> None:
        self.deadline = time.monotonic() + MAX_SECONDS

    def step(self, count: int = 1) -> None:
        if self.deadline is None:
            # compile-time constant folding: tell jinja to leave it to the render
            raise nodes.Impossible()
        self.steps += count
        if self.steps > MAX_STEPS:
            raise _LimitError(f"over {MAX_STEPS:,} steps (loop iterations, calls, lookups)")
        if self.steps >= self._next_clock:
            self._next_clock = self.steps + _CLOCK_EVERY
            if time.monotonic() > self.deadline:
                raise _LimitError(f"took longer than {MAX_SECONDS:g} s")

    def charge(self, chars: int) -> None:
        """Account for a value of ``chars`` characters (or items) about to be made."""
        self.step()
        if chars > MAX_VALUE_CHARS:
            raise _LimitError(f"a value of {chars:,} characters (limit {MAX_VALUE_CHARS:,})")
        self.chars += chars
        if self.chars > MAX_CHARS:
            raise _LimitError(f"made over {MAX_CHARS:,} characters of strings")

    def size(self, value: Any) -> int:
        """About how long ``str(value)`` (or its JSON) is: walked without converting, so that a
        list of a thousand references to one long string counts a thousand times; each item
        visited is a step, and the walk stops once past the limit."""
        total, visited, stack = 0, 0, [value]
        while stack and total <= MAX_VALUE_CHARS:
            item = stack.pop()
            visited += 1
            if isinstance(item, str):
                total += len(item) + 2
            elif isinstance(item, Mapping):
                total += 2 + 4 * len(item)
                if total <= MAX_VALUE_CHARS:
                    stack.extend(item.keys())
                    stack.extend(item.values())
            elif isinstance(item, (bytes, bytearray)):
                total += 4 * len(item)
            elif isinstance(item, Collection):  # lists, tuples, sets, dict views
                total += 2 + 2 * len(item)
                if total <= MAX_VALUE_CHARS:
                    stack.extend(item)
            elif isinstance(item, Namespace):
                stack.append(dict(item._Namespace__attrs))  # type: ignore[attr-defined]
            elif isinstance(item, int) and not isinstance(item, bool):
                total += item.bit_length() // 3 + 1
            else:
                total += 8
        self.step(visited)
        return total

    def check_size(self, value: Any) -> None:
        if (size := self.size(value)) > MAX_VALUE_CHARS:
            raise _LimitError(f"a value of over {size:,} characters (limit {MAX_VALUE_CHARS:,})")


def _check_width(width: Any, what: str) -> None:
    if isinstance(width, int) and abs(width) > MAX_WIDTH:
        raise _LimitError(f"{what} of {width} (limit {MAX_WIDTH})")


def _check_printf(fmt: str, args: Any) -> None:
    """``fmt % args`` stays small: widths and precisions at most MAX_WIDTH, no ``*``."""
    for match in _PRINTF_SPEC.finditer(fmt):
        for number in match.groups():
            if number == "*":
                raise _LimitError("a '*' width in a % format")
            if number is not None:
                _check_width(int(number), "a % format width")


def _check_format(fmt: str) -> None:
    """``fmt.format(...)`` stays small: no nested field in a spec, widths at most MAX_WIDTH."""
    for _text, _field, spec, _conversion in string.Formatter().parse(fmt):
        if spec and "{" in spec:
            raise _LimitError("a nested {} in a format spec")
        for number in re.findall(r"\d+", spec or ""):
            _check_width(int(number), "a format width")


def _replaced_size(text: str, old: str, new: str, count: int = -1) -> int:
    hits = len(text) + 1 if old == "" else text.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


class _GuardLoops(NodeTransformer):
    """Route every ``for`` through the ``_bounded`` filter (iterations are steps, each charged
    with the literal text of the body) and every ``~`` through ``_concat`` (sizes checked
    before joining); records the literal size of each macro for the call hook."""

    def __init__(self) -> None:
        self.macro_chars: dict[str, int] = {}

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        body_chars = _literal_chars([*node.body, *node.else_])
        node.iter = nodes.Filter(node.iter, "_bounded", [nodes.Const(body_chars)], [], None,
                                 None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "_concat", [], [],
                            None, None, lineno=node.lineno)

    def visit_Macro(self, node: nodes.Macro) -> nodes.Macro:
        self.generic_visit(node)
        self._record(node.name, node.body)
        return node

    def visit_CallBlock(self, node: nodes.CallBlock) -> nodes.CallBlock:
        self.generic_visit(node)
        self._record("caller", node.body)
        return node

    def _record(self, name: str, body: list[nodes.Node]) -> None:
        self.macro_chars[name] = max(self.macro_chars.get(name, 0), _literal_chars(body))


def _literal_chars(body: list[nodes.Node]) -> int:
    total = 0
    for top in body:
        for node in (top, *top.find_all((nodes.TemplateData, nodes.Const))):
            if isinstance(node, nodes.TemplateData):
                total += len(node.data)
            elif isinstance(node, nodes.Const) and isinstance(node.value, str):
                total += len(node.value)
    return total


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' chat-template environment (trim_blocks, lstrip_blocks, loopcontrols,
    unescaped ``tojson``, ``raise_exception``) with the bounds of this module."""

    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols],
                         finalize=self._finalize)
        self.budget = _Budget()
        self.macro_chars: dict[str, int] = {}
        self.globals.pop("lipsum", None)  # lorem ipsum of any length; no template needs it
        self.globals["range"] = self._range
        self.globals["raise_exception"] = _raise_exception
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}
        self.filters["_bounded"] = self._bounded
        self.filters["_concat"] = self._concat

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        guard = _GuardLoops()
        tree = guard.visit(super()._parse(source, name, filename))
        self.macro_chars.update(guard.macro_chars)
        return tree

    # -- hooks the compiled template calls -----------------------------------------------
    def getattr(self, obj: Any, attribute: str) -> Any:
        self.budget.step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.budget.step()
        return super().getitem(obj, argument)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = __self.budget
        budget.step()
        if isinstance(__obj, Macro):
            budget.charge(__self.macro_chars.get(__obj.name, 0))
        elif isinstance(__obj, LoopContext) and args:  # loop(children) in a recursive for
            args = (__self._bounded(args[0], 0), *args[1:])
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            args = _check_str_method(budget, owner, getattr(__obj, "__name__", ""), args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, (str, list, tuple, dict)):
            budget.charge(len(result))
        return result

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = self.budget
        budget.step()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                    budget.charge(len(seq) * max(times, 0))
            if _both_ints(left, right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _LimitError(f"a product of over {MAX_INT_BITS} bits")
        elif operator == "+" and isinstance(left, (str, list, tuple)) \
                and isinstance(right, (str, list, tuple)):
            budget.charge(len(left) + len(right))
        elif operator == "**" and _both_ints(left, right) and right > 0 \
                and left.bit_length() * right > MAX_INT_BITS:
            raise _LimitError(f"a power of over {MAX_INT_BITS} bits")
        elif operator == "%" and isinstance(left, str):
            _check_printf(left, right)
            budget.check_size(right)
        result = self.binop_table[operator](left, right)
        if isinstance(result, str):
            budget.charge(len(result))
        return result

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, budget = value.__self__, self.budget

        @functools.wraps(wrapped)
        def bounded_format(*args: Any, **kwargs: Any) -> str:
            _check_format(fmt)
            budget.check_size([args, kwargs])
            result = wrapped(*args, **kwargs)
            budget.charge(len(result))
            return result

        return bounded_format

    def _finalize(self, value: Any) -> str:
        """Every ``{{ ... }}``: sized before it becomes a string."""
        self.budget.check_size(value)
        text = str(value)
        self.budget.charge(len(text))
        return text

    # -- globals and filters -------------------------------------------------------------
    def _range(self, *args: int) -> range:
        self.budget.step()
        return safe_range(*args)

    def _bounded(self, iterable: Iterable[Any], body_chars: int) -> Iterator[Any]:
        if self.budget.deadline is None:
            raise nodes.Impossible()  # never folded at compile time
        return self._iterate(iterable, body_chars)

    def _iterate(self, iterable: Iterable[Any], body_chars: int) -> Iterator[Any]:
        budget = self.budget
        for item in iterable:
            budget.step()
            if body_chars:
                budget.charge(body_chars)
            yield item

    def _concat(self, parts: list[Any]) -> str:
        self.budget.check_size(parts)
        text = "".join(map(str, parts))
        self.budget.charge(len(text))
        return text

    def _guard_filter(self, name: str, func: Any) -> Any:
        passes_first = _PassArg.from_obj(func) is not None

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            budget = self.budget
            budget.step()
            first = 1 if passes_first else 0
            value, *rest = args[first:]
            if name == "join" and not isinstance(value, (str, Collection)):
                value = list(value)  # a generator (map, select): sized before joining
                args = (*args[:first], value, *rest)
            _check_filter(budget, name, value, rest, kwargs)
            result = func(*args, **kwargs)
            if isinstance(result, (str, list, tuple, dict)):
                budget.charge(len(result))
            return result

        return guarded


def _check_filter(budget: _Budget, name: str, value: Any, args: list[Any],
                  kwargs: dict[str, Any]) -> None:
    budget.check_size(value)
    for arg in (*args, *kwargs.values()):
        if name in _WIDTH_FILTERS:
            _check_width(arg, f"{name} width")
        elif isinstance(arg, int) and abs(arg) > MAX_VALUE_CHARS:
            raise _LimitError(f"{name} argument {arg}")
        if not isinstance(arg, (int, float, type(None))):
            budget.check_size(arg)
    if name == "format" and isinstance(value, str):
        _check_printf(value, args)
    elif name == "replace" and isinstance(value, str) and len(args) >= 2:
        budget.charge(_replaced_size(value, str(args[0]), str(args[1]),
                                     args[2] if len(args) > 2 else -1))
    elif name == "join" and isinstance(value, (list, tuple)) and args:
        budget.charge(len(str(args[0])) * len(value) + budget.size(value))
    elif name == "indent" and isinstance(value, str):
        width = args[0] if args else kwargs.get("width", 4)
        budget.charge(len(value) + value.count("\n") * (width if isinstance(width, int)
                                                       else len(str(width))))


def _check_str_method(budget: _Budget, text: str, method: str, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Refuse a str method call whose result would be too large; the (maybe materialized)
    arguments to call it with."""
    if method in _PADDING:
        for arg in (*args, *kwargs.values()):
            _check_width(arg, f"str.{method} width")
        if method == "expandtabs":
            tabsize = args[0] if args else kwargs.get("tabsize", 8)
            budget.charge(len(text) * max(1, tabsize if isinstance(tabsize, int) else 1))
    elif method == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        budget.charge(_replaced_size(text, args[0], args[1],
                                     args[2] if len(args) > 2 else kwargs.get("count", -1)))
    elif method == "join" and args:
        items = args[0] if isinstance(args[0], (list, tuple)) else list(args[0])
        budget.charge(len(text) * len(items) + budget.size(items))
        args = (items, *args[1:])
    return args


def _both_ints(left: Any, right: Any) -> bool:
    return isinstance(left, int) and isinstance(right, int)


def _raise_exception(message: Any) -> None:
    raise _RaisedByTemplate(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson``: no HTML escaping (jinja2's own turns ``<`` into ``\\u003c``)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)
