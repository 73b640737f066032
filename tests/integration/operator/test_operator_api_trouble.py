"""API trouble on a real API server: a request the API server refuses (403).

The status table's row (operator/README.md, "API trouble: a request refused"):
Degraded=True ``ApiError`` naming the refused request, a Warning ``ApiError``
event, retried; once the request is allowed again the object recovers
(Degraded=False, a Normal ``Recovered`` event).

How: the operator runs under the chart's per-namespace RBAC (``helm template``
with ``watchNamespaces`` set to this test's namespace and peering off), with a
kubeconfig whose only credential is a token of the chart's ServiceAccount (as
``test_rbac_least_privilege.py`` does, and for the same reason: kopf and the
kubernetes client ignore an ``as:`` impersonation in a kubeconfig). Its Role
lacks ``patch`` on NetworkPolicies, so the server-side apply of the
NetworkPolicy that every default spec has is refused while the watch on
NetworkPolicies, and everything else, works. Then the Role is restored.
"""

from __future__ import annotations

import copy
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from operator_helpers import ROOT, Kube, OperatorProcess, agd, start_operator, wait_for

from autoglm_dev.binaries import ensure_binaries

pytestmark = pytest.mark.k8s

CHART = ROOT / "charts" / "autoglm"
TINY = {"model": {"source": "/opt/models/tiny"}}
API_ERRORS = "autoglm_operator_reconcile_errors_total{reason=ApiError}"
REFUSED = 'cannot patch resource "networkpolicies" in API group "networking.k8s.io"'
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


@pytest.fixture(scope="module")
def exclusive(operator: OperatorProcess) -> Iterator[None]:
    """The session's operator runs as the admin over every namespace: stop it for
    this module (it would apply the NetworkPolicy itself), start it again after."""
    operator.stop()
    try:
        yield
    finally:
        operator.restart()


def render_rbac(release: str, namespace: str) -> list[dict[str, Any]]:
    """The chart's RBAC objects for one watched namespace, without peering."""
    helm = ensure_binaries(("helm",))["helm"]
    args = [str(helm), "template", release, str(CHART), "--namespace", namespace]
    args += ["--kube-version", "v1.36.3"]
    args += ["--set", f"watchNamespaces={{{namespace}}}", "--set", "peering.enabled=false"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] in RBAC_KINDS]


def without_verb(role: dict[str, Any], resource: str, verb: str) -> dict[str, Any]:
    """The Role with ``verb`` taken off the one rule that grants ``resource``."""
    out = copy.deepcopy(role)
    rules = [r for r in out["rules"] if resource in r["resources"]]
    assert len(rules) == 1 and rules[0]["resources"] == [resource], rules
    assert verb in rules[0]["verbs"], rules
    rules[0]["verbs"] = [v for v in rules[0]["verbs"] if v != verb]
    return out


def apply_objects(kube: Kube, docs: list[dict[str, Any]]) -> None:
    listing = {"apiVersion": "v1", "kind": "List", "items": docs}
    kube.cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(listing)
    )


def can_patch_network_policies(kube: Kube, user: str) -> bool:
    out = kube.cluster.kubectl(
        "auth",
        "can-i",
        "patch",
        "networkpolicies.networking.k8s.io",
        f"--as={user}",
        f"-n={kube.namespace}",
        check=False,
    )
    return bool(out.stdout.strip() == "yes")


def token_kubeconfig(kube: Kube, account: str, path: Path) -> Path:
    """A kubeconfig whose only credential is a token of ``account``."""
    token = kube.run("create", "token", account, "--duration=1h").stdout.strip()
    config = yaml.safe_load(Path(kube.cluster.kubeconfig).read_text())
    config["users"] = [{"name": "operator", "user": {"token": token}}]
    for ctx in config["contexts"]:
        ctx["context"]["user"] = "operator"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def events_for(kube: Kube, name: str, reason: str) -> list[dict[str, Any]]:
    data = kube.get(
        "events",
        None,
        "--field-selector",
        f"involvedObject.name={name},involvedObject.kind=AutoGLMDeployment,reason={reason}",
    )
    return list((data or {}).get("items", []))


def test_a_refused_request_is_degraded_api_error_with_a_warning_then_recovers(
    exclusive: None, cluster: Any, crd: Any, kube: Kube, tmp_path: Path
) -> None:
    release = f"trouble-{uuid.uuid4().hex[:6]}"
    docs = render_rbac(release, kube.namespace)
    account = next(d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount")
    user = f"system:serviceaccount:{kube.namespace}:{account}"
    role = next(d for d in docs if d["kind"] == "Role")
    op: OperatorProcess | None = None
    try:
        apply_objects(
            kube,
            [d for d in docs if d["kind"] != "Role"]
            + [without_verb(role, "networkpolicies", "patch")],
        )
        wait_for(
            lambda: not can_patch_network_policies(kube, user),
            timeout=30,
            message="the Role without patch on networkpolicies in force",
        )
        kubeconfig = token_kubeconfig(kube, account, tmp_path / "operator.kubeconfig")
        scope = ["--standalone", f"--namespace={kube.namespace}"]
        op = start_operator(kubeconfig, tmp_path / "op.log", scope, 4.0)
        name = "refused"
        assert kube.apply(agd(name, TINY)).returncode == 0

        def degraded() -> dict[str, Any] | None:
            cond = kube.condition(name, "Degraded")
            return cond if cond is not None and cond["status"] == "True" else None

        cond = wait_for(
            degraded,
            timeout=120,
            message=lambda: (
                f"Degraded=True; status now {(kube.get('agd', name) or {}).get('status')}"
            ),
        )
        assert cond["reason"] == "ApiError", cond
        assert "403" in cond["message"] and REFUSED in cond["message"], cond["message"]
        warnings = wait_for(
            lambda: events_for(kube, name, "ApiError"), timeout=30, message="a Warning ApiError"
        )
        assert [e["type"] for e in warnings] == ["Warning"]
        assert REFUSED in warnings[0]["message"], warnings[0]["message"]
        # Retried (the resync timer and kopf's backoff), counted each time, and the
        # unchanged refusal is neither written again nor posted again.
        wait_for(
            lambda: op.metrics().get(API_ERRORS, 0.0) >= 3,
            timeout=60,
            message=lambda: f"retries; log:\n{op.log_tail()}",
        )
        assert len(events_for(kube, name, "ApiError")) == 1
        # Everything the operator may do was done: the children before the refused one.
        kinds = sorted(c["kind"] for c in kube.children(name))
        assert "Deployment" in kinds and "NetworkPolicy" not in kinds, kinds

        # The verb is granted again: the retry applies the NetworkPolicy and the object recovers.
        apply_objects(kube, [role])
        wait_for(
            lambda: can_patch_network_policies(kube, user),
            timeout=30,
            message="the Role restored",
        )
        wait_for(
            lambda: (kube.condition(name, "Degraded") or {}).get("reason") == "AsExpected",
            timeout=120,
            message=lambda: (
                f"Degraded=False; status now {(kube.get('agd', name) or {}).get('status')}"
            ),
        )
        assert (kube.condition(name, "Degraded") or {})["status"] == "False"
        kube.wait_ready(name, timeout=120)
        recovered = wait_for(
            lambda: events_for(kube, name, "Recovered"), timeout=30, message="a Normal Recovered"
        )
        assert [e["type"] for e in recovered] == ["Normal"]
        assert kube.get("networkpolicy", name) is not None
        assert op.alive(), op.log_tail()
    finally:
        if op is not None:
            op.stop()
        for doc in docs:
            if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                cluster.kubectl(
                    "delete", doc["kind"], doc["metadata"]["name"], "--wait=false", check=False
                )
