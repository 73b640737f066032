"""Bad input over HTTP is the client's error (400 naming the field), never a 500,
and every outcome is counted once in autoglm_requests_total (issue 9's list)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from frontend_fakes import FakeEngine

from autoglm_server.engine.api import FinishReason
from autoglm_server.frontend import Phase, ServerState
from autoglm_server.http_server import build_http_app

JSON = {"content-type": "application/json"}


@dataclass
class Harness:
    state: ServerState
    engine: FakeEngine
    client: httpx.AsyncClient
    counted: list[str] = field(default_factory=list)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    state = ServerState()
    engine = FakeEngine()
    state.engine = engine
    state.set_phase(Phase.SERVING)
    app = build_http_app(state, None)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        harness = Harness(state, engine, client)
        state.on_rejected = harness.counted.append
        yield harness


def _error(resp: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    return error


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", b'{"prompt": "\xff\xfe"}', "body"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xc3("}]}', "body"),
        ("/v1/completions", b'{"prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", b'{"prompt": ["ok", "\\udfff x"]}', "prompt[1]"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
            "messages[0].content[0].text",
        ),
        ("/v1/completions", b"[" * 5000 + b"]" * 5000, "body"),
        ("/v1/completions", b'{"prompt": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "body"),
        ("/v1/completions", b'{"prompt": "a", "x": ' + b"[" * 100 + b"]" * 100 + b"}", "x"),
        ("/v1/completions", b"{nope", "body"),
        ("/v1/completions", b"[1, 2]", "body"),
    ],
)
async def test_undecodable_bodies_are_400_and_counted(
    h: Harness, path: str, raw: bytes, param: str
) -> None:
    error = _error(await h.client.post(path, content=raw, headers=JSON))
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert h.engine.requests == []
    assert h.counted == ["INVALID_ARGUMENT"]


@pytest.mark.parametrize("value", [10**9, 2**63, 2**70])
async def test_max_tokens_beyond_the_context_is_400(h: Harness, value: int) -> None:
    error = _error(
        await h.client.post("/v1/completions", json={"prompt": "hi", "max_tokens": value})
    )
    assert error["param"] == "max_tokens"
    error = _error(
        await h.client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": value},
        )
    )
    assert error["param"] == "max_completion_tokens"
    assert h.engine.requests == []
    assert h.counted == ["INVALID_ARGUMENT"] * 2


async def test_max_tokens_that_fit_exactly_are_accepted(h: Harness) -> None:
    # The fake's context is 64 tokens; "hi" is 2.
    resp = await h.client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 62})
    assert resp.status_code == 200, resp.text
    _error(await h.client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 63}))


async def test_too_long_chat_names_messages(h: Harness) -> None:
    body = {"messages": [{"role": "user", "content": "x" * 70}]}  # 70 tokens > 64
    for stream in (False, True):
        error = _error(await h.client.post("/v1/chat/completions", json={**body, "stream": stream}))
        assert error["param"] == "messages"
        assert "context limit" in error["message"]
    error = _error(await h.client.post("/v1/completions", json={"prompt": "x" * 70}))
    assert error["param"] == "prompt"


async def test_unrenderable_conversation_is_400_naming_messages(h: Harness) -> None:
    h.engine.tokenizer.apply_chat_template = _refuse  # type: ignore[method-assign]
    error = _error(
        await h.client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
        )
    )
    assert error["param"] == "messages"
    assert "roles must alternate" in error["message"]


def _refuse(conversation: Any, **kwargs: Any) -> str:
    raise ValueError("roles must alternate")


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/completions", {"echo": True}, "echo"),
        ("/v1/completions", {"suffix": "tail"}, "suffix"),
        ("/v1/completions", {"best_of": 3}, "best_of"),
        ("/v1/completions", {"functions": []}, "functions"),
        ("/v1/chat/completions", {"audio": {"voice": "alloy"}}, "audio"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"prediction": {"type": "content"}}, "prediction"),
        ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
        ("/v1/chat/completions", {"service_tier": "auto"}, "service_tier"),
        ("/v1/chat/completions", {"store": True}, "store"),
        ("/v1/chat/completions", {"metadata": {"a": "b"}}, "metadata"),
        ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
        ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
        (
            "/v1/chat/completions",
            {"stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
        ),
        ("/v1/chat/completions", {"tool_choice": "auto"}, "tool_choice"),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"presence_penalty": 2.5}, "presence_penalty"),
        ("/v1/chat/completions", {"frequency_penalty": -3}, "frequency_penalty"),
        ("/v1/chat/completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/chat/completions", {"logit_bias": {"999999": 1}}, "logit_bias"),
        ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format.type"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
async def test_unsupported_parameters_are_refused_by_name(
    h: Harness, path: str, extra: dict[str, Any], param: str
) -> None:
    base: dict[str, Any] = (
        {"prompt": "hi"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    error = _error(await h.client.post(path, json={**base, **extra}))
    assert error["param"] == param, error
    assert error["message"].startswith(f"{param}: ")
    assert h.engine.requests == []


async def test_internal_errors_are_counted(h: Harness) -> None:
    h.engine.admission_error = RuntimeError("secret")
    _error(await h.client.post("/v1/completions", json={"prompt": "hi"}), 500)
    _error(await h.client.post("/v1/completions", json={"prompt": "hi", "model": "nope"}), 404)
    assert h.counted == ["INTERNAL", "NOT_FOUND"]


async def test_abort_is_answered_as_an_openai_finish_reason(h: Harness) -> None:
    h.engine.finish_reason = FinishReason.ABORT
    resp = await h.client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    choice = resp.json()["choices"][0]
    assert (choice["finish_reason"], choice["autoglm_finish_reason"]) == ("stop", "abort")
    resp = await h.client.post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}
    )
    events = [json.loads(e[6:]) for e in resp.text.split("\n\n") if e.startswith("data: {")]
    last = events[-1]["choices"][0]
    assert (last["finish_reason"], last["autoglm_finish_reason"]) == ("stop", "abort")


async def test_n_choices_are_separate_requests_with_their_own_seeds(h: Harness) -> None:
    resp = await h.client.post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 3, "seed": 5}
    )
    body = resp.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 6
    assert [r.params.seed for r in h.engine.requests] == [5, 6, 7]
    resp = await h.client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "a"}],
            "max_tokens": 2,
            "n": 2,
            "stream": True,
        },
    )
    events = [json.loads(e[6:]) for e in resp.text.split("\n\n") if e.startswith("data: {")]
    finished = sorted(c["choices"][0]["index"] for c in events if c["choices"][0]["finish_reason"])
    assert finished == [0, 1]


@pytest.mark.parametrize("caching", [True, False])
async def test_n_choices_share_the_prompt_when_the_engine_caches_prefixes(
    h: Harness, caching: bool
) -> None:
    from types import SimpleNamespace

    h.engine.config = SimpleNamespace(prefix_caching=caching)
    resp = await h.client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 3})
    assert len(resp.json()["choices"]) == 3
    first, second, third = (r.request_id for r in h.engine.requests)
    events = h.engine.events
    started = [e for e in events if e[0] == "generate"]
    assert started == [("generate", first), ("generate", second), ("generate", third)]
    if caching:  # the others start after the first's prefill (its first token) is done
        assert events.index(("delta", first)) < events.index(("generate", second))
    else:
        assert events[:3] == started


async def test_an_error_mid_stream_is_counted_as_internal_not_cancelled(h: Harness) -> None:
    h.engine.fail_mid_stream = RuntimeError("secret")
    resp = await h.client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True},
    )
    assert resp.status_code == 200
    assert '"internal error"' in resp.text
    (req,) = h.engine.requests
    assert h.engine.abort_codes[req.request_id] == "INTERNAL"
    assert h.counted == []  # the engine counts it (under INTERNAL), not the front end too
