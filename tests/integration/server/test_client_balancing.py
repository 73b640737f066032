"""The project's gRPC client balances per request over several backends.

Two real server processes listen on 127.0.0.2 and 127.0.0.3; one client
channel to ``ipv4:<both>`` spreads its requests over both (round_robin). With
gRPC's default policy (pick_first, ``balance=False``) every request of the
channel goes to the first backend, which the second test shows, so the first
can fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from server_helpers import ServerProcess, serving

from autoglm_server.client import AutoGLMClient

REQUESTS = 12


@pytest.fixture(scope="module")
def two_servers(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    workdir = tmp_path_factory.mktemp("balanced")
    procs = [
        ServerProcess(tiny_model, workdir, "--served-model-name", "tiny", host=host)
        for host in ("127.0.0.2", "127.0.0.3")
    ]
    with serving(*procs):
        yield procs


def _finished(proc: ServerProcess) -> float:
    return proc.metric("autoglm_requests_total", default=0.0, code="OK")


def _send(target: str, balance: bool) -> None:
    with AutoGLMClient(target, timeout=60, balance=balance) as client:
        for _ in range(REQUESTS):
            result = client.generate("Hi", max_new_tokens=1, ignore_eos=True)
            assert result.completion_tokens == 1


def test_round_robin_reaches_both_backends(two_servers: list[ServerProcess]) -> None:
    before = [_finished(p) for p in two_servers]
    target = "ipv4:" + ",".join(p.target for p in two_servers)
    _send(target, balance=True)
    got = [_finished(p) - b for p, b in zip(two_servers, before, strict=True)]
    assert sum(got) == REQUESTS
    # Round robin over READY subchannels: both take requests (the first few may
    # all go to the backend that connected first).
    assert all(n >= 2 for n in got), got


def test_pick_first_sticks_to_one_backend(two_servers: list[ServerProcess]) -> None:
    before = [_finished(p) for p in two_servers]
    target = "ipv4:" + ",".join(p.target for p in two_servers)
    _send(target, balance=False)
    got = [_finished(p) - b for p, b in zip(two_servers, before, strict=True)]
    assert sorted(got) == [0, REQUESTS], got
