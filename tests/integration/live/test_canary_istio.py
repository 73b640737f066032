"""The ``istio`` provider's objects against Istio's own CRD schemas (issue 8, "Done when" 9).

Istio's CRDs come from the ``istio.io/api`` Go module
(``autoglm_dev.addons.install_istio_crds``) and are installed in the test
cluster; the apiserver then checks every VirtualService and DestinationRule
against Istio's structural schemas. There is no istiod and no Envoy here:
nothing routes by these objects, so this is a schema check, not a traffic one.

1. What ``autoglm_operator.traffic`` builds (stable + canary, a Gateway, warm
   revisions at weight 0) passes a server-side dry run, and objects that break
   Istio's schema (a weight that is not an integer, an unknown field) are refused,
   so the check is real.
2. The operator itself, with ``traffic.provider: istio`` and a canary at weight
   10, writes a VirtualService (90/10 over two subsets) and a DestinationRule
   (one subset per revision label) that the apiserver accepted.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_helpers import Kube, OperatorProcess, start_operator, wait_for

from autoglm_dev.addons import install_istio_crds, remove_istio_crds
from autoglm_dev.cluster import install_crd
from autoglm_operator.canary import VersionPlan
from autoglm_operator.owner import Owner
from autoglm_operator.spec import parse_spec
from autoglm_operator.traffic import build_destination_rule, build_virtual_service

pytestmark = [pytest.mark.k8s]

NAME = "istio-llm"


@pytest.fixture(scope="module")
def istio_crds(cluster: Any) -> Iterator[Path]:
    """Istio's CRDs for this module only: the cluster is shared by the whole run, and the
    operator tests check what a cluster WITHOUT them reports (TrafficProviderMissing)."""
    present = (
        cluster.kubectl(
            "get", "crd", "virtualservices.networking.istio.io", "-o", "name", check=False
        ).returncode
        == 0
    )
    crds = install_istio_crds(cluster)
    yield crds
    if not present:
        remove_istio_crds(cluster)


def _spec(**extra: Any) -> dict[str, Any]:
    return {
        "model": {"source": "hf://autoglm-test/tiny-glm4"},
        "traffic": {"provider": "istio", "hostnames": ["llm.example.com"]},
        **extra,
    }


def _dry_run(kube: Kube, manifest: dict[str, Any]) -> Any:
    return kube.run(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--field-manager=autoglm-test",
        "-f",
        "-",
        input=json.dumps(manifest),
        check=False,
    )


def test_built_istio_objects_pass_istios_schemas(
    istio_crds: Path, namespace: str, cluster: Any
) -> None:
    kube = Kube(cluster, namespace)
    spec = parse_spec(
        _spec(
            canary={"weight": 10, "server": {"batching": {"maxBatchSize": 2}}},
            traffic={
                "provider": "istio",
                "hostnames": ["llm.example.com"],
                "gateway": {"name": "public", "namespace": "istio-system"},
            },
        )
    )
    owner = Owner(NAME, namespace, "00000000-0000-0000-0000-000000000001")
    versions = [
        VersionPlan("aaaa1111", spec, "stable", 90, 1),
        VersionPlan("bbbb2222", spec, "canary", 10, 1),
        VersionPlan("cccc3333", spec, "warm", 0, 1),
    ]
    vs = build_virtual_service(spec, owner, versions)
    dr = build_destination_rule(spec, owner, versions)
    for manifest in (dr, vs):
        manifest["metadata"].pop("ownerReferences")  # no owner object in a dry run
        proc = _dry_run(kube, manifest)
        assert proc.returncode == 0, f"{manifest['kind']}: {proc.stderr}"
    accepted = json.loads(
        kube.run("apply", "--server-side", "--dry-run=server", "-o", "json", "-f", "-",
                 input=json.dumps(vs)).stdout
    )  # fmt: skip
    assert [r["weight"] for r in accepted["spec"]["http"][0]["route"]] == [90, 10, 0]

    # The check is Istio's schema, not a preserve-unknown-fields bag.
    bad_weight = copy.deepcopy(vs)
    bad_weight["spec"]["http"][0]["route"][0]["weight"] = "ninety"
    proc = _dry_run(kube, bad_weight)
    assert proc.returncode != 0 and "weight" in proc.stderr, proc.stderr
    unknown = copy.deepcopy(dr)
    unknown["spec"]["subsets"][0]["bogusField"] = True
    proc = _dry_run(kube, unknown)
    assert proc.returncode != 0 and "bogusField" in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def operator(
    cluster: Any, istio_crds: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(cluster)
    log = tmp_path_factory.mktemp("istio-operator") / "operator.log"
    op = start_operator(cluster.kubeconfig, log, 3.0)
    yield op
    op.stop()


def test_operator_writes_istio_objects_the_apiserver_accepts(
    operator: OperatorProcess, namespace: str, cluster: Any
) -> None:
    kube = Kube(cluster, namespace)
    agd = {
        "apiVersion": "serving.autoglm.io/v1alpha1",
        "kind": "AutoGLMDeployment",
        "metadata": {"name": NAME},
        "spec": _spec(),
    }
    kube.apply(agd)
    try:
        vs = wait_for(
            lambda: kube.get("virtualservice", NAME),
            timeout=90,
            message=lambda: f"VirtualService {NAME}; operator log:\n{operator.log_tail()}",
        )
        stable = vs["spec"]["http"][0]["route"]
        assert [r["weight"] for r in stable] == [100]

        agd["spec"]["canary"] = {"weight": 10, "server": {"batching": {"maxBatchSize": 2}}}
        kube.apply(agd)

        def split() -> list[tuple[str, int]] | None:
            obj = kube.get("virtualservice", NAME)
            routes = obj["spec"]["http"][0]["route"] if obj else []
            pairs = [(r["destination"]["subset"], r.get("weight", 0)) for r in routes]
            return pairs if len(pairs) == 2 and sorted(w for _, w in pairs) == [10, 90] else None

        pairs = wait_for(
            split,
            timeout=180,
            message=lambda: (
                f"a 90/10 VirtualService: {json.dumps(kube.get('virtualservice', NAME))}\n"
                f"status: {json.dumps((kube.get('agd', NAME) or {}).get('status', {}).get('canary'))}\n"
                f"operator log:\n{operator.log_tail()}"
            ),
        )
        dr = kube.get("destinationrule", NAME)
        subsets = {s["name"]: s["labels"] for s in dr["spec"]["subsets"]}
        for revision, _ in pairs:
            assert subsets[revision] == {"serving.autoglm.io/revision": revision}
        host = f"{NAME}.{namespace}.svc.cluster.local"
        assert dr["spec"]["host"] == host and vs["spec"]["hosts"][0] == host
    finally:
        kube.run("delete", "agd", NAME, "--timeout=60s", check=False)
