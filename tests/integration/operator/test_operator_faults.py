"""The operator under faults, on a real control plane, each bounded in time.

- the operator SIGKILLed in the middle of a burst and started again: every
  object converges, with exactly its children, each owned by it (no
  duplicates, no orphans);
- the apiserver stopped (20 s here: long enough that every watch and every
  request fails and kopf's reconnect backoff runs; a minute exercises no other
  code path and would cost CI a minute): the operator stays up (no crash
  loop), and objects created after the apiserver returns are reconciled.

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
from pathlib import Path
from typing import Any

import pytest
from operator_helpers import Kube, OperatorProcess, agd, start_operator, wait_for

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
        assert per_owner[f"{name} Service"] == 3  # <name>, <name>-headless, <name>-<revision>
    pods = kube.get("pods")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == BURST, f"{len(live)} pods for {BURST} single-replica objects"


def test_apiserver_outage_no_crash_and_new_objects_reconcile_after(
    exclusive: None, cluster: Any, crd: Any, kube: Kube, tmp_path: Path
) -> None:
    if not hasattr(cluster, "stop_apiserver"):
        pytest.skip("needs the local control plane (it stops the apiserver)")
    scope = ["--standalone", f"--namespace={kube.namespace}"]
    op = start_operator(cluster.kubeconfig, tmp_path / "op.log", scope, 5.0)
    try:
        assert kube.apply(agd("before", {"model": {"source": "/opt/models/tiny"}})).returncode == 0
        kube.wait_ready("before", timeout=120)
        cluster.stop_apiserver()
        try:
            time.sleep(20)  # the outage itself: the fault under test, not a wait for a result
            assert op.alive(), f"the operator exited during the outage:\n{op.log_tail()}"
        finally:
            cluster.start_apiserver()
        reconciles = op.reconciles()
        assert kube.apply(agd("after", {"model": {"source": "/opt/models/tiny"}})).returncode == 0
        kube.wait_ready("after", timeout=180)
        assert op.reconciles() > reconciles
        kube.wait_ready("before", timeout=60)
        assert op.alive(), f"the operator exited:\n{op.log_tail()}"
    finally:
        op.stop()
