"""Drift is repaired within one timer period, and a no-op reconcile writes nothing."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from operator_helpers import Kube, OperatorProcess, agd, load_example, revision_of, wait_for

pytestmark = pytest.mark.k8s

# A spec with every child kind but the routes: digests ConfigMap, Deployment, the two
# shared Services, HPA, PDB, NetworkPolicy (a revision Service comes with gatewayAPI only).
FULL_SPEC: dict[str, Any] = {
    "model": {
        "source": "hf://THUDM/glm-4-9b-chat-hf@main",
        "sha256": {"model.safetensors": "a" * 64},
    },
    "autoscaling": {
        "minReplicas": 2,
        "maxReplicas": 4,
        "targets": [{"type": "gpuUtilization", "averageValue": "70"}],
    },
}

REV = f"-{revision_of(FULL_SPEC)}"  # the per-revision children: <name>-<revision>

# kind, name suffix, a hand edit (merge patch) of a field the operator owns, and how to read it back
EDITS: list[tuple[str, str, dict[str, Any], Any]] = [
    (
        "deployment",
        REV,
        {
            "spec": {
                "template": {"spec": {"containers": [{"name": "server", "image": "evil:latest"}]}}
            }
        },
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["image"],
    ),
    (
        "service",
        "",
        {"metadata": {"labels": {"app.kubernetes.io/part-of": "hacked"}}},
        lambda o: o["metadata"]["labels"]["app.kubernetes.io/part-of"],
    ),
    (
        "service",
        "-headless",
        {"spec": {"ports": [{"port": 8001, "name": "grpc", "targetPort": 9999}]}},
        lambda o: o["spec"]["ports"],
    ),
    ("configmap", f"{REV}-digests", {"data": {"sha256.json": "{}"}}, lambda o: o["data"]),
    (
        "service",
        "",
        {"spec": {"selector": {"app.kubernetes.io/instance": "other"}}},
        lambda o: o["spec"]["selector"],
    ),
    ("hpa", "", {"spec": {"maxReplicas": 9}}, lambda o: o["spec"]["maxReplicas"]),
    ("pdb", "", {"spec": {"maxUnavailable": 2}}, lambda o: o["spec"]["maxUnavailable"]),
    (
        "networkpolicy",
        "",
        {"spec": {"ingress": [{}]}},  # one empty rule: allow everything
        lambda o: o["spec"].get("ingress"),
    ),
]


def repair_deadline(op: OperatorProcess) -> float:
    # One timer period, plus the time a reconcile and kubectl take.
    return op.resync_seconds + 10


@pytest.fixture
def full(op: OperatorProcess, kube: Kube) -> str:
    assert kube.apply(agd("full", FULL_SPEC)).returncode == 0
    kube.wait_ready("full", timeout=120)
    wait_for(lambda: len(kube.children("full")) == 7, timeout=30, message="seven children")
    return "full"


@pytest.mark.parametrize(
    ("kind", "suffix", "patch", "read"),
    EDITS,
    ids=[f"{k}{s}-{i}" for i, (k, s, _, _) in enumerate(EDITS)],
)
def test_hand_edit_of_a_child_is_reverted(
    op: OperatorProcess,
    kube: Kube,
    full: str,
    kind: str,
    suffix: str,
    patch: dict[str, Any],
    read: Any,
) -> None:
    name = f"{full}{suffix}"
    before = read(kube.get(kind, name))
    # The patched object as the API server stored it: the edit took (the operator
    # usually reverts it within milliseconds, so reading it back later would race).
    patched = json.loads(
        kube.run("patch", kind, name, "--type=merge", "-p", json.dumps(patch), "-o", "json").stdout
    )
    assert read(patched) != before, "the hand edit did not take"
    wait_for(
        lambda: read(kube.get(kind, name)) == before,
        timeout=repair_deadline(op),
        message=lambda: f"{kind}/{name} restored to {before!r}, is {read(kube.get(kind, name))!r}",
    )


@pytest.mark.parametrize(
    ("kind", "suffix"),
    [
        ("deployment", REV),
        ("service", ""),
        ("service", "-headless"),
        ("configmap", f"{REV}-digests"),
        ("hpa", ""),
        ("pdb", ""),
        ("networkpolicy", ""),
    ],
)
def test_deleted_child_is_recreated(
    op: OperatorProcess, kube: Kube, full: str, kind: str, suffix: str
) -> None:
    name = f"{full}{suffix}"
    old_uid = kube.get(kind, name)["metadata"]["uid"]
    kube.run("delete", kind, name, "--wait=true", "--timeout=30s")
    wait_for(
        lambda: (o := kube.get(kind, name)) is not None and o["metadata"]["uid"] != old_uid,
        timeout=repair_deadline(op),
        message=f"{kind}/{name} recreated",
    )


def resource_versions(kube: Kube, name: str) -> dict[str, str]:
    versions = {"agd": kube.get("agd", name)["metadata"]["resourceVersion"]}
    for child in kube.children(name):
        versions[f"{child['kind']}/{child['metadata']['name']}"] = child["metadata"][
            "resourceVersion"
        ]
    return versions


# secure: Secret and ConfigMap volumes, valueFrom env, HTTP probes (TLS), pod labels,
# spread constraints and a NetworkPolicy with rules, all as the API server stores them.
@pytest.mark.parametrize("stem", ["glm-1gpu", "secure"])
def test_noop_reconcile_makes_zero_writes(op: OperatorProcess, kube: Kube, stem: str) -> None:
    example = load_example(stem)
    name = example["metadata"]["name"]
    assert kube.apply(example).returncode == 0
    kube.wait_ready(name, timeout=120)

    # Settle: wait for a whole timer period in which the operator wrote nothing.
    def quiet() -> bool:
        writes, reconciles = op.writes(), op.reconciles()
        time.sleep(op.resync_seconds + 1)
        return op.writes() == writes and op.reconciles() > reconciles

    wait_for(quiet, timeout=90, message="a quiet timer period")

    writes, reconciles = op.writes(), op.reconciles()
    versions = resource_versions(kube, name)
    # At least three more reconciles (timer ticks) of this object and the others.
    wait_for(
        lambda: op.reconciles() >= reconciles + 3,
        timeout=4 * op.resync_seconds + 10,
        message="three reconciles",
    )
    assert op.writes() == writes, "a no-op reconcile sent write requests"
    # Nobody else wrote either: kopf itself (annotations, finalizers) included.
    assert resource_versions(kube, name) == versions
    metrics = op.metrics()
    assert metrics["autoglm_operator_managed_objects{}"] >= 1
    assert metrics["autoglm_operator_reconcile_duration_seconds_count{}"] >= reconciles + 3


# Fields the operator sets to false: a hand edit to true moves the field to the
# editor, and the operator must win it back although "false" may look like "unset".
FALSE_FIELD_EDITS: list[tuple[str, str, Any]] = [
    (
        "json",
        json.dumps(
            [
                {
                    "op": "replace",
                    "path": "/spec/template/spec/containers/0/securityContext/allowPrivilegeEscalation",
                    "value": True,
                }
            ]
        ),
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["securityContext"][
            "allowPrivilegeEscalation"
        ],
    ),
    (
        "strategic",
        json.dumps({"spec": {"template": {"spec": {"enableServiceLinks": True}}}}),
        lambda o: o["spec"]["template"]["spec"]["enableServiceLinks"],
    ),
    (
        "merge",
        json.dumps({"spec": {"template": {"spec": {"automountServiceAccountToken": True}}}}),
        lambda o: o["spec"]["template"]["spec"]["automountServiceAccountToken"],
    ),
]


@pytest.mark.parametrize(
    ("patch_type", "patch", "read"),
    FALSE_FIELD_EDITS,
    ids=["allowPrivilegeEscalation", "enableServiceLinks", "automountServiceAccountToken"],
)
def test_hand_edit_of_a_false_field_is_reverted(
    op: OperatorProcess, kube: Kube, full: str, patch_type: str, patch: str, read: Any
) -> None:
    assert read(kube.get("deployment", f"{full}{REV}")) is False
    patched = json.loads(
        kube.run(
            "patch", "deployment", f"{full}{REV}", f"--type={patch_type}", "-p", patch, "-o", "json"
        ).stdout
    )
    assert read(patched) is True, "the hand edit did not take"
    wait_for(
        lambda: read(kube.get("deployment", f"{full}{REV}")) is False,
        timeout=repair_deadline(op),
        message=lambda: (
            f"deployment/{full}{REV} restored to false, is {read(kube.get('deployment', full + REV))!r}"
        ),
    )
