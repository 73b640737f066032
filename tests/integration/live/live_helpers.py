"""Helpers for the live-cluster tests: kubectl with JSON, the operator process,
AutoGLMDeployments placed on live nodes, and the addresses a Service's
EndpointSlices list."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoglm_dev.agent import build_live_placement
from autoglm_dev.cluster import operator_command
from autoglm_dev.waiting import wait_until

MODEL_SOURCE = "hf://autoglm-test/tiny-glm4"
SMALL_BATCHING = {
    "maxBatchSize": 4,
    "maxBatchTokens": 512,
    "maxQueueLength": 64,
}


class Kube:
    """kubectl with JSON in and out, bound to one namespace."""

    def __init__(self, cluster: Any, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace

    def run(self, *args: str, input: str | None = None, check: bool = True) -> Any:
        return self.cluster.kubectl("-n", self.namespace, *args, input=input, check=check)

    def get(self, kind: str, name: str | None = None, *extra: str) -> Any:
        args = ["get", kind] + ([name] if name else []) + ["-o", "json", *extra]
        proc = self.run(*args, check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return json.loads(proc.stdout)

    def apply(self, manifest: dict[str, Any]) -> None:
        self.run("apply", "--server-side", "-f", "-", input=json.dumps(manifest))

    def pods(self, instance: str) -> list[dict[str, Any]]:
        data = self.get("pods", None, "-l", f"app.kubernetes.io/instance={instance}")
        return list(data["items"]) if data else []

    def events(self, involved: str) -> list[dict[str, Any]]:
        data = self.get("events", None, "--field-selector", f"involvedObject.name={involved}")
        return list(data["items"]) if data else []

    def condition(self, name: str, ctype: str = "Ready") -> dict[str, Any] | None:
        obj = self.get("agd", name)
        for c in (obj or {}).get("status", {}).get("conditions") or []:
            if c["type"] == ctype:
                return dict(c)
        return None


def live_agd(
    name: str,
    *,
    replicas: int = 1,
    source: str = MODEL_SOURCE,
    batching: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    autoscaling: dict[str, Any] | None = None,
    shutdown_grace_seconds: int = 10,
) -> dict[str, Any]:
    """An AutoGLMDeployment whose pods land on the live nodes (real processes)."""
    spec: dict[str, Any] = {
        "model": {"source": source, "servedName": name, **(model or {})},
        "resources": {**build_live_placement(), "cpu": "1", "memory": "2Gi", "shmSize": "64Mi"},
        "server": {
            "batching": batching or SMALL_BATCHING,
            "shutdownGraceSeconds": shutdown_grace_seconds,
        },
    }
    if autoscaling is not None:
        spec["autoscaling"] = autoscaling
    else:
        spec["replicas"] = replicas
    return {
        "apiVersion": "serving.autoglm.io/v1alpha1",
        "kind": "AutoGLMDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


def ready_addresses(kube: Kube, service: str) -> list[str]:
    """Ready endpoint addresses of ``service`` from its EndpointSlices."""
    data = kube.get("endpointslices", None, "-l", f"kubernetes.io/service-name={service}")
    out: list[str] = []
    for eps in (data or {}).get("items", []):
        for ep in eps.get("endpoints") or []:
            if (ep.get("conditions") or {}).get("ready"):
                out.extend(ep.get("addresses") or [])
    return sorted(out)


def node_network(cluster: Any, node: str) -> tuple[ipaddress.IPv4Network, str]:
    """(podCIDR, InternalIP) of a node, as its agent registered it."""
    obj = json.loads(cluster.kubectl("get", "node", node, "-o", "json").stdout)
    internal = next(a["address"] for a in obj["status"]["addresses"] if a["type"] == "InternalIP")
    return ipaddress.IPv4Network(obj["spec"]["podCIDR"]), str(internal)


def wait_for(
    probe: Callable[[], Any],
    *,
    timeout: float = 120,
    message: str | Callable[[], str] = "condition",
) -> Any:
    return wait_until(probe, timeout=timeout, interval=0.5, message=message)


def container_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or [{}]
    return dict(statuses[0])


def describe_pods(kube: Kube, instance: str) -> str:
    """Pod names, IPs, phases and container states, for failure messages."""
    lines = []
    for pod in kube.pods(instance):
        cs = container_status(pod)
        lines.append(
            f"{pod['metadata']['name']} ip={pod.get('status', {}).get('podIP')} "
            f"phase={pod.get('status', {}).get('phase')} ready={cs.get('ready')} "
            f"restarts={cs.get('restartCount')} state={json.dumps(cs.get('state'))} "
            f"last={json.dumps(cs.get('lastState'))[:400]}"
        )
    return "\n".join(lines) or "(no pods)"


@dataclass
class OperatorProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def start_operator(
    kubeconfig: Path,
    log_path: Path,
    resync_seconds: float,
    env: dict[str, str] | None = None,
) -> OperatorProcess:
    """``kopf run`` of the operator, as in its image (standalone, all namespaces);
    ``env`` adds settings (e.g. ``AUTOGLM_OPERATOR_PROMETHEUS_URL``)."""
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "AUTOGLM_OPERATOR_METRICS_PORT": "0",
        "AUTOGLM_OPERATOR_RESYNC_SECONDS": str(resync_seconds),
        "AUTOGLM_OPERATOR_LOG_FORMAT": "text",
        **(env or {}),
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            operator_command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=log_path.parent,  # not the checkout: its operator/ would shadow the stdlib
        )
    time.sleep(0)  # the tests wait on the objects the operator writes
    return OperatorProcess(proc, log_path)
