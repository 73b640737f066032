"""Tool calling shared by the front ends: the plan of a request, and a streamed choice.

:func:`plan_tools` checks ``tools`` / ``tool_choice`` and picks the parser;
:class:`ChatStream` turns one choice's engine deltas into OpenAI-shaped
pieces (``{"content": ...}`` or ``{"tool_calls": [...]}``), which the HTTP
front end sends as SSE chunks and autoglm.v1 turns into protobuf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from autoglm_server.engine.api import GenerationDelta, TokenLogprob
from autoglm_server.engine.grammar import GrammarSpec
from autoglm_server.errors import InvalidRequestError
from autoglm_server.frontends.tools import (
    ToolCall,
    ToolParser,
    ToolSpec,
    parser_for_template,
    parser_named,
)

Piece = tuple[dict[str, Any], list[TokenLogprob]]  # a chunk's delta and its logprobs
MODES = ("none", "auto", "required")


@dataclass(slots=True)
class ToolPlan:
    """How a chat request treats tools: which parser, and what the output must be."""

    tools: list[ToolSpec]
    parser: ToolParser | None  # None: tool calls are not parsed (no tools, or choice none)
    named: str | None = None  # tool_choice names one function
    forced: bool = False  # required or named: the output is a call, enforced by grammar
    parallel: bool = True  # parallel_tool_calls: false keeps the first call only

    def parse(self, text: str) -> list[ToolCall]:
        if self.parser is None:
            return []
        calls = self.parser.parse(text, self.tools)
        return calls if self.parallel else calls[:1]

    def grammar(self) -> GrammarSpec:
        """The grammar of one call to the allowed tools (``forced`` plans only)."""
        assert self.parser is not None and self.forced
        return self.parser.grammar([t for t in self.tools if self.named in (None, t.name)])

    @property
    def call_finish(self) -> str:
        """finish_reason of a choice that made calls: OpenAI says ``stop`` for a named tool."""
        return "stop" if self.named else "tool_calls"


def plan_tools(
    tools: Sequence[ToolSpec] | None,
    choice: str | None,
    *,
    parser_name: str | None,
    template: str | None,
    parallel: bool | None = None,
    field: str = "tools",
    choice_field: str = "tool_choice",
) -> ToolPlan:
    """Check ``tools`` and ``choice`` and pick the parser (``parser_name``, else the one
    the chat template implies).

    ``choice`` is ``None`` (auto when there are tools), a mode of :data:`MODES`, or
    ``"function:NAME"`` for a named function.
    """
    specs = list(tools or [])
    if tools is not None and not specs:
        raise InvalidRequestError(field, "must not be empty")
    if choice is not None and not specs and choice != "none":
        raise InvalidRequestError(choice_field, "needs tools")
    if len({t.name for t in specs}) != len(specs):
        raise InvalidRequestError(field, "function names must be unique")
    allow_parallel = parallel is not False
    if not specs or choice == "none":
        return ToolPlan(specs, None, parallel=allow_parallel)
    parser = parser_named(parser_name) if parser_name else parser_for_template(template)
    if choice is not None and choice.startswith("function:"):
        name = choice.removeprefix("function:")
        if name not in {t.name for t in specs}:
            raise InvalidRequestError(f"{choice_field}.function.name", f"no tool named {name!r}")
        return ToolPlan(specs, parser, named=name, forced=True, parallel=allow_parallel)
    if choice not in (None, *MODES):
        raise InvalidRequestError(choice_field, f"must be one of {', '.join(MODES)} or a function")
    return ToolPlan(specs, parser, forced=choice == "required", parallel=allow_parallel)


class ChatStream:
    """One streamed chat choice: plain content, or tool calls.

    While the output so far could still be a tool call (the parser says so),
    text and its logprobs are held; once it can't, what was held is sent as
    content and the rest streams as it comes. Once the parser sees a call
    under way (GLM-4: the name line, then ``{``; Llama-3 JSON: ``{"name":
    "...", "parameters": ``), its id and name go out and the arguments follow
    as they are generated, call after call. That is how the openai client
    assembles ``tool_calls``: by index, id and name first, arguments
    concatenated. With ``parallel_tool_calls: false`` only the first call is
    sent.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        self._holding = plan.parser is not None
        self._held: list[str] = []
        self._held_lps: list[TokenLogprob] = []
        self._calls: list[ToolCall] = []  # calls whose head was sent
        self._sent_args: list[str] = []
        self.has_calls = False

    def _take_lps(self) -> list[TokenLogprob]:
        lps, self._held_lps = self._held_lps, []
        return lps

    def _stream_calls(self, partials: Sequence[tuple[str, str]]) -> list[Piece]:
        out: list[Piece] = []
        if not self._plan.parallel:
            partials = partials[:1]
        for j, (name, args) in enumerate(partials):
            if j == len(self._calls):
                call = ToolCall.new(name, "")
                self._calls.append(call)
                self._sent_args.append("")
                self.has_calls = True
                head = {**call.to_json(j), "function": {"name": name, "arguments": ""}}
                out.append(({"tool_calls": [head]}, []))
            elif j > len(self._calls) or self._calls[j].name != name:
                continue
            sent = self._sent_args[j]
            if len(args) > len(sent) and args.startswith(sent):
                self._sent_args[j] = args
                piece = {"tool_calls": [{"index": j, "function": {"arguments": args[len(sent) :]}}]}
                out.append((piece, []))
        if out:
            # The logprobs held so far go with the last piece.
            last, lps = out[-1]
            out[-1] = (last, [*lps, *self._take_lps()])
        return out

    def add(self, delta: GenerationDelta) -> list[Piece]:
        lps = list(delta.logprobs or ())
        if not self._holding:
            return [({"content": delta.text}, lps)] if delta.text or lps else []
        self._held.append(delta.text)
        self._held_lps.extend(lps)
        parser = self._plan.parser
        assert parser is not None
        text = "".join(self._held)
        partials = parser.partial_calls(text, self._plan.tools)
        if partials:
            return self._stream_calls(partials)
        if self._calls or self._plan.forced or parser.may_be_call(text, self._plan.tools):
            return []
        self._holding = False
        self._held = []
        return [({"content": text}, self._take_lps())]

    def finish(self) -> list[Piece]:
        """What is still to send when the choice ends (``has_calls`` says which kind)."""
        text = "".join(self._held)
        parser = self._plan.parser
        if not self._holding or parser is None:
            return [({"content": text}, self._take_lps())] if text or self._held_lps else []
        calls = self._plan.parse(text)
        if self._calls:
            # Calls already under way are completed; calls the scan did not see are added.
            fits = all(
                j >= len(calls) or calls[j].arguments.startswith(self._sent_args[j])
                for j in range(len(self._calls))
            )
            out: list[Piece] = []
            if fits and len(calls) >= len(self._calls):
                out = self._stream_calls([(c.name, c.arguments) for c in calls])
            if not out and self._held_lps:
                out = [({}, self._take_lps())]  # cut short (length), or nothing more
            return out
        if not calls:
            return [({"content": text}, self._take_lps())]
        self.has_calls = True
        out = []
        for j, call in enumerate(calls):
            head = {**call.to_json(j), "function": {"name": call.name, "arguments": ""}}
            out.append(({"tool_calls": [head]}, []))
            args = {"index": j, "function": {"arguments": call.arguments}}
            out.append(({"tool_calls": [args]}, self._take_lps()))
        return out
