"""Real server processes for the integration tests (the fixtures are in conftest.py).

``python -m autoglm_server`` runs as a subprocess on free loopback ports, with
a tiny random GLM-4 model (``autoglm_server.testing.build_tiny_model``) built
once per session. Tests talk to it over gRPC and HTTP only. Every wait polls
with a deadline; a server that misbehaves fails the test with its log tail.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from autoglm_server.client import wait_until_serving

if TYPE_CHECKING:
    import openai

START_LIMIT_S = 120.0  # torch import + load + warm-up on two busy cores


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """One ``autoglm-server`` subprocess and the ways tests look at it."""

    def __init__(self, model: Path, workdir: Path, *args: str, host: str = "127.0.0.1") -> None:
        self.host = host
        self.grpc_port, self.http_port, self.metrics_port = (free_port(host) for _ in range(3))
        self.log_path = workdir / f"server-{host}-{self.grpc_port}.log"
        cmd = [
            sys.executable,
            "-m",
            "autoglm_server",
            "--model", str(model),
            "--device", "cpu",
            "--host", host,
            "--grpc-port", str(self.grpc_port),
            "--http-port", str(self.http_port),
            "--metrics-port", str(self.metrics_port),
            *args,
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONSAFEPATH": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir, env=env
        )
        self.channel = grpc.insecure_channel(self.target)
        self.http = httpx.Client(base_url=f"http://{host}:{self.http_port}", timeout=30)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, service: str = "") -> str | None:
        """SERVING / NOT_SERVING, or None while nothing answers."""
        try:
            resp = health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.RpcError:
            return None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def wait_serving(self, limit_s: float = START_LIMIT_S) -> None:
        """Poll health on fresh channels (see ``autoglm_server.client.wait_until_serving``)."""
        deadline = time.monotonic() + limit_s
        while True:
            try:
                wait_until_serving(self.target, timeout_s=0.5)
                return
            except TimeoutError:
                pass
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not SERVING after {limit_s} s:\n{self.log()[-3000:]}")

    def metrics(
        self, port: int | None = None
    ) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of /metrics, keyed by (name, labels)."""
        resp = httpx.get(f"http://{self.host}:{port or self.http_port}/metrics", timeout=10)
        resp.raise_for_status()
        out = {}
        for family in text_string_to_metric_families(resp.text):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    def metric(self, name: str, default: float | None = None, **labels: str) -> float:
        """One sample's value (labels beyond model/version must be given).

        ``default`` is returned when the series does not exist yet (a counter
        with a label value nothing has used); otherwise a missing series fails.
        """
        matches = [
            value
            for (n, lbls), value in self.metrics().items()
            if n == name and set(labels.items()) <= set(lbls)
        ]
        if not matches and default is not None:
            return default
        assert len(matches) == 1, f"{name}{labels}: {len(matches)} samples"
        return matches[0]

    def wait_metric(self, name: str, want: float, limit_s: float = 10.0) -> None:
        deadline = time.monotonic() + limit_s
        while (value := self.metric(name)) != want:
            assert time.monotonic() < deadline, f"{name} is {value}, wanted {want}"
            time.sleep(0.02)

    def stop(self, limit_s: float = 60.0) -> int:
        """SIGTERM and wait; kill (and fail) if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            pytest.fail(f"server ignored SIGTERM for {limit_s} s:\n{self.log()[-3000:]}")
        finally:
            self.close()

    def close(self) -> None:
        self.channel.close()
        self.http.close()
        self._log.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def serving(*procs: ServerProcess) -> Iterator[None]:
    """Wait until each of ``procs`` is SERVING; on the way out stop each and require a
    clean drain (exit 0). A server fixture: ``with serving(proc): yield proc``."""
    try:
        for proc in procs:
            proc.wait_serving()
        yield
    finally:
        for proc in procs:
            assert proc.stop() == 0, proc.log()[-3000:]


def openai_client(proc: ServerProcess, timeout: float = 60) -> openai.OpenAI:
    """The official openai client on ``proc``'s HTTP port; no retries, so a failure shows."""
    import openai

    return openai.OpenAI(
        base_url=f"http://{proc.host}:{proc.http_port}/v1",
        api_key="unused",
        max_retries=0,
        timeout=timeout,
    )


def hang_up_mid_generation(proc: ServerProcess) -> None:
    """A long chat completion (not streamed) on a raw socket, closed once the request runs;
    returns when the server has no request running."""
    body = json.dumps(
        {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1500, "ignore_eos": True}
    ).encode()
    with socket.create_connection((proc.host, proc.http_port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        proc.wait_metric("autoglm_running_requests", 1)
    proc.wait_metric("autoglm_running_requests", 0)
