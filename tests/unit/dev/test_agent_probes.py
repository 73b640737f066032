"""The node agent's probes against a real gRPC health server on 127.0.0.1, and
the kubelet's threshold counting."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from autoglm_dev.agent.plan import ProbePlan
from autoglm_dev.agent.runtime import _ProbeTracker, run_probe

SERVICE = "autoglm.v1.AutoGLM"


@pytest.fixture
async def health_server() -> AsyncIterator[tuple[int, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def grpc_probe(port: int, **kw: Any) -> ProbePlan:
    return ProbePlan("grpc", "127.0.0.1", port, service=SERVICE, timeout_s=2, **kw)


async def test_grpc_probe_follows_the_serving_status(
    health_server: tuple[int, health.aio.HealthServicer],
) -> None:
    port, servicer = health_server
    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    ok, why = await run_probe(grpc_probe(port))
    assert not ok and "NOT_SERVING" in why
    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert (await run_probe(grpc_probe(port)))[0]


async def test_probes_of_a_closed_port_fail() -> None:
    port = _free_port()
    ok, why = await run_probe(grpc_probe(port))
    assert not ok and "UNAVAILABLE" in why
    ok, why = await run_probe(ProbePlan("tcp", "127.0.0.1", port, timeout_s=2))
    assert not ok and f"127.0.0.1:{port}" in why
    ok, _ = await run_probe(ProbePlan("http", "127.0.0.1", port, path="/readyz", timeout_s=2))
    assert not ok


async def test_http_and_tcp_probes_against_a_listener() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert (await run_probe(ProbePlan("tcp", "127.0.0.1", port, timeout_s=2)))[0]
        ok, why = await run_probe(ProbePlan("http", "127.0.0.1", port, timeout_s=2))
        assert not ok and "503" in why


async def test_thresholds_and_initial_delay_are_counted_like_the_kubelet(
    health_server: tuple[int, health.aio.HealthServicer],
) -> None:
    port, servicer = health_server
    tracker = _ProbeTracker(
        grpc_probe(port, initial_delay_s=5, period_s=3, failure_threshold=2, success_threshold=2),
        t0=100.0,
    )
    assert not tracker.due(104.9) and tracker.due(105.0)
    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await tracker.run(105.0) is None  # one failure of two
    assert tracker.next_at == 108.0 and not tracker.due(107.9)
    assert await tracker.run(108.0) is False  # the threshold
    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert await tracker.run(111.0) is None  # one success of two
    assert await tracker.run(114.0) is True
    await servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await tracker.run(117.0) is None  # a failure resets the successes
    assert tracker.successes == 0 and tracker.failures == 1
