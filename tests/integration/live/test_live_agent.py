"""The node agent on its own: a second agent with a cap of one process.

It takes node ``gpu-live-5`` (its own pod network) beside the session's
agent and runs bare pods bound to that node: the process cap, stopping the
agent (no process of its pods left behind), and an agent killed and replaced.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_helpers import MODEL_SOURCE, Kube, container_status, node_network, wait_for

from autoglm_dev.agent import live_node_name
from autoglm_dev.cluster import LocalCluster

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

NODE_INDEX = 5


def _bare_pod(name: str) -> dict[str, Any]:
    """A pod bound straight to the node (no scheduler), running the server."""
    env = {
        "AUTOGLM_MODEL": MODEL_SOURCE,
        "AUTOGLM_SERVED_MODEL_NAME": name,
        "AUTOGLM_DEVICE": "cuda",
        "AUTOGLM_HOST": "0.0.0.0",
        "AUTOGLM_METRICS_PORT": "0",
        "AUTOGLM_SHUTDOWN_GRACE_SECONDS": "5",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": live_node_name(NODE_INDEX),
            "terminationGracePeriodSeconds": 10,
            "containers": [
                {
                    "name": "server",
                    "image": "ghcr.io/autoglm/autoglm-server:0.1.0",
                    "env": [{"name": k, "value": v} for k, v in env.items()],
                    "readinessProbe": {
                        "grpc": {"port": 8001, "service": "autoglm.v1.AutoGLM"},
                        "periodSeconds": 2,
                    },
                }
            ],
        },
    }


def _pids_under(root: Path) -> list[int]:
    """Processes whose working directory is under ``root`` (the agent's pods)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(root)):
            out.append(int(entry.name))
    return out


class SecondAgent:
    """``python -m autoglm_dev.agent`` on node ``gpu-live-5``, capped at one process."""

    def __init__(self, cluster: LocalCluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / "logs" / f"agent-{self.starts}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "autoglm_dev.agent",
                    f"--workdir={self.workdir}",
                    f"--kubeconfig={self.cluster.kubeconfig}",
                    "--nodes=1",
                    f"--first-node={NODE_INDEX}",
                    "--max-processes=1",
                    f"--models={self.cluster.workdir / 'models'}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self.proc = proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the agent exited:\n{log_path.read_text()[-2000:]}")
            return "node agent up" in log_path.read_text()

        wait_for(up, timeout=60, message=f"the agent on {live_node_name(NODE_INDEX)}")
        return proc

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def second_agent(
    live_cluster: LocalCluster, tiny_model: Path, tmp_path: Path
) -> Iterator[SecondAgent]:
    agent = SecondAgent(live_cluster, tmp_path / "agent")
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
        live_cluster.kubectl(
            "delete", "node", live_node_name(NODE_INDEX), "--wait=false", check=False
        )


def _ready(kube: Kube, name: str) -> dict[str, Any] | None:
    pod = kube.get("pod", name)
    return pod if pod and container_status(pod).get("ready") else None


def test_the_process_cap_holds_a_pod_back_with_an_event_and_stop_leaves_nothing(
    kube: Kube, second_agent: SecondAgent
) -> None:
    agent, workdir = second_agent.proc, second_agent.workdir
    assert agent is not None
    kube.apply(_bare_pod("first"))
    first = wait_for(lambda: _ready(kube, "first"), timeout=120, message="pod first to be Ready")
    # Its own pod network: another /20 than the session's agent.
    pod_cidr, _ = node_network(kube.cluster, live_node_name(NODE_INDEX))
    session_cidr, _ = node_network(kube.cluster, live_node_name(0))
    assert ipaddress.IPv4Address(first["status"]["podIP"]) in pod_cidr
    assert not pod_cidr.overlaps(session_cidr.supernet(new_prefix=20))

    kube.apply(_bare_pod("second"))

    def held_back() -> dict[str, Any] | None:
        pod = kube.get("pod", "second")
        waiting = (container_status(pod or {}).get("state") or {}).get("waiting") or {}
        return pod if waiting.get("reason") == "ProcessCapReached" else None

    held = wait_for(held_back, timeout=30, message="pod second to wait for a process slot")
    assert held["status"]["phase"] == "Pending"
    events = [e for e in kube.events("second") if e["reason"] == "ProcessCapReached"]
    assert events and events[0]["type"] == "Warning"
    assert "--max-processes" in events[0]["message"]

    # The first pod goes (SIGTERM, drain, exit): the second one starts in its slot.
    kube.run("delete", "pod", "first", "--wait=false")
    second = wait_for(lambda: _ready(kube, "second"), timeout=120, message="pod second to be Ready")
    assert second["status"]["podIP"] != first["status"]["podIP"]
    assert kube.get("pod", "first") is None

    # Stopping the agent stops its processes.
    pods_root = workdir / "pods"
    assert _pids_under(pods_root), "the second pod's server should be running"
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(30) == 0
    assert _pids_under(pods_root) == []


def test_a_killed_agent_takes_its_processes_along_and_a_new_one_restarts_them(
    kube: Kube, second_agent: SecondAgent
) -> None:
    kube.apply(_bare_pod("kept"))
    before = wait_for(lambda: _ready(kube, "kept"), timeout=120, message="pod kept to be Ready")
    pods_root = second_agent.workdir / "pods"
    assert _pids_under(pods_root)
    agent = second_agent.proc
    assert agent is not None
    agent.kill()  # SIGKILL: no clean-up code runs
    agent.wait(10)
    # PR_SET_PDEATHSIG: the server died with it (reaped or a zombie awaiting its reaper).
    wait_for(
        lambda: all(_zombie_or_gone(pid) for pid in _pids_under(pods_root)),
        timeout=10,
        message="the server to die with its agent",
    )

    second_agent.start()

    def restarted() -> dict[str, Any] | None:
        pod = _ready(kube, "kept")
        return pod if pod and container_status(pod).get("restartCount") == 1 else None

    after = wait_for(restarted, timeout=120, message="pod kept to be Ready again")
    # The same pod IP (it can't change), the restart counted with its cause.
    assert after["status"]["podIP"] == before["status"]["podIP"]
    last = container_status(after)["lastState"]["terminated"]
    assert last["message"] == "killed with the node agent that ran it"


def _zombie_or_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
