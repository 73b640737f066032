"""Builders: golden YAML per variant, determinism, and the properties the issue names.

Regenerate the golden files after an intended change with
``AUTOGLM_UPDATE_GOLDEN=1 pytest tests/unit/operator/test_operator_builders.py``
and review the diff like source.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm_operator.builders import (
    CHECKSUM_ANNOTATION,
    DCGM_GPU_UTIL_METRIC,
    TARGET_METRICS,
    Owner,
    build_children,
    build_deployment,
    build_hpa,
    build_pdb,
    compute_config_checksum,
    plan_deletions,
)
from autoglm_operator.spec import AutoGLMDeploymentSpec, parse_spec

ROOT = Path(__file__).resolve().parents[3]
GOLDEN = Path(__file__).resolve().parent / "golden"
EXAMPLES = ROOT / "manifests" / "examples"
OWNER = Owner(name="glm", namespace="models", uid="0b7c6d8e-0000-4000-8000-000000000001")


def example_spec(stem: str) -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((EXAMPLES / f"{stem}.yaml").read_text())["spec"]
    return spec


VARIANTS: dict[str, dict[str, Any]] = {
    "minimal": example_spec("minimal"),
    "glm-1gpu": example_spec("glm-1gpu"),
    "autoscaling": example_spec("autoscaling"),
    "pvc-digests-fixed": {
        "replicas": 3,
        "model": {
            "source": "pvc://models/glm-4-9b",
            "version": "2024-06-05",
            "sha256": {"model-00001-of-00002.safetensors": "a" * 64, "config.json": "b" * 64},
            "trustRemoteCode": True,
        },
        "resources": {
            "gpus": 2,
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
            ],
        },
        "server": {
            "image": "registry.local/autoglm/server:dev",
            "imagePullPolicy": "Always",
            "shutdownGraceSeconds": 60,
        },
    },
    "dcgm-hf-cache": {
        "model": {"source": "hf://THUDM/glm-4-9b-chat-hf@abc123", "hfCacheClaim": "hf-cache"},
        "autoscaling": {
            "minReplicas": 1,
            "maxReplicas": 3,
            "targets": [
                {"type": "gpuUtilization", "averageValue": "80", "source": "dcgm"},
                {"type": "requestsPerSecond", "averageValue": "20"},
            ],
        },
    },
    "image-path-fixed-autoscaling": {
        "model": {"source": "/opt/models/tiny"},
        "autoscaling": {"minReplicas": 2, "maxReplicas": 2},
    },
}


def build(variant: str) -> list[dict[str, Any]]:
    return build_children(parse_spec(VARIANTS[variant]), OWNER)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_golden(variant: str) -> None:
    rendered = yaml.safe_dump_all(build(variant), sort_keys=True)
    path = GOLDEN / f"{variant}.yaml"
    if os.environ.get("AUTOGLM_UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(rendered)
    assert path.exists(), f"no golden file; run with AUTOGLM_UPDATE_GOLDEN=1 to write {path}"
    assert rendered == path.read_text()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_build_is_deterministic_and_pure(variant: str) -> None:
    raw = copy.deepcopy(VARIANTS[variant])
    first = build(variant)
    second = build_children(parse_spec(raw), OWNER)
    assert first == second
    assert yaml.safe_dump_all(first) == yaml.safe_dump_all(second)
    assert raw == VARIANTS[variant]  # the input was not mutated


def _spec(**overrides: Any) -> AutoGLMDeploymentSpec:
    return parse_spec({"model": {"source": "hf://THUDM/glm-4@main"}, **overrides})


def test_every_child_has_owner_reference_and_labels() -> None:
    for child in build("autoscaling") + build("pvc-digests-fixed"):
        meta = child["metadata"]
        assert meta["namespace"] == OWNER.namespace
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "serving.autoglm.io/v1alpha1",
                "kind": "AutoGLMDeployment",
                "name": OWNER.name,
                "uid": OWNER.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        for key in ("name", "instance", "component", "managed-by", "part-of"):
            assert f"app.kubernetes.io/{key}" in meta["labels"]


def test_deployment_gpu_node_selection_probes_and_security() -> None:
    dep = build_deployment(
        _spec(resources={"gpus": 4, "gpuProduct": "NVIDIA-H100-80GB-HBM3"}), OWNER
    )
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "4"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["readinessProbe"]["grpc"] == {"port": 8001, "service": "autoglm.v1.AutoGLM"}
    assert container["livenessProbe"]["grpc"] == {"port": 8001}
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_env_follows_the_server_contract() -> None:
    env = {
        e["name"]: e["value"]
        for e in build_deployment(parse_spec(VARIANTS["pvc-digests-fixed"]), OWNER)["spec"][
            "template"
        ]["spec"]["containers"][0]["env"]
    }
    contract = (ROOT / "docs" / "architecture.md").read_text()
    documented = set(re.findall(r"`(AUTOGLM_[A-Z0-9_]+)`", contract))
    assert set(n for n in env if n.startswith("AUTOGLM_")) <= documented
    assert env["AUTOGLM_MODEL"] == "/models/glm-4-9b"
    assert env["AUTOGLM_MODEL_VERSION"] == "2024-06-05"
    assert env["AUTOGLM_SERVED_MODEL_NAME"] == OWNER.name
    assert env["AUTOGLM_TRUST_REMOTE_CODE"] == "true"
    assert env["AUTOGLM_SHA256_FILE"] == "/etc/autoglm/digests/sha256.json"
    assert env["AUTOGLM_GRPC_PORT"] == "8001"


def _env_volumes_mounts(
    spec: AutoGLMDeploymentSpec,
) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
    pod = build_deployment(spec, OWNER)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    return env, volumes, mounts


def test_hf_source_without_cache_claim_downloads_into_a_writable_cache() -> None:
    env, volumes, mounts = _env_volumes_mounts(_spec())
    assert env["AUTOGLM_MODEL"] == "hf://THUDM/glm-4@main"
    assert env["HF_HOME"] == "/var/cache/huggingface"
    assert "HF_HUB_OFFLINE" not in env  # the server downloads at start
    assert volumes["hf-cache"] == {"name": "hf-cache", "emptyDir": {}}
    assert mounts["hf-cache"] == {"name": "hf-cache", "mountPath": "/var/cache/huggingface"}


def test_hf_source_with_cache_claim_resolves_offline_from_it() -> None:
    env, volumes, mounts = _env_volumes_mounts(
        parse_spec({"model": {"source": "hf://THUDM/glm-4@main", "hfCacheClaim": "hf-cache"}})
    )
    assert env["HF_HOME"] == "/var/cache/huggingface"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert volumes["hf-cache"]["persistentVolumeClaim"] == {
        "claimName": "hf-cache",
        "readOnly": True,
    }
    assert mounts["hf-cache"]["readOnly"] is True


def test_non_hf_sources_get_no_hf_cache() -> None:
    for source in ("pvc://models/glm", "/opt/models/tiny"):
        env, volumes, _ = _env_volumes_mounts(parse_spec({"model": {"source": source}}))
        assert "HF_HOME" not in env and "HF_HUB_OFFLINE" not in env
        assert "hf-cache" not in volumes


def test_checksum_rolls_pods_on_model_or_server_change_only() -> None:
    base = _spec()
    assert compute_config_checksum(base) == compute_config_checksum(_spec())
    assert compute_config_checksum(base) != compute_config_checksum(
        parse_spec({"model": {"source": "hf://THUDM/glm-4@v2"}})
    )
    assert compute_config_checksum(base) != compute_config_checksum(
        _spec(server={"batching": {"maxBatchSize": 8}})
    )
    assert compute_config_checksum(base) == compute_config_checksum(_spec(replicas=5))
    dep = build_deployment(base, OWNER)
    assert dep["spec"]["template"]["metadata"]["annotations"][
        CHECKSUM_ANNOTATION
    ] == compute_config_checksum(base)


def test_hpa_metric_names_match_the_server_metrics() -> None:
    contract = (ROOT / "docs" / "architecture.md").read_text()
    for name in TARGET_METRICS.values():
        assert f"`{name}`" in contract
    assert DCGM_GPU_UTIL_METRIC in contract
    spec = _spec(
        autoscaling={
            "minReplicas": 1,
            "maxReplicas": 8,
            "scaleDownStabilizationSeconds": 120,
            "targets": [
                {"type": "gpuUtilization", "averageValue": "70"},
                {"type": "requestsPerSecond", "averageValue": "10"},
                {"type": "queueDepth", "averageValue": "4"},
                {"type": "timeToFirstTokenP95", "averageValue": "500m"},
            ],
        }
    )
    hpa = build_hpa(spec, OWNER)
    assert hpa is not None
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == [
        "autoglm_gpu_utilization_percent",
        "autoglm_requests_per_second",
        "autoglm_queue_depth",
        "autoglm_time_to_first_token_p95_seconds",
    ]
    assert all(
        m["type"] == "Pods" and m["pods"]["target"]["type"] == "AverageValue"
        for m in hpa["spec"]["metrics"]
    )
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": OWNER.name,
    }
    # The HPA owns the Deployment's replicas.
    assert "replicas" not in build_deployment(spec, OWNER)["spec"]


def test_pdb_only_above_one_replica() -> None:
    assert build_pdb(_spec(replicas=1), OWNER) is None
    assert build_pdb(_spec(replicas=2), OWNER) is not None
    assert build_pdb(_spec(autoscaling={"minReplicas": 2, "maxReplicas": 2}), OWNER) is not None
    assert (
        build_pdb(_spec(replicas=5, autoscaling={"minReplicas": 1, "maxReplicas": 1}), OWNER)
        is None
    )


def test_plan_deletions_lists_optional_children_not_wanted() -> None:
    kinds = {kind for _, kind, _ in plan_deletions(build_children(_spec(), OWNER), OWNER)}
    assert kinds == {"ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    auto = parse_spec(VARIANTS["autoscaling"])
    assert plan_deletions(build_children(auto, OWNER), OWNER) == [
        ("v1", "ConfigMap", "glm-model-digests")
    ]


def test_services_grpc_headless_and_scrape_annotations() -> None:
    children = build("minimal")
    services = [c for c in children if c["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == ["glm", "glm-headless"]
    main, headless = services
    assert main["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert main["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in main["spec"]["ports"]} == {"grpc", "http", "metrics"}
    assert (
        next(p for p in headless["spec"]["ports"] if p["name"] == "grpc")["appProtocol"]
        == "kubernetes.io/h2c"
    )
