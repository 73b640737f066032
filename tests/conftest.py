"""Shared fixtures: one real control plane per test run, a namespace per test.

The control plane is ``autoglm_dev.cluster.LocalCluster`` (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok GPU nodes on 127.0.0.1). Set
``AUTOGLM_USE_EXISTING_CLUSTER=true`` to run the ``k8s`` tests against the
cluster in ``KUBECONFIG`` instead.

A ``k8s`` test never skips for want of a cluster: if the binaries are missing
they are built, and if the control plane can't start the test errors with the
component's log tail.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    # Imported lazily below: the GPU machine runs tests/gpu without the
    # control-plane tooling's dependencies (cryptography).
    from autoglm_dev.cluster import ExistingCluster, LocalCluster

GPU_NODES = 4
GPUS_PER_NODE = 8


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster | ExistingCluster]:
    from autoglm_dev.cluster import ExistingCluster, LocalCluster

    if os.environ.get("AUTOGLM_USE_EXISTING_CLUSTER", "").lower() == "true":
        kubeconfig = os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config"))
        yield ExistingCluster(Path(kubeconfig))
        return
    workdir = tmp_path_factory.mktemp("cluster")
    local = LocalCluster(
        workdir, nodes=GPU_NODES, gpus_per_node=GPUS_PER_NODE, die_with_parent=True
    )
    local.start()
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(local.kubeconfig)
    try:
        yield local
    finally:
        local.stop()
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old


@pytest.fixture
def namespace(
    cluster: LocalCluster | ExistingCluster, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh namespace named after the test, deleted (without waiting) afterwards."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{stem}-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
