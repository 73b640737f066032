"""`autoglm-dev cluster up|status|down` as a user runs it: its own work
directory, processes that outlive the command, and nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from autoglm_dev.cluster import _pid_alive
from autoglm_dev.waiting import wait_until

pytestmark = pytest.mark.k8s


def _cli(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "autoglm_dev", "--workdir", str(workdir), "cluster", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=workdir.parent,
    )


def test_up_status_down_leaves_no_process(tmp_path: Path) -> None:
    workdir = tmp_path / "c"
    up = _cli(workdir, "up", "--nodes", "1")
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={workdir / 'kubeconfig'}" in up.stdout
    pids = json.loads((workdir / "state.json").read_text())["pids"]
    assert set(pids) == {
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
    }
    try:
        assert all(_pid_alive(p) for p in pids.values())
        status = _cli(workdir, "status")
        assert status.returncode == 0, status.stdout
        assert status.stdout.count("running") == 5

        # A component that dies is reported, with its log tail.
        os.kill(pids["kwok"], signal.SIGKILL)
        wait_until(lambda: not _pid_alive(pids["kwok"]), timeout=10, message="kwok to die")
        status = _cli(workdir, "status")
        assert status.returncode == 1
        assert "kwok" in status.stdout and "DEAD" in status.stdout
        assert "last lines of its log" in status.stdout
    finally:
        down = _cli(workdir, "down")
    assert down.returncode == 0, down.stderr
    assert not any(_pid_alive(p) for p in pids.values()), "down left a process behind"
    assert not (workdir / "state.json").exists()


def test_component_crash_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    fake = tmp_path / "etcd"
    fake.write_text("#!/bin/sh\necho 'etcdmain: boom, cannot listen' >&2\nexit 3\n")
    fake.chmod(0o755)
    env = {**os.environ, "TEST_ASSET_ETCD": str(fake)}
    workdir = tmp_path / "c"
    up = _cli(workdir, "up", "--nodes", "1", env=env)
    assert up.returncode == 1
    assert "etcd exited with code 3" in up.stderr
    assert "etcdmain: boom, cannot listen" in up.stderr
    assert not (workdir / "state.json").exists(), "a failed start must clean up after itself"
