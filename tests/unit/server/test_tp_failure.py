"""A rank's failure ends the whole TP server (no hang), with a non-zero exit.

Real ``autoglm-server`` processes with ``--tensor-parallel-size 2`` on the CPU
(gloo); ranks are killed with SIGKILL, as the OOM killer or a crashed driver would.
Every wait has a deadline, and none of them is a timing assertion: the bound is
what separates "exits" from "hangs".
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

START_LIMIT_S = 240.0  # two processes import torch and load on two busy cores
EXIT_LIMIT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TPServer:
    def __init__(self, model: Path, workdir: Path) -> None:
        self.http_port = free_port()
        self.log_path = workdir / f"tp-server-{self.http_port}.log"
        cmd = [
            sys.executable, "-m", "autoglm_server",
            "--model", str(model), "--device", "cpu", "--dtype", "float32",
            "--max-model-len", "512", "--tensor-parallel-size", "2",
            "--host", "127.0.0.1", "--grpc-port", str(free_port()),
            "--http-port", str(self.http_port), "--metrics-port", "0",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        pytest.fail(f"not ready after {START_LIMIT_S} s:\n{self.log()}")

    def rank1_pid(self) -> int:
        children = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            children += (task / "children").read_text().split()
        pids = [int(c) for c in children if b"autoglm_server.engine.parallel" in _cmdline(c)]
        assert len(pids) == 1, pids
        return pids[0]

    def metric(self, name: str) -> float:
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(name)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.http.close()
        self._log.close()


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody has reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def server(tiny_model_dir: Path, tmp_path: Path) -> TPServer:
    srv = TPServer(tiny_model_dir, tmp_path)
    try:
        srv.wait_ready()
        yield srv  # type: ignore[misc]
    finally:
        srv.close()


def test_a_killed_rank_mid_request_ends_the_server_with_exit_1(server: TPServer) -> None:
    result: dict[str, object] = {}

    def long_request() -> None:
        try:
            resp = server.http.post(
                "/v1/completions",
                json={"prompt": "hello", "max_tokens": 400, "ignore_eos": True},
                timeout=EXIT_LIMIT_S,
            )
            result["status"] = resp.status_code
        except httpx.HTTPError as exc:
            result["error"] = type(exc).__name__

    client = threading.Thread(target=long_request)
    client.start()
    deadline = time.monotonic() + 30
    while server.metric("autoglm_running_requests") < 1:
        assert time.monotonic() < deadline, "the request never started running"
        time.sleep(0.05)
    rank1 = server.rank1_pid()
    os.kill(rank1, signal.SIGKILL)
    try:
        code = server.proc.wait(timeout=EXIT_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"rank 0 still running {EXIT_LIMIT_S} s after rank 1 died:\n{server.log()}")
    assert code == 1, server.log()
    client.join(timeout=EXIT_LIMIT_S)
    assert not client.is_alive()
    assert result.get("status") != 200 or "error" in result
    full = server.log_path.read_text(errors="replace")
    # whichever saw it first: the watcher of rank 1, or rank 0's collective
    assert "tensor-parallel rank 1 exited" in full or "tensor-parallel step failed" in full


def test_a_killed_rank_0_ends_the_other_ranks(server: TPServer) -> None:
    rank1 = server.rank1_pid()
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    deadline = time.monotonic() + EXIT_LIMIT_S
    while not _gone(rank1):
        if time.monotonic() > deadline:
            os.kill(rank1, signal.SIGKILL)
            pytest.fail(f"rank 1 still running {EXIT_LIMIT_S} s after rank 0 died")
        time.sleep(0.1)


def test_sigterm_drains_and_stops_every_rank_with_exit_0(server: TPServer) -> None:
    rank1 = server.rank1_pid()
    server.proc.send_signal(signal.SIGTERM)  # to rank 0 only, as the kubelet sends it
    try:
        code = server.proc.wait(timeout=EXIT_LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit {EXIT_LIMIT_S} s after SIGTERM:\n{server.log()}")
    assert code == 0, server.log()
    assert _gone(rank1)
