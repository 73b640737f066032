"""The HPA scales the operator's Deployment on real load, through Prometheus and
prometheus-adapter (``autoglm_dev.addons``), and back in when the load stops.

Load is bounded (at most ``MAX_REQUESTS`` requests and ``LOAD_LIMIT_S``
seconds) and goes to the ready addresses in the Service's EndpointSlices.
The metric is the server's ``autoglm_requests_per_second`` (arrivals over the
last 60 s), the target 1 per pod, so two loaded pods' worth of traffic needs
two replicas.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from live_helpers import (
    Kube,
    OperatorProcess,
    container_status,
    describe_pods,
    live_agd,
    ready_addresses,
    wait_for,
)

from autoglm_dev.cluster import LocalCluster
from autoglm_server.client import AutoGLMClient

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

NAME = "scale"
MAX_REQUESTS = 4000
LOAD_LIMIT_S = 300.0
STABILIZATION_S = 15


def _hpa_view(kube: Kube) -> str:
    hpa = kube.get("hpa", NAME) or {}
    st = hpa.get("status", {})
    conds = {c["type"]: f"{c['status']}/{c.get('reason')}" for c in st.get("conditions") or []}
    return (
        f"hpa current={st.get('currentReplicas')} desired={st.get('desiredReplicas')} "
        f"metrics={json.dumps(st.get('currentMetrics'))} conditions={conds}"
    )


def test_hpa_scales_out_on_real_load_and_back_in(
    kube: Kube, live_operator: OperatorProcess, tiny_model: Any, live_cluster: LocalCluster
) -> None:
    live_cluster.start_addons()
    kube.apply(
        live_agd(
            NAME,
            autoscaling={
                "minReplicas": 1,
                "maxReplicas": 2,
                "scaleDownStabilizationSeconds": STABILIZATION_S,
                "targets": [{"type": "requestsPerSecond", "averageValue": "1"}],
            },
        )
    )

    def one_ready() -> list[str] | None:
        ips = ready_addresses(kube, NAME)
        return ips if len(ips) == 1 else None

    wait_for(one_ready, timeout=240, message=lambda: describe_pods(kube, NAME))

    # The HPA reads the metric through the adapter before any load.
    def hpa_reads_metric() -> bool:
        hpa = kube.get("hpa", NAME) or {}
        return bool(hpa.get("status", {}).get("currentMetrics"))

    wait_for(hpa_reads_metric, timeout=120, message=lambda: _hpa_view(kube))

    stop = threading.Event()
    sent = [0]
    failed: list[str] = []
    addresses: list[str] = ready_addresses(kube, NAME)
    lock = threading.Lock()

    def refresh() -> None:
        nonlocal addresses
        while not stop.is_set():
            found = ready_addresses(kube, NAME)
            if found:
                addresses = found
            stop.wait(1.0)

    def load(worker: int) -> None:
        n = worker
        deadline = time.monotonic() + LOAD_LIMIT_S
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if sent[0] >= MAX_REQUESTS:
                    return
                sent[0] += 1
            ip = addresses[n % len(addresses)]
            n += 1
            try:
                with AutoGLMClient(f"{ip}:8001", timeout=30) as client:
                    client.generate("load", max_new_tokens=2, ignore_eos=True)
            except Exception as exc:  # counted; the test is about scaling
                with lock:
                    failed.append(f"{ip}: {exc}")
            stop.wait(0.05)

    threads = [threading.Thread(target=refresh)] + [
        threading.Thread(target=load, args=(i,)) for i in range(3)
    ]
    load_start = time.monotonic()
    for t in threads:
        t.start()
    try:

        def scaled_out() -> list[dict[str, Any]] | None:
            pods = [p for p in kube.pods(NAME) if not p["metadata"].get("deletionTimestamp")]
            ready = [p for p in pods if container_status(p).get("ready")]
            return ready if len(ready) == 2 else None

        ready = wait_for(
            scaled_out,
            timeout=LOAD_LIMIT_S - 30,
            message=lambda: f"{_hpa_view(kube)}\n{describe_pods(kube, NAME)}",
        )
        to_ready = time.monotonic() - load_start
        # A new pod is Ready only when its server says SERVING.
        for pod in ready:
            with AutoGLMClient(f"{pod['status']['podIP']}:8001", timeout=10) as client:
                assert client.health("autoglm.v1.AutoGLM") == "SERVING"
        wait_for(lambda: len(ready_addresses(kube, NAME)) == 2, timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    hpa = kube.get("hpa", NAME)
    print(
        f"\nFIGURE HPA scale-out: load start -> second pod Ready {to_ready:.0f} s "
        f"({sent[0]} requests sent, {len(failed)} failed); {_hpa_view(kube)}"
    )
    assert hpa["status"]["desiredReplicas"] >= 2
    assert sent[0] < MAX_REQUESTS

    # Load stopped: the 60 s rate decays, and after the stabilization window the HPA scales in.
    stopped = time.monotonic()

    def scaled_in() -> bool:
        pods = [p for p in kube.pods(NAME) if not p["metadata"].get("deletionTimestamp")]
        return len(pods) == 1

    wait_for(
        scaled_in,
        timeout=60 + STABILIZATION_S + 120,
        message=lambda: f"{_hpa_view(kube)}\n{describe_pods(kube, NAME)}",
    )
    print(f"FIGURE HPA scale-in: load stop -> 1 replica {time.monotonic() - stopped:.0f} s")
