"""Canary rollouts on the real control plane (kwok GPU nodes, no servers, no Prometheus).

What the API server and the operator do with the objects: the routes each
provider needs are accepted by the API server's own CRD schemas (Gateway API
from its module, Istio's from ``istio.io/api``), and the step machine moves the
weights in them, step by step, through resume, promotion, abort and a
rollback to an older revision. The live cluster (real servers, Prometheus,
Traefik) is tests/integration/live's.

The test with the missing provider removes Istio's CRDs first if an earlier
test installed them (the later Istio tests install them again).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from operator_helpers import Kube, OperatorProcess, agd, revision_of, wait_for

from autoglm_dev.addons import install_gateway_api, install_istio_crds, remove_istio_crds

pytestmark = pytest.mark.k8s

SOURCE = {"source": "hf://THUDM/glm-4-9b-chat-hf@main"}
GATEWAY = {"provider": "gatewayAPI", "gateway": {"name": "gw", "sectionName": "http"}}


@pytest.fixture(scope="module")
def gateway_crds(cluster: Any) -> None:
    install_gateway_api(cluster)


def canary_status(kube: Kube, name: str) -> dict[str, Any]:
    return dict(((kube.get("agd", name) or {}).get("status") or {}).get("canary") or {})


def wait_phase(kube: Kube, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
    status: dict[str, Any] = wait_for(
        lambda: (st := canary_status(kube, name)).get("phase") == phase and st,
        timeout=timeout,
        message=lambda: f"phase {phase}; status.canary now {json.dumps(canary_status(kube, name))}",
    )
    return status


def backend_weights(kube: Kube, kind: str, name: str) -> dict[str, int]:
    route = kube.get(kind, name) or {}
    if kind.lower() == "virtualservice":
        return {r["destination"]["subset"]: r["weight"] for r in route["spec"]["http"][0]["route"]}
    return {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]}


def wait_weights(kube: Kube, kind: str, name: str, want: dict[str, int]) -> None:
    wait_for(
        lambda: kube.get(kind, name) is not None and backend_weights(kube, kind, name) == want,
        timeout=60,
        message=lambda: (
            f"{kind}/{name} weights {want}, have "
            f"{backend_weights(kube, kind, name) if kube.get(kind, name) else None}"
        ),
    )


def events(kube: Kube, name: str) -> list[str]:
    data = kube.get(
        "events",
        None,
        "--field-selector",
        f"involvedObject.name={name},involvedObject.kind=AutoGLMDeployment",
    )
    return [e["reason"] for e in (data or {}).get("items", [])]


def annotate(kube: Kube, name: str, action: str) -> None:
    kube.run("annotate", "agd", name, f"serving.autoglm.io/canary-action={action}", "--overwrite")


def patch_spec(kube: Kube, name: str, spec: dict[str, Any]) -> None:
    kube.run("patch", "agd", name, "--type=merge", "-p", json.dumps({"spec": spec}))


def test_a_provider_whose_crds_are_missing_is_a_condition_not_a_crash(
    op: OperatorProcess, kube: Kube
) -> None:
    # The cluster is shared by the whole run: take Istio's CRDs away if another test
    # installed them (the later tests here install them again).
    remove_istio_crds(kube.cluster)
    spec = {"model": SOURCE, "traffic": {"provider": "istio"}}
    assert kube.apply(agd("nomesh", spec)).returncode == 0

    def missing() -> dict[str, Any] | None:
        cond = kube.condition("nomesh")
        return cond if cond and cond["reason"] == "TrafficProviderMissing" else None

    cond = wait_for(missing, timeout=60, message=lambda: f"{kube.condition('nomesh')}")
    assert cond["status"] == "False"
    assert "networking.istio.io/v1beta1" in cond["message"]
    degraded = kube.condition("nomesh", "Degraded")
    assert degraded is not None and degraded["status"] == "True"
    # The model's pods are created all the same, and the operator lives on.
    wait_for(
        lambda: kube.get("deployment", f"nomesh-{revision_of(spec)}") is not None,
        timeout=30,
        message="the Deployment",
    )
    assert op.alive()


def test_gateway_api_routes_follow_the_steps_through_promotion_and_rollback_to(
    op: OperatorProcess, kube: Kube, gateway_crds: None
) -> None:
    base = {"model": SOURCE, "replicas": 2, "traffic": GATEWAY}
    stable = f"canary-{revision_of(base)}"
    assert kube.apply(agd("canary", base)).returncode == 0
    kube.wait_ready("canary", timeout=120)
    for kind in ("grpcroute", "httproute"):
        wait_weights(kube, kind, "canary", {stable: 100})
    grpc = kube.get("grpcroute", "canary")
    assert grpc["spec"]["parentRefs"][0]["name"] == "gw"
    assert grpc["spec"]["rules"][0]["backendRefs"][0]["port"] == 8001
    assert kube.get("httproute", "canary")["spec"]["rules"][0]["backendRefs"][0]["port"] == 8000

    steps = [{"setWeight": 20}, {"pause": {}}, {"setWeight": 60}, {"pause": {"duration": "1s"}}]
    patch_spec(kube, "canary", {"canary": {"image": "registry.local/server:2", "steps": steps}})
    target = f"canary-{revision_of({**base, 'server': {'image': 'registry.local/server:2'}})}"
    st = wait_phase(kube, "canary", "Paused")
    assert (st["step"], st["weight"], st["reason"]) == (1, 20, "PauseStep")
    assert "canary-" + st["canaryRevision"] == target
    for kind in ("grpcroute", "httproute"):
        wait_weights(kube, kind, "canary", {stable: 80, target: 20})
    assert kube.get("service", target)["spec"]["selector"]["serving.autoglm.io/revision"] == (
        target.removeprefix("canary-")
    )
    # The stable side keeps its two pods; the canary gets its share (20% of 2 -> 1).
    assert kube.get("deployment", stable)["spec"]["replicas"] == 2
    assert kube.get("deployment", target)["spec"]["replicas"] == 1
    ready = kube.condition("canary")
    assert ready is not None and ready["status"] == "True"  # the stable serves
    progressing = kube.condition("canary", "Progressing")
    assert progressing is not None and progressing["reason"] == "CanaryInProgress"
    table = kube.run("get", "agd", "canary").stdout.splitlines()
    assert table[1].split()[4] == "Paused"

    # Resume: past the open pause, weight 60, a timed pause, then promoted.
    annotate(kube, "canary", "resume")
    st = wait_phase(kube, "canary", "Promoted")
    assert st["stableRevision"] == target.removeprefix("canary-")
    assert st["weight"] == 100
    assert "serving.autoglm.io/canary-action" not in (
        kube.get("agd", "canary")["metadata"].get("annotations") or {}
    )
    # The old stable stays warm (its pods kept, no traffic) for the instant-rollback window.
    for kind in ("grpcroute", "httproute"):
        wait_weights(kube, kind, "canary", {target: 100, stable: 0})
    assert kube.get("deployment", stable)["spec"]["replicas"] == 2
    assert kube.get("deployment", target)["spec"]["replicas"] == 2
    revisions = kube.get("agd", "canary")["status"]["revisions"]
    assert [r["name"] for r in revisions] == [
        target.removeprefix("canary-"),
        stable.removeprefix("canary-"),
    ]
    assert revisions[1]["warmUntil"] and revisions[0]["image"] == "registry.local/server:2"
    reasons = events(kube, "canary")
    for reason in ("CanaryStarted", "WeightSet", "PauseStep", "CanaryAction", "Promoted"):
        assert reason in reasons, reasons

    # rollbackTo the old revision inside the window: a weight flip.
    patch_spec(kube, "canary", {"rollbackTo": stable.removeprefix("canary-")})
    st = wait_phase(kube, "canary", "Promoted")
    st = wait_for(
        lambda: (s := canary_status(kube, "canary")).get("reason") == "RolledBackTo" and s,
        timeout=60,
        message=lambda: f"RolledBackTo, have {canary_status(kube, 'canary')}",
    )
    assert st["stableRevision"] == stable.removeprefix("canary-")
    wait_weights(kube, "grpcroute", "canary", {stable: 100, target: 0})


def test_abort_sets_weight_zero_then_removes_the_canary(
    op: OperatorProcess, kube: Kube, gateway_crds: None
) -> None:
    base = {"model": SOURCE, "traffic": GATEWAY}
    stable = f"abort-{revision_of(base)}"
    assert kube.apply(agd("abort", base)).returncode == 0
    kube.wait_ready("abort", timeout=120)
    canary = {"model": {"source": "hf://THUDM/glm-4-9b-chat-hf@v2"}, "weight": 50}
    patch_spec(kube, "abort", {"canary": canary})
    st = wait_phase(kube, "abort", "Paused")
    target = f"abort-{st['canaryRevision']}"
    wait_weights(kube, "httproute", "abort", {stable: 50, target: 50})
    annotate(kube, "abort", "abort")
    st = wait_phase(kube, "abort", "RolledBack", timeout=60)
    assert st["reason"] == "Aborted" and st["weight"] == 0
    assert st["weightZeroAt"] >= st["rollbackStartedAt"]
    wait_weights(kube, "httproute", "abort", {stable: 100})
    wait_for(
        lambda: kube.get("deployment", target) is None and kube.get("service", target) is None,
        timeout=60,
        message="the canary's Deployment and Service removed",
    )
    assert kube.get("deployment", stable)["spec"]["replicas"] == 1


def test_an_analysis_without_prometheus_times_out_and_rolls_back(
    op: OperatorProcess, kube: Kube
) -> None:
    # The session's operator has no Prometheus to ask: every interval is inconclusive.
    base = {"model": SOURCE}
    assert kube.apply(agd("blind", base)).returncode == 0
    kube.wait_ready("blind", timeout=120)
    steps = [{"setWeight": 50}, {"analysis": {"interval": "1s", "timeout": "4s"}}]
    patch_spec(kube, "blind", {"canary": {"image": "registry.local/server:3", "steps": steps}})
    st = wait_phase(kube, "blind", "RolledBack", timeout=90)
    assert st["reason"] == "AnalysisFailed"
    assert "timed out" in st["message"] and "PROMETHEUS_URL" in st["message"]
    assert st["lastAnalysis"]["verdict"] == "Inconclusive"
    degraded = kube.condition("blind", "Degraded")
    assert degraded is not None and degraded["reason"] == "AnalysisFailed"
    assert "RollingBack" not in events(kube, "blind")  # reasons, not phases
    assert "AnalysisFailed" in events(kube, "blind")


def test_istio_objects_are_accepted_and_carry_the_weights(
    op: OperatorProcess, kube: Kube, cluster: Any
) -> None:
    install_istio_crds(cluster)
    base = {"model": SOURCE, "replicas": 2, "traffic": {"provider": "istio"}}
    stable = revision_of(base)
    assert kube.apply(agd("mesh", base)).returncode == 0
    kube.wait_ready("mesh", timeout=120)
    patch_spec(
        kube, "mesh", {"canary": {"server": {"batching": {"maxBatchSize": 8}}, "weight": 30}}
    )
    st = wait_phase(kube, "mesh", "Paused")
    target = st["canaryRevision"]
    wait_weights(kube, "virtualservice", "mesh", {stable: 70, target: 30})
    rule = kube.get("destinationrule", "mesh")
    assert rule["spec"]["host"] == f"mesh.{kube.namespace}.svc.cluster.local"
    assert {s["name"]: s["labels"] for s in rule["spec"]["subsets"]} == {
        stable: {"serving.autoglm.io/revision": stable},
        target: {"serving.autoglm.io/revision": target},
    }
    # The canary's pods carry its subset's label.
    pods = kube.get("pods", None, "-l", f"serving.autoglm.io/revision={target}")["items"]
    assert pods, "no canary pods"
    env = {e["name"]: e["value"] for e in pods[0]["spec"]["containers"][0]["env"]}
    assert env["AUTOGLM_MAX_BATCH_SIZE"] == "8"
    # The Degraded condition of the missing-provider test is gone here.
    assert kube.condition("mesh", "Degraded")["status"] == "False"  # type: ignore[index]


def build_legacy_deployment(name: str, spec: dict[str, Any], uid: str, ns: str) -> dict[str, Any]:
    """The Deployment an operator from before revisions made: named <name>, selected by the
    instance labels alone, pods without the revision label."""
    from autoglm_operator.builders import build_deployment
    from autoglm_operator.owner import REVISION_LABEL, Owner
    from autoglm_operator.spec import parse_spec

    dep = build_deployment(parse_spec(spec), Owner(name, ns, uid))
    dep["metadata"]["name"] = name
    for labels in (
        dep["metadata"]["labels"],
        dep["spec"]["selector"]["matchLabels"],
        dep["spec"]["template"]["metadata"]["labels"],
    ):
        labels.pop(REVISION_LABEL)
    dep["spec"]["template"]["spec"].pop("nodeSelector", None)
    for volume in dep["spec"]["template"]["spec"]["volumes"]:
        volume.pop("configMap", None)
    return dep


def test_the_deployment_from_before_revisions_serves_until_the_new_one_is_ready(
    op: OperatorProcess, kube: Kube
) -> None:
    # The new revision's pods can't be placed yet (no node has this GPU product).
    spec = {"model": SOURCE, "resources": {"gpuProduct": "NVIDIA-NONE"}}
    assert kube.apply(agd("old", spec)).returncode == 0
    uid = kube.get("agd", "old")["metadata"]["uid"]
    legacy = build_legacy_deployment("old", {"model": SOURCE}, uid, kube.namespace)
    created = kube.run("apply", "--server-side", "--field-manager=autoglm-operator", "-f", "-",
                       input=json.dumps(legacy), check=False)  # fmt: skip
    assert created.returncode == 0, created.stderr
    wait_for(
        lambda: (kube.get("deployment", "old") or {}).get("status", {}).get("readyReplicas") == 1,
        timeout=60,
        message="the old Deployment's pod ready",
    )
    new = f"old-{revision_of(spec)}"
    assert kube.get("deployment", new) is not None
    # Several timer periods later the old Deployment still serves, and the status says so.
    ticks = op.reconciles()
    wait_for(lambda: op.reconciles() >= ticks + 3, timeout=60, message="three reconciles")
    assert kube.get("deployment", "old") is not None
    ready = kube.wait_ready("old", timeout=30)
    assert ready["status"]["readyReplicas"] == 1
    # Once the new revision can run and is Ready, the old Deployment goes.
    patch_spec(kube, "old", {"resources": {"gpuProduct": None}})
    wait_for(
        lambda: kube.get("deployment", "old") is None,
        timeout=90,
        message=lambda: (
            f"old Deployment removed; new: {(kube.get('deployment', new) or {}).get('status')}"
        ),
    )
    status = kube.get("deployment", new)["status"]
    assert status.get("readyReplicas") == 1


def test_routes_at_rest_cost_no_write(op: OperatorProcess, kube: Kube, cluster: Any) -> None:
    """The API server's defaults in the routes (group, kind, match types) are written out by
    the builders, so a route that is as wanted compares equal and is not applied again."""
    install_gateway_api(cluster)
    install_istio_crds(cluster)
    for name, provider in (("quiet-gw", GATEWAY), ("quiet-mesh", {"provider": "istio"})):
        spec = {"model": SOURCE, "traffic": provider}
        assert kube.apply(agd(name, spec)).returncode == 0
        kube.wait_ready(name, timeout=120)
    kinds = ("grpcroute", "httproute", "virtualservice", "destinationrule")

    def versions() -> dict[str, str]:
        out = {}
        for kind in kinds:
            for name in ("quiet-gw", "quiet-mesh"):
                obj = kube.get(kind, name)
                if obj is not None:
                    out[f"{kind}/{name}"] = obj["metadata"]["resourceVersion"]
        return out

    before = versions()
    assert len(before) == 4
    ticks = op.reconciles()
    wait_for(
        lambda: op.reconciles() >= ticks + 6,
        timeout=6 * op.resync_seconds + 30,
        message="six reconciles",
    )
    assert versions() == before, "a route at rest was written again"
