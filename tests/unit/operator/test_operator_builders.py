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
from autoglm_operator.canary import VersionPlan, compute_revision
from autoglm_operator.spec import AutoGLMDeploymentSpec, compute_canary_spec, parse_spec

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
    assert hpa["metadata"]["name"] == OWNER.name  # the stable revision's HPA keeps the name
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{OWNER.name}-{compute_revision(spec)}",
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


def test_plan_deletions_lists_owned_children_not_wanted() -> None:
    spec = _spec()
    rev = compute_revision(spec)
    live = {
        "Deployment": [f"glm-{rev}", "glm", "glm-0ld0ld00"],
        "Service": ["glm", "glm-headless", f"glm-{rev}", "glm-0ld0ld00"],
        "HorizontalPodAutoscaler": ["glm"],
        "PodDisruptionBudget": ["glm"],
        "ConfigMap": ["glm-model-digests"],
        "HTTPRoute": ["glm"],
    }
    deletions = plan_deletions(build_children(spec, OWNER), OWNER, live)
    assert deletions == [
        ("v1", "ConfigMap", "glm-model-digests"),
        ("apps/v1", "Deployment", "glm"),
        ("apps/v1", "Deployment", "glm-0ld0ld00"),
        ("v1", "Service", "glm-0ld0ld00"),
        # No Gateway API routes: a revision Service is nobody's backend, and goes.
        ("v1", "Service", f"glm-{rev}"),
        ("autoscaling/v2", "HorizontalPodAutoscaler", "glm"),
        ("policy/v1", "PodDisruptionBudget", "glm"),
        ("gateway.networking.k8s.io/v1", "HTTPRoute", "glm"),
    ]
    # What the reconcile keeps (a draining canary, the Deployment from before revisions) stays.
    kept = plan_deletions(
        build_children(spec, OWNER),
        OWNER,
        live,
        {("Deployment", "glm"), ("Deployment", "glm-0ld0ld00")},
    )
    assert ("apps/v1", "Deployment", "glm") not in kept
    assert ("autoscaling/v2", "HorizontalPodAutoscaler", "glm") in kept  # same name, other kind


def test_services_grpc_headless_and_scrape_annotations() -> None:
    children = build("minimal")
    services = [c for c in children if c["kind"] == "Service"]
    # No Gateway API routes, so no revision Service (a ClusterIP nobody routes to).
    assert [s["metadata"]["name"] for s in services] == ["glm", "glm-headless"]
    gateway = {"provider": "gatewayAPI", "gateway": {"name": "gw"}}
    with_routes = parse_spec({**VARIANTS["minimal"], "traffic": gateway})
    rev = compute_revision(with_routes)
    services = [c for c in build_children(with_routes, OWNER) if c["kind"] == "Service"]
    assert [s["metadata"]["name"] for s in services] == [f"glm-{rev}", "glm", "glm-headless"]
    per_revision, main, headless = services
    assert per_revision["spec"]["selector"]["serving.autoglm.io/revision"] == rev
    assert "serving.autoglm.io/revision" not in main["spec"]["selector"]
    assert "annotations" not in per_revision["metadata"]  # scraped once, through <name>
    assert main["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert main["metadata"]["annotations"]["prometheus.io/port"] == "8002"
    assert headless["spec"]["clusterIP"] == "None"
    assert {p["name"] for p in main["spec"]["ports"]} == {"grpc", "http", "metrics"}
    assert (
        next(p for p in headless["spec"]["ports"] if p["name"] == "grpc")["appProtocol"]
        == "kubernetes.io/h2c"
    )


# ---- per-revision children and the traffic providers ----------------------------------------


def _two_versions(provider: dict[str, Any] | None, **extra: Any) -> list[dict[str, Any]]:
    spec = parse_spec(
        {
            "model": {"source": "hf://org/glm@v1"},
            "replicas": 4,
            "canary": {"model": {"source": "hf://org/glm@v2"}, "weight": 10},
            **({"traffic": provider} if provider else {}),
            **extra,
        }
    )
    canary = compute_canary_spec(spec)
    versions = [
        VersionPlan(compute_revision(spec), spec, "stable", 90, 4, None, hpa_is_stable=True),
        VersionPlan(compute_revision(canary), canary, "canary", 10, 1, None),
    ]
    return build_children(spec, OWNER, versions)


def test_each_revision_has_its_own_deployment_and_service_with_the_revision_label() -> None:
    children = _two_versions(None)
    deployments = [c for c in children if c["kind"] == "Deployment"]
    assert [d["spec"]["replicas"] for d in deployments] == [4, 1]
    for dep in deployments:
        rev = dep["metadata"]["labels"]["serving.autoglm.io/revision"]
        assert dep["metadata"]["name"] == f"glm-{rev}"
        assert dep["spec"]["selector"]["matchLabels"]["serving.autoglm.io/revision"] == rev
        assert dep["spec"]["template"]["metadata"]["labels"]["serving.autoglm.io/revision"] == rev
    envs = [
        {e["name"]: e["value"] for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        for d in deployments
    ]
    assert [e["AUTOGLM_MODEL"] for e in envs] == ["hf://org/glm@v1", "hf://org/glm@v2"]
    # The replicas provider: no routes; <name> selects every revision.
    kinds = {c["kind"] for c in children}
    assert not kinds & {"GRPCRoute", "HTTPRoute", "VirtualService", "DestinationRule"}


def test_gateway_api_routes_split_by_weight_to_revision_services() -> None:
    children = _two_versions(
        {
            "provider": "gatewayAPI",
            "gateway": {"name": "gw", "namespace": "infra", "sectionName": "web"},
            "hostnames": ["glm.example"],
        }
    )
    # The routes go first: a rollback's weight 0 is applied before anything scales down.
    assert [c["kind"] for c in children[:2]] == ["GRPCRoute", "HTTPRoute"]
    grpc, http = children[0], children[1]
    for route, port in ((grpc, 8001), (http, 8000)):
        assert route["metadata"]["name"] == "glm"
        assert route["spec"]["parentRefs"] == [
            {
                "group": "gateway.networking.k8s.io",
                "kind": "Gateway",
                "name": "gw",
                "namespace": "infra",
                "sectionName": "web",
            }
        ]
        assert route["spec"]["hostnames"] == ["glm.example"]
        refs = route["spec"]["rules"][0]["backendRefs"]
        assert [(r["weight"], r["port"]) for r in refs] == [(90, port), (10, port)]
        names = {c["metadata"]["name"] for c in children if c["kind"] == "Service"}
        assert {r["name"] for r in refs} <= names


def test_istio_virtual_service_and_destination_rule_subsets() -> None:
    children = _two_versions({"provider": "istio"})
    assert [c["kind"] for c in children[:2]] == ["DestinationRule", "VirtualService"]
    rule, vs = children[0], children[1]
    host = "glm.models.svc.cluster.local"
    assert rule["spec"]["host"] == host
    subsets = rule["spec"]["subsets"]
    assert [s["labels"] for s in subsets] == [
        {"serving.autoglm.io/revision": s["name"]} for s in subsets
    ]
    assert vs["spec"]["hosts"] == [host]
    assert "gateways" not in vs["spec"]  # the mesh
    route = vs["spec"]["http"][0]["route"]
    assert [(r["destination"]["subset"], r["weight"]) for r in route] == [
        (subsets[0]["name"], 90),
        (subsets[1]["name"], 10),
    ]


def test_canary_hpa_is_named_after_its_revision_and_the_stable_keeps_name() -> None:
    auto = {
        "minReplicas": 2,
        "maxReplicas": 8,
        "targets": [{"type": "queueDepth", "averageValue": "4"}],
    }
    spec = parse_spec(
        {"model": {"source": "/m"}, "autoscaling": auto, "canary": {"image": "img:2", "weight": 10}}
    )
    canary = compute_canary_spec(spec)
    versions = [
        VersionPlan(compute_revision(spec), spec, "stable", 90, None, (2, 8), hpa_is_stable=True),
        VersionPlan(compute_revision(canary), canary, "canary", 10, None, (1, 1)),
    ]
    hpas = [
        c for c in build_children(spec, OWNER, versions) if c["kind"] == "HorizontalPodAutoscaler"
    ]
    assert [
        (h["metadata"]["name"], h["spec"]["minReplicas"], h["spec"]["maxReplicas"]) for h in hpas
    ] == [
        ("glm", 2, 8),
        (f"glm-{compute_revision(canary)}", 1, 1),
    ]
    assert [h["spec"]["scaleTargetRef"]["name"] for h in hpas] == [
        f"glm-{compute_revision(spec)}",
        f"glm-{compute_revision(canary)}",
    ]
