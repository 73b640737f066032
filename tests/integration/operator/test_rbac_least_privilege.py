"""RBAC least privilege: the operator runs under the chart's exact ServiceAccount and
(Cluster)Roles, reconciles an example to Ready, and loses a named step when any one
grant is taken away.

How it runs:
- ``helm template`` renders the chart with its default values (cluster-wide: a
  ClusterRole) and, for the per-namespace mode, with ``watchNamespaces``; its
  CRDs, ServiceAccount, (Cluster)Roles, bindings and peering objects are applied
  as rendered.
- The operator runs with the chart's container arguments (peering on) and a
  kubeconfig whose only credential is a token of that ServiceAccount (TokenRequest,
  ``kubectl create token``). Not an ``as:`` impersonation kubeconfig: neither
  kopf's login nor the kubernetes client honour ``as:``, so such a kubeconfig would
  silently run as the admin. The baseline shows from the audit log that every
  request of the run came from the ServiceAccount; impersonation
  (``kubectl auth can-i --as``) checks each edited role before the operator starts.
- A *grant* is one (apiGroup, resource) of one rule. For each grant, the role is
  replaced by a copy without it, a fresh operator process starts, and the test
  finds the API server's 403 for that resource in the audit log (the
  ServiceAccount's request), the operator's log line that quotes it, and the step
  that broke: no reconcile at all (kopf never starts handlers while a watch cache
  it indexes can't be listed), children but no status, no Events, no leader
  election, or no CRD scan.
- A grant that no step needs fails the test: it is an over-grant.

CI runs the baseline and a representative subset (one grant of each kind of
step); ``AUTOGLM_RBAC_FULL_MATRIX=1`` runs every grant of the chart (about 20
operator starts, a few minutes).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_helpers import ROOT, Kube, OperatorProcess, free_port, load_example, start_operator

from autoglm_dev.addons import install_gateway_api, install_istio_crds
from autoglm_dev.binaries import ensure_binaries
from autoglm_dev.waiting import wait_until

pytestmark = pytest.mark.k8s

CHART = ROOT / "charts" / "autoglm"
# A release of its own (names unlike the chart and manifests tests' "autoglm"), removed
# afterwards: its cluster-scoped roles would clash with a later ``helm install``.
RELEASE = "rbacproof"
RELEASE_NS = "rbacproof-system"
SA_NAME = f"{RELEASE}-autoglm"
SA_USER = f"system:serviceaccount:{RELEASE_NS}:{SA_NAME}"
RESYNC_SECONDS = 4.0
# How long a removal that should stop every reconcile gets to (wrongly) reach Ready.
# The baseline reaches Ready in a few seconds on the shared 2-core machine.
NEGATIVE_DEADLINE = 20.0
FULL = os.environ.get("AUTOGLM_RBAC_FULL_MATRIX", "") == "1"
EXAMPLE = "autoscaling"  # a Deployment, three Services, an HPA and a PDB


@dataclass(frozen=True)
class Step:
    """What breaks without a grant. ``ready``: the example still reaches Ready
    (the break is elsewhere); ``verbs``: a verb the operator is refused."""

    name: str
    ready: bool
    verbs: tuple[str, ...] = ("list",)


def _watch(kind: str) -> Step:
    return Step(
        f"watch cache of {kind}: kopf lists them before any handler runs: nothing is reconciled",
        False,
    )


# (apiGroup or "core", resource) -> the step that needs it.
STEPS: dict[str, Step] = {
    "apiextensions.k8s.io/customresourcedefinitions": Step(
        "kopf's CRD scan: resources whose CRDs appear later (Gateway API, Istio) are never served",
        True,
    ),
    "core/nodes": _watch("Nodes (GPU capacity)"),
    "core/namespaces": Step(
        "kopf's namespace scan (per-namespace mode): namespaces are assumed, not observed",
        True,
    ),
    "kopf.dev/clusterkopfpeerings": Step(
        "leader election: the ClusterKopfPeering heartbeat (replicas would all act)",
        True,
        ("list", "patch"),
    ),
    "kopf.dev/kopfpeerings": Step(
        "leader election (per-namespace mode): the KopfPeering heartbeat",
        True,
        ("list", "patch"),
    ),
    "serving.autoglm.io/autoglmdeployments": _watch("AutoGLMDeployments"),
    "serving.autoglm.io/autoglmdeployments/status": Step(
        "status patch: the children are made, the object never gets a status (no Ready)",
        False,
        ("patch",),
    ),
    "apps/deployments": _watch("Deployments"),
    "core/services": _watch("Services"),
    "core/configmaps": _watch("ConfigMaps (digests)"),
    "autoscaling/horizontalpodautoscalers": _watch("HorizontalPodAutoscalers"),
    "policy/poddisruptionbudgets": _watch("PodDisruptionBudgets"),
    "networking.k8s.io/networkpolicies": _watch("NetworkPolicies"),
    "gateway.networking.k8s.io/grpcroutes": _watch("GRPCRoutes"),
    "gateway.networking.k8s.io/httproutes": _watch("HTTPRoutes"),
    "networking.istio.io/virtualservices": _watch("VirtualServices"),
    "networking.istio.io/destinationrules": _watch("DestinationRules"),
    "core/pods": _watch("server Pods (readiness)"),
    "core/events": Step(
        "Events on the object (ReplicasReady and the like) are not recorded", True, ("create",)
    ),
}
# One grant of each kind of step runs in CI; the rest with AUTOGLM_RBAC_FULL_MATRIX=1.
SUBSET = {
    ("clusterwide", "apps/deployments"),
    ("clusterwide", "serving.autoglm.io/autoglmdeployments/status"),
    ("clusterwide", "core/events"),
    ("clusterwide", "kopf.dev/clusterkopfpeerings"),
    ("namespaced", "kopf.dev/kopfpeerings"),
}


@dataclass(frozen=True)
class Grant:
    """One (apiGroup, resource) of one rule of one rendered RBAC object."""

    kind: str  # ClusterRole or Role
    name: str
    namespace: str | None
    rule: int
    group: str
    resource: str

    @property
    def key(self) -> str:
        return f"{self.group or 'core'}/{self.resource}"

    def without(self, role: dict[str, Any]) -> dict[str, Any]:
        """The role with this grant taken out (and its rule, if nothing is left of it)."""
        out = copy.deepcopy(role)
        rule = out["rules"][self.rule]
        if len(rule["apiGroups"]) > 1 and len(rule["resources"]) > 1:
            # Split the rule so that only this (group, resource) pair goes.
            rest_groups = [g for g in rule["apiGroups"] if g != self.group]
            rest_res = [r for r in rule["resources"] if r != self.resource]
            out["rules"][self.rule] = {**rule, "apiGroups": rest_groups}
            out["rules"].append({**rule, "apiGroups": [self.group], "resources": rest_res})
        elif len(rule["apiGroups"]) > 1:
            rule["apiGroups"] = [g for g in rule["apiGroups"] if g != self.group]
        else:
            rule["resources"] = [r for r in rule["resources"] if r != self.resource]
        out["rules"] = [r for r in out["rules"] if r["resources"] and r["apiGroups"]]
        return out


def render(*sets: str) -> list[dict[str, Any]]:
    helm = ensure_binaries(("helm",))["helm"]
    args = [str(helm), "template", RELEASE, str(CHART), "--namespace", RELEASE_NS]
    args += ["--kube-version", "v1.36.3", "--include-crds"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def grants_of(docs: list[dict[str, Any]]) -> list[Grant]:
    out = []
    for doc in docs:
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        meta = doc["metadata"]
        for i, rule in enumerate(doc.get("rules") or []):
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    out.append(
                        Grant(doc["kind"], meta["name"], meta.get("namespace"), i, group, resource)
                    )
    return out


def audit_log(cluster: Any) -> Path:
    """The API server's JSON audit log: the local control plane's, or AUTOGLM_AUDIT_LOG."""
    if hasattr(cluster, "workdir"):
        return Path(cluster.workdir) / "logs" / "audit.log"
    return Path(os.environ.get("AUTOGLM_AUDIT_LOG", "/nonexistent"))


RBAC_KINDS = {
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "ClusterKopfPeering",
    "KopfPeering",
}


class Chart:
    """The chart's RBAC applied to the cluster, a ServiceAccount token kubeconfig,
    and the means to run the operator as it does in the chart's Deployment."""

    def __init__(self, cluster: Any, docs: list[dict[str, Any]], workdir: Path) -> None:
        self.cluster = cluster
        self.docs = docs
        self.workdir = workdir
        self.audit = audit_log(cluster)
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        self.args: list[str] = list(container["args"])
        self.env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
        accounts = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
        assert accounts == [SA_NAME], accounts

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> Any:
        return self.cluster.kubectl(*args, input=input, check=check)

    def apply_docs(self, kinds: set[str]) -> None:
        items = [d for d in self.docs if d["kind"] in kinds]
        self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )

    def install_crds(self) -> None:
        """The release namespace, the watched namespaces, the chart's CRDs and its
        ServiceAccount (whose token the operator's kubeconfig carries)."""
        self.kubectl("create", "namespace", RELEASE_NS, check=False)
        for doc in self.docs:
            ns = doc["metadata"].get("namespace")
            if ns and ns != RELEASE_NS:
                self.kubectl("create", "namespace", ns, check=False)
        self.apply_docs({"CustomResourceDefinition", "ServiceAccount"})
        jsonpath = "jsonpath={.status.conditions[?(@.type=='Established')].status}"
        for doc in self.docs:
            if doc["kind"] == "CustomResourceDefinition":
                crd = f"crd/{doc['metadata']['name']}"
                # Polled: kubectl wait fails on a CRD that has no condition yet.
                wait_until(
                    lambda crd=crd: (
                        self.kubectl("get", crd, "-o", jsonpath, check=False).stdout.strip()
                        == "True"
                    ),
                    timeout=60,
                    interval=0.2,
                    message=f"{crd} Established",
                )

    def install_rbac(self, namespace: str) -> None:
        """The chart's ServiceAccount, (Cluster)Roles, bindings and peering objects as
        rendered (both modes use the same names: each run applies its own mode's)."""
        self.apply_docs(RBAC_KINDS)
        probe = Grant("ClusterRole", "", None, 0, "apps", "deployments")
        wait_until(
            lambda: self.can_i("list", probe, namespace),
            timeout=30,
            interval=0.2,
            message="the chart's roles in force",
        )

    def kubeconfig(self) -> Path:
        """A kubeconfig whose only credential is a token of the chart's ServiceAccount."""
        token = self.kubectl(
            "create", "token", SA_NAME, "-n", RELEASE_NS, "--duration=2h"
        ).stdout.strip()
        config = json.loads(Path(self.cluster.kubeconfig).read_text())
        config["users"] = [{"name": "operator", "user": {"token": token}}]
        for ctx in config["contexts"]:
            ctx["context"]["user"] = "operator"
        path = self.workdir / "operator.kubeconfig"
        path.write_text(json.dumps(config))
        path.chmod(0o600)
        return path

    def role(self, grant: Grant) -> dict[str, Any]:
        for doc in self.docs:
            if (
                doc["kind"] == grant.kind
                and doc["metadata"]["name"] == grant.name
                and doc["metadata"].get("namespace") == grant.namespace
            ):
                return doc
        raise KeyError(grant)

    def replace_role(self, role: dict[str, Any]) -> None:
        self.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(role)
        )

    def can_i(self, verb: str, grant: Grant, namespace: str) -> bool:
        """``kubectl auth can-i`` as the ServiceAccount (the admin impersonates it)."""
        resource, _, sub = grant.resource.partition("/")
        target = f"{resource}.{grant.group}" if grant.group else resource
        args = ["auth", "can-i", verb, target, f"--as={SA_USER}"]
        args += [f"-n={grant.namespace or namespace}"]
        if sub:
            args.append(f"--subresource={sub}")
        out = self.kubectl(*args, check=False).stdout.strip()
        return out == "yes"

    def start(self, kubeconfig: Path, log_path: Path) -> OperatorProcess:
        """The operator with the chart's arguments (its liveness port moved to a free one)."""
        args = [
            f"--liveness=http://127.0.0.1:{free_port()}/healthz"
            if a.startswith("--liveness=")
            else a
            for a in self.args
        ]
        env = {
            k: v
            for k, v in self.env.items()
            if k not in ("AUTOGLM_OPERATOR_METRICS_PORT", "AUTOGLM_OPERATOR_RESYNC_SECONDS")
        }
        return start_operator(kubeconfig, log_path, args, RESYNC_SECONDS, **env)

    def audit_offset(self) -> int:
        return self.audit.stat().st_size

    def audit_since(self, offset: int) -> list[dict[str, Any]]:
        with self.audit.open() as f:
            f.seek(offset)
            return [json.loads(line) for line in f if line.strip()]


def denied(events: list[dict[str, Any]], grant: Grant, namespace: str) -> list[str]:
    """The ServiceAccount's requests for the grant's resource that the API server
    refused (403), cluster-wide or in ``namespace`` (other test namespaces being
    deleted refuse writes too, for their own reason)."""
    resource, _, sub = grant.resource.partition("/")
    out = []
    for e in events:
        ref = e.get("objectRef") or {}
        if (
            e["user"]["username"] == SA_USER
            and e["responseStatus"].get("code") == 403
            and ref.get("resource") == resource
            and (ref.get("subresource") or "") == sub
            and (ref.get("apiGroup") or "") == grant.group
            and ref.get("namespace") in (None, namespace)
        ):
            out.append(e["verb"])
    return out


def logged_refusals(op: OperatorProcess, grant: Grant) -> list[str]:
    """The operator's log lines that quote the API server's RBAC refusal for the grant."""
    quoted = f'resource "{grant.resource}" in API group "{grant.group}"'
    lines = []
    for line in op.log_path.read_text(errors="replace").splitlines():
        try:
            message = str(json.loads(line).get("message", ""))
        except ValueError:
            message = line
        if quoted in message and "cannot" in message:
            lines.append(message)
    return lines


@dataclass
class Run:
    namespace: str
    grant: Grant | None
    ready: bool
    denied: list[str]
    logged: list[str]
    children: list[str]
    status: dict[str, Any] | None
    events: list[dict[str, Any]]


@pytest.fixture(scope="module")
def no_admin_operator(operator: OperatorProcess) -> Iterator[None]:
    """The session's operator runs as the admin: stop it while these tests run, or it
    would reconcile the examples for the operator under test."""
    operator.stop()
    try:
        yield
    finally:
        operator.restart()


@pytest.fixture(scope="module")
def extra_crds(cluster: Any) -> None:
    """The route and Istio kinds exist, so that their grants are exercised too."""
    install_gateway_api(cluster)  # both poll their CRDs to Established
    install_istio_crds(cluster)


def run_once(
    chart: Chart, kubeconfig: Path, grant: Grant | None, tmp: Path, *, namespace: str | None = None
) -> Run:
    """One operator process against one fresh namespace holding the example;
    with ``grant``, the role lacks it for the whole run."""
    ns = namespace or f"rbac-{uuid.uuid4().hex[:8]}"
    if namespace is None:
        chart.kubectl("create", "namespace", ns)
    kube = Kube(chart.cluster, ns)
    example = load_example(EXAMPLE)
    # A name of its own: the previous run's children may still wait for the collector.
    name = example["metadata"]["name"] = f"{example['metadata']['name']}-{uuid.uuid4().hex[:4]}"
    chart.install_rbac(ns)
    role = None
    if grant is not None:
        role = chart.role(grant)
        verb = STEPS[grant.key].verbs[0] if grant.key in STEPS else "list"
        chart.replace_role(grant.without(role))
        wait_until(
            lambda: not chart.can_i(verb, grant, ns),
            timeout=30,
            interval=0.2,
            message=f"the role without {grant.key}",
        )
    op = None
    try:
        assert kube.apply(example).returncode == 0
        offset = chart.audit_offset()
        op = chart.start(
            kubeconfig, tmp / f"operator-{grant.key.replace('/', '_') if grant else 'baseline'}.log"
        )
        step = STEPS.get(grant.key) if grant else None
        if grant is None or step is None or step.ready:
            try:
                kube.wait_ready(name, timeout=60)
                ready = True
            except AssertionError:
                ready = False
            if grant is not None and step is not None:
                # The refusal itself (the run reached Ready, or not, first).
                wait_until(
                    lambda: denied(chart.audit_since(offset), grant, ns),
                    timeout=60,
                    interval=0.5,
                    message=f"a 403 on {grant.key}",
                )
        else:
            wait_until(
                lambda: denied(chart.audit_since(offset), grant, ns),
                timeout=60,
                interval=0.5,
                message=f"a 403 on {grant.key}",
            )
            deadline = time.monotonic() + NEGATIVE_DEADLINE
            ready = False
            while time.monotonic() < deadline and not ready:
                cond = kube.condition(name)
                ready = bool(cond and cond["status"] == "True")
                time.sleep(0.5)
        assert op.alive() or grant is not None, op.log_tail()
        events = chart.audit_since(offset)
        obj = kube.get("agd", name) or {}
        return Run(
            ns,
            grant,
            ready,
            denied(events, grant, ns) if grant else [],
            logged_refusals(op, grant) if grant else [],
            sorted(f"{c['kind']}/{c['metadata']['name']}" for c in kube.children(name)),
            obj.get("status"),
            events,
        )
    finally:
        if op is not None:
            op.stop()
        if role is not None:
            chart.replace_role(role)
            assert grant is not None
            verb = STEPS[grant.key].verbs[0] if grant.key in STEPS else "list"
            wait_until(
                lambda: chart.can_i(verb, grant, ns),
                timeout=30,
                interval=0.2,
                message="the role restored",
            )
        # Nothing runs to take the finalizer off: do it as the admin, then drop the namespace.
        kube.run(
            "patch",
            "agd",
            name,
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":null}}',
            check=False,
        )
        kube.run("delete", "agd", name, "--wait=false", check=False)
        if namespace is None:
            chart.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# ---- the tests ---------------------------------------------------------------------------

WATCHED = "rbac-watched"
PEERING = "autoglm-operator"  # the chart's default peering.name  # the per-namespace mode's one watched namespace
MODES = {"clusterwide": (), "namespaced": (f"watchNamespaces={{{WATCHED}}}",)}
# The grants each mode's chart must hold, no more: each one's removal is run below.
NAMESPACED_ONLY = {"core/namespaces", "kopf.dev/kopfpeerings"}
CLUSTERWIDE_ONLY = {"kopf.dev/clusterkopfpeerings"}
EXPECTED = {
    "clusterwide": set(STEPS) - NAMESPACED_ONLY,
    "namespaced": set(STEPS) - CLUSTERWIDE_ONLY,
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_chart_grants_exactly_the_steps_that_need_it(mode: str) -> None:
    """Rendered only: every grant has a step below that needs it (else it is an
    over-grant), and every step's grant is there."""
    keys = {g.key for g in grants_of(render(*MODES[mode]))}
    assert keys - EXPECTED[mode] == set(), f"over-granted in {mode} mode"
    assert EXPECTED[mode] - keys == set(), f"missing in {mode} mode"


@pytest.fixture(scope="module")
def charts(
    cluster: Any,
    no_admin_operator: None,
    extra_crds: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[Chart, Path]]]:
    if not audit_log(cluster).is_file():
        pytest.skip("needs the API server's JSON audit log (set AUTOGLM_AUDIT_LOG)")
    out: dict[str, tuple[Chart, Path]] = {}
    had_peering = cluster.kubectl("get", "clusterkopfpeering", PEERING, check=False).returncode == 0
    try:
        for mode, sets in MODES.items():
            chart = Chart(cluster, render(*sets), tmp_path_factory.mktemp(f"rbac-{mode}"))
            chart.install_crds()
            out[mode] = (chart, chart.kubeconfig())
        yield out
    finally:
        # The release's cluster-scoped objects; its Roles go with the namespaces.
        clusterwide = out.get("clusterwide")
        for doc in clusterwide[0].docs if clusterwide else []:
            if doc["kind"] in ("ClusterRole", "ClusterRoleBinding") or (
                doc["kind"] == "ClusterKopfPeering" and not had_peering
            ):
                name = doc["metadata"]["name"]
                cluster.kubectl("delete", doc["kind"], name, "--wait=false", check=False)
        for ns in (WATCHED, RELEASE_NS):
            cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_operator_reconciles_under_the_charts_service_account(
    charts: dict[str, tuple[Chart, Path]], mode: str, tmp_path: Path
) -> None:
    chart, kubeconfig = charts[mode]
    run = run_once(
        chart, kubeconfig, None, tmp_path, namespace=WATCHED if mode == "namespaced" else None
    )
    assert run.ready, run.status
    kinds = {c.split("/")[0] for c in run.children}
    assert {"Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"} <= kinds
    # Every request the operator sent (kopf's and the client's) came from the
    # ServiceAccount, and none of this run's was refused.
    ours = [e for e in run.events if e["userAgent"].startswith(("kopf/", "OpenAPI-Generator/"))]
    assert ours, "no request of the operator in the audit log"
    assert {e["user"]["username"] for e in ours} == {SA_USER}
    refused = [
        (e["verb"], e.get("objectRef"))
        for e in ours
        if e["responseStatus"].get("code") == 403
        and (e.get("objectRef") or {}).get("namespace") in (None, run.namespace)
    ]
    assert refused == []


def _params() -> list[Any]:
    out = []
    for mode in sorted(MODES):
        keys = (
            sorted(EXPECTED[mode])
            if mode == "clusterwide"
            else sorted(NAMESPACED_ONLY | {"apps/deployments"})
        )
        for key in keys:
            run_it = FULL or (mode, key) in SUBSET
            marks = (
                []
                if run_it
                else [pytest.mark.skip(reason="full matrix: AUTOGLM_RBAC_FULL_MATRIX=1")]
            )
            out.append(pytest.param(mode, key, id=f"{mode}-{key}", marks=marks))
    return out


@pytest.mark.parametrize(("mode", "key"), _params())
def test_removing_one_grant_breaks_a_named_step(
    charts: dict[str, tuple[Chart, Path]], mode: str, key: str, tmp_path: Path
) -> None:
    chart, kubeconfig = charts[mode]
    grants = [g for g in grants_of(chart.docs) if g.key == key]
    assert len(grants) == 1, f"the {mode} chart grants {key} {len(grants)} times"
    grant, step = grants[0], STEPS[key]
    run = run_once(
        chart, kubeconfig, grant, tmp_path, namespace=WATCHED if mode == "namespaced" else None
    )
    print(
        f"\n{mode} {key}: refused {sorted(set(run.denied))}; ready={run.ready}; step: {step.name}"
    )
    assert set(step.verbs) & set(run.denied), f"{key}: refused {run.denied}, expected {step.verbs}"
    assert run.logged, f"the operator's log quotes no refusal of {key}"
    assert run.ready == step.ready, (key, run.status)
    if key == "serving.autoglm.io/autoglmdeployments/status":
        assert run.children and run.status is None, (run.children, run.status)
    elif not step.ready:
        # No handler ran: no child, no status.
        assert run.children == [] and run.status is None, (run.children, run.status)
