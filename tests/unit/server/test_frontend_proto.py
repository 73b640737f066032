"""The committed generated code is current, importable on old runtimes, and
the client path never imports torch."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PROTO = ROOT / "server" / "proto"
PINNED_GRPC_TOOLS = "1.85.1"  # pyproject's [dev] pin; its protoc decides the output


def _generated(folder: Path) -> list[Path]:
    return sorted(
        p.relative_to(folder)
        for p in folder.rglob("*")
        if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
    )


def test_committed_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    from importlib.metadata import version

    if version("grpcio-tools") != PINNED_GRPC_TOOLS:
        pytest.skip(f"grpcio-tools {version('grpcio-tools')} is not the pinned {PINNED_GRPC_TOOLS}")
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(PROTO / "generate.sh"), str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
        timeout=120,
    )
    fresh, committed = _generated(tmp_path), _generated(PROTO)
    assert fresh == committed, "generated file set differs; run server/proto/generate.sh"
    assert len(fresh) == 6
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, PROTO / p, shallow=False)]
    assert not stale, f"stale generated code {stale}: run server/proto/generate.sh"


def test_version_stamps_are_the_supported_floors() -> None:
    for path in PROTO.rglob("*_pb2.py"):
        text = path.read_text()
        assert "Domain.PUBLIC,\n    5,\n    29,\n    0,\n" in text, path
    for path in PROTO.rglob("*_pb2_grpc.py"):
        text = path.read_text()
        assert "GRPC_GENERATED_VERSION = '1.72.2'" in text, path  # pyproject's floor
        assert "from autoglm_server.proto" in text, path


def test_client_path_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import autoglm_server.client, autoglm_server.loadgen\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'fastapi', 'autoglm_server.engine.engine')"
        " if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT / "tests")
