"""The node agent on its own: a second agent with a cap of one process.

It takes node ``gpu-live-5`` (its own pod network) beside the session's
agent, runs bare pods bound to that node, and is stopped at the end, which
must leave no process of its pods behind.
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


@pytest.fixture
def capped_agent(
    live_cluster: LocalCluster, tiny_model: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    workdir = tmp_path / "agent"
    (workdir / "logs").mkdir(parents=True)
    log = (workdir / "logs" / "agent.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "autoglm_dev.agent",
            f"--workdir={workdir}",
            f"--kubeconfig={live_cluster.kubeconfig}",
            "--nodes=1",
            f"--first-node={NODE_INDEX}",
            "--max-processes=1",
            f"--models={live_cluster.workdir / 'models'}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=workdir,
    )
    log.close()
    node = live_node_name(NODE_INDEX)

    def node_ready() -> bool:
        out = live_cluster.kubectl("get", "node", node, "-o", "json", check=False)
        return out.returncode == 0 and '"type": "Ready"' in out.stdout and proc.poll() is None

    try:
        wait_for(node_ready, timeout=60, message=f"node {node} to be registered")
        yield proc, workdir
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        live_cluster.kubectl("delete", "node", node, "--wait=false", check=False)


def test_the_process_cap_holds_a_pod_back_with_an_event_and_stop_leaves_nothing(
    kube: Kube, capped_agent: tuple[subprocess.Popen[bytes], Path]
) -> None:
    agent, workdir = capped_agent
    kube.apply(_bare_pod("first"))

    def ready(name: str) -> dict[str, Any] | None:
        pod = kube.get("pod", name)
        return pod if pod and container_status(pod).get("ready") else None

    first = wait_for(lambda: ready("first"), timeout=120, message="pod first to be Ready")
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
    second = wait_for(lambda: ready("second"), timeout=120, message="pod second to be Ready")
    assert second["status"]["podIP"] != first["status"]["podIP"]
    assert kube.get("pod", "first") is None

    # Stopping the agent stops its processes.
    pods_root = workdir / "pods"
    assert _pids_under(pods_root), "the second pod's server should be running"
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(30) == 0
    assert _pids_under(pods_root) == []
