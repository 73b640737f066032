"""The Gateway API data plane (Traefik) in front of operator pods that really serve.

Two AutoGLMDeployments (one replica each, on the live node) are reached through
the cluster's Gateway (``autoglm_dev.addons``): an HTTPRoute carries an OpenAI
request, a GRPCRoute (h2c) an ``autoglm.v1`` request, and an HTTPRoute with
weighted backendRefs splits a bounded number of requests between the two. Each
route has its own hostname, so routes of other tests on the same listener never
match these requests.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from live_helpers import Kube, OperatorProcess, describe_pods, live_agd, wait_for

from autoglm_dev.addons import (
    ADDONS_NAMESPACE,
    GATEWAY_LISTENER,
    GATEWAY_NAME,
    AddonEndpoints,
    endpoints,
)
from autoglm_dev.cluster import LocalCluster
from autoglm_server.client import build_generate_request
from autoglm_server.proto.autoglm.v1 import autoglm_pb2 as pb
from autoglm_server.proto.autoglm.v1 import autoglm_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.k8s, pytest.mark.slow]

HTTP_PORT = 8000
GRPC_PORT = 8001
WEIGHTS = (3, 1)
WEIGHTED_REQUESTS = 40  # bounded: 30 and 10 expected from a weighted round robin


@pytest.fixture(scope="module")
def gateway(live_cluster: LocalCluster) -> AddonEndpoints:
    live_cluster.start_addons()
    state = live_cluster.load_state()
    assert state is not None
    return endpoints(state)


@pytest.fixture(scope="module")
def backends(
    live_cluster: LocalCluster, live_operator: OperatorProcess, tiny_model: Any
) -> Iterator[tuple[Kube, list[str]]]:
    """Two ready AutoGLMDeployments in one namespace, served names = their names."""
    ns = f"t-gateway-{uuid.uuid4().hex[:6]}"
    live_cluster.kubectl("create", "namespace", ns)
    kube = Kube(live_cluster, ns)
    names = ["gw-a", "gw-b"]
    try:
        for name in names:
            kube.apply(live_agd(name))
        for name in names:
            _wait_ready(kube, name, live_operator)
        yield kube, names
    finally:
        live_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _wait_ready(kube: Kube, name: str, operator: OperatorProcess) -> None:
    def ready() -> bool:
        cond = kube.condition(name)
        return bool(cond and cond["status"] == "True")

    wait_for(
        ready,
        timeout=480,
        message=lambda: (
            f"agd/{name} Ready: {kube.condition(name)}\n{describe_pods(kube, name)}\n"
            f"operator log:\n{operator.log_tail()}"
        ),
    )


def _parent_ref() -> dict[str, Any]:
    return {"name": GATEWAY_NAME, "namespace": ADDONS_NAMESPACE, "sectionName": GATEWAY_LISTENER}


def _http_route(name: str, host: str, refs: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": name},
        "spec": {
            "parentRefs": [_parent_ref()],
            "hostnames": [host],
            "rules": [
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/v1"}}],
                    "backendRefs": [
                        {"name": svc, "port": HTTP_PORT, "weight": weight} for svc, weight in refs
                    ],
                }
            ],
        },
    }


def _h2c_service(kube: Kube, backend: str) -> str:
    """A Service on the backend's pods whose gRPC port says ``kubernetes.io/h2c``:
    the appProtocol Gateway API defines for HTTP/2 without TLS (GEP-1911), which
    is what Traefik accepts for a GRPCRoute's backend."""
    owned = kube.get("service", backend)
    assert owned is not None, f"the operator made no Service {backend}"
    name = f"{backend}-h2c"
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name},
            "spec": {
                "selector": owned["spec"]["selector"],
                "ports": [
                    {
                        "name": "grpc",
                        "port": GRPC_PORT,
                        "targetPort": "grpc",
                        "appProtocol": "kubernetes.io/h2c",
                    }
                ],
            },
        }
    )
    return name


def _grpc_route(name: str, host: str, service: str) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GRPCRoute",
        "metadata": {"name": name},
        "spec": {
            "parentRefs": [_parent_ref()],
            "hostnames": [host],
            "rules": [
                {
                    "matches": [{"method": {"service": "autoglm.v1.AutoGLM"}}],
                    "backendRefs": [{"name": service, "port": GRPC_PORT}],
                }
            ],
        },
    }


def _route_accepted(kube: Kube, kind: str, name: str) -> bool:
    """Traefik accepted the route on our Gateway and resolved its backends."""
    obj = kube.get(kind, name)
    for parent in (obj or {}).get("status", {}).get("parents") or []:
        if parent.get("parentRef", {}).get("name") != GATEWAY_NAME:
            continue
        conds = {c["type"]: c["status"] for c in parent.get("conditions") or []}
        return conds.get("Accepted") == "True" and conds.get("ResolvedRefs") == "True"
    return False


def _complete(
    gateway: AddonEndpoints, host: str, model: str | None = None
) -> tuple[int, dict[str, Any]]:
    """An OpenAI completion through the Gateway; without ``model`` any backend answers."""
    body: dict[str, Any] = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
    if model is not None:
        body["model"] = model
    req = urllib.request.Request(
        f"{gateway.gateway}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Host": host},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}


def _wait_route(kube: Kube, kind: str, name: str) -> None:
    wait_for(
        lambda: _route_accepted(kube, kind, name),
        timeout=60,
        message=lambda: f"{kind}/{name} accepted: {json.dumps(kube.get(kind, name))}",
    )


def _wait_serving(probe: Any, what: str) -> Any:
    """Traefik programs a route a moment after it reports it: poll a bounded
    number of times until the first good answer, then the test asserts on it."""
    last: list[Any] = []

    def attempt() -> Any:
        out = probe()
        last[:] = [out]
        return out if out[0] == 200 else None

    return wait_for(attempt, timeout=60, message=lambda: f"{what}; last answer: {last}")


def test_httproute_and_grpcroute_reach_the_pod_servers(
    gateway: AddonEndpoints, backends: tuple[Kube, list[str]]
) -> None:
    kube, names = backends
    backend = names[0]
    host = f"{backend}.{kube.namespace}.example"
    kube.apply(_http_route("http", host, [(backend, 1)]))
    kube.apply(_grpc_route("grpc", host, _h2c_service(kube, backend)))
    _wait_route(kube, "httproute", "http")
    _wait_route(kube, "grpcroute", "grpc")

    status, answer = _wait_serving(
        lambda: _complete(gateway, host, backend), "an OpenAI request through the HTTPRoute"
    )
    assert status == 200
    assert answer["model"] == backend
    assert answer["choices"][0]["text"] is not None

    # An unknown host matches no route: the Gateway answers 404 itself.
    status, _ = _complete(gateway, f"nobody.{kube.namespace}.example", backend)
    assert status == 404

    options = [("grpc.default_authority", host)]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.gateway_port}", options=options) as channel:
        stub = pb_grpc.AutoGLMStub(channel)

        def info() -> tuple[int, Any]:
            try:
                return 200, stub.ModelInfo(pb.ModelInfoRequest(), timeout=30)
            except grpc.RpcError as exc:
                return 0, exc

        _, model_info = _wait_serving(info, "ModelInfo through the GRPCRoute")
        assert model_info.name == backend
        tokens = stub.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=30)
        assert len(tokens.token_ids) > 0
        request = build_generate_request("Hello", max_new_tokens=3, ignore_eos=True)
        generated = stub.Generate(request, timeout=60)
        assert generated.model == backend
        assert len(generated.token_ids) == 3


def test_weighted_backend_refs_split_requests(
    gateway: AddonEndpoints, backends: tuple[Kube, list[str]]
) -> None:
    kube, names = backends
    host = f"weighted.{kube.namespace}.example"
    kube.apply(_http_route("weighted", host, list(zip(names, WEIGHTS, strict=True))))
    _wait_route(kube, "httproute", "weighted")
    # The route serves before counting starts.
    _wait_serving(lambda: _complete(gateway, host), "the weighted route")

    counts: Counter[str] = Counter()
    for _ in range(WEIGHTED_REQUESTS):
        status, answer = _complete(gateway, host)
        assert status == 200, answer
        counts[answer["model"]] += 1
    expected = {
        name: WEIGHTED_REQUESTS * w / sum(WEIGHTS) for name, w in zip(names, WEIGHTS, strict=True)
    }
    print(f"weighted split over {WEIGHTED_REQUESTS} requests, weights {WEIGHTS}: {dict(counts)}")
    assert set(counts) == set(names), counts
    for name in names:
        # Traefik's weighted round robin is smooth: the split is exact up to
        # where the counting window starts in its cycle.
        assert abs(counts[name] - expected[name]) <= 2, (counts, expected)
