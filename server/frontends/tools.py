"""Tool calls in model output: one small parser interface, two formats.

A :class:`ToolParser` knows one model family's way of writing a call:

- :class:`Glm4ToolParser` (``glm4``): GLM-4's chat models answer a call as the
  function name on its own line, then the arguments as a JSON object
  (``get_weather\\n{"city": "Beijing"}``); results come back as
  ``role: tool`` messages (``<|observation|>`` in the template).
- :class:`Llama3JsonToolParser` (``llama3_json``): Llama 3.1+ writes a JSON
  object ``{"name": ..., "parameters": {...}}``, optionally after
  ``<|python_tag|>``.

Each parser also gives the grammar of a call (:meth:`ToolParser.grammar`), so
``tool_choice: required`` or a named function is enforced while decoding:
the arguments are valid JSON for the tool's schema, not hoped to be.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from autoglm_server.engine.grammar import GrammarSpec


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the client offered: its name and the JSON schema of its arguments."""

    name: str
    parameters: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text

    @classmethod
    def new(cls, name: str, arguments: Any) -> ToolCall:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        return cls(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=text)

    def to_json(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            out = {"index": index, **out}
        return out


def _schema(tool: ToolSpec) -> dict[str, Any]:
    return tool.parameters if tool.parameters is not None else {"type": "object"}


class ToolParser(ABC):
    name: ClassVar[str]

    @abstractmethod
    def parse(self, text: str, tools: Sequence[ToolSpec]) -> list[ToolCall]:
        """The tool calls in a whole output; empty when it is plain content."""

    @abstractmethod
    def may_be_call(self, prefix: str, tools: Sequence[ToolSpec]) -> bool:
        """Could an output starting with ``prefix`` still turn out to be a tool call?

        Streaming holds text back while this is True, and sends it as content
        as soon as it is False.
        """

    @abstractmethod
    def grammar(self, tools: Sequence[ToolSpec]) -> GrammarSpec:
        """The grammar of exactly one call to one of ``tools``."""

    def partial_calls(self, prefix: str, tools: Sequence[ToolSpec]) -> list[tuple[str, str]]:
        """[(name, arguments so far), ...] of the calls ``prefix`` has begun, for streaming
        the arguments as they are generated; each call's arguments only grow, and add up
        to what :meth:`parse` returns. Empty while no call is recognisable yet."""
        return []


class Glm4ToolParser(ToolParser):
    name = "glm4"

    def parse(self, text: str, tools: Sequence[ToolSpec]) -> list[ToolCall]:
        body = text.strip()
        name, sep, rest = body.partition("\n")
        names = {t.name for t in tools}
        if not sep or name.strip() not in names:
            return []
        try:
            args = json.loads(rest)
        except ValueError:
            return []
        if not isinstance(args, dict):
            return []
        # The model's own text: what streaming sent piece by piece adds up to it.
        return [ToolCall.new(name.strip(), rest.strip())]

    def partial_calls(self, prefix: str, tools: Sequence[ToolSpec]) -> list[tuple[str, str]]:
        line, sep, rest = prefix.lstrip().partition("\n")
        name = line.strip()
        args = rest.strip()
        if sep and name in {t.name for t in tools} and args.startswith("{"):
            return [(name, args)]
        return []

    def may_be_call(self, prefix: str, tools: Sequence[ToolSpec]) -> bool:
        head = prefix.lstrip()
        line, sep, _ = head.partition("\n")
        if sep:
            return line.strip() in {t.name for t in tools}
        return any(t.name.startswith(line) for t in tools)

    def grammar(self, tools: Sequence[ToolSpec]) -> GrammarSpec:
        return GrammarSpec(
            tuple((f"{t.name}\n", json.dumps(_schema(t), sort_keys=True)) for t in tools)
        )


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    _TAG = "<|python_tag|>"

    def parse(self, text: str, tools: Sequence[ToolSpec]) -> list[ToolCall]:
        body = text.strip().removeprefix(self._TAG).strip()
        if not body.startswith("{"):
            return []
        scanned, complete = _scan_llama3(body, {t.name for t in tools})
        if complete:
            # Each call's arguments as the model wrote them: what streaming sent adds up to it.
            return [ToolCall.new(name, args) for name, args in scanned]
        names = {t.name for t in tools}
        calls = []
        decoder = json.JSONDecoder()
        pos = 0
        while pos < len(body):
            try:
                obj, end = decoder.raw_decode(body, pos)
            except ValueError:
                return []
            if not isinstance(obj, dict) or obj.get("name") not in names:
                return []
            args = obj.get("parameters", obj.get("arguments", {}))
            if not isinstance(args, dict):
                return []
            calls.append(ToolCall.new(obj["name"], args))
            pos = end
            rest = body[pos:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            pos = len(body) - len(rest)
        return calls

    def partial_calls(self, prefix: str, tools: Sequence[ToolSpec]) -> list[tuple[str, str]]:
        body = prefix.lstrip().removeprefix(self._TAG).lstrip()
        return _scan_llama3(body, {t.name for t in tools})[0]

    def may_be_call(self, prefix: str, tools: Sequence[ToolSpec]) -> bool:
        head = prefix.lstrip()
        if head.startswith(self._TAG) or self._TAG.startswith(head):
            return True
        return head.removeprefix(self._TAG).lstrip()[:1] in ("", "{")

    def grammar(self, tools: Sequence[ToolSpec]) -> GrammarSpec:
        variants = [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, "parameters": _schema(t)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for t in tools
        ]
        schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
        return GrammarSpec((("", json.dumps(schema, sort_keys=True)),))


_LLAMA3_HEAD = re.compile(r'\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"(?:parameters|arguments)"\s*:\s*')


def _object_end(text: str, start: int) -> int | None:
    """The index after the JSON object that starts at ``text[start]`` (``{``); None if
    the text ends inside it."""
    depth = 0
    in_string = escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _scan_llama3(body: str, names: set[str]) -> tuple[list[tuple[str, str]], bool]:
    """Llama-3 JSON calls written name first (``{"name": ..., "parameters": {...}}``,
    ``;``-separated): [(name, raw arguments so far)], and whether ``body`` is exactly
    complete calls whose arguments are JSON objects."""
    out: list[tuple[str, str]] = []
    pos = 0
    while True:
        head = _LLAMA3_HEAD.match(body, pos)
        if head is None or head.group(1) not in names:
            return out, False
        start = head.end()
        if start == len(body):
            out.append((head.group(1), ""))
            return out, False
        if body[start] != "{":
            return out, False
        end = _object_end(body, start)
        if end is None:
            out.append((head.group(1), body[start:]))
            return out, False
        out.append((head.group(1), body[start:end]))
        rest = body[end:].lstrip()
        if not rest.startswith("}"):
            return out, False
        rest = rest[1:].lstrip()
        if not rest:
            complete = all(isinstance(_loads(a), dict) for _, a in out)
            return out, complete
        if not rest.startswith(";"):
            return out, False
        rest = rest[1:].lstrip()
        pos = len(body) - len(rest)
        if not rest:
            return out, False


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (Glm4ToolParser, Llama3JsonToolParser)}

_GLM4_MARKERS = re.compile(r"<\|observation\|>|<\|assistant\|>")


def parser_for_template(template: str | None) -> ToolParser:
    """The parser for a chat template: Llama-3 style if it uses ``<|python_tag|>`` or
    ``<|eot_id|>``, GLM-4 otherwise (GLM-4 templates mark turns with ``<|assistant|>``)."""
    text = template or ""
    if "<|python_tag|>" in text or "<|eot_id|>" in text:
        return Llama3JsonToolParser()
    if _GLM4_MARKERS.search(text):
        return Glm4ToolParser()
    return Glm4ToolParser()


def parser_named(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; one of {sorted(PARSERS)}") from None
