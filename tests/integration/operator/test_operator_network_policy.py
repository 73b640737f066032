"""The NetworkPolicy of an AutoGLMDeployment, as the API server stores it.

No CNI runs in the local control plane (kwok plays the kubelets), so nothing
enforces these policies here: the tests check the objects the operator writes,
their rules and their life (created, changed, removed with enabled: false).
"""

from __future__ import annotations

from typing import Any

import pytest
from operator_helpers import Kube, OperatorProcess, agd, wait_for

pytestmark = pytest.mark.k8s

SPEC: dict[str, Any] = {
    "model": {"source": "/opt/models/tiny"},
    "networkPolicy": {
        "fromNamespaces": ["gateway-system", "mesh"],
        "fromPrometheusNamespaces": ["monitoring"],
    },
}
SELECTOR = {
    "app.kubernetes.io/component": "server",
    "app.kubernetes.io/instance": "guarded",
    "app.kubernetes.io/name": "autoglm",
}


def ns_peer(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def test_policy_allows_the_serving_ports_from_the_listed_namespaces_and_metrics_from_prometheus(
    op: OperatorProcess, kube: Kube
) -> None:
    assert kube.apply(agd("guarded", SPEC)).returncode == 0
    policy = wait_for(
        lambda: kube.get("networkpolicy", "guarded"), timeout=60, message="NetworkPolicy/guarded"
    )
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": SELECTOR}
    assert spec["policyTypes"] == ["Ingress"]
    serving, metrics = spec["ingress"]
    assert serving["from"] == [{"podSelector": {}}, ns_peer("gateway-system"), ns_peer("mesh")]
    assert serving["ports"] == [
        {"port": 8001, "protocol": "TCP"},
        {"port": 8000, "protocol": "TCP"},
    ]
    assert metrics == {
        "from": [ns_peer("monitoring")],
        "ports": [{"port": 8002, "protocol": "TCP"}],
    }
    owner = policy["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("AutoGLMDeployment", "guarded")

    # The same namespace turned off, no namespaces listed: no rule, all ingress denied.
    closed = {
        **SPEC,
        "networkPolicy": {"allowSameNamespace": False, "fromPrometheusNamespaces": []},
    }
    assert kube.apply(agd("guarded", closed)).returncode == 0
    wait_for(
        lambda: "ingress" not in kube.get("networkpolicy", "guarded")["spec"],
        timeout=op.resync_seconds + 30,
        message=lambda: f"no ingress rule, have {kube.get('networkpolicy', 'guarded')['spec']}",
    )

    # Turned off: the operator deletes it.
    off = {**SPEC, "networkPolicy": {"enabled": False}}
    assert kube.apply(agd("guarded", off)).returncode == 0
    wait_for(
        lambda: kube.get("networkpolicy", "guarded") is None,
        timeout=op.resync_seconds + 30,
        message="NetworkPolicy/guarded deleted",
    )
    assert op.alive()
