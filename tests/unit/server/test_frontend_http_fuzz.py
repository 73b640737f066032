"""Hypothesis over raw HTTP bodies (bytes, arbitrary JSON, near-valid requests) against the
app with a fake engine: every answer is a 2xx or a 4xx with OpenAI's error shape, and
nothing is counted as INTERNAL. In process, so hundreds of cases take seconds."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

import httpx
from frontend_fakes import FakeEngine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autoglm_server.frontend import Phase, ServerState
from autoglm_server.http_server import build_http_app

_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
_fields = st.sampled_from(
    ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stop", "stream",
     "stream_options", "logprobs", "top_logprobs", "logit_bias", "seed", "tools", "tool_choice",
     "response_format", "presence_penalty", "frequency_penalty", "priority", "parallel_tool_calls",
     "max_completion_tokens", "echo", "best_of", "suffix", "user"]
)  # fmt: skip
_near_valid = st.fixed_dictionaries(
    {"messages": st.just([{"role": "user", "content": "hi"}]), "max_tokens": st.just(3)}
).flatmap(lambda base: st.dictionaries(_fields, _json, max_size=4).map(lambda d: {**base, **d}))


@functools.cache
def _app() -> tuple[Any, list[str]]:
    state = ServerState()
    state.engine = FakeEngine()
    rejected: list[str] = []
    state.on_rejected = rejected.append
    state.set_phase(Phase.SERVING)
    return build_http_app(state, None), rejected


async def _post(app: Any, path: str, content: bytes) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.post(path, content=content, headers={"content-type": "application/json"})


@given(
    body=st.binary(max_size=300)
    | _json.map(lambda v: json.dumps(v).encode())
    | _near_valid.map(lambda v: json.dumps(v).encode()),
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
)
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_any_body_gets_a_client_answer(body: bytes, path: str) -> None:
    app, rejected = _app()
    rejected.clear()
    resp = asyncio.run(_post(app, path, body))
    assert resp.status_code < 500, (body, resp.text)
    if resp.status_code >= 400:
        assert resp.json()["error"]["message"]
    assert "INTERNAL" not in rejected
