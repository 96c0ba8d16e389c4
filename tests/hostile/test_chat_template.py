"""Issue 9 item 7: chat templates are untrusted code; rendering them is bounded in time and
size, and every failure is one ``chat template: <cause>`` error (exit 2 from the CLI).

Real templates must render exactly as before: they are compared with the environment
mmconvert used before the bounds (and transformers uses), not with hard-coded strings.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, unsafe

from mmconvert.convert.example import CHAT_TEMPLATE
from mmconvert.convert.readers import read_checkpoint
from mmconvert.errors import ChatTemplateError
from mmconvert.formats import chat_template
from mmconvert.formats.chat_template import render
from mmconvert.runtime.run_inputs import RunInputError
from mmconvert.runtime.run_inputs import render_chat as run_render_chat
from mmconvert.verify.cases import render_chat as verify_render_chat

from .harness import assert_refused, run_cli, tree_digest

# From memory of the structure of Qwen3's chat template (tools, thinking, tool calls and
# responses, the last-query index): the constructs real templates use.
QWEN3_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and \
arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \
\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and \
not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')\
.split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') \
+ '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> in a city & its \"region\"",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
CONVERSATIONS = {
    "plain": dict(messages=[{"role": "system", "content": "You are helpful."},
                            {"role": "user", "content": "Hi <|multimodal|> 你好"}]),
    "no-think": dict(messages=[{"role": "user", "content": "2+2?"}], enable_thinking=False),
    "tools": dict(tools=TOOLS, messages=[
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "<think>\nneed a tool\n</think>\n\nLet me check.",
         "tool_calls": [{"type": "function", "function": {
             "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "21 and sunny.", "reasoning_content": "easy"},
        {"role": "user", "content": "Thanks"}]),
    "multi-turn": dict(messages=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "<think>x</think>d", "tool_calls": [
            {"name": "f", "arguments": "{\"k\": 1}"}]}]),
}


def reference_render(template: str, **variables) -> str:
    """What mmconvert rendered before the bounds (transformers' environment, minus bounds)."""
    def raise_exception(message):
        raise RuntimeError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(**variables)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_qwen3_template_renders_as_before(name, generation_prompt):
    variables = {**CONVERSATIONS[name], "add_generation_prompt": generation_prompt}
    expected = reference_render(QWEN3_TEMPLATE, **variables)
    assert render(QWEN3_TEMPLATE, **variables) == expected
    assert "<|im_start|>" in expected


def test_qwen3_template_matches_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    for variables in CONVERSATIONS.values():
        variables = {**variables, "add_generation_prompt": True}
        messages = variables.pop("messages")
        rendered, _ = render_jinja_template(conversations=[messages], chat_template=QWEN3_TEMPLATE,
                                            **variables)
        assert render(QWEN3_TEMPLATE, messages=messages, **variables) == rendered[0]


def test_example_template_through_both_callers(example_ckpt):
    model = read_checkpoint(example_ckpt)
    assert model.tokenizer.chat_template == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    expected = reference_render(CHAT_TEMPLATE, messages=messages, add_generation_prompt=True)
    assert verify_render_chat(CHAT_TEMPLATE, messages, model) == expected
    assert run_render_chat(CHAT_TEMPLATE, "u", "s") == expected


S = "{% set s = 'x' * 1000000 %}"
HOSTILE = {
    # hangs
    "nested range": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                    "{% endfor %}",
    "nested list": "{% set r = range(100000)|list %}{% for a in r %}{% for b in r %}{% endfor %}"
                   "{% endfor %}",
    "nested string": "{% set s = 'ab' * 50000 %}{% for a in s %}{% for b in s %}{% endfor %}"
                     "{% endfor %}",
    "exponential macro": "{% macro m(n) %}{% if n > 0 %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}"
                         "{% endmacro %}{{ m(40) }}",
    "recursive loop": "{% set r = range(100000)|list %}{% for x in [1] recursive %}{{ loop(r) }}"
                      "{% endfor %}",
    # huge values from one operation
    "format filter": "{{ '%2000000000s'|format('x') }}",
    "printf": "{{ '%2000000000s' % 'x' }}",
    "printf star": "{{ '%*s' % (2000000000, 'x') }}",
    "str.format width": "{{ '{:>2000000000}'.format('x') }}",
    "str.format nested": "{{ '{:>{}}'.format('x', 2000000000) }}",
    "ljust": "{{ 'x'.ljust(2000000000) }}",
    "center": "{{ 'x'|center(2000000000) }}",
    "string times": "{{ 'x' * 2000000000 }}",
    "list times": "{{ [1] * 2000000000 }}",
    "power": "{{ 2 ** 100000000 }}",
    "squaring": "{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}"
                "{% endfor %}{{ ns.x }}",
    "doubling ~": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                  "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "doubling +": "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                  "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "shared references": S + "{{ [s] * 1000 }}",
    "join shared": S + "{{ ([s] * 1000)|join }}",
    "join generator": S + "{{ ([s] * 1000)|map('string')|join }}",
    "str.join": S + "{{ s.join(['a'] * 1000) }}",
    "replace": "{% set s = 'x' * 100000 %}{{ s|replace('', 'y' * 100000) }}",
    "str.replace": "{% set s = 'x' * 100000 %}{{ s.replace('', 'y' * 100000) }}",
    "indent": "{% set s = '\n' * 1000000 %}{{ s|indent(1000) }}",
    "batch": "{{ [1]|batch(2000000000, 'x')|list }}",
    "tojson indent": "{{ messages|tojson(indent=2000000000) }}",
    "expandtabs": "{{ ('\t' * 100000).expandtabs(1000) }}",
    "literal in set block": "{% set b %}{% for i in range(100000) %}" + "L" * 10000
                            + "{% endfor %}{% endset %}{{ b|length }}",
    "literal in macro": "{% macro m() %}{% for i in range(100000) %}" + "L" * 10000
                        + "{% endfor %}{% endmacro %}{{ m()|length }}",
    "output": "{% for i in range(100000) %}" + "L" * 1000 + "{% endfor %}",
    "lipsum": "{{ lipsum(2000000000) }}",
    "big range": "{{ range(2000000000)|list }}",
    "template size": "x" * (chat_template.MAX_TEMPLATE_CHARS + 1),
    # errors
    "deep recursion": "{% macro m(n) %}{{ m(n + 1) }}{% endmacro %}{{ m(0) }}",
    "deep nesting": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "syntax": "{% for %}",
    "undefined": "{{ foo() }}",
    "raise_exception": "{{ raise_exception('System message must be first') }}",
    "zero division": "{{ 1 // 0 }}",
    "overflow": "{{ 10.0 ** 400 }}",
    "type error": "{{ 1 + 'a' }}",
    "include": "{% include 'x' %}",
    "unsafe attribute call": "{{ messages.append(1) }}",
}
NEEDLES = {"raise_exception": "System message must be first", "syntax": "syntax error",
           "zero division": "ZeroDivisionError", "overflow": "OverflowError",
           "deep recursion": "RecursionError", "undefined": "'foo' is undefined",
           "nested range": "steps", "format filter": "width", "output": "output over"}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_template_is_one_error(name):
    start = time.monotonic()
    with pytest.raises(ChatTemplateError) as info:
        render(HOSTILE[name], "ck/tokenizer_config.json",
               messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    elapsed = time.monotonic() - start
    first, *rest = str(info.value).splitlines()
    assert first.startswith("chat template: ") and len("error: " + first) <= 200, first
    assert rest == ["in ck/tokenizer_config.json"]
    assert NEEDLES.get(name, "") in first
    assert elapsed < chat_template.MAX_SECONDS + 5, f"{name} took {elapsed:.1f} s"


def test_unsafe_callable_is_security_error():
    with pytest.raises(ChatTemplateError, match="not safely callable"):
        render("{{ f() }}", f=unsafe(lambda: 1))


def test_wall_time_limit(monkeypatch):
    """The deadline stops a render that stays under the step limit (checked inside it)."""
    monkeypatch.setattr(chat_template, "MAX_SECONDS", 0.05)
    slow = ("{% macro m(n) %}{% if n > 0 %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}"
            "{% endmacro %}{{ m(40) }}")
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=r"took longer than 0\.05 s"):
        render(slow)
    assert time.monotonic() - start < 2


def test_run_chat_error_is_a_run_input_error():
    with pytest.raises(RunInputError, match="the chat template failed: over .* steps"):
        run_render_chat(HOSTILE["nested range"], "hi")


def _hostile_copy(example_ckpt: Path, root: Path, template: str, jinja_file: bool) -> Path:
    ckpt = root / "hostile"
    shutil.copytree(example_ckpt, ckpt)
    if jinja_file:
        (ckpt / "chat_template.jinja").write_text(template, encoding="utf-8")
    else:
        path = ckpt / "tokenizer_config.json"
        cfg = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**cfg, "chat_template": template}), encoding="utf-8")
    return ckpt


@pytest.mark.parametrize("name,jinja_file", [("nested range", False), ("printf", True),
                                             ("raise_exception", False)])
def test_verify_refuses_hostile_template(example_ckpt, tmp_path, name, jinja_file):
    bundle = tmp_path / "st"
    assert run_cli("to-safetensors", example_ckpt, "-o", bundle).returncode == 0
    ckpt = _hostile_copy(example_ckpt, tmp_path, HOSTILE[name], jinja_file)
    before = tree_digest(ckpt, bundle)
    result = run_cli("verify", ckpt, bundle, "--device", "cpu", "--backend", "safetensors",
                     timeout=120)
    where = "chat_template.jinja" if jinja_file else "tokenizer_config.json"
    assert_refused(result, needle="chat template: ", before=before, inputs=(ckpt, bundle))
    assert where in result.stderr
    assert result.seconds < 60


def test_run_refuses_hostile_template(example_ckpt, tmp_path):
    pytest.importorskip("llama_cpp")
    ckpt = _hostile_copy(example_ckpt, tmp_path, HOSTILE["nested range"], False)
    out = tmp_path / "gguf"
    converted = run_cli("to-gguf", ckpt, "-o", out)  # writers store the template, never render it
    assert converted.returncode == 0, converted.stderr
    before = tree_digest(out)
    result = run_cli("run", out, "--chat", "-p", "hi", "--max-tokens", "1", timeout=120)
    assert_refused(result, needle="the chat template failed: over", before=before,
                   inputs=(out,))
