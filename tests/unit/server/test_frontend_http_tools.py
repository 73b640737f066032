"""Tool calls over HTTP against a scripted fake engine: parsed, streamed as the openai
client assembles them (id and name first, arguments as they are generated)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from frontend_fakes import FakeEngine

from autoglm_server.engine.api import FinishReason
from autoglm_server.frontend import Phase, ServerState
from autoglm_server.http_server import build_http_app

TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object"}},
    }
]
BODY: dict[str, Any] = {
    "messages": [{"role": "user", "content": "weather?"}],
    "tools": TOOLS,
    "max_tokens": 20,
}
CALL = ["get_", "weather\n", '{"city": ', '"Paris"', "}"]


@pytest.fixture
async def client() -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine]]:
    state = ServerState()
    engine = FakeEngine()
    engine.finish_reason = FinishReason.STOP
    state.engine = engine
    state.set_phase(Phase.SERVING)
    transport = httpx.ASGITransport(app=build_http_app(state, None))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c, engine


def _chunks(text: str) -> list[dict[str, Any]]:
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


async def test_a_glm4_call_streams_its_arguments_as_they_come(
    client: tuple[httpx.AsyncClient, FakeEngine],
) -> None:
    c, engine = client
    engine.script = CALL
    resp = await c.post("/v1/chat/completions", json={**BODY, "stream": True})
    chunks = _chunks(resp.text)
    deltas = [ch["choices"][0]["delta"] for ch in chunks]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    head = calls[0]
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    pieces = [call["function"]["arguments"] for call in calls[1:]]
    assert len(pieces) >= 2  # sent while generated, not at the end in one piece
    assert "".join(pieces) == '{"city": "Paris"}'
    assert all("content" not in d or d["content"] == "" for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_call_unstreamed(client: tuple[httpx.AsyncClient, FakeEngine]) -> None:
    c, engine = client
    engine.script = CALL
    body = (await c.post("/v1/chat/completions", json=BODY)).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


@pytest.mark.parametrize("stream", [False, True])
async def test_prose_is_content_and_none_disables_parsing(
    client: tuple[httpx.AsyncClient, FakeEngine], stream: bool
) -> None:
    c, engine = client
    for script, extra, want in [
        (["get", " lost", " in it"], {}, "get lost in it"),
        (CALL, {"tool_choice": "none"}, "".join(CALL)),
    ]:
        engine.script = script
        resp = await c.post("/v1/chat/completions", json={**BODY, **extra, "stream": stream})
        if stream:
            chunks = _chunks(resp.text)
            text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
            assert not any(ch["choices"][0]["delta"].get("tool_calls") for ch in chunks)
        else:
            choice = resp.json()["choices"][0]
            text, finish = choice["message"]["content"], choice["finish_reason"]
            assert "tool_calls" not in choice["message"]
        assert (text, finish) == (want, "stop")


async def test_tool_choice_errors_name_the_field(
    client: tuple[httpx.AsyncClient, FakeEngine],
) -> None:
    c, _ = client
    for extra, param in [
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": []}, "tools"),
        ({"tools": TOOLS * 2}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
        ),
        (
            {"response_format": {"type": "json_object"}, "tool_choice": "required"},
            "response_format",
        ),
    ]:
        resp = await c.post("/v1/chat/completions", json={**BODY, **extra})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == param


LLAMA_CALL = ['{"name": "get_', 'weather", "parameters": ', '{"city": ', '"Par', 'is"}', "}"]
TWO_CALLS = [*LLAMA_CALL, "; ", '{"name": "get_weather", ', '"parameters": {"city": "Rome"}}']


def _stream_tool_calls(chunks: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Assemble streamed tool calls as the openai client does (by index)."""
    calls: dict[int, dict[str, Any]] = {}
    for ch in chunks:
        for tc in ch["choices"][0]["delta"].get("tool_calls") or []:
            call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            call["pieces"] = call.get("pieces", 0) + 1
            if tc.get("id"):
                call["id"] = tc["id"]
            fn = tc.get("function") or {}
            if fn.get("name"):
                call["name"] = fn["name"]
            call["arguments"] += fn.get("arguments") or ""
    return calls


@pytest.fixture
async def llama() -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine]]:
    """A server whose tool-call parser is llama3_json."""
    state = ServerState()
    state.tool_parser = "llama3_json"
    engine = FakeEngine()
    engine.finish_reason = FinishReason.STOP
    state.engine = engine
    state.set_phase(Phase.SERVING)
    transport = httpx.ASGITransport(app=build_http_app(state, None))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c, engine


async def test_a_llama3_call_streams_its_arguments_as_they_come(
    llama: tuple[httpx.AsyncClient, FakeEngine],
) -> None:
    c, engine = llama
    engine.script = LLAMA_CALL
    resp = await c.post("/v1/chat/completions", json={**BODY, "stream": True})
    chunks = _chunks(resp.text)
    calls = _stream_tool_calls(chunks)
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert calls[0]["arguments"] == '{"city": "Paris"}'
    assert calls[0]["pieces"] >= 3  # the head, then the arguments in several pieces
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("parallel", [True, False])
async def test_parallel_tool_calls_false_keeps_the_first_call(
    llama: tuple[httpx.AsyncClient, FakeEngine], parallel: bool
) -> None:
    c, engine = llama
    engine.script = TWO_CALLS
    body = {**BODY, "parallel_tool_calls": parallel}
    streamed = _stream_tool_calls(_chunks((await c.post(
        "/v1/chat/completions", json={**body, "stream": True}
    )).text))  # fmt: skip
    whole = (await c.post("/v1/chat/completions", json=body)).json()
    calls = whole["choices"][0]["message"]["tool_calls"]
    want = ['{"city": "Paris"}', '{"city": "Rome"}'] if parallel else ['{"city": "Paris"}']
    assert [call["function"]["arguments"] for call in calls] == want
    assert [call["arguments"] for _, call in sorted(streamed.items())] == want
