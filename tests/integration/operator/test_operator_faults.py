"""The operator under faults, on a real control plane, each bounded in time.

- the operator SIGKILLed in the middle of a burst and started again: every
  object converges, with exactly its children, each owned by it (no
  duplicates, no orphans);
- the apiserver stopped for a minute while a burst is being reconciled: the
  operator stays up throughout (the same process, started once: no crash
  loop); the requests that failed are counted
  (``autoglm_operator_reconcile_errors_total{reason="ApiError"}``) and retried
  with backoff; an unreachable apiserver is no degradation (a settled object's
  conditions are as they were, no Warning event); afterwards the interrupted
  burst converges, and a new object and a change to an old one are
  reconciled (the watches reconnected). The outage, the errors counted, the
  time to Ready afterwards and where that time went (the controller-manager
  marking the Deployments Available, then the operator) are printed as a JSON
  figure line.

These tests need the session's operator out of the way (it watches every
namespace and would do the work itself): ``exclusive`` stops it for the
module and starts it again afterwards.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from operator_helpers import (
    Kube,
    OperatorProcess,
    agd,
    deployment_of,
    record,
    start_operator,
    wait_for,
)

pytestmark = pytest.mark.k8s

BURST = 24


@pytest.fixture(scope="module")
def exclusive(operator: OperatorProcess) -> Iterator[None]:
    """Stop the session's operator for this module; start it again (same object) after."""
    operator.stop()
    try:
        yield
    finally:
        operator.restart()


def burst_objects(namespace: str) -> list[dict[str, Any]]:
    items = []
    for i in range(BURST):
        obj = agd(f"b-{i:02d}", {"model": {"source": "/opt/models/tiny"}})
        obj["metadata"]["namespace"] = namespace
        items.append(obj)
    return items


def ready_names(kube: Kube) -> set[str]:
    data = kube.get("agd") or {"items": []}
    out = set()
    for obj in data["items"]:
        gen = obj["metadata"]["generation"]
        for c in obj.get("status", {}).get("conditions") or []:
            if c["type"] == "Ready" and c["status"] == "True" and c["observedGeneration"] == gen:
                out.add(obj["metadata"]["name"])
    return out


def test_operator_killed_mid_burst_converges_without_duplicates_or_orphans(
    exclusive: None, cluster: Any, crd: Any, kube: Kube, tmp_path: Path
) -> None:
    scope = ["--standalone", f"--namespace={kube.namespace}"]
    first = start_operator(cluster.kubeconfig, tmp_path / "first.log", scope, 30.0)
    try:
        listing = {"apiVersion": "v1", "kind": "List", "items": burst_objects(kube.namespace)}
        assert kube.run("apply", "-f", "-", input=json.dumps(listing)).returncode == 0
        # Kill it once it has started on the burst and before it is through.
        wait_for(
            lambda: first.writes() >= 10,
            timeout=60,
            message=lambda: f"the first writes; log:\n{first.log_tail()}",
        )
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
    finally:
        first.stop()
    done_before = len(ready_names(kube))
    second = start_operator(cluster.kubeconfig, tmp_path / "second.log", scope, 30.0)
    try:
        wait_for(
            lambda: len(ready_names(kube)) == BURST,
            timeout=240,
            message=lambda: f"{len(ready_names(kube))}/{BURST} Ready; log:\n{second.log_tail()}",
        )
        assert second.reconciles() > 0
    finally:
        second.stop()
    assert done_before < BURST, "the first operator finished before it was killed"
    owners = {o["metadata"]["name"]: o["metadata"]["uid"] for o in kube.get("agd")["items"]}
    children = kube.get(
        "deployments,services,configmaps,hpa,pdb",
        None,
        "-l",
        "app.kubernetes.io/managed-by=autoglm-operator",
    )["items"]
    per_owner: Counter[str] = Counter()
    for child in children:
        refs = child["metadata"].get("ownerReferences") or []
        assert len(refs) == 1, f"{child['kind']}/{child['metadata']['name']}: {refs}"
        ref = refs[0]
        assert owners.get(ref["name"]) == ref["uid"], f"orphan: {child['metadata']['name']}"
        per_owner[f"{ref['name']} {child['kind']}"] += 1
    for name in owners:
        assert per_owner[f"{name} Deployment"] == 1
        assert per_owner[f"{name} Service"] == 2  # <name>, <name>-headless (no Gateway routes)
    pods = kube.get("pods")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == BURST, f"{len(live)} pods for {BURST} single-replica objects"


OUTAGE_S = 60.0
# A slow client-side rate limit keeps the reconciles of a small burst in flight
# for several seconds, so that the apiserver stops under them.
SLOW_API = {"AUTOGLM_OPERATOR_API_QPS": "2", "AUTOGLM_OPERATOR_API_BURST": "1"}
API_ERRORS = "autoglm_operator_reconcile_errors_total{reason=ApiError}"
TINY = {"model": {"source": "/opt/models/tiny"}}


def api_errors(op: OperatorProcess) -> float:
    return op.metrics().get(API_ERRORS, 0.0)


def conditions_of(kube: Kube, name: str) -> list[dict[str, Any]]:
    obj = kube.get("agd", name) or {}
    return list(obj.get("status", {}).get("conditions") or [])


def warnings_for(kube: Kube, names: list[str]) -> list[str]:
    data = kube.get("events", None, "--field-selector", "type=Warning") or {"items": []}
    return [
        f"{e['involvedObject']['name']}: {e['reason']} {e.get('message', '')}"
        for e in data["items"]
        if e["involvedObject"].get("kind") == "AutoGLMDeployment"
        and e["involvedObject"]["name"] in names
    ]


def ready_times(kube: Kube, name: str) -> tuple[datetime, datetime]:
    """When the object's Deployment turned Available (the controller-manager's
    verdict) and when the object itself turned Ready (the operator's)."""

    def turned(conditions: list[dict[str, Any]], ctype: str) -> datetime:
        stamp = next(c for c in conditions if c["type"] == ctype)["lastTransitionTime"]
        return datetime.fromisoformat(stamp.replace("Z", "+00:00"))

    dep = kube.get("deployment", deployment_of(name, TINY))
    return turned(dep["status"]["conditions"], "Available"), turned(
        conditions_of(kube, name), "Ready"
    )


def test_apiserver_outage_of_a_minute_no_crash_and_everything_reconciles_after(
    exclusive: None, cluster: Any, crd: Any, kube: Kube, tmp_path: Path
) -> None:
    if not hasattr(cluster, "stop_apiserver"):
        pytest.skip("needs the local control plane (it stops the apiserver)")
    scope = ["--standalone", f"--namespace={kube.namespace}"]
    op = start_operator(cluster.kubeconfig, tmp_path / "op.log", scope, 5.0, **SLOW_API)
    pid = op.proc.pid
    mid = [f"mid-{i}" for i in range(3)]
    try:
        assert kube.apply(agd("before", TINY)).returncode == 0
        kube.wait_ready("before", timeout=120)
        settled = conditions_of(kube, "before")
        errors_before, writes_before = api_errors(op), op.writes()
        listing = {"apiVersion": "v1", "kind": "List", "items": [agd(n, TINY) for n in mid]}
        assert kube.run("apply", "-f", "-", input=json.dumps(listing)).returncode == 0
        # The apiserver stops while the burst's writes are under way.
        wait_for(lambda: op.writes() > writes_before, timeout=60, message="the burst's first write")
        started = time.monotonic()
        cluster.stop_apiserver()
        try:
            while time.monotonic() - started < OUTAGE_S:  # the fault itself, a plain timed stop
                assert op.alive(), f"the operator exited during the outage:\n{op.log_tail()}"
                time.sleep(1)
            errors_during = api_errors(op) - errors_before
        finally:
            cluster.start_apiserver()
        outage = time.monotonic() - started
        assert op.alive() and op.proc.pid == pid, f"the operator exited:\n{op.log_tail()}"
        # Retried, counted, and the reconciles the outage cut short were not the burst's last.
        assert errors_during > 0, f"no ApiError counted during the outage:\n{op.log_tail()}"
        back, back_at = time.monotonic(), datetime.now(UTC)
        for name in mid:  # the control plane's own controllers take about a minute to catch up
            kube.wait_ready(name, timeout=180)
        burst_ready = time.monotonic() - back
        times = [ready_times(kube, name) for name in mid]
        # An unreachable apiserver is no degradation: the settled object's status is
        # as it was (same transition times), and no object got a Warning.
        assert conditions_of(kube, "before") == settled
        assert warnings_for(kube, ["before", *mid]) == []
        # New objects and changes are picked up: the watches reconnected.
        recovered = time.monotonic()
        assert kube.apply(agd("after", TINY)).returncode == 0
        patch = json.dumps({"spec": {"replicas": 2}})
        kube.run("patch", "agd", "before", "--type=merge", "-p", patch)
        kube.wait_ready("after", timeout=120)
        kube.wait_ready("before", timeout=120)
        dep = kube.get("deployment", deployment_of("before", TINY))
        assert dep["spec"]["replicas"] == 2
        record(
            "apiserver_outage",
            outage_s=round(outage, 1),
            reconcile_errors_api=api_errors(op) - errors_before,
            burst_ready_after_outage_s=round(burst_ready, 1),
            deployments_available_after_outage_s=round(
                max((d - back_at).total_seconds() for d, _ in times), 1
            ),
            # From the apiserver's return when a Deployment was Available before the outage.
            status_ready_after_deployment_s=max(
                (r - max(d, back_at)).total_seconds() for d, r in times
            ),
            new_object_ready_s=round(time.monotonic() - recovered, 1),
        )
        assert op.alive() and op.proc.pid == pid, f"the operator exited:\n{op.log_tail()}"
        starts = op.log_path.read_text().count("autoglm operator started")
        assert starts == 1, f"the operator started {starts} times"
    finally:
        op.stop()
