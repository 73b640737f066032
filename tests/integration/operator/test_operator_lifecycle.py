"""The life of an AutoGLMDeployment on a real control plane (kwok GPU nodes).

Each test runs in its own namespace against the session's operator process.
"""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
from operator_helpers import (
    Kube,
    OperatorProcess,
    agd,
    deployment_of,
    load_example,
    wait_for,
)

pytestmark = pytest.mark.k8s

KIND_OF = {
    "Deployment": "deployment",
    "Service": "service",
    "ConfigMap": "configmap",
    "HorizontalPodAutoscaler": "hpa",
    "PodDisruptionBudget": "pdb",
    "NetworkPolicy": "networkpolicy",
}


def expected_children(name: str, example: dict[str, Any]) -> set[tuple[str, str]]:
    spec = example["spec"]
    per_revision = deployment_of(name, spec)
    kids = {
        ("Deployment", per_revision),
        ("Service", name),
        ("Service", f"{name}-headless"),
    }
    if (spec.get("traffic") or {}).get("provider") == "gatewayAPI":
        kids.add(("Service", per_revision))  # the routes' backendRef
    auto = spec.get("autoscaling")
    if auto and auto.get("targets"):
        kids.add(("HorizontalPodAutoscaler", name))
    min_replicas = auto.get("minReplicas", 1) if auto else spec.get("replicas", 1)
    if min_replicas > 1:
        kids.add(("PodDisruptionBudget", name))
    if spec["model"].get("sha256"):
        kids.add(("ConfigMap", f"{per_revision}-digests"))
    if spec.get("networkPolicy", {}).get("enabled", True):
        kids.add(("NetworkPolicy", name))
    return kids


def gpu_nodes(kube: Kube) -> set[str]:
    nodes = kube.cluster.kubectl("get", "nodes", "-l", "nvidia.com/gpu.present=true", "-o", "json")
    return {n["metadata"]["name"] for n in json.loads(nodes.stdout)["items"]}


def running_pods(kube: Kube, name: str) -> list[dict[str, Any]]:
    pods = kube.get("pods", None, "-l", f"app.kubernetes.io/instance={name}")
    return [
        p
        for p in (pods or {}).get("items", [])
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    ]


@pytest.mark.parametrize("stem", ["minimal", "glm-1gpu", "autoscaling"])
def test_example_becomes_ready_with_owned_children_on_gpu_nodes(
    op: OperatorProcess, kube: Kube, stem: str
) -> None:
    example = load_example(stem)
    name = example["metadata"]["name"]
    applied = kube.apply(example)
    assert applied.returncode == 0, applied.stderr
    owner = kube.get("agd", name)
    uid = owner["metadata"]["uid"]

    # All children exist, each controlled by this object.
    want = expected_children(name, example)

    def children_ok() -> bool:
        found = {(c["kind"], c["metadata"]["name"]): c for c in kube.children(name)}
        if set(found) != want:
            return False
        for child in found.values():
            refs = child["metadata"].get("ownerReferences") or []
            assert [(r["kind"], r["name"], r["uid"], r.get("controller")) for r in refs] == [
                ("AutoGLMDeployment", name, uid, True)
            ], child["metadata"]
        return True

    wait_for(
        children_ok,
        timeout=60,
        message=lambda: (
            f"children {want}, have {[(c['kind'], c['metadata']['name']) for c in kube.children(name)]}"
        ),
    )

    # Ready=True for the current generation, with every desired pod Running on a GPU node.
    obj = kube.wait_ready(name, timeout=120)
    desired = example["spec"].get("autoscaling", {}).get("minReplicas") or example["spec"].get(
        "replicas", 1
    )
    obj = wait_for(
        lambda: (o := kube.wait_ready(name)) and o["status"]["readyReplicas"] >= desired and o,
        timeout=90,
        message=f"{desired} ready replicas",
    )
    pods = running_pods(kube, name)
    assert len(pods) >= desired
    gpus = gpu_nodes(kube)
    for pod in pods:
        assert pod["spec"]["nodeName"] in gpus
        requests = pod["spec"]["containers"][0]["resources"]["requests"]
        assert requests["nvidia.com/gpu"] == str(
            example["spec"].get("resources", {}).get("gpus", 1)
        )
    status = obj["status"]
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    assert status["endpoints"]["grpc"] == f"{name}.{kube.namespace}.svc:8001"
    assert status["modelRevision"]


def test_spec_edit_rolls_the_deployment_and_updates_status(op: OperatorProcess, kube: Kube) -> None:
    manifest = agd("edit-me", {"model": {"source": "hf://THUDM/glm-4-9b-chat-hf@v1"}})
    assert kube.apply(manifest).returncode == 0
    first = kube.wait_ready("edit-me")
    assert first["status"]["modelRevision"] == "v1"
    old_name = deployment_of("edit-me", manifest["spec"])
    dep = kube.get("deployment", old_name)
    old_checksum = dep["spec"]["template"]["metadata"]["annotations"][
        "serving.autoglm.io/config-checksum"
    ]
    old_template_hash = {
        p["metadata"]["labels"]["pod-template-hash"] for p in running_pods(kube, "edit-me")
    }

    edited = copy.deepcopy(manifest)
    edited["spec"]["model"]["source"] = "hf://THUDM/glm-4-9b-chat-hf@v2"
    edited["spec"]["server"] = {"batching": {"maxBatchSize": 32}}
    assert kube.apply(edited).returncode == 0

    second = kube.wait_ready("edit-me", timeout=120)
    assert second["metadata"]["generation"] > first["metadata"]["generation"]
    assert second["status"]["modelRevision"] == "v2"
    # A new revision: its own Deployment, which took over; the old one goes.
    new_name = deployment_of("edit-me", edited["spec"])
    assert new_name != old_name
    assert second["status"]["revisions"][0]["name"] == new_name.removeprefix("edit-me-")
    assert second["status"]["canary"]["phase"] == "Promoted"
    wait_for(lambda: kube.get("deployment", old_name) is None, timeout=60, message="old gone")
    dep = kube.get("deployment", new_name)
    template = dep["spec"]["template"]
    assert template["metadata"]["annotations"]["serving.autoglm.io/config-checksum"] != old_checksum
    env = {e["name"]: e["value"] for e in template["spec"]["containers"][0]["env"]}
    assert env["AUTOGLM_MAX_BATCH_SIZE"] == "32"
    assert env["AUTOGLM_MODEL"] == "hf://THUDM/glm-4-9b-chat-hf@v2"
    # The pods were replaced: the running ones come from a new ReplicaSet.
    wait_for(
        lambda: (
            (
                hashes := {
                    p["metadata"]["labels"]["pod-template-hash"]
                    for p in running_pods(kube, "edit-me")
                }
            )
            and not (hashes & old_template_hash)
        ),
        timeout=60,
        message="pods from the new template only",
    )


def test_delete_garbage_collects_every_child(op: OperatorProcess, kube: Kube) -> None:
    manifest = agd(
        "doomed",
        {
            "model": {"source": "/opt/models/tiny", "sha256": {"model.safetensors": "0" * 64}},
            "autoscaling": {
                "minReplicas": 2,
                "maxReplicas": 3,
                "targets": [{"type": "queueDepth", "averageValue": "4"}],
            },
        },
    )
    assert kube.apply(manifest).returncode == 0
    wait_for(lambda: len(kube.children("doomed")) == 7, timeout=60, message="seven children")
    deleted = kube.run("delete", "agd", "doomed", "--wait=true", "--timeout=60s", check=False)
    assert deleted.returncode == 0, deleted.stderr
    wait_for(
        lambda: kube.children("doomed") == [] and running_pods(kube, "doomed") == [],
        timeout=90,
        message=lambda: (
            f"no children left, have {[(c['kind'], c['metadata']['name']) for c in kube.children('doomed')]}"
        ),
    )
    assert kube.get("agd", "doomed") is None


def test_kubectl_scale_and_get_columns(op: OperatorProcess, kube: Kube) -> None:
    assert (
        kube.apply(
            agd("scaled", {"model": {"source": "hf://THUDM/glm-4-9b-chat-hf@main"}})
        ).returncode
        == 0
    )
    kube.wait_ready("scaled")
    out = kube.run("scale", "agd/scaled", "--replicas=3")
    assert "scaled" in out.stdout
    obj = kube.get("agd", "scaled")
    assert obj["spec"]["replicas"] == 3

    wait_for(
        lambda: (
            (o := kube.get("agd", "scaled"))["status"].get("readyReplicas") == 3
            and kube.condition("scaled")["status"] == "True"
            and o
        ),
        timeout=90,
        message="3 ready replicas",
    )
    scaled = deployment_of("scaled", {"model": {"source": "hf://THUDM/glm-4-9b-chat-hf@main"}})
    assert kube.get("deployment", scaled)["spec"]["replicas"] == 3
    assert kube.get("pdb", "scaled") is not None  # more than one replica now

    # The scale subresource reads back what kubectl scale wrote, with the selector.
    scale = json.loads(
        kube.cluster.kubectl(
            "get",
            "--raw",
            f"/apis/serving.autoglm.io/v1alpha1/namespaces/{kube.namespace}/autoglmdeployments/scaled/scale",
        ).stdout
    )
    assert scale["spec"]["replicas"] == 3
    assert scale["status"]["replicas"] == 3
    assert "app.kubernetes.io/instance=scaled" in scale["status"]["selector"]

    table = kube.run("get", "agd").stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "MODEL", "REPLICAS", "CANARY", "AGE"]
    row = table[1].split()
    assert row[:4] == ["scaled", "True", "hf://THUDM/glm-4-9b-chat-hf@main", "3"]
    wide = kube.run("get", "autoglm", "-o", "wide").stdout.splitlines()
    assert wide[0].split() == [
        "NAME",
        "READY",
        "MODEL",
        "REPLICAS",
        "CANARY",
        "WEIGHT",
        "REASON",
        "AGE",
    ]
    assert wide[1].split()[4] == "ReplicasReady"  # no rollout yet: Canary and Weight are empty

    # Scaling back to one removes the PodDisruptionBudget.
    kube.run("scale", "agd/scaled", "--replicas=1")
    wait_for(lambda: kube.get("pdb", "scaled") is None, timeout=30, message="PDB removed")


SWITCH = deployment_of("switch", {"model": {"source": "hf://THUDM/glm-4-9b-chat-hf@main"}})


def deployment_with_owners(kube: Kube, name: str) -> dict[str, Any]:
    dep: dict[str, Any] = kube.get("deployment", SWITCH, "--show-managed-fields")
    return dep


def operator_owns_replicas(deployment: dict[str, Any]) -> bool:
    return any(
        e["manager"] == "autoglm-operator"
        and e["operation"] == "Apply"
        and "f:replicas" in e.get("fieldsV1", {}).get("f:spec", {})
        for e in deployment["metadata"]["managedFields"]
    )


def test_switch_to_autoscaling_keeps_the_replica_count(op: OperatorProcess, kube: Kube) -> None:
    source = {"source": "hf://THUDM/glm-4-9b-chat-hf@main"}
    assert kube.apply(agd("switch", {"replicas": 3, "model": source})).returncode == 0
    obj = kube.wait_ready("switch", timeout=120)
    assert obj["status"]["readyReplicas"] == 3
    assert operator_owns_replicas(deployment_with_owners(kube, "switch"))

    auto = {
        "model": source,
        "autoscaling": {
            "minReplicas": 2,
            "maxReplicas": 6,
            "targets": [{"type": "queueDepth", "averageValue": "4"}],
        },
    }
    assert kube.apply(agd("switch", auto)).returncode == 0
    # The operator applied the new spec: the HPA exists and spec.replicas is no longer ours.
    wait_for(
        lambda: (
            kube.get("hpa", "switch") is not None
            and not operator_owns_replicas(deployment_with_owners(kube, "switch"))
        ),
        timeout=30,
        message="the HPA created and spec.replicas handed over",
    )
    # The HPA has no metrics here, so nothing else changes the count: it stays 3.
    for _ in range(6):
        assert kube.get("deployment", SWITCH)["spec"]["replicas"] == 3
        time.sleep(0.5)
    kube.wait_ready("switch", timeout=60)
    assert kube.get("deployment", SWITCH)["spec"]["replicas"] == 3
