"""autoglm.v1.AutoGLM: our own gRPC API over the engine (translate only).

Wire message -> :class:`GenerationRequest`, engine deltas -> wire messages;
errors are raised and mapped by :mod:`.grpc_common`'s interceptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from pydantic import ValidationError

from autoglm_server.engine.api import (
    AsyncEngine,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    TokenLogprob,
    Usage,
)
from autoglm_server.engine.grammar import GrammarSpec
from autoglm_server.errors import InvalidRequestError
from autoglm_server.frontend import GenerationStream, ServerState
from autoglm_server.frontends import openai_protocol as oai
from autoglm_server.frontends.chat import template_messages
from autoglm_server.frontends.choices import MAX_CHOICES, generation_requests, merge
from autoglm_server.frontends.grpc_common import deadline, engine_stream, max_new_tokens_for
from autoglm_server.frontends.tool_stream import ChatStream, ToolPlan, plan_tools
from autoglm_server.frontends.tools import ToolSpec
from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.validation import (
    GenerationParams,
    check_room,
    format_loc,
    max_prompt_chars,
    too_long,
    validate_chat,
    validate_params,
    validate_prompt,
    validate_request_id,
)

DEFAULT_MAX_NEW_TOKENS = 128

_FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def params_from_pb(request: pb.GenerateRequest) -> GenerationParams:
    """Validate the sampling fields of a GenerateRequest (proto names are ours)."""
    return validate_params(
        {
            "max_new_tokens": _optional(request, "max_new_tokens"),
            "temperature": _optional(request, "temperature"),
            "top_p": _optional(request, "top_p"),
            "top_k": _optional(request, "top_k"),
            "repetition_penalty": _optional(request, "repetition_penalty"),
            "presence_penalty": _optional(request, "presence_penalty"),
            "frequency_penalty": _optional(request, "frequency_penalty"),
            "logit_bias": tuple(sorted((int(k), float(v)) for k, v in request.logit_bias.items()))
            or None,
            "logprobs": _optional(request, "logprobs"),
            "stop": tuple(request.stop),
            "seed": _optional(request, "seed"),
            "ignore_eos": request.ignore_eos,
            "priority": request.priority,
        }
    )


_CHOICE_MODES = {
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}


def _first_error(exc: ValidationError, prefix: str) -> InvalidRequestError:
    err = exc.errors(include_url=False)[0]
    # autoglm.v1's Tool and ToolCall carry name and arguments directly (no "function").
    loc = format_loc([p for p in err["loc"] if p != "function"])
    return InvalidRequestError(f"{prefix}.{loc}" if loc else prefix, err["msg"])


def tools_from_pb(request: pb.GenerateRequest) -> tuple[list[ToolSpec] | None, str | None]:
    """The request's tools (validated as OpenAI's) and tool_choice (as plan_tools takes it)."""
    specs: list[ToolSpec] | None = None
    if request.tools:
        specs = []
        for i, tool in enumerate(request.tools):
            parameters = None
            if tool.parameters:
                try:
                    parameters = json.loads(tool.parameters)
                except ValueError:
                    parameters = None
                if not isinstance(parameters, dict):
                    raise InvalidRequestError(
                        f"tools[{i}].parameters", "must be a JSON schema (a JSON object as text)"
                    )
            function: dict[str, Any] = {"name": tool.name, "parameters": parameters}
            if tool.description:
                function["description"] = tool.description
            try:
                checked = oai.Tool.model_validate({"type": "function", "function": function})
            except ValidationError as exc:
                raise _first_error(exc, f"tools[{i}]") from None
            specs.append(ToolSpec(checked.function.name, checked.function.parameters))
    choice: str | None = None
    which = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if which == "function":
        choice = f"function:{request.tool_choice.function}"
    elif which == "mode":
        mode = request.tool_choice.mode
        if mode not in _CHOICE_MODES and mode != pb.TOOL_CHOICE_MODE_UNSPECIFIED:
            raise InvalidRequestError("tool_choice.mode", "is not a known mode")
        choice = _CHOICE_MODES.get(mode)
    return specs, choice


def _uses_tool_fields(chat: pb.ChatMessages) -> bool:
    return any(m.role == "tool" or m.tool_calls or m.tool_call_id or m.name for m in chat.messages)


def _tool_chat(chat: pb.ChatMessages, field: str, max_chars: int) -> list[dict[str, Any]]:
    """Chat messages with tool calls and results, validated as OpenAI's."""
    messages = []
    for i, m in enumerate(chat.messages):
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.name:
            item["name"] = m.name
        if m.tool_call_id:
            item["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for c in m.tool_calls
            ]
        try:
            messages.append(oai.ChatMessage.model_validate(item))
        except ValidationError as exc:
            raise _first_error(exc, f"{field}[{i}]") from None
    if sum(len(m.text()) for m in messages) > max_chars:
        raise InvalidRequestError(field, too_long(max_chars))
    try:
        return template_messages(messages, field)
    except InvalidRequestError as exc:
        # autoglm.v1's ToolCall has its arguments directly (no "function").
        message = str(exc).removeprefix(f"{exc.field}: ")
        raise InvalidRequestError(exc.field.replace(".function.", "."), message) from None


async def prompt_ids(
    state: ServerState,
    engine: AsyncEngine,
    message: Any,
    text_field: str,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], str]:
    """Token ids of a request's ``oneof input`` and the field they came from.

    Raw text is tokenized as is; chat goes through the chat template (with
    ``tools``, OpenAI's shape, when given). Both are CPU work proportional to
    the (capped) text, so they run on a worker thread.
    """
    max_chars = max_prompt_chars(engine.model_info.max_model_len)
    which = message.WhichOneof("input")
    if which == text_field:
        if tools is not None:
            raise InvalidRequestError("tools", "need chat input (the chat template renders them)")
        text = validate_prompt(getattr(message, text_field), text_field, max_chars=max_chars)
        return await asyncio.to_thread(engine.tokenize, text), text_field
    if which == "chat":
        field = "chat.messages"
        if tools is not None or _uses_tool_fields(message.chat):
            chat = _tool_chat(message.chat, field, max_chars)
        else:
            chat = validate_chat(
                [{"role": m.role, "content": m.content} for m in message.chat.messages],
                field,
                max_chars=max_chars,
            )
        renderer = state.chat_renderer(engine)
        ids = await asyncio.to_thread(renderer.render, list(chat), tools=tools, field=field)
        return ids, field
    raise InvalidRequestError(text_field, f"one of {text_field} or chat is required")


def _finish_pb(reason: FinishReason | str | None) -> pb.FinishReason:
    if reason is None:
        return pb.FINISH_REASON_UNSPECIFIED
    if reason == "tool_calls":
        return pb.FINISH_REASON_TOOL_CALLS
    assert isinstance(reason, FinishReason)
    return _FINISH_TO_PB[reason]


def _usage_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def _logprobs_pb(entries: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=e.token_id,
            logprob=e.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in e.top],
        )
        for e in entries or ()
    ]


@dataclass(slots=True)
class _Built:
    """A GenerateRequest turned into engine requests (one per choice) and a tool plan."""

    gens: list[GenerationRequest]
    plan: ToolPlan
    prompt_tokens: int


@dataclass(slots=True)
class _ChoiceOut:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishReason | None = None


def _choice_count(request: pb.GenerateRequest) -> int:
    n = _optional(request, "n")
    if n is None:
        return 1
    if not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError("n", f"must be in [1, {MAX_CHOICES}]")
    return int(n)


class AutoGLMServicer:
    """autoglm.v1.AutoGLM. Registered with ``add_AutoGLMServicer_to_server``."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    async def _build(
        self, engine: AsyncEngine, request: pb.GenerateRequest, params: GenerationParams
    ) -> _Built:
        n = _choice_count(request)
        specs, choice = tools_from_pb(request)
        renderer = self._state.chat_renderer(engine) if specs else None
        plan = plan_tools(
            specs,
            choice,
            parser_name=self._state.tool_parser,
            template=renderer.template if renderer is not None else None,
            parallel=_optional(request, "parallel_tool_calls"),
        )
        tools_json = (
            [
                {"type": "function", "function": {"name": t.name, "parameters": t.parameters}}
                for t in plan.tools
            ]
            if specs
            else None
        )
        ids, field_name = await prompt_ids(self._state, engine, request, "prompt", tools_json)
        room = check_room(len(ids), engine.model_info.max_model_len, field_name)
        explicit = _optional(request, "max_new_tokens")
        sampling = dataclasses.replace(
            params.sampling,
            max_new_tokens=max_new_tokens_for(
                explicit, DEFAULT_MAX_NEW_TOKENS, room, "max_new_tokens"
            ),
        )
        if plan.forced and request.HasField("json_schema"):
            raise InvalidRequestError(
                "json_schema", "cannot be combined with tool_choice required or a function"
            )
        grammar = None
        if plan.forced:
            compiler = await asyncio.to_thread(self._state.grammar_compiler, engine)
            grammar = await asyncio.to_thread(compiler.compile, plan.grammar(), "tool_choice")
        elif request.HasField("json_schema"):
            grammar = await self._grammar(engine, request.json_schema)
        if grammar is not None:
            sampling = dataclasses.replace(sampling, grammar=grammar)
            sampling.validate()
        gens = generation_requests(ids, sampling, n, params.priority)
        return _Built(gens, plan, len(ids))

    async def _grammar(self, engine: AsyncEngine, text: str) -> Any:
        try:
            schema = json.loads(text)
        except ValueError:
            raise InvalidRequestError("json_schema", "must be a JSON schema (JSON text)") from None
        if not isinstance(schema, dict):
            raise InvalidRequestError("json_schema", "must be a JSON object")
        compiler = await asyncio.to_thread(self._state.grammar_compiler, engine)
        spec = GrammarSpec.json(schema or None)
        return await asyncio.to_thread(compiler.compile, spec, "json_schema")

    @contextlib.asynccontextmanager
    async def _streams(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        """Admit, build, and open one engine stream per choice; leaving aborts the unfinished.

        The deadline sits inside the streams' block, so the abort it causes is
        counted as DEADLINE_EXCEEDED, as the client sees it.
        """
        params = params_from_pb(request)
        with self._state.admit() as engine:
            built = await self._build(engine, request, params)
            async with contextlib.AsyncExitStack() as stack:
                streams: list[GenerationStream] = [
                    await stack.enter_async_context(engine_stream(engine, gen, context))
                    for gen in built.gens
                ]
                async with deadline(context):
                    yield engine, built, streams

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GenerateResponse:
        client_id = validate_request_id(request.request_id)
        async with self._streams(request, context) as (engine, built, streams):
            outs = [_ChoiceOut() for _ in streams]
            async for index, delta in merge(streams):
                out = outs[index]
                out.text.append(delta.text)
                out.token_ids.extend(delta.token_ids)
                out.logprobs.extend(delta.logprobs or ())
                if delta.finish_reason is not None:
                    out.finish = delta.finish_reason
        info = engine.model_info
        choices = [_choice_pb(i, out, built.plan) for i, out in enumerate(outs)]
        first = choices[0]
        completion = sum(len(out.token_ids) for out in outs)
        return pb.GenerateResponse(
            request_id=client_id or built.gens[0].request_id,
            text=first.text,
            token_ids=first.token_ids,
            finish_reason=first.finish_reason,
            usage=_usage_pb(Usage(built.prompt_tokens, completion)),
            model=info.name,
            model_version=info.version,
            logprobs=first.logprobs,
            tool_calls=first.tool_calls,
            choices=choices,
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        client_id = validate_request_id(request.request_id)
        async with self._streams(request, context) as (_, built, streams):
            reply_id = client_id or built.gens[0].request_id
            chats = [ChatStream(built.plan) for _ in streams]
            single = len(streams) == 1
            completion = 0
            async for index, delta in merge(streams):
                completion += len(delta.token_ids)
                cs = chats[index]
                pieces = cs.add(delta)
                if delta.finish_reason is not None:
                    pieces += cs.finish()
                out = _stream_pb(reply_id, index, delta, pieces, single)
                if delta.finish_reason is not None:
                    out.finish_reason = _finish_pb(_tool_finish(delta.finish_reason, cs.has_calls))
                await context.write(out)
            if not single:
                usage = _usage_pb(Usage(built.prompt_tokens, completion))
                await context.write(pb.GenerateStreamResponse(request_id=reply_id, usage=usage))

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TokenizeResponse:
        ids, _ = await prompt_ids(self._state, self._state.require_engine(), request, "text")
        return pb.TokenizeResponse(token_ids=ids, count=len(ids))

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ModelInfoResponse:
        info = self._state.require_engine().model_info
        return pb.ModelInfoResponse(
            name=info.name,
            version=info.version,
            max_model_len=info.max_model_len,
            dtype=info.dtype,
            device=info.device,
            vocab_size=info.vocab_size,
            architecture=info.architecture,
        )


def _tool_finish(reason: FinishReason, has_calls: bool) -> FinishReason | str:
    return "tool_calls" if has_calls and reason is FinishReason.STOP else reason


def _choice_pb(index: int, out: _ChoiceOut, plan: ToolPlan) -> pb.Choice:
    text = "".join(out.text)
    calls = plan.parse(text)
    finish = out.finish if out.finish is None else _tool_finish(out.finish, bool(calls))
    return pb.Choice(
        index=index,
        text="" if calls else text,
        token_ids=out.token_ids,
        finish_reason=_finish_pb(finish),
        logprobs=_logprobs_pb(out.logprobs),
        tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls],
    )


def _tool_call_deltas(pieces: Sequence[tuple[dict[str, Any], Any]]) -> list[pb.ToolCallDelta]:
    out = []
    for piece, _ in pieces:
        for call in piece.get("tool_calls") or ():
            fn = call.get("function") or {}
            out.append(
                pb.ToolCallDelta(
                    index=call["index"],
                    id=call.get("id") or "",
                    name=fn.get("name") or "",
                    arguments=fn.get("arguments") or "",
                )
            )
    return out


def _stream_pb(
    request_id: str,
    index: int,
    delta: GenerationDelta,
    pieces: Sequence[tuple[dict[str, Any], Any]],
    single: bool,
) -> pb.GenerateStreamResponse:
    """One streamed message: the delta's tokens and logprobs, its content and call pieces."""
    out = pb.GenerateStreamResponse(
        request_id=request_id,
        index=index,
        text="".join(p.get("content") or "" for p, _ in pieces),
        token_ids=delta.token_ids,
        logprobs=_logprobs_pb(delta.logprobs),
        tool_calls=_tool_call_deltas(pieces),
    )
    if single and delta.usage is not None:
        out.usage.CopyFrom(_usage_pb(delta.usage))
    return out
