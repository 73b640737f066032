"""Leader election through kopf peering: of two operator instances one works, and
the other takes over when it leaves.

Evidence is each instance's own reconcile counter (its Prometheus metrics), so
the session's standalone operator, which also watches this namespace, does not
blur it.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from operator_helpers import ROOT, Kube, OperatorProcess, agd, record, start_operator, wait_for

pytestmark = pytest.mark.k8s

PEERING_CRDS = ROOT / "charts" / "autoglm" / "crds" / "kopf-peering.yaml"
PEERING = "autoglm-operator"


def test_newest_instance_leads_and_the_other_takes_over(
    cluster: Any, crd: Any, kube: Kube, tmp_path: Path
) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/kopfpeerings.kopf.dev"
    )
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}}
    assert kube.run("apply", "-f", "-", input=json.dumps(peering)).returncode == 0

    scope = [f"--namespace={kube.namespace}"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = start_operator(cluster.kubeconfig, tmp_path / "a" / "op.log", scope, 3.0)
    second: OperatorProcess | None = None
    try:
        second = start_operator(cluster.kubeconfig, tmp_path / "b" / "op.log", scope, 3.0)
        # The older instance sees a newer (higher-priority) peer and stands by.
        wait_for(
            lambda: "Pausing operations in favour of" in first.log_path.read_text(),
            timeout=60,
            message=lambda: f"the first instance to pause; its log:\n{first.log_tail()}",
        )
        assert "Pausing operations" not in second.log_path.read_text()

        assert kube.apply(agd("led", {"model": {"source": "/opt/models/tiny"}})).returncode == 0
        wait_for(lambda: second.reconciles() >= 2, timeout=60, message="the leader to reconcile")
        assert first.reconciles() == 0, "a standby instance reconciled"

        # The leader leaves (SIGTERM): it removes itself from the peering object,
        # and the standby resumes and takes the object over.
        left = time.monotonic()
        second.stop()
        wait_for(
            lambda: first.reconciles() >= 1,
            timeout=60,
            message=lambda: f"the standby to take over; its log:\n{first.log_tail()}",
        )
        record("peering_handover_after_sigterm", handover_s=round(time.monotonic() - left, 1))
        kube.run("patch", "agd", "led", "--type=merge", "-p", json.dumps({"spec": {"replicas": 2}}))
        before = first.reconciles()
        wait_for(
            lambda: first.reconciles() > before,
            timeout=30,
            message="the new leader to act on an edit",
        )
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_standby_takes_over_from_a_killed_leader_within_the_peering_lifetime(
    cluster: Any, crd: Any, kube: Kube, tmp_path: Path
) -> None:
    """SIGKILL: the leader cannot leave the peering object; the standby waits out its lifetime."""
    cluster.kubectl("apply", "--server-side", "-f", str(PEERING_CRDS))
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/kopfpeerings.kopf.dev"
    )
    peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}}
    assert kube.run("apply", "-f", "-", input=json.dumps(peering)).returncode == 0
    lifetime = 10
    env = {"AUTOGLM_OPERATOR_PEERING_LIFETIME": str(lifetime)}
    scope = [f"--namespace={kube.namespace}"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    standby = start_operator(cluster.kubeconfig, tmp_path / "a" / "op.log", scope, 3.0, **env)
    leader: OperatorProcess | None = None
    try:
        leader = start_operator(cluster.kubeconfig, tmp_path / "b" / "op.log", scope, 3.0, **env)
        wait_for(
            lambda: "Pausing operations in favour of" in standby.log_path.read_text(),
            timeout=60,
            message=lambda: f"the standby to pause; its log:\n{standby.log_tail()}",
        )
        assert kube.apply(agd("led", {"model": {"source": "/opt/models/tiny"}})).returncode == 0
        wait_for(lambda: leader.reconciles() >= 2, timeout=60, message="the leader to act")
        assert standby.reconciles() == 0, "a standby instance reconciled"
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait(timeout=10)
        killed = time.monotonic()
        wait_for(
            lambda: "Resuming operations after the pause" in standby.log_path.read_text(),
            timeout=lifetime + 60,
            message=lambda: f"the standby to resume; its log:\n{standby.log_tail()}",
        )
        takeover = time.monotonic() - killed
        wait_for(
            lambda: standby.reconciles() >= 1,
            timeout=60,
            message=lambda: f"the new leader to reconcile; its log:\n{standby.log_tail()}",
        )
        record(
            "peering_takeover_after_sigkill",
            resumed_s=round(takeover, 1),
            first_reconcile_s=round(time.monotonic() - killed, 1),
            lifetime_s=lifetime,
        )
        before = standby.reconciles()
        kube.run("patch", "agd", "led", "--type=merge", "-p", json.dumps({"spec": {"replicas": 2}}))
        wait_for(
            lambda: standby.reconciles() > before,
            timeout=30,
            message="the new leader to act on an edit",
        )
    finally:
        standby.stop()
        if leader is not None:
            leader.stop()
