"""The add-ons' lifecycle: ``LocalCluster(addons=True)`` starts Prometheus,
prometheus-adapter and Traefik with the control plane, and ``stop()`` (what
``autoglm-dev cluster down`` runs) leaves none of their processes behind."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from autoglm_dev.addons import ADDON_COMPONENTS, ADDONS_NAMESPACE, GATEWAY_NAME, endpoints
from autoglm_dev.cluster import LocalCluster, _pid_alive

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def test_addons_start_with_the_cluster_and_stop_with_it(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster", nodes=1, addons=True, die_with_parent=True)
    pids: dict[str, int] = {}
    try:
        state = cluster.start()
        pids = {name: state.pids[name] for name in ADDON_COMPONENTS}
        assert all(_pid_alive(pid) for pid in pids.values()), pids

        ends = endpoints(state)
        with urllib.request.urlopen(f"{ends.prometheus}/-/ready", timeout=10) as resp:
            assert resp.status == 200
        gateway = json.loads(
            cluster.kubectl(
                "get", "gateway", GATEWAY_NAME, "-n", ADDONS_NAMESPACE, "-o", "json"
            ).stdout
        )
        assert {"type": "IPAddress", "value": "127.0.0.1"} in gateway["status"]["addresses"]
        discovery = json.loads(
            cluster.kubectl("get", "--raw", "/apis/custom.metrics.k8s.io/v1beta1").stdout
        )
        assert discovery["groupVersion"] == "custom.metrics.k8s.io/v1beta1"
    finally:
        cluster.stop()
    still = {name: pid for name, pid in pids.items() if _pid_alive(pid)}
    assert not still, f"left running after stop: {still}"
    assert cluster.load_state() is None
