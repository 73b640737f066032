"""Canary analysis against a real Prometheus scraping real servers.

Two server processes: a healthy one ("stable") and one whose model revision is
broken (``autoglm_server.testing.break_model``: NaN in a weight, so every
forward pass yields non-finite logits). Prometheus (the binary that
``autoglm_dev.addons`` runs, from the add-on cache) scrapes both every second,
labelled with ``namespace`` and ``pod`` as kubernetes_sd relabelling would.
Then ``autoglm_operator.analysis`` queries it over the HTTP API:

- the broken server answers INTERNAL (gRPC) and 500 (HTTP), counts them, and
  stays ready;
- its error rate through Prometheus is 100 % and the interval fails with action
  rollback; the healthy server's client errors (HTTP 400, INVALID_ARGUMENT)
  are not server errors, so it passes.

Skips when the Prometheus binary is not in the cache (``cluster up --addons``
builds it).
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from server_helpers import ServerProcess, free_port, serving

from autoglm_dev.addons import prometheus_args
from autoglm_dev.binaries import find_binary
from autoglm_operator.analysis import (
    Action,
    AnalysisSpec,
    PrometheusClient,
    Sample,
    Verdict,
    evaluate,
    measure,
    pods_regex,
)
from autoglm_server.client import AutoGLMClient
from autoglm_server.testing import break_model

pytestmark = [pytest.mark.slow]

NAMESPACE = "canary-ns"
STABLE = "llm-stable1"  # Deployment names: <name>-<revision>
CANARY = "llm-broken2"
REQUESTS = 24
SPEC = AnalysisSpec(min_requests=REQUESTS // 2, window_s=60)
MESSAGE = "the model produced non-finite logits (NaN or inf); this model revision is broken"


@pytest.fixture(scope="module")
def servers(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    workdir = tmp_path_factory.mktemp("canary-analysis")
    broken = workdir / "broken-model"
    shutil.copytree(tiny_model, broken)
    break_model(broken)
    procs = (
        ServerProcess(tiny_model, workdir, "--served-model-name", "tiny"),
        ServerProcess(broken, workdir, "--served-model-name", "tiny"),
    )
    with serving(*procs):
        yield procs


@pytest.fixture(scope="module")
def prometheus(
    servers: tuple[ServerProcess, ServerProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    binary = find_binary("prometheus")
    if binary is None:
        pytest.skip("no Prometheus binary in the add-on cache (run `cluster up --addons` once)")
    workdir = tmp_path_factory.mktemp("prometheus")
    stable, canary = servers
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "autoglm",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": [
                    {
                        "targets": [f"{proc.host}:{proc.metrics_port}"],
                        # The labels kubernetes_sd relabelling gives a pod's series.
                        "labels": {"namespace": NAMESPACE, "pod": f"{name}-5d8f7c-x2k9p"},
                    }
                    for proc, name in ((stable, STABLE), (canary, CANARY))
                ],
            }
        ],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    with (workdir / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(binary.path), *prometheus_args(port, path, workdir / "data")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prometheus not ready:\n{(workdir / 'prometheus.log').read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _drive(servers: tuple[ServerProcess, ServerProcess]) -> None:
    """REQUESTS good ones to stable plus client errors; REQUESTS to the broken canary."""
    stable, canary = servers
    with AutoGLMClient(stable.target, timeout=60) as client:
        for _ in range(REQUESTS):
            assert client.generate("Hello", max_new_tokens=2).completion_tokens >= 1
    for _ in range(REQUESTS // 4):  # 400s: the client's fault, not a server failure
        resp = stable.http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "n": 0})
        assert resp.status_code == 400, resp.text
    with AutoGLMClient(canary.target, timeout=60) as client:
        for _ in range(REQUESTS // 2):
            with pytest.raises(grpc.RpcError) as info:
                client.generate("Hello", max_new_tokens=2)
            assert info.value.code() is grpc.StatusCode.INTERNAL
            assert info.value.details() == MESSAGE
    for _ in range(REQUESTS - REQUESTS // 2):
        resp = canary.http.post(
            "/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2}
        )
        assert resp.status_code == 500, resp.text
        assert resp.json()["error"]["type"] == "internal_error"


def _instant(url: str, promql: str) -> float | None:
    query = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{query}", timeout=10) as resp:
        result = json.loads(resp.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.fixture(scope="module")
def driven(servers: tuple[ServerProcess, ServerProcess], prometheus: str) -> str:
    # Both servers' zero outcome series scraped first: the baseline increase() needs.
    baseline = f'count(autoglm_requests_total{{namespace="{NAMESPACE}",code="INTERNAL"}} == 0)'
    deadline = time.monotonic() + 60
    while _instant(prometheus, baseline) != 2:
        assert time.monotonic() < deadline, "Prometheus never scraped both servers"
        time.sleep(0.5)
    _drive(servers)
    return prometheus


def test_broken_revision_fails_with_internal_counted_and_stays_ready(
    servers: tuple[ServerProcess, ServerProcess], driven: str
) -> None:
    stable, canary = servers
    assert canary.metric("autoglm_requests_total", code="INTERNAL") == REQUESTS
    assert canary.metric("autoglm_requests_total", default=0.0, code="OK") == 0
    assert canary.health() == "SERVING"
    assert stable.metric("autoglm_requests_total", code="OK") == REQUESTS
    assert stable.metric("autoglm_requests_total", code="INVALID_ARGUMENT") == REQUESTS // 4
    assert "non-finite logits" in canary.log()


async def _sample_when_scraped(url: str, stable_pods: str, canary_pods: str) -> Sample:
    """Measure until Prometheus has scraped every finished request (bounded)."""
    async with PrometheusClient(url) as client:
        deadline = time.monotonic() + 60
        while True:
            sample = await measure(client, SPEC, NAMESPACE, stable_pods, canary_pods)
            assert sample.error is None, sample.error
            # increase() extrapolates to the window's edges: ask for at least all of them.
            if (sample.canary_requests or 0) >= REQUESTS:
                return sample
            assert time.monotonic() < deadline, f"never saw {REQUESTS} requests: {sample}"
            await asyncio.sleep(1.0)


async def test_analysis_of_the_broken_canary_fails_with_rollback(driven: str) -> None:
    sample = await _sample_when_scraped(driven, pods_regex(STABLE), pods_regex(CANARY))
    assert sample.error_rate is not None and math.isclose(sample.error_rate, 1.0, rel_tol=0.05)
    result = evaluate(SPEC, sample)
    assert result.verdict is Verdict.FAIL and result.action is Action.ROLLBACK
    assert result.reason.startswith("server error rate 100.0% > 5.0%"), result.reason
    # The broken revision produced no token: no TTFT to compare.
    assert sample.canary_ttft_p95 is None
    assert sample.stable_ttft_p95 is not None and sample.stable_ttft_p95 > 0


async def test_client_errors_are_not_server_errors(driven: str) -> None:
    # The healthy server as the canary: its 400s are not failures, so it passes.
    sample = await _sample_when_scraped(driven, pods_regex(CANARY), pods_regex(STABLE))
    assert sample.canary_errors == 0
    result = evaluate(SPEC, sample)
    assert result.verdict is Verdict.PASS, result.reason
    assert result.values["ttftP95"] > 0 and "ttftRatio" not in result.values  # no stable TTFT
