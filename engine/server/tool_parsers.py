"""Tool calls and reasoning in model output, parsed from each model family's own chat-template format.

One parser per family (the format its chat template teaches the model):
- Qwen3 (Hermes style): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, once per call.
- DeepSeek-V3 / R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```
  <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`; V3.1's `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>` too.
- Kimi-K2: `<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>ARGS
  <|tool_call_end|>...<|tool_calls_section_end|>` (the `functions.NAME:IDX` is the call id).
`parser_for_template` picks the family from the chat template's text. Reasoning (`<think>...</think>`) is split
off where the template marks it; when the generation prompt already opened `<think>` (DeepSeek-R1), the
output starts inside the reasoning.

Streaming (`StreamingToolParser`): content is passed through until a tool-call start marker (text that could
still become a marker is held back); from the marker on, each call is sent once it is complete, as OpenAI's
deltas: one with id, type and name (arguments ""), then one with the arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            return json.dumps(json.loads(arguments), ensure_ascii=False)
        except ValueError:
            return arguments
    return json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)


class ToolParser(ABC):
    """Finds tool calls in a whole output. `start` is the marker that opens the tool-call part."""

    start: str

    @abstractmethod
    def calls(self, text: str) -> list[ToolCall]:
        """The complete calls in `text` (the part from `start` on)."""

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content before the tool calls, calls). Text without a complete call stays content."""
        index = text.find(self.start)
        if index == -1:
            return text, []
        calls = self.calls(text[index:])
        if not calls:
            return text, []
        return text[:index], calls


class Qwen3ToolParser(ToolParser):
    start = "<tool_call>"
    _call = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)

    def calls(self, text: str) -> list[ToolCall]:
        found = []
        for match in self._call.finditer(text):
            try:
                data = json.loads(match.group(1))
            except ValueError:
                continue
            if isinstance(data, dict) and isinstance(data.get("name"), str):
                found.append(ToolCall(data["name"], _arguments_text(data.get("arguments"))))
        return found


class DeepSeekToolParser(ToolParser):
    start = "<｜tool▁calls▁begin｜>"
    _call = re.compile(r"<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)<｜tool▁call▁end｜>", re.DOTALL)
    _v3_args = re.compile(r"^(.*?)\n```(?:json)?\n(.*?)\n```\s*$", re.DOTALL)

    def calls(self, text: str) -> list[ToolCall]:
        found = []
        for match in self._call.finditer(text):
            head, body = match.group(1).strip(), match.group(2)
            v3 = self._v3_args.match(body)
            if head == "function" and v3:  # V3 / R1: type, then name and a fenced JSON block
                found.append(ToolCall(v3.group(1).strip(), _arguments_text(v3.group(2))))
            else:  # V3.1: name, then the arguments
                found.append(ToolCall(head, _arguments_text(body.strip())))
        return found


class KimiK2ToolParser(ToolParser):
    start = "<|tool_calls_section_begin|>"
    _call = re.compile(
        r"<\|tool_call_begin\|>\s*([^<\s]+)\s*<\|tool_call_argument_begin\|>\s*(.*?)\s*<\|tool_call_end\|>",
        re.DOTALL,
    )

    def calls(self, text: str) -> list[ToolCall]:
        found = []
        for match in self._call.finditer(text):
            call_id = match.group(1)
            name = call_id.split(":")[0]
            name = name.split(".", 1)[1] if name.startswith("functions.") else name
            found.append(ToolCall(name, _arguments_text(match.group(2)), id=call_id))
        return found


PARSERS: dict[str, type[ToolParser]] = {
    "qwen3": Qwen3ToolParser,
    "deepseek_v3": DeepSeekToolParser,
    "kimi_k2": KimiK2ToolParser,
}


def family_of_template(chat_template: str | None) -> str | None:
    """Which tool-call format a chat template teaches, from its markers."""
    if not chat_template:
        return None
    if "tool_calls_section_begin" in chat_template:
        return "kimi_k2"
    if "tool▁calls▁begin" in chat_template or "tool▁call▁begin" in chat_template:
        return "deepseek_v3"
    if "<tool_call>" in chat_template:
        return "qwen3"
    return None


def parser_for_template(chat_template: str | None) -> ToolParser | None:
    family = family_of_template(chat_template)
    return PARSERS[family]() if family else None


def template_marks_reasoning(chat_template: str | None) -> bool:
    return bool(chat_template) and "<think>" in chat_template and "</think>" in chat_template  # type: ignore[operator]


THINK_START, THINK_END = "<think>", "</think>"


def split_reasoning(text: str, starts_inside: bool) -> tuple[str | None, str]:
    """(reasoning or None, the rest) of a whole output."""
    if not starts_inside:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_START):
            return None, text
        text, starts_inside = stripped[len(THINK_START) :], True
    end = text.find(THINK_END)
    if end == -1:  # cut off while thinking (length)
        return text, ""
    return text[:end], text[end + len(THINK_END) :].lstrip("\n")


def _held_back(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (could still become it)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


@dataclass(slots=True)
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)


class StreamingToolParser:
    """Splits streamed text into content, reasoning and complete tool calls, as it arrives."""

    def __init__(self, parser: ToolParser | None, reasoning: bool, starts_inside_reasoning: bool = False):
        self.parser = parser
        self._in_reasoning = reasoning and starts_inside_reasoning
        self._reasoning_possible = reasoning  # a <think> may still open at the very start
        self._skip_newlines = False
        self._pending = ""  # text not yet classified
        self._tools_text: str | None = None  # from the tool-call start marker on
        self._sent_calls = 0
        self.calls: list[ToolCall] = []

    def feed(self, text: str, final: bool = False) -> Delta:
        delta = Delta()
        self._pending += text
        while True:
            if self._tools_text is not None:
                self._tools_text += self._pending
                self._pending = ""
                assert self.parser is not None
                calls = self.parser.calls(self._tools_text)
                delta.tool_calls.extend(calls[self._sent_calls :])
                self.calls.extend(calls[self._sent_calls :])
                self._sent_calls = len(calls)
                return delta
            if self._reasoning_possible and not self._in_reasoning:
                stripped = self._pending.lstrip()
                if stripped.startswith(THINK_START):
                    self._pending = stripped[len(THINK_START) :]
                    self._in_reasoning, self._reasoning_possible = True, False
                    continue
                if THINK_START.startswith(stripped) and not final:
                    return delta  # could still be "<think>"
                self._reasoning_possible = False
            if self._in_reasoning:
                end = self._pending.find(THINK_END)
                if end == -1:
                    keep = 0 if final else _held_back(self._pending, THINK_END)
                    delta.reasoning += self._pending[: len(self._pending) - keep]
                    self._pending = self._pending[len(self._pending) - keep :]
                    return delta
                delta.reasoning += self._pending[:end]
                self._pending = self._pending[end + len(THINK_END) :]
                self._in_reasoning, self._skip_newlines = False, True
                continue
            if self._skip_newlines:  # the template's blank line after </think> is not content
                self._pending = self._pending.lstrip("\n")
                if not self._pending:
                    return delta
                self._skip_newlines = False
            if self.parser is None:
                delta.content += self._pending
                self._pending = ""
                return delta
            start = self._pending.find(self.parser.start)
            if start != -1:
                delta.content += self._pending[:start]
                self._tools_text, self._pending = "", self._pending[start:]
                continue
            keep = 0 if final else _held_back(self._pending, self.parser.start)
            delta.content += self._pending[: len(self._pending) - keep]
            self._pending = self._pending[len(self._pending) - keep :]
            return delta

    def finish(self) -> Delta:
        """Flush at the end of the output. A started but incomplete tool-call part becomes content."""
        delta = self.feed("", final=True)
        if self._tools_text is not None and not self.calls:
            delta.content += self._tools_text
            self._tools_text = ""
        return delta
