"""The Helm chart renders, passes the real API server's validation, installs,
and ships the same CRD as crds/ (the API of record)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from autoglm_dev.binaries import ensure_binaries
from autoglm_dev.cluster import ExistingCluster, LocalCluster
from autoglm_dev.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "autoglm"
CRD_FILE = "serving.autoglm.io_autoglmdeployments.yaml"


def _helm(*args: str, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    helm = ensure_binaries(("helm",))["helm"]
    extra = ["--kubeconfig", str(kubeconfig)] if kubeconfig else []
    return subprocess.run(
        [str(helm), *args, *extra], capture_output=True, text=True, timeout=120, check=False
    )


def _render(*sets: str) -> list[dict[str, Any]]:
    args = [
        "template",
        "rel",
        str(CHART),
        "--kube-version",
        "v1.36.3",
        "--namespace",
        "autoglm-system",
    ]
    for s in sets:
        args += ["--set", s]
    proc = _helm(*args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_chart_crd_copy_matches_api_of_record() -> None:
    assert (CHART / "files" / "crds" / CRD_FILE).read_text() == (
        ROOT / "crds" / CRD_FILE
    ).read_text(), "charts/autoglm/files/crds is stale: cp crds/*.yaml charts/autoglm/files/crds/"


def test_chart_lints_and_renders_with_security_defaults() -> None:
    lint = _helm("lint", str(CHART), "--kube-version", "v1.36.3")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _render()}
    crd = docs[("CustomResourceDefinition", "autoglmdeployments.serving.autoglm.io")]
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    deploy = docs[("Deployment", "rel-autoglm")]
    pod = deploy["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    ctr = pod["containers"][0]
    assert ctr["securityContext"]["readOnlyRootFilesystem"] is True
    assert ctr["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "--all-namespaces" in ctr["args"]
    assert ("ClusterKopfPeering", "autoglm-operator") in docs


def test_chart_namespaced_mode_uses_roles_and_namespace_flags() -> None:
    docs = _render("watchNamespaces={team-a,team-b}", "peering.enabled=false", "replicaCount=1")
    kinds = [(d["kind"], d["metadata"].get("namespace")) for d in docs]
    assert ("Role", "team-a") in kinds and ("Role", "team-b") in kinds
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["--namespace=team-a", "--namespace=team-b", "--standalone"]
    assert not any(d["kind"].endswith("KopfPeering") for d in docs)


def test_chart_rejects_bad_values() -> None:
    proc = _helm(
        "template",
        "rel",
        str(CHART),
        "--kube-version",
        "v1.36.3",
        "--set",
        "operator.logFormat=xml",
    )
    assert proc.returncode != 0
    assert "logFormat" in proc.stderr


@pytest.mark.k8s
def test_chart_installs_into_the_cluster(
    cluster: LocalCluster | ExistingCluster, namespace: str
) -> None:
    # The CRD is left to the operator tests (crds.install=false): Helm would
    # refuse to adopt a CRD that kubectl created.
    proc = _helm(
        "install",
        "autoglm",
        str(CHART),
        "--namespace",
        namespace,
        "--set",
        "crds.install=false",
        "--set",
        f"peering.name=peering-{namespace}",
        "--wait=false",
        kubeconfig=cluster.kubeconfig,
    )
    assert proc.returncode == 0, proc.stderr
    try:
        deploy = json.loads(
            cluster.kubectl("get", "deployment", "autoglm", "-n", namespace, "-o", "json").stdout
        )
        assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "autoglm"
        # the controller-manager acts on it: a ReplicaSet exists
        wait_until(
            lambda: json.loads(cluster.kubectl("get", "rs", "-n", namespace, "-o", "json").stdout)[
                "items"
            ],
            timeout=60,
            message="a ReplicaSet for the operator Deployment",
        )
        sa = f"--as=system:serviceaccount:{namespace}:autoglm"
        for verb, resource in (
            ("patch", "deployments.apps"),
            ("create", "horizontalpodautoscalers.autoscaling"),
            ("list", "nodes"),
        ):
            can = cluster.kubectl("auth", "can-i", verb, resource, sa, "-n", "default", check=False)
            assert can.stdout.strip() == "yes", (verb, resource, can.stderr)
        cannot = cluster.kubectl("auth", "can-i", "delete", "nodes", sa, check=False)
        assert cannot.stdout.strip() == "no"
    finally:
        _helm("uninstall", "autoglm", "--namespace", namespace, kubeconfig=cluster.kubeconfig)


def _dockerfile_exec_form(instruction: str) -> list[str]:
    for line in (ROOT / "Dockerfile.operator").read_text().splitlines():
        if line.startswith(instruction + " "):
            value: list[str] = json.loads(line[len(instruction) + 1 :])
            return value
    raise AssertionError(f"no {instruction} in Dockerfile.operator")


@pytest.mark.parametrize(
    ("sets", "standalone"),
    [((), False), (("peering.enabled=false", "replicaCount=1"), True)],
)
def test_operator_command_is_image_entrypoint_plus_chart_args(
    sets: tuple[str, ...], standalone: bool
) -> None:
    """What the container really runs: the image's ENTRYPOINT followed by the
    chart's args (args replace CMD). Leader election must not be switched off
    behind the chart's back."""
    deploy = next(d for d in _render(*sets) if d["kind"] == "Deployment")
    command = (
        _dockerfile_exec_form("ENTRYPOINT")
        + deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert command[:4] == ["kopf", "run", "-m", "autoglm_operator.handlers"]
    assert ("--standalone" in command) == standalone
    assert "--standalone" in _dockerfile_exec_form("CMD")  # a bare `docker run` runs alone
