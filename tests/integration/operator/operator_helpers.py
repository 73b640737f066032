"""Helpers shared by the operator integration tests (kubectl with JSON, polling)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from autoglm_dev.cluster import operator_command
from autoglm_dev.waiting import wait_until

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "manifests" / "examples"
CHILD_KINDS = (
    "deployments,services,configmaps,horizontalpodautoscalers,poddisruptionbudgets,networkpolicies"
)


def revision_of(spec: dict[str, Any]) -> str:
    """The revision the operator names the spec's Deployment after (``<name>-<revision>``)."""
    from autoglm_operator.canary import compute_revision
    from autoglm_operator.spec import parse_spec

    return compute_revision(parse_spec(spec))


def deployment_of(name: str, spec: dict[str, Any]) -> str:
    return f"{name}-{revision_of(spec)}"


@dataclass
class OperatorProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int
    resync_seconds: float
    kubeconfig: Path | None = None
    scope: list[str] | None = None
    env: dict[str, str] | None = None

    def metrics(self) -> dict[str, float]:
        """Every sample as 'name{labels}' -> value."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
        return out

    def writes(self) -> float:
        return sum(
            v
            for k, v in self.metrics().items()
            if k.startswith("autoglm_operator_api_writes_total{")
        )

    def reconciles(self) -> float:
        return self.metrics().get("autoglm_operator_reconcile_duration_seconds_count{}", 0.0)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def restart(self) -> None:
        """Start it again as it was started (same scope, log file and settings), in place."""
        assert self.kubeconfig is not None and self.scope is not None
        fresh = start_operator(
            self.kubeconfig, self.log_path, self.scope, self.resync_seconds, **(self.env or {})
        )
        self.proc, self.metrics_port = fresh.proc, fresh.metrics_port

    def stop(self) -> None:
        """SIGTERM (kopf leaves its peering object on the way out), then SIGKILL."""
        if not self.alive():
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_operator(
    kubeconfig: Path, log_path: Path, scope: list[str], resync_seconds: float, **env: str
) -> OperatorProcess:
    """``kopf run`` of the operator as a subprocess; returns once its metrics answer."""
    port = free_port()
    full_env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "AUTOGLM_OPERATOR_METRICS_PORT": str(port),
        "AUTOGLM_OPERATOR_RESYNC_SECONDS": str(resync_seconds),
        "AUTOGLM_OPERATOR_LOG_FORMAT": "json",
        **env,
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            operator_command(*scope),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=log_path.parent,  # not the checkout: its operator/ would shadow the stdlib
        )
    op = OperatorProcess(proc, log_path, port, resync_seconds, kubeconfig, scope, dict(env))

    def metrics_up() -> bool:
        if not op.alive():
            raise AssertionError(f"operator exited with {proc.returncode}:\n{op.log_tail()}")
        try:
            op.metrics()
            return True
        except OSError:
            return False

    wait_until(metrics_up, timeout=60, message=lambda: f"operator metrics; log:\n{op.log_tail()}")
    return op


class Kube:
    """kubectl with JSON in and out, bound to one namespace."""

    def __init__(self, cluster: Any, namespace: str) -> None:
        self.cluster = cluster
        self.namespace = namespace

    def run(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc: subprocess.CompletedProcess[str] = self.cluster.kubectl(
            "-n", self.namespace, *args, input=input, check=check
        )
        return proc

    def get(self, kind: str, name: str | None = None, *extra: str) -> Any:
        args = ["get", kind] + ([name] if name else []) + ["-o", "json", *extra]
        proc = self.run(*args, check=False)
        if proc.returncode != 0:
            if "NotFound" in proc.stderr:
                return None
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr}")
        return json.loads(proc.stdout)

    def apply(self, manifest: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run(
            "apply", "--server-side", "-f", "-", *extra, input=json.dumps(manifest), check=False
        )

    def children(self, name: str) -> list[dict[str, Any]]:
        data = self.get(CHILD_KINDS, None, "-l", f"app.kubernetes.io/instance={name}")
        return list(data["items"]) if data else []

    def condition(self, name: str, ctype: str = "Ready") -> dict[str, Any] | None:
        obj = self.get("agd", name)
        for c in (obj or {}).get("status", {}).get("conditions") or []:
            if c["type"] == ctype:
                return dict(c)
        return None

    def wait_ready(self, name: str, *, timeout: float = 90, status: str = "True") -> dict[str, Any]:
        """Wait for Ready=<status> computed for the object's current generation."""

        def probe() -> dict[str, Any] | None:
            obj = self.get("agd", name)
            if obj is None:
                return None
            gen = obj["metadata"]["generation"]
            st = obj.get("status", {})
            for c in st.get("conditions") or []:
                if (
                    c["type"] == "Ready"
                    and c["status"] == status
                    and c.get("observedGeneration") == gen
                    and st.get("observedGeneration") == gen
                ):
                    return dict(obj)
            return None

        result: dict[str, Any] = wait_until(
            probe,
            timeout=timeout,
            interval=0.5,
            message=lambda: (
                f"Ready={status} on agd/{name}; status now: {json.dumps((self.get('agd', name) or {}).get('status'))}"
            ),
        )
        return result


def load_example(stem: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{stem}.yaml").read_text())
    return doc


def agd(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "serving.autoglm.io/v1alpha1",
        "kind": "AutoGLMDeployment",
        "metadata": {"name": name},
        "spec": spec,
    }


def wait_for(probe: Any, *, timeout: float = 60, message: Any = "condition") -> Any:
    return wait_until(probe, timeout=timeout, interval=0.5, message=message)


def record(figure: str, **values: Any) -> None:
    """Print a measured figure as one JSON line (``pytest -s`` shows it) and append it to
    ``$AUTOGLM_OPERATOR_FIGURES`` when set."""
    line = json.dumps({"figure": figure, **values}, sort_keys=True)
    print(f"\n{line}")
    path = os.environ.get("AUTOGLM_OPERATOR_FIGURES")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")
