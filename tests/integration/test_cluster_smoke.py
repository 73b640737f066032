"""The local control plane is a real one: controllers, scheduler, GPU nodes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from autoglm_dev.cluster import ExistingCluster, LocalCluster
from autoglm_dev.waiting import wait_until

pytestmark = pytest.mark.k8s

Cluster = LocalCluster | ExistingCluster


def _get(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def _gpu_deployment(name: str, gpus: int, replicas: int = 1) -> str:
    labels = {"app": name}
    return json.dumps(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "nodeSelector": {"nvidia.com/gpu.present": "true"},
                        "tolerations": [
                            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                        ],
                        "containers": [
                            {
                                "name": "main",
                                "image": "registry.invalid/never-pulled:1",
                                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                            }
                        ],
                    },
                },
            },
        }
    )


def test_gpu_nodes_are_registered_and_ready(cluster: Cluster) -> None:
    nodes = _get(cluster, "nodes", "-l", "nvidia.com/gpu.present=true")["items"]
    assert len(nodes) >= 1
    for node in nodes:
        assert int(node["status"]["allocatable"]["nvidia.com/gpu"]) > 0
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"]
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}
        assert ready.get("Ready") == "True"


def test_gpu_deployment_is_scheduled_running_and_garbage_collected(
    cluster: Cluster, namespace: str
) -> None:
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=_gpu_deployment("gpu-app", gpus=1, replicas=2)
    )

    # controller-manager: Deployment -> ReplicaSet -> Pods
    rs = wait_until(
        lambda: _get(cluster, "replicasets", "-n", namespace, "-l", "app=gpu-app")["items"],
        timeout=60,
        message="a ReplicaSet for the Deployment",
    )
    assert rs[0]["metadata"]["ownerReferences"][0]["kind"] == "Deployment"

    def running_pods() -> list[dict[str, Any]] | None:
        pods = _get(cluster, "pods", "-n", namespace, "-l", "app=gpu-app")["items"]
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        return running if len(running) == 2 else None

    pods = wait_until(running_pods, timeout=90, message="2 Running pods")
    gpu_nodes = {
        n["metadata"]["name"]
        for n in _get(cluster, "nodes", "-l", "nvidia.com/gpu.present=true")["items"]
    }
    for pod in pods:
        # the scheduler bound it to a GPU node, and kwok reports it Running and Ready
        assert pod["spec"]["nodeName"] in gpu_nodes
        conditions = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
        assert conditions["Ready"] == "True"
        assert pod["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"

    cluster.kubectl("delete", "deployment", "gpu-app", "-n", namespace, "--wait=false")
    wait_until(
        lambda: _get(cluster, "pods", "-n", namespace, "-l", "app=gpu-app")["items"] == [],
        timeout=90,
        message="the garbage collector to delete the pods",
    )
    assert _get(cluster, "replicasets", "-n", namespace)["items"] == []


def test_more_gpus_than_any_node_leaves_pod_pending(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=_gpu_deployment("too-big", gpus=1000)
    )

    def failed_scheduling() -> list[dict[str, Any]]:
        events = _get(
            cluster, "events", "-n", namespace, "--field-selector", "reason=FailedScheduling"
        )["items"]
        return [e for e in events if "Insufficient nvidia.com/gpu" in e.get("message", "")]

    events = wait_until(failed_scheduling, timeout=90, message="a FailedScheduling event")
    assert events[0]["involvedObject"]["kind"] == "Pod"
    pods = _get(cluster, "pods", "-n", namespace, "-l", "app=too-big")["items"]
    assert len(pods) == 1
    assert pods[0]["status"]["phase"] == "Pending"
    assert not pods[0]["spec"].get("nodeName")
