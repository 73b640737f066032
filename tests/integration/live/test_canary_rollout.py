"""Progressive canary rollouts judged by analysis on the live cluster
(issue 8, "Done when" 1, 2, 3, 4, 6 and 8).

Real server processes behind pods, the real Gateway (Traefik) carrying the load,
the real Prometheus scraping the pods, and the operator asking Prometheus at
each analysis interval. One AutoGLMDeployment ``ro`` (provider ``gatewayAPI``,
1 replica) meets four canaries in turn:

1. **never Ready** (its model does not exist, the server exits): it gets no
   traffic and ends Failed, reason CanaryNotReady, after ``readyTimeout``;
2. **healthy** (a harmless config change): weight 30, an open pause ended by the
   ``resume`` annotation, another paused and resumed through ``spec.canary.paused``,
   then analysis under load passes and the canary is promoted;
3. **broken** (its model yields NaN logits: every request fails with INTERNAL):
   the analysis fails on the server error rate and the operator rolls back; the
   time from the failing analysis to weight 0 in the GRPCRoute is measured (< 10 s);
4. **slow** (``maxBatchSize: 1`` under concurrent load: requests queue): the
   analysis fails on TTFT and the rollout pauses (latencyAction pause); the
   ``abort`` annotation then rolls it back.

A watcher checks that the stable revision never has fewer ready pods than its
minimum. Figures are printed (``-s``) and appended to ``$AUTOGLM_CANARY_FIGURES``.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from canary_live import (
    Load,
    StableWatch,
    canary_agd,
    canary_status,
    patch_spec,
    record,
    revision_pods,
    revisions,
    route_weights,
    set_action,
    start_canary_operator,
    wait_phase,
    wait_ready,
)
from live_helpers import Kube, OperatorProcess, wait_for

from autoglm_dev.addons import AddonEndpoints, endpoints
from autoglm_dev.agent import install_tiny_model
from autoglm_dev.cluster import LocalCluster, install_crd
from autoglm_operator.canary import parse_time
from autoglm_server.testing import break_model

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

NAME = "ro"
BROKEN_SOURCE = "hf://autoglm-test/broken-glm4"
MISSING_SOURCE = "hf://autoglm-test/missing-glm4"
ROLLBACK_LIMIT_S = 10.0
# A short interval and window, so each analysis step takes seconds (Prometheus scrapes every 2 s).
FAST = {"interval": "4s", "minRequests": 4, "timeout": "3m"}


@pytest.fixture(scope="module")
def broken_model(live_cluster: LocalCluster) -> Path:
    path = install_tiny_model(live_cluster.workdir, BROKEN_SOURCE)
    return break_model(path)


@pytest.fixture(scope="module")
def env(
    live_cluster: LocalCluster,
    tiny_model: Any,
    broken_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Kube, OperatorProcess, AddonEndpoints, str]]:
    live_cluster.start_addons()
    state = live_cluster.load_state()
    assert state is not None
    addons = endpoints(state)
    install_crd(live_cluster)
    ns = f"t-canary-rollout-{uuid.uuid4().hex[:6]}"
    live_cluster.kubectl("create", "namespace", ns)
    kube = Kube(live_cluster, ns)
    log = tmp_path_factory.mktemp("canary-rollout") / "operator.log"
    op = start_canary_operator(live_cluster, addons.prometheus, log)
    host = f"{NAME}.{ns}.example"
    try:
        kube.apply(canary_agd(NAME, host=host))
        wait_ready(kube, NAME, op)
        with StableWatch(kube, NAME) as watch:
            yield kube, op, addons, host
        record("stable_minimum", agd=NAME, summary=watch.check())
    finally:
        kube.run("delete", "agd", "--all", "--timeout=90s", check=False)
        op.stop()
        live_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _model(source: str) -> dict[str, Any]:
    return {"source": source, "servedName": NAME}


class RouteWatch:
    """Polls the GRPCRoute's weight for ``service`` every 0.1 s: the first time it was
    seen above 0, and the first time after that it was seen at 0."""

    def __init__(self, kube: Kube, service: str) -> None:
        self.kube, self.service = kube, service
        self.max_weight = 0
        self.up_at: float | None = None
        self.zero_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            weight = route_weights(self.kube, "grpcroute", NAME).get(self.service)
            now = time.time()
            if weight:
                self.max_weight = max(self.max_weight, weight)
                if self.up_at is None:
                    self.up_at = now
            elif self.up_at is not None and self.zero_at is None and weight is not None:
                self.zero_at = now
            self._stop.wait(0.1)

    def __enter__(self) -> RouteWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _stable(kube: Kube) -> str:
    return str(revisions(kube, NAME)[0]["name"])


def test_a_canary_that_never_becomes_ready_gets_no_traffic_and_fails(
    env: tuple[Kube, OperatorProcess, AddonEndpoints, str],
) -> None:
    kube, op, _, _ = env
    stable = _stable(kube)
    canary = {
        "model": _model(MISSING_SOURCE),
        "readyTimeout": "40s",
        "steps": [{"setWeight": 50}, {"analysis": FAST}],
    }
    patch_spec(kube, NAME, {"canary": canary})
    st = wait_phase(kube, NAME, ("Progressing", "Failed"), op)
    revision = st["canaryRevision"]
    with RouteWatch(kube, f"{NAME}-{revision}") as watch:
        st = wait_phase(kube, NAME, ("Failed",), op, timeout=240)
    assert st["reason"] == "CanaryNotReady", st
    assert "not Ready within 40s and got no traffic" in st["message"], st["message"]
    assert watch.max_weight == 0 and st["weight"] == 0
    assert route_weights(kube, "grpcroute", NAME).get(f"{NAME}-{stable}") == 100
    assert _stable(kube) == stable
    record("never_ready", message=st["message"])


def test_a_healthy_canary_pauses_resumes_passes_analysis_and_is_promoted(
    env: tuple[Kube, OperatorProcess, AddonEndpoints, str],
) -> None:
    kube, op, gw, host = env
    stable = _stable(kube)
    canary = {
        "model": None,  # merge patch: back to spec.model
        "readyTimeout": "10m",
        "server": {"batching": {"maxQueueLength": 65}},  # a new revision, same behaviour
        "analysis": {"maxTTFTRatio": 5, "maxTPOTRatio": 5},  # noise on 2 shared cores
        "steps": [
            {"setWeight": 30},
            {"pause": {}},
            {"pause": {}},
            {"analysis": {**FAST, "successfulIntervals": 2, "failedIntervals": 3}},
        ],
    }
    patch_spec(kube, NAME, {"canary": canary})
    st = wait_phase(kube, NAME, ("Paused",), op)
    assert (st["step"], st["weight"], st["reason"]) == (1, 30, "PauseStep"), st
    revision = st["canaryRevision"]
    pods = {p["metadata"]["uid"] for p in revision_pods(kube, NAME, revision)}

    set_action(kube, NAME, "resume")  # ends the open pause at step 1
    st = wait_for(
        lambda: (
            s
            if (s := canary_status(kube, NAME)).get("step") == 2 and s["phase"] == "Paused"
            else None
        ),
        timeout=60,
        message=lambda: f"paused at step 2: {canary_status(kube, NAME)}",
    )
    patch_spec(kube, NAME, {"canary": {"paused": True}})
    st = wait_for(
        lambda: s if (s := canary_status(kube, NAME)).get("reason") == "PausedBySpec" else None,
        timeout=60,
        message=lambda: f"PausedBySpec: {canary_status(kube, NAME)}",
    )
    assert st["phase"] == "Paused" and st["step"] == 2
    with Load(gw.gateway_port, host, workers=2, max_new_tokens=4) as load:
        patch_spec(kube, NAME, {"canary": {"paused": False}})  # ends the open pause at step 2
        st = wait_phase(kube, NAME, ("Promoted", "RollingBack", "RolledBack", "Failed"), op)
    assert st["phase"] == "Promoted", st
    last = st["lastAnalysis"]
    record("analysis_pass", last_analysis=last, load=dict(load.outcomes))
    assert last["verdict"] == "Pass" and last["stepVerdict"] == "Pass"
    assert last["values"]["requests"] >= FAST["minRequests"]
    assert last["values"]["errorRate"] == 0
    assert set(load.outcomes) == {"OK"}, load.outcomes
    assert _stable(kube) == revision != stable
    assert {p["metadata"]["uid"] for p in revision_pods(kube, NAME, revision)} == pods


def test_a_canary_that_fails_requests_is_rolled_back_within_seconds(
    env: tuple[Kube, OperatorProcess, AddonEndpoints, str],
) -> None:
    kube, op, gw, host = env
    stable = _stable(kube)
    canary = {
        "model": _model(BROKEN_SOURCE),
        "server": None,
        "analysis": None,
        "steps": [
            {"setWeight": 50},
            {"analysis": {**FAST, "successfulIntervals": 3, "failedIntervals": 1}},
        ],
    }
    with Load(gw.gateway_port, host, workers=2, max_new_tokens=2) as load:
        patch_spec(kube, NAME, {"canary": canary})
        st = wait_for(
            lambda: (s if (s := canary_status(kube, NAME)).get("canaryRevision") not in (None, stable)
                     and s.get("phase") != "Promoted" else None),
            timeout=60,
            message=lambda: f"a new rollout: {canary_status(kube, NAME)}",
        )  # fmt: skip
        revision = st["canaryRevision"]
        with RouteWatch(kube, f"{NAME}-{revision}") as watch:
            st = wait_phase(kube, NAME, ("RollingBack", "RolledBack"), op, timeout=400)
            wait_for(lambda: watch.zero_at, timeout=30, message="the route's weight 0 seen")
        st = wait_phase(kube, NAME, ("RolledBack",), op, timeout=60)
    last = st["lastAnalysis"]
    assert st["reason"] == "AnalysisFailed", st
    assert last["verdict"] == "Fail" and "server error rate" in st["message"], st
    assert watch.max_weight == 50
    failed_at = parse_time(last["time"])
    weight_zero_at = parse_time(st["weightZeroAt"])
    assert failed_at is not None and weight_zero_at is not None and watch.zero_at is not None
    to_status = weight_zero_at - failed_at
    to_route = watch.zero_at - failed_at
    record(
        "rollback_on_errors", analysis_to_weight_zero_status_s=round(to_status, 3),
        analysis_to_route_seen_zero_s=round(to_route, 3), message=st["message"],
        values=last["values"], load=dict(load.outcomes),
    )  # fmt: skip
    assert to_route < ROLLBACK_LIMIT_S, to_route
    assert load.outcomes["INTERNAL"] > 0  # the canary really failed requests
    assert _stable(kube) == stable
    wait_for(
        lambda: not revision_pods(kube, NAME, revision),
        timeout=90,
        message="the broken canary's pods removed",
    )


def test_a_slow_canary_is_paused_on_ttft_then_aborted(
    env: tuple[Kube, OperatorProcess, AddonEndpoints, str],
) -> None:
    kube, op, gw, host = env
    stable = _stable(kube)
    canary = {
        "model": None,
        "server": {"batching": {"maxBatchSize": 1}},  # requests queue behind one another
        "analysis": None,  # the defaults: p95 > 1 s, or > 2x the stable's, pauses
        "steps": [
            {"setWeight": 50},
            {"analysis": {**FAST, "successfulIntervals": 4, "failedIntervals": 2}},
        ],
    }
    # The previous test left its own canary RolledBack: wait for this one's revision, or the
    # old status would be read as this canary's verdict before the operator saw the patch.
    before = canary_status(kube, NAME).get("canaryRevision")
    with Load(gw.gateway_port, host, workers=6, max_new_tokens=24) as load:
        patch_spec(kube, NAME, {"canary": canary})
        st = wait_for(
            lambda: (s if (s := canary_status(kube, NAME)).get("canaryRevision") not in (None, before)
                     and (s.get("reason") == "AnalysisFailedPaused"
                          or s.get("phase") in ("Promoted", "RolledBack")) else None),
            timeout=400,
            message=lambda: f"a latency pause: {canary_status(kube, NAME)}\n{op.log_tail()}",
        )  # fmt: skip
    record("latency_pause", message=st["message"], values=st["lastAnalysis"]["values"],
           load=dict(load.outcomes))  # fmt: skip
    assert st["phase"] == "Paused" and st["reason"] == "AnalysisFailedPaused", st
    assert "TTFT p95" in st["message"] or "TPOT p95" in st["message"], st["message"]
    assert st["weight"] == 50  # paused: traffic stays where it was, nothing promoted
    revision = st["canaryRevision"]

    set_action(kube, NAME, "abort")
    st = wait_phase(kube, NAME, ("RollingBack", "RolledBack"), op, timeout=60)
    assert st["reason"] == "Aborted" and st["weight"] == 0
    assert route_weights(kube, "grpcroute", NAME).get(f"{NAME}-{revision}") in (0, None)
    st = wait_phase(kube, NAME, ("RolledBack",), op, timeout=60)
    assert _stable(kube) == stable
