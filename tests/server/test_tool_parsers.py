"""Tool-call and reasoning parsers on hand-written outputs in each family's own format, whole and streamed
in every split (one character at a time and in random pieces)."""

from __future__ import annotations

import json
import random

import pytest
from moefleet.engine.server.tool_parsers import (
    DeepSeekToolParser,
    KimiK2ToolParser,
    Qwen3ToolParser,
    StreamingToolParser,
    family_of_template,
    split_reasoning,
)

QWEN3 = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
)
DEEPSEEK_V3 = (
    "Sure."
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
    '{"city": "Paris", "unit": "c"}\n```<｜tool▁call▁end｜>\n'
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n"
    '{"tz": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
)
DEEPSEEK_V31 = (
    "Sure."
    '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "unit": "c"}'
    '<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>{"tz": "CET"}<｜tool▁call▁end｜>'
    "<｜tool▁calls▁end｜>"
)
KIMI_K2 = (
    "Sure."
    "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
    '{"city": "Paris", "unit": "c"}<|tool_call_end|><|tool_call_begin|>functions.get_time:1'
    '<|tool_call_argument_begin|>{"tz": "CET"}<|tool_call_end|><|tool_calls_section_end|>'
)
EXPECTED = [("get_weather", {"city": "Paris", "unit": "c"}), ("get_time", {"tz": "CET"})]
CASES = [
    (Qwen3ToolParser, QWEN3, "Let me check.\n"),
    (DeepSeekToolParser, DEEPSEEK_V3, "Sure."),
    (DeepSeekToolParser, DEEPSEEK_V31, "Sure."),
    (KimiK2ToolParser, KIMI_K2, "Sure."),
]


@pytest.mark.parametrize(("parser_type", "text", "content"), CASES)
def test_whole_output(parser_type, text, content):
    got_content, calls = parser_type().parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == EXPECTED
    assert len({c.id for c in calls}) == 2


def test_kimi_call_ids_come_from_the_output():
    _, calls = KimiK2ToolParser().parse(KIMI_K2)
    assert [c.id for c in calls] == ["functions.get_weather:0", "functions.get_time:1"]


@pytest.mark.parametrize(("parser_type", "text", "content"), CASES)
@pytest.mark.parametrize("split", ["chars", "random"])
def test_streamed_output_equals_whole(parser_type, text, content, split):
    rng = random.Random(0)
    pieces, i = [], 0
    while i < len(text):
        size = 1 if split == "chars" else rng.randint(1, 12)
        pieces.append(text[i : i + size])
        i += size
    stream = StreamingToolParser(parser_type(), reasoning=False)
    got_content, calls, first_call_at = "", [], None
    for n, piece in enumerate(pieces):
        delta = stream.feed(piece)
        got_content += delta.content
        calls.extend(delta.tool_calls)
        if delta.tool_calls and first_call_at is None:
            first_call_at = n
    final = stream.finish()
    got_content += final.content
    calls.extend(final.tool_calls)
    assert got_content == content  # no piece of a marker ever leaks into content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == EXPECTED
    assert first_call_at is not None and first_call_at < len(pieces) - 1  # the first call is sent early


def test_text_without_calls_and_broken_calls_stay_content():
    assert Qwen3ToolParser().parse("just text <tool") == ("just text <tool", [])
    broken = "a <tool_call>\n{not json}\n</tool_call>"
    assert Qwen3ToolParser().parse(broken) == (broken, [])
    stream = StreamingToolParser(Qwen3ToolParser(), reasoning=False)
    out = stream.feed(broken[:5]).content + stream.feed(broken[5:]).content + stream.finish().content
    assert out == broken


@pytest.mark.parametrize("inside", [False, True])
def test_reasoning_split(inside):
    body = "Paris is in France, so...\n</think>\n\nIt is sunny."
    text = body if inside else "<think>\n" + body
    reasoning, rest = split_reasoning(text, starts_inside=inside)
    assert reasoning is not None and reasoning.strip() == "Paris is in France, so..."
    assert rest == "It is sunny."
    stream = StreamingToolParser(None, reasoning=True, starts_inside_reasoning=inside)
    got_r, got_c = "", ""
    for ch in text:
        d = stream.feed(ch)
        got_r, got_c = got_r + d.reasoning, got_c + d.content
    d = stream.finish()
    got_r, got_c = got_r + d.reasoning, got_c + d.content
    assert got_r.strip() == "Paris is in France, so..." and got_c == "It is sunny."


def test_reasoning_then_tool_call_streamed():
    text = "<think>need weather</think>\n" + QWEN3
    stream = StreamingToolParser(Qwen3ToolParser(), reasoning=True)
    reasoning, content, calls = "", "", []
    for ch in text:
        d = stream.feed(ch)
        reasoning, content, calls = reasoning + d.reasoning, content + d.content, calls + d.tool_calls
    d = stream.finish()
    content += d.content
    assert reasoning == "need weather" and content == "Let me check.\n" and len(calls) == 2


def test_no_reasoning_when_output_does_not_open_think():
    assert split_reasoning("plain answer", starts_inside=False) == (None, "plain answer")


def test_family_from_template_markers():
    assert family_of_template("{{ '<tool_call>' }}") == "qwen3"
    assert family_of_template("{{'<｜tool▁calls▁begin｜>'}}") == "deepseek_v3"
    assert family_of_template("<|tool_calls_section_begin|>") == "kimi_k2"
    assert family_of_template("<|im_start|>") is None and family_of_template(None) is None


def test_tool_call_history_renders_in_deepseek_and_qwen3_template_styles():
    """An assistant turn with tool_calls and the tool's answer reach templates in the shapes they read:
    DeepSeek concatenates function.arguments (a string), Qwen3 prints arguments (string or tojson)."""
    import jinja2
    from moefleet.engine.server.protocol import ChatMessage

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [
        ChatMessage(role="assistant", content=None, tool_calls=[call]).for_template(),
        ChatMessage(role="tool", content="42", tool_call_id="c1").for_template(),
    ]
    deepseek = jinja2.Template(
        "{% for m in messages %}{% for t in m.tool_calls or [] %}"
        "{{ t['type'] + ':' + t['function']['name'] + ':' + t['function']['arguments'] }}"
        "{% endfor %}{% if m.role == 'tool' %}|{{ m.content }}|{{ m.tool_call_id }}{% endif %}{% endfor %}"
    )
    assert deepseek.render(messages=messages) == 'function:f:{"x": 1}|42|c1'
    qwen3 = jinja2.Template(
        "{% for m in messages %}{% for t in m.tool_calls or [] %}"
        "{% if t.function is defined %}{% set t = t.function %}{% endif %}"
        "{{ t.name }}={% if t.arguments is string %}{{ t.arguments }}{% else %}{{ t.arguments | tojson }}{% endif %}"
        "{% endfor %}{% endfor %}"
    )
    assert qwen3.render(messages=messages) == 'f={"x": 1}'
    assert messages[0]["tool_calls"][0]["arguments"] == {"x": 1} and messages[0]["content"] == ""
