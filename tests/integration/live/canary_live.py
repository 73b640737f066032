"""Helpers for the live canary tests (``test_canary_*.py``): AutoGLMDeployments with
a canary and a traffic provider, the operator with a Prometheus to ask, per-revision
request counts read from the pods' own /metrics, load through the Gateway, and a
watcher that records the stable side's ready pods for the whole test.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from live_helpers import Kube, OperatorProcess, live_agd, start_operator, wait_for
from prometheus_client.parser import text_string_to_metric_families

from autoglm_dev.addons import ADDONS_NAMESPACE, GATEWAY_LISTENER, GATEWAY_NAME
from autoglm_server.client import build_generate_request
from autoglm_server.proto.autoglm.v1 import autoglm_pb2_grpc as pb_grpc

REVISION_LABEL = "serving.autoglm.io/revision"
ACTION_ANNOTATION = "serving.autoglm.io/canary-action"
GRPC_PORT, HTTP_PORT, METRICS_PORT = 8001, 8000, 8002
GATEWAY_REF = {"name": GATEWAY_NAME, "namespace": ADDONS_NAMESPACE, "sectionName": GATEWAY_LISTENER}


def canary_agd(
    name: str,
    *,
    provider: str = "gatewayAPI",
    host: str | None = None,
    replicas: int = 1,
    rollout: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """A live AutoGLMDeployment with ``spec.traffic`` (and room for ``spec.canary``)."""
    agd = live_agd(name, replicas=replicas, **kwargs)
    traffic: dict[str, Any] = {"provider": provider}
    if provider == "gatewayAPI":
        traffic["gateway"] = dict(GATEWAY_REF)
    if host is not None:
        traffic["hostnames"] = [host]
    agd["spec"]["traffic"] = traffic
    agd["spec"]["server"]["shutdownGraceSeconds"] = 5
    if rollout is not None:
        agd["spec"]["rollout"] = rollout
    return agd


def start_canary_operator(cluster: Any, prometheus: str, log_path: Path) -> OperatorProcess:
    """The operator with Prometheus to ask for analysis, and a fast rollout tick."""
    env = {
        "AUTOGLM_OPERATOR_PROMETHEUS_URL": prometheus,
        "AUTOGLM_OPERATOR_ROLLOUT_TICK_SECONDS": "1",
    }
    return start_operator(cluster.kubeconfig, log_path, 3.0, env=env)


# ---- status ----------------------------------------------------------------------------


def canary_status(kube: Kube, name: str) -> dict[str, Any]:
    obj = kube.get("agd", name) or {}
    return dict(obj.get("status", {}).get("canary") or {})


def revisions(kube: Kube, name: str) -> list[dict[str, Any]]:
    obj = kube.get("agd", name) or {}
    return list(obj.get("status", {}).get("revisions") or [])


def wait_phase(
    kube: Kube, name: str, phases: tuple[str, ...], operator: OperatorProcess, timeout: float = 300
) -> dict[str, Any]:
    """status.canary once its phase is one of ``phases``."""

    def probe() -> dict[str, Any] | None:
        st = canary_status(kube, name)
        return st if st.get("phase") in phases else None

    result: dict[str, Any] = wait_for(
        probe,
        timeout=timeout,
        message=lambda: (
            f"agd/{name} canary phase in {phases}: {json.dumps(canary_status(kube, name))}\n"
            f"pods: {describe_revision_pods(kube, name)}\noperator log:\n{operator.log_tail()}"
        ),
    )
    return result


def wait_ready(kube: Kube, name: str, operator: OperatorProcess, timeout: float = 480) -> None:
    def ready() -> bool:
        cond = kube.condition(name)
        return bool(cond and cond["status"] == "True")

    wait_for(
        ready,
        timeout=timeout,
        message=lambda: (
            f"agd/{name} Ready: {kube.condition(name)}\n{describe_revision_pods(kube, name)}\n"
            f"operator log:\n{operator.log_tail()}"
        ),
    )


def set_action(kube: Kube, name: str, action: str) -> None:
    kube.run("annotate", "agd", name, f"{ACTION_ANNOTATION}={action}", "--overwrite")


def patch_spec(kube: Kube, name: str, patch: dict[str, Any]) -> float:
    """A JSON merge patch of the spec; returns the wall time just before it was sent."""
    before = time.time()
    kube.run("patch", "agd", name, "--type=merge", "-p", json.dumps({"spec": patch}))
    return before


# ---- pods and per-revision counts ------------------------------------------------------


def revision_pods(kube: Kube, name: str, revision: str | None = None) -> list[dict[str, Any]]:
    selector = f"app.kubernetes.io/instance={name}"
    if revision is not None:
        selector += f",{REVISION_LABEL}={revision}"
    data = kube.get("pods", None, "-l", selector)
    return list(data["items"]) if data else []


def describe_revision_pods(kube: Kube, name: str) -> str:
    lines = []
    for pod in revision_pods(kube, name):
        cs = (pod.get("status", {}).get("containerStatuses") or [{}])[0]
        lines.append(
            f"{pod['metadata']['name']} rev={pod['metadata'].get('labels', {}).get(REVISION_LABEL)} "
            f"ip={pod.get('status', {}).get('podIP')} ready={cs.get('ready')} "
            f"restarts={cs.get('restartCount')} state={json.dumps(cs.get('state'))[:300]}"
        )
    return "\n".join(lines) or "(no pods)"


def _pod_ready(pod: dict[str, Any]) -> bool:
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_requests(ip: str, code: str = "OK") -> float:
    """A pod's server's autoglm_requests_total{code} from its own /metrics."""
    with urllib.request.urlopen(f"http://{ip}:{METRICS_PORT}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "autoglm_requests_total" and sample.labels.get("code") == code:
                total += sample.value
    return total


def requests_by_revision(kube: Kube, name: str, code: str = "OK") -> Counter[str]:
    """Finished requests per revision (summed over the revision's running pods)."""
    out: Counter[str] = Counter()
    for pod in revision_pods(kube, name):
        ip = pod.get("status", {}).get("podIP")
        rev = pod["metadata"].get("labels", {}).get(REVISION_LABEL)
        if ip and rev and pod["status"].get("phase") == "Running":
            with contextlib.suppress(urllib.error.URLError, OSError):  # a pod going away
                out[rev] += pod_requests(ip, code)
    return out


# ---- routes ----------------------------------------------------------------------------


def route_weights(kube: Kube, kind: str, name: str) -> dict[str, int]:
    """backendRef Service -> weight of a route's first rule ({} when there is no route)."""
    obj = kube.get(kind, name)
    if not obj:
        return {}
    refs = obj["spec"]["rules"][0].get("backendRefs") or []
    return {r["name"]: int(r.get("weight", 1)) for r in refs}


def route_ready(kube: Kube, kind: str, name: str) -> bool:
    obj = kube.get(kind, name)
    for parent in (obj or {}).get("status", {}).get("parents") or []:
        if parent.get("parentRef", {}).get("name") != GATEWAY_NAME:
            continue
        conds = {c["type"]: c["status"] for c in parent.get("conditions") or []}
        return conds.get("Accepted") == "True" and conds.get("ResolvedRefs") == "True"
    return False


# ---- requests through the Gateway ------------------------------------------------------


def grpc_channel(gateway_port: int, host: str) -> grpc.Channel:
    return grpc.insecure_channel(
        f"127.0.0.1:{gateway_port}", options=[("grpc.default_authority", host)]
    )


def grpc_generate(stub: Any, max_new_tokens: int = 1) -> str:
    """One Generate; the gRPC status name (OK, INTERNAL, ...)."""
    request = build_generate_request("Hello", max_new_tokens=max_new_tokens, ignore_eos=True)
    try:
        stub.Generate(request, timeout=60)
        return "OK"
    except grpc.RpcError as exc:
        return str(exc.code().name)


def http_complete(gateway: str, host: str, max_tokens: int = 1) -> int:
    """One OpenAI completion through the Gateway; the HTTP status (the last
    failure's body is kept in ``LAST_HTTP_ERROR`` for messages)."""
    body = {"prompt": "Hello", "max_tokens": max_tokens, "temperature": 0}
    req = urllib.request.Request(
        f"{gateway}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Host": host},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        LAST_HTTP_ERROR[:] = [exc.code, dict(exc.headers), exc.read()[:500]]
        return int(exc.code)


LAST_HTTP_ERROR: list[Any] = []


@dataclass
class Load:
    """Background gRPC requests through the Gateway, ``workers`` at a time, until stopped."""

    gateway_port: int
    host: str
    workers: int = 2
    max_new_tokens: int = 1
    pause_s: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self) -> None:
        with grpc_channel(self.gateway_port, self.host) as channel:
            stub = pb_grpc.AutoGLMStub(channel)
            while not self._stop.is_set():
                code = grpc_generate(stub, self.max_new_tokens)
                with self._lock:
                    self.outcomes[code] += 1
                if self.pause_s:
                    self._stop.wait(self.pause_s)

    def __enter__(self) -> Load:
        for _ in range(self.workers):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)


# ---- the stable side's minimum ---------------------------------------------------------


@dataclass
class StableWatch:
    """Polls the stable revision (status.revisions[0]) and its ready pods every
    ``interval_s``; ``below`` lists the samples under ``minimum`` once the
    stable was first seen at its minimum."""

    kube: Kube
    name: str
    minimum: int = 1
    interval_s: float = 1.0
    samples: list[tuple[float, str, int]] = field(default_factory=list)
    below: list[tuple[float, str, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        revs = revisions(self.kube, self.name)
        if not revs:
            return
        stable = str(revs[0]["name"])
        # Pods, not the Deployment's status: the operator promotes on pod readiness,
        # and the Deployment's readyReplicas follows a moment later.
        ready = sum(1 for p in revision_pods(self.kube, self.name, stable) if _pod_ready(p))
        now = time.time()
        seen_ready = any(r >= self.minimum for _, _, r in self.samples)
        self.samples.append((now, stable, ready))
        if seen_ready and ready < self.minimum:
            self.below.append((now, stable, ready))

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # a kubectl hiccup is no stable-side failure
                self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> StableWatch:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sampling (before the AutoGLMDeployment is deleted on purpose)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def check(self) -> str:
        """A one-line summary; raises when the stable side went below its minimum."""
        assert self.samples, "the watcher never saw the stable revision"
        assert not self.below, f"stable below its minimum {self.minimum}: {self.below[:10]}"
        revs = sorted({s for _, s, _ in self.samples})
        return (
            f"stable >= {self.minimum} ready in all {len(self.samples)} samples "
            f"(revisions {', '.join(revs)})"
        )


def figures_file() -> Path | None:
    """Where the tests append their measured figures (AUTOGLM_CANARY_FIGURES), if set."""
    path = os.environ.get("AUTOGLM_CANARY_FIGURES")
    return Path(path) if path else None


def record(figure: str, **values: Any) -> None:
    """Print a measured figure (pytest -s shows it) and append it to the figures file."""
    line = json.dumps({"figure": figure, **values}, sort_keys=True)
    print(line)
    path = figures_file()
    if path is not None:
        with path.open("a") as fh:
            fh.write(line + "\n")
