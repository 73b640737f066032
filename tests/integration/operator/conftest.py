"""The operator against a real control plane: the CRD installed, the operator running.

The operator runs as a subprocess, ``python -m kopf run --standalone
--all-namespaces -m autoglm_operator.handlers``, exactly as in its image (bar
peering), with a short resync period. Its log goes to a file whose tail is
printed when a test fails; its Prometheus metrics (write counter, reconcile
count) are read over HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from operator_helpers import Kube, OperatorProcess, start_operator

from autoglm_dev.cluster import install_crd

RESYNC_SECONDS = 4.0


@pytest.fixture(scope="session")
def crd(cluster: Any) -> Path:
    return install_crd(cluster)


@pytest.fixture(scope="session")
def operator(
    cluster: Any, crd: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    log_path = tmp_path_factory.mktemp("operator") / "operator.log"
    op = start_operator(
        cluster.kubeconfig, log_path, ["--standalone", "--all-namespaces"], RESYNC_SECONDS
    )
    try:
        yield op
    finally:
        op.stop()


@pytest.fixture
def op(operator: OperatorProcess, request: pytest.FixtureRequest) -> Iterator[OperatorProcess]:
    """The session's operator; its log tail is attached to a failing test's report."""
    yield operator
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n--- operator log tail ---\n{operator.log_tail(80)}")
    assert operator.alive(), f"the operator died:\n{operator.log_tail()}"


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


@pytest.fixture
def kube(cluster: Any, namespace: str) -> Kube:
    return Kube(cluster, namespace)
