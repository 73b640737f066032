"""The base install (the client) at the lowest versions pyproject.toml allows, against a
real server that starts after the client began waiting (what the benchmark does).

A virtual environment is built with ``data/constraints-lowest.txt`` (from PyPI,
pip's cache makes a warm run quick); transformers and torch are pinned exactly
in the [server] extra, so their lowest is what the rest of the suite runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from server_helpers import ServerProcess

ROOT = Path(__file__).resolve().parents[3]
CONSTRAINTS = Path(__file__).parent / "data" / "constraints-lowest.txt"

CLIENT = r"""
import importlib.metadata as md, json, sys, warnings
warnings.simplefilter("error")  # generated code must import cleanly on the floors
from autoglm_server.client import AutoGLMClient, wait_until_serving

wait_until_serving(sys.argv[1], timeout_s=240)
with AutoGLMClient(sys.argv[1], timeout=60) as client:
    result = client.generate("Hello", max_new_tokens=3, ignore_eos=True, logprobs=1)
versions = {n: md.version(n) for n in ("grpcio", "protobuf", "grpcio-health-checking", "pydantic")}
print(json.dumps({"tokens": result.completion_tokens, "logprobs": len(result.logprobs or []),
                  "versions": versions}))
"""


@pytest.fixture(scope="module")
def lowest_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env_dir = tmp_path_factory.mktemp("lowest") / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    proc = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(CONSTRAINTS), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return python


def test_client_at_the_lowest_versions_waits_and_generates(
    lowest_python: Path, start_server: type[ServerProcess], tmp_path: Path
) -> None:
    proc = start_server("--served-model-name", "tiny")  # loading: not listening yet
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    run = subprocess.run(
        [str(lowest_python), str(script), proc.target],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert run.returncode == 0, run.stderr[-3000:] + proc.log()[-2000:]
    out = json.loads(run.stdout)
    pins = dict(
        line.split("==")
        for line in CONSTRAINTS.read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert out["versions"] == {k: pins[k] for k in out["versions"]}
    assert out["tokens"] == 3 and out["logprobs"] == 3
    assert sys.version_info >= (3, 11)
