"""Prometheus and prometheus-adapter against operator pods that really serve.

Prometheus (``autoglm_dev.addons``) finds the pod through the apiserver by the
scrape annotations the operator writes and scrapes the server at the pod's
loopback IP; the adapter, registered as ``custom.metrics.k8s.io`` with the
chart's rules, answers Pods metrics for it through the apiserver; and the
kube-controller-manager's HPA controller reads the metric through the adapter.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from live_helpers import Kube, OperatorProcess, describe_pods, live_agd, wait_for

from autoglm_dev.addons import AddonEndpoints, endpoints
from autoglm_dev.cluster import LocalCluster

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

METRICS_PORT = 8002
NAME = "prom"


@pytest.fixture(scope="module")
def addons(live_cluster: LocalCluster) -> AddonEndpoints:
    live_cluster.start_addons()
    state = live_cluster.load_state()
    assert state is not None
    return endpoints(state)


@pytest.fixture(scope="module")
def served(
    live_cluster: LocalCluster, live_operator: OperatorProcess, tiny_model: Any
) -> Iterator[tuple[Kube, dict[str, Any]]]:
    """One ready AutoGLMDeployment with an HPA on queue depth; yields its pod."""
    ns = f"t-prometheus-{uuid.uuid4().hex[:6]}"
    live_cluster.kubectl("create", "namespace", ns)
    kube = Kube(live_cluster, ns)
    try:
        kube.apply(
            live_agd(
                NAME,
                autoscaling={
                    "minReplicas": 1,
                    "maxReplicas": 2,
                    "targets": [{"type": "queueDepth", "averageValue": "50"}],
                },
            )
        )

        def ready_pod() -> dict[str, Any] | None:
            cond = kube.condition(NAME)
            pods = [p for p in kube.pods(NAME) if p.get("status", {}).get("podIP")]
            if cond and cond["status"] == "True" and pods:
                return pods[0]
            return None

        pod: dict[str, Any] = wait_for(
            ready_pod,
            timeout=480,
            message=lambda: (
                f"agd/{NAME} Ready: {kube.condition(NAME)}\n{describe_pods(kube, NAME)}\n"
                f"operator log:\n{live_operator.log_tail()}"
            ),
        )
        yield kube, pod
    finally:
        live_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _prom(addons: AddonEndpoints, path: str, **params: str) -> Any:
    url = f"{addons.prometheus}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_discovers_and_scrapes_the_pod_server(
    addons: AddonEndpoints, served: tuple[Kube, dict[str, Any]]
) -> None:
    kube, pod = served
    pod_name, pod_ip = pod["metadata"]["name"], pod["status"]["podIP"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"

    def target() -> dict[str, Any] | None:
        for t in _prom(addons, "/api/v1/targets", state="active")["activeTargets"]:
            labels = t["labels"]
            if labels.get("namespace") == kube.namespace and labels.get("pod") == pod_name:
                return t if t["health"] == "up" else None
        return None

    found = wait_for(
        target,
        timeout=90,
        message=lambda: (
            "an up target for the pod; targets: "
            + json.dumps(_prom(addons, "/api/v1/targets", state="active")["activeTargets"])[:3000]
        ),
    )
    assert found["scrapeUrl"] == f"http://{pod_ip}:{METRICS_PORT}/metrics"

    query = f'autoglm_queue_depth{{namespace="{kube.namespace}",pod="{pod_name}"}}'
    result = wait_for(
        lambda: _prom(addons, "/api/v1/query", query=query)["result"],
        timeout=60,
        message=f"a sample of {query}",
    )
    assert len(result) == 1
    assert float(result[0]["value"][1]) >= 0


def test_adapter_serves_pod_metrics_to_the_hpa(
    addons: AddonEndpoints, served: tuple[Kube, dict[str, Any]]
) -> None:
    kube, pod = served
    pod_name = pod["metadata"]["name"]
    raw = f"/apis/custom.metrics.k8s.io/v1beta1/namespaces/{kube.namespace}/pods/*/autoglm_queue_depth"

    def items() -> list[dict[str, Any]] | None:
        proc = kube.cluster.kubectl("get", "--raw", raw, check=False)
        if proc.returncode != 0:
            return None
        found = [
            i for i in json.loads(proc.stdout)["items"] if i["describedObject"]["name"] == pod_name
        ]
        return found or None

    metric = wait_for(items, timeout=90, message=f"{raw} listing {pod_name}")[0]
    assert metric["metricName"] == "autoglm_queue_depth"
    assert metric["describedObject"]["kind"] == "Pod"

    # The HPA controller reads the same metric through the aggregation layer.
    def hpa_reads_metric() -> dict[str, Any] | None:
        hpa = kube.get("hpa", NAME)
        current = (hpa or {}).get("status", {}).get("currentMetrics") or []
        conds = {c["type"]: c for c in (hpa or {}).get("status", {}).get("conditions") or []}
        active = conds.get("ScalingActive", {})
        if current and active.get("status") == "True":
            return hpa
        return None

    hpa = wait_for(
        hpa_reads_metric,
        timeout=90,
        message=lambda: f"hpa/{NAME} reading its metric: {json.dumps(kube.get('hpa', NAME))}",
    )
    current = hpa["status"]["currentMetrics"][0]
    assert current["type"] == "Pods"
    assert current["pods"]["metric"]["name"] == "autoglm_queue_depth"
