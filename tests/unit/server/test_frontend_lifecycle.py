"""The server process lifecycle with a fake engine: start-up order, drain on
stop, engine death and load failure, each with its exit code."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import httpx
import pytest
from frontend_fakes import FakeEngine
from grpc_health.v1 import health_pb2, health_pb2_grpc

from autoglm_server.app import (
    EXIT_ENGINE_DIED,
    EXIT_OK,
    EXIT_START_FAILED,
    ServeOptions,
    ServerProcess,
)
from autoglm_server.engine.config import EngineConfig
from autoglm_server.errors import ModelLoadError
from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.proto.autoglm.v1 import autoglm_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Metrics:
    def render(self) -> bytes:
        return b"autoglm_running_requests 0\n"

    def on_rejected(self, code: str) -> None:
        pass


class LifecycleEngine(FakeEngine):
    def __init__(self, on_fatal: Callable[[BaseException], None]) -> None:
        super().__init__(step_s=0.01, max_model_len=200_000)
        self.ready = False
        self.on_fatal = on_fatal
        self.metrics = _Metrics()
        self.may_start = asyncio.Event()
        self.start_error: BaseException | None = None
        self.shutdown_grace: float | None = None

    async def start(self) -> None:
        await self.may_start.wait()
        if self.start_error is not None:
            raise self.start_error
        self.ready = True

    async def shutdown(self, grace_s: float) -> None:
        self.shutdown_grace = grace_s
        self.ready = False


async def _eventually(check: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Running:
    def __init__(self, grace: float = 10.0) -> None:
        self.engines: list[LifecycleEngine] = []
        options = ServeOptions(
            host="127.0.0.1", grpc_port=0, http_port=0, metrics_port=0, shutdown_grace_s=grace
        )
        self.proc = ServerProcess(EngineConfig(model="/fake"), options, self._factory)
        self.task = asyncio.create_task(self.proc.run())

    def _factory(
        self, config: EngineConfig, on_fatal: Callable[[BaseException], None]
    ) -> LifecycleEngine:
        engine = LifecycleEngine(on_fatal)
        self.engines.append(engine)
        return engine  # type: ignore[return-value]

    async def started(self) -> tuple[grpc.aio.Channel, LifecycleEngine]:
        await asyncio.wait_for(self.proc.listening.wait(), 10)
        await _eventually(lambda: bool(self.engines))
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.proc.ports['grpc']}")
        return channel, self.engines[0]

    async def health(self, channel: grpc.aio.Channel) -> int:
        resp = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="autoglm.v1.AutoGLM"), timeout=5
        )
        return int(resp.status)


async def test_startup_serve_drain_exit_zero() -> None:
    run = Running()
    channel, engine = await run.started()
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{run.proc.ports['http']}")
    try:
        assert await run.health(channel) == NOT_SERVING  # listening, model not loaded
        assert (await http.get("/readyz")).status_code == 503
        assert (await http.get("/healthz")).status_code == 200
        engine.may_start.set()
        await _eventually(lambda: run.proc.state.is_ready())
        assert await run.health(channel) == SERVING
        assert (await http.get("/readyz")).status_code == 200

        stub = pb_grpc.AutoGLMStub(channel)
        stream = stub.GenerateStream(pb.GenerateRequest(prompt="a", max_new_tokens=30))
        first = await stream.read()
        run.proc.request_stop("SIGTERM")
        assert await run.health(channel) == NOT_SERVING  # readiness first
        assert (await http.get("/readyz")).status_code == 503
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Generate(pb.GenerateRequest(prompt="b"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        chunks = [first]
        while (chunk := await stream.read()) is not grpc.aio.EOF:  # the in-flight request finishes
            chunks.append(chunk)
        assert len(chunks) == 30
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert await asyncio.wait_for(run.task, 15) == EXIT_OK
        assert engine.shutdown_grace is not None and engine.shutdown_grace > 0
    finally:
        await http.aclose()
        await channel.close()


async def test_second_signal_cuts_the_grace() -> None:
    run = Running(grace=60)
    channel, engine = await run.started()
    engine.may_start.set()
    await _eventually(lambda: run.proc.state.is_ready())
    stream = pb_grpc.AutoGLMStub(channel).GenerateStream(
        pb.GenerateRequest(prompt="a", max_new_tokens=100000)
    )
    await stream.read()
    run.proc.request_stop("SIGTERM")
    run.proc.request_stop("SIGTERM")
    assert await asyncio.wait_for(run.task, 15) == EXIT_OK
    assert engine.shutdown_grace == 0.0
    stream.cancel()
    await channel.close()


async def test_engine_death_goes_not_serving_and_exits_nonzero() -> None:
    run = Running()
    channel, engine = await run.started()
    engine.may_start.set()
    await _eventually(lambda: run.proc.state.is_ready())
    engine.ready = False
    assert await run.health(channel) == NOT_SERVING
    engine.on_fatal(RuntimeError("step loop crashed"))
    assert await asyncio.wait_for(run.task, 15) == EXIT_ENGINE_DIED
    await channel.close()


async def test_load_failure_exits_two(caplog: pytest.LogCaptureFixture) -> None:
    run = Running()
    channel, engine = await run.started()
    engine.start_error = ModelLoadError("sha256 mismatch for model.safetensors")
    engine.may_start.set()
    assert await asyncio.wait_for(run.task, 15) == EXIT_START_FAILED
    assert "model load failed: sha256 mismatch for model.safetensors" in caplog.text
    await channel.close()


async def test_busy_port_fails_startup_cleanly() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        options = ServeOptions(host="127.0.0.1", grpc_port=0, http_port=port, metrics_port=0)
        proc = ServerProcess(EngineConfig(model="/fake"), options, lambda c, f: None)  # type: ignore[arg-type,return-value]
        assert await asyncio.wait_for(proc.run(), 15) == EXIT_START_FAILED
