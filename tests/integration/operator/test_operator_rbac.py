"""The chart grants the operator every verb it uses on every kind it owns (and no more
than it needs on the route kinds): rendered with Helm, compared with the operator's
own list of child kinds."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml
from operator_helpers import ROOT

from autoglm_dev.binaries import ensure_binaries
from autoglm_operator.builders import CHILD_KINDS
from autoglm_operator.handlers import CHILD_RESOURCES

CHART = ROOT / "charts" / "autoglm"
WRITE_VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


def render(*sets: str) -> list[dict[str, Any]]:
    helm = ensure_binaries(("helm",))["helm"]
    args = [helm, "template", "autoglm", str(CHART), "--namespace", "autoglm-system"]
    args += ["--kube-version", "v1.36.3"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def granted(docs: list[dict[str, Any]], kind: str) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for doc in docs:
        if doc["kind"] != kind:
            continue
        for rule in doc.get("rules") or []:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    out.setdefault((group, resource), set()).update(rule.get("verbs", []))
    return out


@pytest.mark.parametrize(
    ("sets", "kind"),
    [((), "ClusterRole"), (("watchNamespaces={models}",), "Role")],
    ids=["cluster-wide", "per-namespace"],
)
def test_the_chart_grants_every_child_kind_the_operator_owns(
    sets: tuple[str, ...], kind: str
) -> None:
    rules = granted(render(*sets), kind)
    plural = {k: (group, p) for group, _v, p, k in CHILD_RESOURCES}
    assert set(plural) == set(CHILD_KINDS), "handlers and builders disagree on the child kinds"
    for child in CHILD_KINDS:
        group, resource = plural[child]
        assert rules.get((group, resource), set()) >= WRITE_VERBS, (
            child,
            rules.get((group, resource)),
        )
    # The routes and Istio objects: exactly what a child needs, nothing cluster-wide beyond it.
    for resource in ("grpcroutes", "httproutes"):
        assert rules[("gateway.networking.k8s.io", resource)] == WRITE_VERBS
    for resource in ("virtualservices", "destinationrules"):
        assert rules[("networking.istio.io", resource)] == WRITE_VERBS
    assert ("gateway.networking.k8s.io", "gateways") not in rules
