"""The live cluster: pods on live GPU nodes run the real server as processes.

The session's control plane (tests/conftest.py) gets the node agent
(``autoglm_dev.agent``) with one live node, ``gpu-live-0``, and the operator
runs as a ``kopf run`` subprocess, one per test module: it must be gone before
the operator tests start their own and count its requests. A tiny GLM is installed where the agent maps
``hf://autoglm-test/tiny-glm4``. Pods are kept few: the machine has 2 cores.

These tests need our own node agent, so against a cluster brought with
``AUTOGLM_USE_EXISTING_CLUSTER`` they skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_helpers import MODEL_SOURCE, Kube, OperatorProcess, start_operator

from autoglm_dev.agent import install_tiny_model
from autoglm_dev.cluster import LocalCluster, install_crd

LIVE_NODES = 1
RESYNC_SECONDS = 3.0


@pytest.fixture(scope="session")
def live_cluster(cluster: Any) -> LocalCluster:
    if not isinstance(cluster, LocalCluster):
        pytest.skip("live tests run pods through the local node agent (autoglm_dev.agent)")
    cluster.start_agent(LIVE_NODES)
    return cluster


@pytest.fixture(scope="session")
def tiny_model(live_cluster: LocalCluster) -> Path:
    return install_tiny_model(live_cluster.workdir, MODEL_SOURCE)


@pytest.fixture(scope="module")
def live_operator(
    live_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    install_crd(live_cluster)
    before = _namespaces(live_cluster)
    log_path = tmp_path_factory.mktemp("live-operator") / "operator.log"
    op = start_operator(live_cluster.kubeconfig, log_path, RESYNC_SECONDS)
    try:
        yield op
    finally:
        # AutoGLMDeployments of this module's namespaces go while the operator
        # can still remove its finalizer; then the operator stops.
        for ns in sorted(_namespaces(live_cluster) - before):
            live_cluster.kubectl(
                "delete", "agd", "--all", "-n", ns, "--timeout=90s", check=False, timeout=120
            )
        op.stop()


def _namespaces(cluster: LocalCluster) -> set[str]:
    out = cluster.kubectl("get", "namespaces", "-o", "name", check=False).stdout
    return {line.split("/", 1)[1] for line in out.split() if "/" in line}


@pytest.fixture
def kube(live_cluster: LocalCluster, namespace: str) -> Iterator[Kube]:
    """The test's namespace. Its AutoGLMDeployments are deleted afterwards while
    the operator still runs (it holds a finalizer on them), so nothing of this
    test is left for another test's operator to clean up."""
    yield Kube(live_cluster, namespace)
    live_cluster.kubectl(
        "delete", "agd", "--all", "-n", namespace, "--timeout=90s", check=False, timeout=120
    )


@pytest.fixture
def agent_log(live_cluster: LocalCluster) -> Path:
    return live_cluster.workdir / "logs" / "agent.log"
