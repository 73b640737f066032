"""The GRPCRoute and the HTTPRoute share hostnames and a listener: the GRPCRoute
must match the server's gRPC services by name, not every path, or a Gateway
sends OpenAI requests to the gRPC port (Traefik ranks a match-all GRPCRoute,
``Host && PathPrefix("/")``, above the HTTPRoute's ``PathPrefix("/")``; the live
canary test saw every HTTP request answered 500)."""

from __future__ import annotations

from autoglm_operator.canary import VersionPlan
from autoglm_operator.owner import Owner
from autoglm_operator.spec import parse_spec
from autoglm_operator.traffic import GRPC_SERVICES, build_grpc_route, build_http_route

OWNER = Owner("glm", "models", "uid-1")


def _routes() -> tuple[dict[str, object], dict[str, object]]:
    spec = parse_spec(
        {
            "model": {"source": "hf://org/glm@v1"},
            "traffic": {
                "provider": "gatewayAPI",
                "gateway": {"name": "gw"},
                "hostnames": ["glm.example"],
            },
        }
    )
    versions = [VersionPlan("aaaa1111", spec, "stable", 100, 1)]
    return build_grpc_route(spec, OWNER, versions), build_http_route(spec, OWNER, versions)


def test_grpc_route_matches_the_servers_grpc_services_only() -> None:
    grpc_route, http_route = _routes()
    (rule,) = grpc_route["spec"]["rules"]  # type: ignore[index]
    matches = rule["matches"]
    assert matches, "a GRPCRoute rule without matches takes every path of its hostnames"
    assert [m["method"] for m in matches] == [
        {"type": "Exact", "service": s} for s in GRPC_SERVICES
    ]
    assert set(GRPC_SERVICES) >= {
        "autoglm.v1.AutoGLM",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
    }
    # The HTTPRoute keeps everything else on the same hostnames.
    (http_rule,) = http_route["spec"]["rules"]  # type: ignore[index]
    assert http_rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
