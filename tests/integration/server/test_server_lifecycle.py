"""Process lifecycle against real servers: start-up refusal, health transitions,
back-pressure, and a SIGTERM in the middle of a burst."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from server_helpers import ServerProcess

from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.proto.autoglm.v1 import autoglm_pb2_grpc as pb_grpc

LONG = 1500  # tokens: seconds of work for the tiny model


def test_digest_mismatch_refuses_to_start(
    tiny_model: Path, tmp_path: Path, start_server: type[ServerProcess]
) -> None:
    manifest = tmp_path / "sha256.json"
    manifest.write_text(json.dumps({"model.safetensors": "0" * 64}))
    server = start_server("--sha256-file", str(manifest))
    try:
        code = server.proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"server did not exit:\n{server.log()[-3000:]}")
    log = server.log()
    assert code == 2, log[-3000:]
    (line,) = [ln for ln in log.splitlines() if "model load failed" in ln]
    assert "model.safetensors" in line
    assert "does not match" in line
    assert "Traceback" not in log


def _open_writer_when_read(fifo: Path, server: ServerProcess, limit_s: float = 120) -> int:
    """Wait until the server opens ``fifo`` for reading; return a write end that
    keeps its read blocked (nothing is written until the fd is closed)."""
    deadline = time.monotonic() + limit_s
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        assert server.proc.poll() is None, server.log()[-3000:]
        assert time.monotonic() < deadline, "the server never read the manifest"
        time.sleep(0.02)


def test_sigterm_while_loading_exits_at_once(
    tmp_path: Path, start_server: type[ServerProcess]
) -> None:
    # The digest manifest is a FIFO nobody writes to: the model load blocks
    # reading it, as it would on a slow volume, for as long as the test likes.
    fifo = tmp_path / "sha256.json"
    os.mkfifo(fifo)
    server = start_server("--sha256-file", str(fifo))
    writer = _open_writer_when_read(fifo, server)
    try:
        assert server.health("") == "NOT_SERVING"
        assert server.http.get("/healthz").status_code == 200
        server.proc.send_signal(signal.SIGTERM)
        try:
            code = server.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"SIGTERM during the load did not exit:\n{server.log()[-3000:]}")
    finally:
        os.close(writer)  # unblocks the loader if the server is still there
    log = server.log()
    assert code == 0, log[-3000:]
    assert "stopped during start-up" in log
    assert "Traceback" not in log


def test_health_transitions(start_server: type[ServerProcess]) -> None:
    server = start_server("--shutdown-grace-seconds", "30")
    seen: list[str] = []
    deadline = time.monotonic() + 120
    while not seen or seen[-1] != "SERVING":
        assert server.proc.poll() is None, server.log()[-3000:]
        assert time.monotonic() < deadline, f"never SERVING; saw {seen}"
        status = server.health("autoglm.v1.AutoGLM")
        if status is not None and (not seen or seen[-1] != status):
            seen.append(status)
        time.sleep(0.02)
    assert seen == ["NOT_SERVING", "SERVING"]  # answered while loading, then ready
    assert server.http.get("/readyz").status_code == 200

    # One long request keeps the drain open while we look.
    stub = pb_grpc.AutoGLMStub(server.channel)
    call = stub.GenerateStream(pb.GenerateRequest(prompt="go", max_new_tokens=300, ignore_eos=True))
    stream = iter(call)
    next(stream)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while server.health("") != "NOT_SERVING":
        assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
        time.sleep(0.01)
    assert server.health("autoglm.v1.AutoGLM") == "NOT_SERVING"
    assert server.http.get("/readyz").status_code == 503
    assert server.http.get("/healthz").status_code == 200
    rest = list(stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert server.proc.wait(timeout=60) == 0


def test_queue_overflow_is_resource_exhausted(start_server: type[ServerProcess]) -> None:
    server = start_server("--max-queue-length", "2", "--max-batch-size", "1")
    server.wait_serving()
    stub = pb_grpc.AutoGLMStub(server.channel)
    req = pb.GenerateRequest(prompt="go", max_new_tokens=LONG, ignore_eos=True)
    running = stub.GenerateStream(req)
    next(iter(running))  # the only batch slot is taken
    queued = [stub.GenerateStream(req) for _ in range(2)]
    server.wait_metric("autoglm_queue_depth", 2)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(req, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = dict(info.value.trailing_metadata() or ())
        assert float(trailers["retry-after"]) > 0
        resp = server.http.post("/v1/completions", json={"prompt": "go", "max_tokens": 5})
        assert resp.status_code == 429
        assert int(resp.headers["retry-after"]) >= 1
        assert resp.json()["error"]["type"] == "rate_limit_error"
        assert server.metric("autoglm_requests_total", code="RESOURCE_EXHAUSTED") == 2
    finally:
        for call in (running, *queued):
            call.cancel()
    server.wait_metric("autoglm_queue_depth", 0)
    server.wait_metric("autoglm_running_requests", 0)


async def _burst_outcome(
    stub: pb_grpc.AutoGLMStub, tokens: int, started: asyncio.Event, counter: list[int], want: int
) -> tuple[str, str, int]:
    """("done", finish, tokens) or ("error", code, chunks received before it)."""
    req = pb.GenerateRequest(prompt="Hello there", max_new_tokens=tokens, ignore_eos=True)
    got = 0
    finish = ""
    try:
        async for chunk in stub.GenerateStream(req, timeout=120):
            if got == 0:
                counter[0] += 1
                if counter[0] >= want:
                    started.set()
            got += len(chunk.token_ids)
            if chunk.finish_reason:
                finish = pb.FinishReason.Name(chunk.finish_reason)
    except grpc.aio.AioRpcError as exc:
        return ("error", exc.code().name, got)
    return ("done", finish, got)


def test_sigterm_during_a_burst_drains_cleanly(start_server: type[ServerProcess]) -> None:
    server = start_server("--shutdown-grace-seconds", "60")
    server.wait_serving()
    tokens = 200

    async def burst() -> list[tuple[str, str, int]]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.AutoGLMStub(channel)
            started, counter = asyncio.Event(), [0]
            tasks = [
                asyncio.create_task(_burst_outcome(stub, tokens, started, counter, want=10))
                for _ in range(25)
            ]
            await asyncio.wait_for(started.wait(), 60)
            server.proc.send_signal(signal.SIGTERM)
            for _ in range(25):  # the rest of the burst arrives during the drain
                tasks.append(
                    asyncio.create_task(_burst_outcome(stub, tokens, started, counter, 10**6))
                )
                await asyncio.sleep(0.01)
            return await asyncio.gather(*tasks)

    outcomes = asyncio.run(burst())
    assert len(outcomes) == 50
    completed = [o for o in outcomes if o[0] == "done"]
    refused = [o for o in outcomes if o[0] == "error"]
    for outcome in completed:
        assert outcome == ("done", "FINISH_REASON_LENGTH", tokens), outcome
    for outcome in refused:
        assert outcome == ("error", "UNAVAILABLE", 0), outcome  # refused at admission, never cut
    assert len(completed) >= 10  # everything streaming at SIGTERM finished
    assert refused, "nothing arrived during the drain"
    assert server.proc.wait(timeout=90) == 0, server.log()[-3000:]
