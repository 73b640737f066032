"""Status rows, conflict events, the peering fallback and idle traffic, on a real control plane.

The rows that need a failing container (crash loop) need real processes behind
pods: tests/integration/live covers them. Here: a node lost (Degraded, a
Warning, then Normal Recovered when the pod runs again), a field-manager
conflict, ``kopf run`` without the peering CRD, and what the operator sends
when nothing changes (the apiserver's audit log, reads included).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from operator_helpers import (
    ROOT,
    Kube,
    OperatorProcess,
    agd,
    deployment_of,
    start_operator,
    wait_for,
)

from autoglm_dev.cluster import build_node_manifest

pytestmark = pytest.mark.k8s

PEERING_CRDS = ROOT / "charts" / "autoglm" / "crds" / "kopf-peering.yaml"
OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")


def events_for(kube: Kube, name: str) -> list[dict[str, Any]]:
    data = kube.get(
        "events",
        None,
        "--field-selector",
        f"involvedObject.name={name},involvedObject.kind=AutoGLMDeployment",
    )
    return list((data or {}).get("items", []))


def conditions(kube: Kube, name: str) -> dict[str, tuple[str, str]]:
    obj = kube.get("agd", name) or {}
    return {
        c["type"]: (c["status"], c["reason"]) for c in obj.get("status", {}).get("conditions") or []
    }


def test_lost_node_turns_degraded_with_a_warning_then_recovers(
    op: OperatorProcess, kube: Kube
) -> None:
    product = f"TEST-GPU-{kube.namespace[-6:]}"
    node = build_node_manifest(f"lost-{kube.namespace[-6:]}", 8, product)
    kube.cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
    name = "lonely"
    spec = {"model": {"source": "/opt/models/tiny"}, "resources": {"gpuProduct": product}}
    assert kube.apply(agd(name, spec)).returncode == 0
    kube.wait_ready(name, timeout=120)
    # The only node with that GPU goes away: its pod is garbage-collected and the
    # replacement has nowhere to go. The spec did not change: this is no rollout.
    kube.cluster.kubectl("delete", "node", node["metadata"]["name"], "--wait=true")
    wait_for(
        lambda: conditions(kube, name).get("Degraded", ("", ""))[0] == "True",
        timeout=180,
        message=lambda: f"Degraded=True; conditions now {conditions(kube, name)}",
    )
    cond = conditions(kube, name)
    assert cond["Ready"][0] == "False"
    assert cond["Progressing"][0] == "False", cond  # not "rolling out"
    warnings = wait_for(
        lambda: [e for e in events_for(kube, name) if e["type"] == "Warning"],
        timeout=30,
        message="a Warning event",
    )
    assert warnings[0]["reason"] in ("Unschedulable", "ReplicasUnavailable")
    # The node comes back: the pod is scheduled and runs; the status recovers.
    kube.cluster.kubectl("apply", "-f", "-", input=json.dumps(node))
    wait_for(
        lambda: (
            conditions(kube, name)
            == {
                "Ready": ("True", "ReplicasReady"),
                "Progressing": ("False", "RolloutComplete"),
                "Degraded": ("False", "AsExpected"),
            }
        ),
        timeout=180,
        message=lambda: f"recovered; conditions now {conditions(kube, name)}",
    )
    wait_for(
        lambda: [e for e in events_for(kube, name) if e["reason"] == "Recovered"],
        timeout=30,
        message="a Normal Recovered event",
    )


def test_a_field_taken_by_another_manager_is_taken_back_with_a_warning(
    op: OperatorProcess, kube: Kube
) -> None:
    name = "contested"
    assert kube.apply(agd(name, {"model": {"source": "/opt/models/tiny"}})).returncode == 0
    kube.wait_ready(name, timeout=120)
    dep = deployment_of(name, {"model": {"source": "/opt/models/tiny"}})
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "server", "image": "x:1"}]}}}}
    kube.run("patch", "deployment", dep, "--type=strategic", "-p", json.dumps(patch))
    events = wait_for(
        lambda: [e for e in events_for(kube, name) if e["reason"] == "FieldManagerConflict"],
        timeout=op.resync_seconds + 30,
        message="a FieldManagerConflict event",
    )
    assert events[0]["type"] == "Warning"
    assert "kubectl" in events[0]["message"] and f"Deployment {dep}" in events[0]["message"]
    wait_for(
        lambda: (
            kube.get("deployment", dep)["spec"]["template"]["spec"]["containers"][0]["image"]
            != "x:1"
        ),
        timeout=30,
        message="the image taken back",
    )


def test_kopf_run_without_the_peering_crd_works_and_says_so(
    cluster: Any, crd: Any, kube: Kube, tmp_path: Path
) -> None:
    """The README's first way to run it: no --standalone, no peering CRD installed."""
    had_crds = cluster.kubectl("get", "crd", "kopfpeerings.kopf.dev", check=False).returncode == 0
    if had_crds:
        cluster.kubectl("delete", "-f", str(PEERING_CRDS), "--wait=true")
    try:
        op = start_operator(
            cluster.kubeconfig, tmp_path / "op.log", [f"--namespace={kube.namespace}"], 3.0
        )
        try:
            assert (
                kube.apply(agd("solo", {"model": {"source": "/opt/models/tiny"}})).returncode == 0
            )
            # This instance's own counter: the session's operator may act here too.
            wait_for(
                lambda: op.reconciles() >= 1,
                timeout=60,
                message=lambda: f"the instance to reconcile; its log:\n{op.log_tail()}",
            )
            log = op.log_path.read_text()
            assert "WITHOUT leader election" in log and "kopf-peering.yaml" in log
        finally:
            op.stop()
    finally:
        if had_crds:
            cluster.kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))


def operator_requests(audit_log: Path, since: str) -> Counter[str]:
    """The operator's requests (by user agent) after the RFC 3339 micro time ``since``, by verb."""
    verbs: Counter[str] = Counter()
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("stage") != "ResponseComplete":
            continue
        if entry.get("requestReceivedTimestamp", "") <= since:
            continue
        if not str(entry.get("userAgent", "")).startswith(OPERATOR_AGENTS):
            continue
        if entry.get("verb") == "watch":
            continue  # a watch that ends and is re-opened is the watch itself
        resource = entry.get("objectRef", {}).get("resource", "?")
        verbs[f"{entry['verb']} {resource}"] += 1
    return verbs


def test_idle_operator_sends_no_request_across_timer_ticks(
    op: OperatorProcess, kube: Kube, cluster: Any
) -> None:
    audit = getattr(cluster, "workdir", None)
    if audit is None:
        pytest.skip("needs the local control plane's audit log")
    audit_log = Path(audit) / "logs" / "audit.log"
    names = [f"idle-{i}" for i in range(3)]
    for name in names:
        spec = {"model": {"source": "/opt/models/tiny", "sha256": {"m.bin": "a" * 64}}}
        assert kube.apply(agd(name, spec)).returncode == 0
    for name in names:
        kube.wait_ready(name, timeout=120)

    def quiet() -> bool:
        writes = op.writes()
        time.sleep(op.resync_seconds + 1)
        return op.writes() == writes

    wait_for(quiet, timeout=120, message="a quiet timer period")
    since = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    reconciles = op.reconciles()
    wait_for(
        lambda: op.reconciles() >= reconciles + 2 * len(names),
        timeout=3 * op.resync_seconds + 20,
        message="two timer ticks of each object",
    )
    # Timestamps in the log are micro times; the second boundary is conservative.
    sent = operator_requests(audit_log, since + ".999999Z")
    assert sent == Counter(), f"the idle operator sent {dict(sent)}"


def test_scaled_to_zero_on_purpose_is_not_degraded(op: OperatorProcess, kube: Kube) -> None:
    name = "parked"
    spec = {"model": {"source": "/opt/models/tiny"}, "replicas": 0}
    assert kube.apply(agd(name, spec)).returncode == 0
    want = {
        "Ready": ("False", "ScaledToZero"),
        "Progressing": ("False", "RolloutComplete"),
        "Degraded": ("False", "AsExpected"),
    }
    wait_for(
        lambda: conditions(kube, name) == want,
        timeout=60,
        message=lambda: f"{want}; conditions now {conditions(kube, name)}",
    )
    events = wait_for(
        lambda: [e for e in events_for(kube, name) if e["reason"] == "ScaledToZero"],
        timeout=30,
        message="a ScaledToZero event",
    )
    assert events[0]["type"] == "Normal"
    assert not [e for e in events_for(kube, name) if e["type"] == "Warning"]
