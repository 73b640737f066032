"""Fixtures: a tiny model per session, a shared server (and an openai client on it), and
extra servers per test.

See ``server_helpers.ServerProcess`` for how a server process is run and watched, and
``server_helpers.serving`` for a module's own servers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from server_helpers import ServerProcess, openai_client, serving

if TYPE_CHECKING:
    import openai


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from autoglm_server.testing import build_tiny_model

    # A 2048-token context lets tests keep a request running for seconds.
    return build_tiny_model(tmp_path_factory.mktemp("tiny-glm4"), max_position_embeddings=2048)


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server with default settings. Tests leave it idle when they finish."""
    proc = ServerProcess(
        tiny_model, tmp_path_factory.mktemp("server"), "--served-model-name", "tiny"
    )
    with serving(proc):
        yield proc


@pytest.fixture
def oai(server: ServerProcess) -> openai.OpenAI:
    """The official openai client on the shared server."""
    return openai_client(server)


@pytest.fixture
def start_server(tiny_model: Path, tmp_path: Path) -> Iterator[type[ServerProcess]]:
    """Start extra servers with their own flags; each is stopped after the test."""
    started: list[ServerProcess] = []

    class _Tracked(ServerProcess):
        def __init__(self, *args: str, model: Path | None = None, host: str = "127.0.0.1") -> None:
            super().__init__(model or tiny_model, tmp_path, *args, host=host)
            started.append(self)

    yield _Tracked  # type: ignore[misc]
    for proc in started:
        if proc.proc.poll() is None:
            proc.stop()
        else:
            proc.close()
