"""The OpenAI-compatible HTTP front end against a fake engine (in-process ASGI)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from frontend_fakes import FakeEngine

from autoglm_server import errors
from autoglm_server.frontend import Phase, ServerState
from autoglm_server.http_server import build_http_app, build_metrics_app
from autoglm_server.validation import max_prompt_chars


@dataclass
class Harness:
    state: ServerState
    engine: FakeEngine
    client: httpx.AsyncClient


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    state = ServerState()
    engine = FakeEngine()
    state.engine = engine
    state.set_phase(Phase.SERVING)
    app = build_http_app(state, lambda: b"autoglm_running_requests 0.0\n")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield Harness(state, engine, client)


def _events(body: str) -> list[str]:
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    return [e.removeprefix("data: ") for e in events]


async def test_models(h: Harness) -> None:
    resp = await h.client.get("/v1/models")
    assert resp.status_code == 200
    assert [m["id"] for m in resp.json()["data"]] == ["fake"]


async def test_completion(h: Harness) -> None:
    resp = await h.client.post(
        "/v1/completions",
        json={"model": "fake", "prompt": "hi", "max_tokens": 3, "temperature": 0, "stop": "\n"},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "xxx"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    params = h.engine.requests[0].params
    assert (params.max_new_tokens, params.temperature, params.stop) == (3, 0.0, ("\n",))


async def test_completion_default_max_tokens_is_openai_16(h: Harness) -> None:
    await h.client.post("/v1/completions", json={"prompt": "hi"})
    assert h.engine.requests[0].params.max_new_tokens == 16


async def test_chat_completion(h: Harness) -> None:
    resp = await h.client.post(
        "/v1/chat/completions",
        json={
            "model": "fake",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            "max_completion_tokens": 2,
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "xx"}
    assert body["usage"]["completion_tokens"] == 2
    assert bytes(h.engine.requests[0].prompt_token_ids) == b"<system>be brief<user>hi<assistant>"


async def test_chat_default_max_tokens_fills_the_context(h: Harness) -> None:
    await h.client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]}
    )
    prompt_len = len(h.engine.requests[0].prompt_token_ids)
    assert h.engine.requests[0].params.max_new_tokens == 64 - prompt_len


async def test_streaming_chat_is_sse_with_done(h: Harness) -> None:
    resp = await h.client.post(
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = _events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "xxx"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert h.state.in_flight == 0


async def test_streaming_completion(h: Harness) -> None:
    resp = await h.client.post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}
    )
    events = _events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == "xx"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)  # only with include_usage


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "top_p": 7}, "top_p"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "n": 17}, "n"),
        ("/v1/completions", {"prompt": "hi", "priority": 5}, "priority"),  # the engine's check
        ("/v1/chat/completions", {"messages": []}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "wizard", "content": "x"}]},
            "messages[0].role",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "stop": [""]},
            "stop",
        ),
    ],
)
async def test_bad_input_is_400_naming_the_field(
    h: Harness, path: str, body: dict[str, Any], param: str
) -> None:
    resp = await h.client.post(path, json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"].startswith(f"{param}: ")
    assert h.engine.requests == []


async def test_prompt_over_the_size_cap_is_400(h: Harness) -> None:
    too_long = "x" * (max_prompt_chars(h.engine.info.max_model_len) + 1)
    cases = [
        ("/v1/completions", {"prompt": too_long}, "prompt"),
        ("/v1/completions", {"prompt": too_long, "stream": True}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": too_long}]}, "messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": too_long}], "stream": True},
            "messages",
        ),
    ]
    for path, body, param in cases:
        resp = await h.client.post(path, json=body)
        assert resp.status_code == 400, resp.text
        error = resp.json()["error"]
        assert error["param"] == param
        assert error["message"].startswith(f"{param}: must be at most")
    assert h.engine.requests == []


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "body", "method"),
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 1}, "tokenize"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
            "apply_chat_template",
        ),
    ],
)
async def test_tokenizing_does_not_block_the_event_loop(
    h: Harness, path: str, body: dict[str, Any], method: str, stream: bool
) -> None:
    started, release, finished = threading.Event(), threading.Event(), threading.Event()
    target = h.engine.tokenizer if method == "apply_chat_template" else h.engine
    fast = getattr(target, method)

    def slow_any(*args: Any, **kwargs: Any) -> Any:
        started.set()
        release.wait(3)  # on the event loop's thread, this would hold everything for 3 s
        finished.set()
        return fast(*args, **kwargs)

    setattr(target, method, slow_any)
    call = asyncio.ensure_future(h.client.post(path, json={**body, "stream": stream}))
    try:
        assert await asyncio.to_thread(started.wait, 5)
        async with asyncio.timeout(1.0):
            assert (await h.client.get("/readyz")).status_code == 200
        assert not finished.is_set()  # answered while the tokenizer worked
    finally:
        release.set()
    assert (await call).status_code == 200


async def test_invalid_json_is_400(h: Harness) -> None:
    resp = await h.client.post(
        "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400
    assert "error" in resp.json()


async def test_unknown_model_is_404(h: Harness) -> None:
    resp = await h.client.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert resp.status_code == 404
    assert resp.json()["error"]["param"] == "model"


async def test_queue_full_is_429_with_retry_after(h: Harness) -> None:
    h.engine.admission_error = errors.QueueFullError("the queue is full", retry_after_s=3)
    for stream in (False, True):
        resp = await h.client.post("/v1/completions", json={"prompt": "hi", "stream": stream})
        assert resp.status_code == 429
        assert resp.headers["retry-after"] == "3"
        assert resp.json()["error"]["type"] == "rate_limit_error"
    assert h.state.in_flight == 0


async def test_not_ready_is_503_and_readyz_follows(h: Harness) -> None:
    assert (await h.client.get("/readyz")).status_code == 200
    h.state.set_phase(Phase.DRAINING)
    resp = await h.client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]}
    )
    assert resp.status_code == 503
    assert resp.json()["error"]["type"] == "service_unavailable"
    assert (await h.client.get("/readyz")).status_code == 503
    assert (await h.client.get("/healthz")).status_code == 200  # still live


async def test_internal_errors_hide_detail(h: Harness) -> None:
    h.engine.admission_error = RuntimeError("secret detail")
    resp = await h.client.post("/v1/completions", json={"prompt": "hi"})
    assert resp.status_code == 500
    assert resp.json()["error"]["message"] == "internal error"
    assert "secret" not in resp.text


async def test_metrics_endpoints(h: Harness) -> None:
    resp = await h.client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    assert b"autoglm_running_requests" in resp.content
    app = build_metrics_app(lambda: b"x 1\n")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://m") as c:
        assert (await c.get("/metrics")).text == "x 1\n"
        assert (await c.get("/v1/models")).status_code == 404


async def test_error_mid_stream_is_an_error_event(h: Harness) -> None:
    h.engine.fail_mid_stream = RuntimeError("secret detail")
    resp = await h.client.post(
        "/v1/completions", json={"prompt": "hi", "max_tokens": 5, "stream": True}
    )
    assert resp.status_code == 200  # the headers were already out
    events = _events(resp.text)
    assert json.loads(events[0])["choices"][0]["text"] == "x"
    assert json.loads(events[-1]) == {
        "error": {
            "message": "internal error",
            "type": "internal_error",
            "param": None,
            "code": None,
        }
    }
    assert "secret" not in resp.text
    assert h.state.in_flight == 0
