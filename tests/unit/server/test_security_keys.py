"""API keys and per-key limits without a server process: the file's format and its
errors, the token buckets on a fake clock, the priority cap on both front ends,
/metrics behind a key, the HTTP request deadline."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import httpx
import pytest
from frontend_fakes import FakeEngine

from autoglm_server.frontend import Phase, ServerState
from autoglm_server.grpc_server import build_grpc_server
from autoglm_server.http_server import build_http_app, build_metrics_app
from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.proto.autoglm.v1 import autoglm_pb2_grpc as pb_grpc
from autoglm_server.security.keys import (
    KeyGuard,
    PermissionDeniedError,
    RateLimitedError,
    UnauthenticatedError,
    bearer,
    parse_keys,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _guard(tmp_path: Path, *keys: dict[str, object], clock: Clock | None = None) -> KeyGuard:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": list(keys)}))
    return KeyGuard(str(path), clock=clock or Clock(), protect_metrics=True)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"key": "k"}, "keys[0].name"),
        ({"name": "a"}, "keys[0]: needs key or sha256"),
        ({"name": "a", "sha256": "zz"}, "keys[0].sha256"),
        ({"name": "a", "key": "k", "scopes": ["admin"]}, "keys[0].scopes"),
        ({"name": "a", "key": "k", "priority_cap": -1}, "keys[0].priority_cap"),
        ({"name": "a", "key": "k", "requests_per_minute": 0}, "keys[0].requests_per_minute"),
        ({"name": "a", "key": "k", "rpm": 1}, "keys[0].rpm: unknown field"),
    ],
)
def test_a_bad_keys_file_names_the_entry_and_field(entry: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_keys(json.dumps({"keys": [entry]}))


def test_keys_by_hash_and_bearer_parsing(tmp_path: Path) -> None:
    import hashlib

    guard = _guard(tmp_path, {"name": "h", "sha256": hashlib.sha256(b"s3cret").hexdigest()})
    assert guard.authenticate("s3cret").name == "h"
    with pytest.raises(UnauthenticatedError):
        guard.authenticate("S3cret")
    assert bearer("Bearer abc") == "abc" and bearer("bearer  abc ") == "abc"
    assert bearer("abc") == "abc" and bearer("Basic abc") is None and bearer("") is None


def test_scopes_and_token_buckets_on_a_clock(tmp_path: Path) -> None:
    clock = Clock()
    guard = _guard(
        tmp_path,
        {"name": "r", "key": "kr", "scopes": ["read"]},
        {"name": "q", "key": "kq", "requests_per_minute": 2, "tokens_per_minute": 60},
        clock=clock,
    )
    with pytest.raises(PermissionDeniedError):
        guard.admit("kr", "generate")
    guard.admit("kr", "read").release("OK")
    guard.admit("kq", "generate").release("OK")
    ticket = guard.admit("kq", "generate")
    with pytest.raises(RateLimitedError) as info:
        guard.admit("kq", "generate")
    assert info.value.limit == "requests_per_minute"
    assert info.value.retry_after_s == pytest.approx(30.0)  # one request per 30 s refills
    clock.now += 30
    ticket.charge(90)  # 30 tokens in debt
    ticket.release("OK")
    with pytest.raises(RateLimitedError) as info:
        guard.admit("kq", "generate")
    assert info.value.limit == "tokens_per_minute"
    assert info.value.retry_after_s == pytest.approx(30.0)  # one token per second
    clock.now += 30
    guard.admit("kq", "generate").release("OK")
    text = guard.render().decode()
    assert 'autoglm_api_key_rate_limited_total{key="q",limit="tokens_per_minute"} 1.0' in text
    assert 'autoglm_api_key_tokens_total{key="q"} 90.0' in text


def test_key_labels_are_bounded(tmp_path: Path) -> None:
    from autoglm_server.security import keys as keys_module

    entries = [{"name": f"k{i}", "key": f"s{i}"} for i in range(keys_module.MAX_KEY_LABELS + 5)]
    guard = _guard(tmp_path, *entries)
    for i in range(len(entries)):
        guard.admit(f"s{i}", "generate").release("OK")
    text = guard.render().decode()
    names = {line.split('key="')[1].split('"')[0] for line in text.splitlines() if 'key="' in line}
    assert len(names) == keys_module.MAX_KEY_LABELS + 1 and "_other" in names


@pytest.fixture
def state() -> ServerState:
    s = ServerState()
    s.engine = FakeEngine()
    s.set_phase(Phase.SERVING)
    return s


async def test_the_key_caps_the_priority_on_http_and_grpc(
    state: ServerState, tmp_path: Path
) -> None:
    guard = _guard(tmp_path, {"name": "low", "key": "kl", "priority_cap": 1})
    engine = state.engine
    assert isinstance(engine, FakeEngine)
    app = build_http_app(state, None, keys=guard)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        body = {"prompt": "hi", "max_tokens": 1, "priority": 0}
        resp = await c.post("/v1/completions", json=body, headers={"Authorization": "Bearer kl"})
        assert resp.status_code == 200, resp.text
    server, port = build_grpc_server(state, "127.0.0.1", 0, keys=guard)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await pb_grpc.AutoGLMStub(channel).Generate(
                pb.GenerateRequest(prompt="hi", max_new_tokens=1, priority=0),
                metadata=(("authorization", "Bearer kl"),),
            )
    finally:
        await server.stop(None)
    assert [r.priority for r in engine.requests] == [1, 1]


async def test_metrics_behind_a_key_and_probes_open(state: ServerState, tmp_path: Path) -> None:
    guard = _guard(
        tmp_path,
        {"name": "prom", "key": "kp", "scopes": ["metrics"]},
        {"name": "user", "key": "ku"},
    )
    for app in (
        build_http_app(state, lambda: b"x 1\n", keys=guard),
        build_metrics_app(lambda: b"x 1\n", state, guard),
    ):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            assert (await c.get("/metrics")).status_code == 401
            assert (
                await c.get("/metrics", headers={"Authorization": "Bearer ku"})
            ).status_code == 403
            ok = await c.get("/metrics", headers={"Authorization": "Bearer kp"})
            assert ok.status_code == 200 and ok.text == "x 1\n"
            assert (await c.get("/healthz")).status_code == 200
            assert (await c.get("/readyz")).status_code == 200


async def test_the_http_request_deadline(state: ServerState) -> None:
    engine = state.engine
    assert isinstance(engine, FakeEngine)
    engine.step_s = 0.05
    rejected: list[str] = []
    state.on_rejected = rejected.append
    app = build_http_app(state, None, request_timeout_s=0.3)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        resp = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 60})
        assert resp.status_code == 504, resp.text
        assert resp.json()["error"]["type"] == "timeout_error"
        quick = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert quick.status_code == 200
    assert engine.aborted  # the engine request was aborted, not left running
