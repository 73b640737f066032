"""Pod Security: the pods of every example and of the chart pass the ``restricted`` profile.

The API server's PodSecurity admission plugin (on by default; the local control
plane disables only ServiceAccount admission) enforces the profile in a
namespace labelled ``pod-security.kubernetes.io/enforce=restricted``. The
pods are created by the ReplicaSet controller from the Deployments the
operator (or the chart) writes, so a pod that breaks the profile shows up as a
``FailedCreate`` on its ReplicaSet, not as an error of ``kubectl apply``: the
tests read the ReplicaSets' conditions and events, and wait for the pods
themselves (kwok nodes run the server pods; the chart's operator pod is
created and left Pending, as no node without the GPU taint exists).

The negative controls show the check can fail: a privileged, root Deployment
in the same namespace gets ``FailedCreate ... violates PodSecurity`` and no
pod, and a bare pod like it is refused by ``kubectl create``.
"""

from __future__ import annotations

import copy
import json
import subprocess
from typing import Any

import pytest
import yaml
from operator_helpers import EXAMPLES, ROOT, Kube, OperatorProcess, wait_for

from autoglm_dev.addons import install_gateway_api
from autoglm_dev.binaries import ensure_binaries

pytestmark = pytest.mark.k8s

CHART = ROOT / "charts" / "autoglm"
PSS_LABELS = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}
EXAMPLE_STEMS = sorted(p.stem for p in EXAMPLES.glob("*.yaml"))


@pytest.fixture(scope="module")
def gateway_crds(cluster: Any) -> None:
    """The canary example routes through the Gateway API: its CRDs let the rollout start."""
    install_gateway_api(cluster)  # polls the CRDs to Established


@pytest.fixture
def restricted(kube: Kube) -> Kube:
    """The test's namespace, enforcing ``restricted`` (latest)."""
    labels = [f"{k}={v}" for k, v in PSS_LABELS.items()]
    kube.cluster.kubectl("label", "namespace", kube.namespace, "--overwrite", *labels)
    ns = json.loads(kube.cluster.kubectl("get", "namespace", kube.namespace, "-o", "json").stdout)
    assert ns["metadata"]["labels"].items() >= PSS_LABELS.items()
    return kube


def owned_by(obj: dict[str, Any], kind: str, name: str) -> bool:
    return any(
        r["kind"] == kind and r["name"] == name
        for r in obj["metadata"].get("ownerReferences") or []
    )


def replica_sets(kube: Kube, deployment: str) -> list[dict[str, Any]]:
    items = (kube.get("replicasets") or {}).get("items", [])
    return [rs for rs in items if owned_by(rs, "Deployment", deployment)]


def failed_creates(kube: Kube, deployment: str) -> list[str]:
    """Every FailedCreate the ReplicaSet controller reported for the Deployment's
    ReplicaSets: their ReplicaFailure conditions and their Warning events."""
    names = set()
    out: list[str] = []
    for rs in replica_sets(kube, deployment):
        names.add(rs["metadata"]["name"])
        for cond in rs.get("status", {}).get("conditions") or []:
            if cond["type"] == "ReplicaFailure" and cond["status"] == "True":
                out.append(f"{rs['metadata']['name']}: {cond.get('reason')}: {cond.get('message')}")
    for event in (kube.get("events") or {}).get("items", []):
        involved = event.get("involvedObject", {})
        if (
            involved.get("kind") == "ReplicaSet"
            and involved.get("name") in names
            and event.get("reason") == "FailedCreate"
        ):
            out.append(f"{involved['name']}: FailedCreate: {event.get('message')}")
    return out


def pods_of(kube: Kube, deployment: str) -> list[dict[str, Any]]:
    rs_names = {rs["metadata"]["name"] for rs in replica_sets(kube, deployment)}
    items = (kube.get("pods") or {}).get("items", [])
    return [
        p
        for p in items
        if any(
            r["kind"] == "ReplicaSet" and r["name"] in rs_names
            for r in p["metadata"].get("ownerReferences") or []
        )
    ]


def wait_all_pods_created(kube: Kube, deployment: str) -> list[dict[str, Any]]:
    """Wait until the Deployment's ReplicaSets have created every pod it asks for;
    fail at once (with the controller's message) on a FailedCreate."""

    def probe() -> list[dict[str, Any]] | None:
        failures = failed_creates(kube, deployment)
        assert not failures, f"{deployment}: {failures}"
        dep = kube.get("deployment", deployment)
        want = dep["spec"].get("replicas", 1) if dep else 1
        pods = pods_of(kube, deployment)
        return pods if dep and len(pods) >= max(1, want) else None

    pods: list[dict[str, Any]] = wait_for(
        probe,
        timeout=90,
        message=lambda: (
            f"pods of {deployment}: {len(pods_of(kube, deployment))}; "
            f"FailedCreate: {failed_creates(kube, deployment)}"
        ),
    )
    return pods


def deployments_of(kube: Kube, instance: str) -> list[str]:
    data = kube.get("deployments", None, "-l", f"app.kubernetes.io/instance={instance}")
    return sorted(d["metadata"]["name"] for d in (data or {}).get("items", []))


def assert_restricted_shape(pod: dict[str, Any]) -> None:
    """What the admission plugin just accepted, read back: the profile's main points."""
    spec = pod["spec"]
    psc = spec.get("securityContext") or {}
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert "ALL" in (sc.get("capabilities") or {}).get("drop", []), c["name"]
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, c["name"]
        assert not sc.get("privileged"), c["name"]
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        assert seccomp in ("RuntimeDefault", "Localhost"), c["name"]
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    assert not any("hostPath" in v for v in spec.get("volumes") or [])


@pytest.mark.parametrize("stem", EXAMPLE_STEMS)
def test_every_example_runs_its_pods_under_restricted(
    op: OperatorProcess, restricted: Kube, gateway_crds: None, stem: str
) -> None:
    example = yaml.safe_load((EXAMPLES / f"{stem}.yaml").read_text())
    name = example["metadata"]["name"]
    applied = restricted.apply(example)
    assert applied.returncode == 0, applied.stderr
    # A canary example runs two revisions (stable and canary): wait for both.
    want = 2 if example["spec"].get("canary") else 1
    names: list[str] = wait_for(
        lambda: len(d := deployments_of(restricted, name)) >= want and d,
        timeout=90,
        message=lambda: f"{want} Deployment(s) of {name}: {deployments_of(restricted, name)}",
    )
    for deployment in names:
        pods = wait_all_pods_created(restricted, deployment)
        for pod in pods:
            assert_restricted_shape(pod)
        assert failed_creates(restricted, deployment) == []
    # kwok's GPU nodes run them: the pods are scheduled and Running.
    wait_for(
        lambda: all(
            p["status"].get("phase") == "Running"
            for d in names
            for p in pods_of(restricted, d)
            if not p["metadata"].get("deletionTimestamp")
        ),
        timeout=90,
        message=lambda: (
            f"pods Running: {[(p['metadata']['name'], p['status'].get('phase')) for d in names for p in pods_of(restricted, d)]}"
        ),
    )


def render_chart(namespace: str, *sets: str) -> list[dict[str, Any]]:
    helm = ensure_binaries(("helm",))["helm"]
    args = [str(helm), "template", "autoglm", str(CHART), "--namespace", namespace]
    args += ["--kube-version", "v1.36.3"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_the_charts_operator_pod_passes_restricted(restricted: Kube) -> None:
    """The chart with its default values: its ServiceAccount and operator Deployment."""
    docs = render_chart(restricted.namespace)
    ours = [d for d in docs if d["kind"] in ("ServiceAccount", "Deployment")]
    assert [d["kind"] for d in ours] == ["ServiceAccount", "Deployment"]
    for doc in ours:
        applied = restricted.apply(doc)
        assert applied.returncode == 0, applied.stderr
    deployment = next(d for d in ours if d["kind"] == "Deployment")
    pods = wait_all_pods_created(restricted, deployment["metadata"]["name"])
    assert len(pods) == deployment["spec"]["replicas"]
    for pod in pods:
        assert_restricted_shape(pod)
        assert pod["spec"]["serviceAccountName"] == "autoglm"


def broken(manifest: dict[str, Any]) -> dict[str, Any]:
    """The same object with a pod template that breaks ``restricted``: privileged, as root."""
    bad = copy.deepcopy(manifest)
    template = bad["spec"]["template"]["spec"] if "template" in bad["spec"] else bad["spec"]
    template.setdefault("securityContext", {})["runAsNonRoot"] = False
    for c in template["containers"]:
        sc = c.setdefault("securityContext", {})
        sc.update({"privileged": True, "runAsUser": 0, "runAsNonRoot": False})
        sc["allowPrivilegeEscalation"] = True
    return bad


def test_a_pod_that_breaks_restricted_is_refused(restricted: Kube) -> None:
    """The negative control: the same checks see a FailedCreate and no pod."""
    from autoglm_operator.builders import build_deployment
    from autoglm_operator.owner import Owner
    from autoglm_operator.spec import parse_spec

    spec = parse_spec({"model": {"source": "hf://sshleifer/tiny-gpt2"}})
    owner = Owner(name="bad", namespace=restricted.namespace, uid="")
    good = build_deployment(spec, owner)
    good["metadata"].pop("ownerReferences", None)
    bad = broken(good)
    name = bad["metadata"]["name"]
    assert restricted.apply(bad).returncode == 0

    failures: list[str] = wait_for(
        lambda: failed_creates(restricted, name),
        timeout=60,
        message=lambda: (
            f"a FailedCreate on {name}'s ReplicaSet; pods: {len(pods_of(restricted, name))}"
        ),
    )
    assert any('violates PodSecurity "restricted:latest"' in f for f in failures), failures
    assert any("privileged" in f for f in failures), failures
    assert pods_of(restricted, name) == []

    # A bare pod like it is refused at once, naming the profile.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bad-pod"},
        "spec": copy.deepcopy(bad["spec"]["template"]["spec"]),
    }
    created = restricted.run("create", "-f", "-", input=json.dumps(pod), check=False)
    assert created.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in created.stderr, created.stderr
    assert restricted.get("pod", "bad-pod") is None


def test_the_unmodified_deployment_is_admitted(restricted: Kube) -> None:
    """The control of the control: the builder's own Deployment, unchanged, gets its pod."""
    from autoglm_operator.builders import build_deployment
    from autoglm_operator.owner import Owner
    from autoglm_operator.spec import parse_spec

    spec = parse_spec({"model": {"source": "hf://sshleifer/tiny-gpt2"}})
    owner = Owner(name="good", namespace=restricted.namespace, uid="")
    good = build_deployment(spec, owner)
    good["metadata"].pop("ownerReferences", None)
    assert restricted.apply(good).returncode == 0
    pods = wait_all_pods_created(restricted, good["metadata"]["name"])
    assert len(pods) == 1
