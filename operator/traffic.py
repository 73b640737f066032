"""Traffic providers: the objects that split requests between revisions (pure).

``build_traffic(spec, owner, versions)`` turns the step machine's per-revision
weights into the provider's objects:

- ``gatewayAPI``: a ``GRPCRoute`` and an ``HTTPRoute`` named ``<name>``, attached
  to ``spec.traffic.gateway``, with one weighted ``backendRef`` per revision
  Service (``<name>-<revision>``): the Gateway splits per request, gRPC included.
- ``istio``: a ``VirtualService`` ``<name>`` (hosts: the ``<name>`` Service and
  ``spec.traffic.hostnames``; the Gateway when one is given, else the mesh) with
  one weighted destination per revision subset, and a ``DestinationRule``
  ``<name>`` with a subset per revision (label ``serving.autoglm.io/revision``).
  The route has no port: requests keep the port they came to (gRPC or HTTP).
- ``replicas``: nothing. The ``<name>`` Service and the headless Service select
  the pods of every revision, so the split follows the replica ratio: exact only
  for clients that balance per request over the endpoints (the project's gRPC
  client on the headless Service with round_robin); a kube-proxy ClusterIP
  balances per connection, and one long-lived HTTP/2 connection goes to one pod.

Revisions kept warm after a promotion stay in the routes with weight 0, so an
instant rollback changes weights only.
"""

from __future__ import annotations

from typing import Any

from .canary import VersionPlan
from .owner import Owner, revision_name
from .spec import API_VERSION, KIND, AutoGLMDeploymentSpec

Manifest = dict[str, Any]

GATEWAY_GROUP = "gateway.networking.k8s.io"
GATEWAY_API_VERSION = f"{GATEWAY_GROUP}/v1"
ISTIO_GROUP = "networking.istio.io"
ISTIO_API_VERSION = f"{ISTIO_GROUP}/v1beta1"
REVISION_LABEL = "serving.autoglm.io/revision"

# kind -> apiVersion of the route objects (children the operator may own)
TRAFFIC_KINDS: dict[str, str] = {
    "GRPCRoute": GATEWAY_API_VERSION,
    "HTTPRoute": GATEWAY_API_VERSION,
    "VirtualService": ISTIO_API_VERSION,
    "DestinationRule": ISTIO_API_VERSION,
}
# provider -> the (groupVersion, plural) it needs the API server to serve
PROVIDER_RESOURCES: dict[str, tuple[tuple[str, str], ...]] = {
    "gatewayAPI": ((GATEWAY_API_VERSION, "grpcroutes"), (GATEWAY_API_VERSION, "httproutes")),
    "istio": ((ISTIO_API_VERSION, "virtualservices"), (ISTIO_API_VERSION, "destinationrules")),
    "replicas": (),
}


def compute_provider(spec: AutoGLMDeploymentSpec) -> str:
    return spec.traffic.provider if spec.traffic is not None else "replicas"


def _metadata(owner: Owner) -> Manifest:
    return {
        "name": owner.name,
        "namespace": owner.namespace,
        "labels": {
            "app.kubernetes.io/component": "server",
            "app.kubernetes.io/instance": owner.name,
            "app.kubernetes.io/name": "autoglm",
            "app.kubernetes.io/managed-by": "autoglm-operator",
            "app.kubernetes.io/part-of": "autoglm",
        },
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": owner.name,
                "uid": owner.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def build_parent_ref(spec: AutoGLMDeploymentSpec, owner: Owner) -> Manifest:
    assert spec.traffic is not None and spec.traffic.gateway is not None
    gw = spec.traffic.gateway
    ref: Manifest = {
        "group": GATEWAY_GROUP,
        "kind": "Gateway",
        "name": gw.name,
        "namespace": gw.namespace or owner.namespace,
    }
    if gw.section_name is not None:
        ref["sectionName"] = gw.section_name
    return ref


def build_backend_refs(owner: Owner, versions: list[VersionPlan], port: int) -> list[Manifest]:
    return [
        {
            "group": "",
            "kind": "Service",
            "name": revision_name(owner, v.revision),
            "port": port,
            "weight": v.weight,
        }
        for v in versions
    ]


# The gRPC services the server answers. The GRPCRoute matches them by name: a
# GRPCRoute with no match matches every path of its hostnames, and Traefik ranks
# that above the HTTPRoute's PathPrefix "/" on the same hostnames, so OpenAI
# requests would go to the gRPC port (and fail with 500).
GRPC_SERVICES = (
    "autoglm.v1.AutoGLM",
    "inference.GRPCInferenceService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
)


def build_grpc_route(
    spec: AutoGLMDeploymentSpec, owner: Owner, versions: list[VersionPlan]
) -> Manifest:
    route_spec: Manifest = {"parentRefs": [build_parent_ref(spec, owner)]}
    if spec.traffic is not None and spec.traffic.hostnames:
        route_spec["hostnames"] = list(spec.traffic.hostnames)
    route_spec["rules"] = [
        {
            "matches": [
                {"method": {"type": "Exact", "service": service}} for service in GRPC_SERVICES
            ],
            "backendRefs": build_backend_refs(owner, versions, spec.server.grpc_port),
        }
    ]
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "GRPCRoute",
        "metadata": _metadata(owner),
        "spec": route_spec,
    }


def build_http_route(
    spec: AutoGLMDeploymentSpec, owner: Owner, versions: list[VersionPlan]
) -> Manifest:
    route_spec: Manifest = {"parentRefs": [build_parent_ref(spec, owner)]}
    if spec.traffic is not None and spec.traffic.hostnames:
        route_spec["hostnames"] = list(spec.traffic.hostnames)
    route_spec["rules"] = [
        {
            # The API server's default, written out so an unchanged route compares equal.
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backendRefs": build_backend_refs(owner, versions, spec.server.http_port),
        }
    ]
    return {
        "apiVersion": GATEWAY_API_VERSION,
        "kind": "HTTPRoute",
        "metadata": _metadata(owner),
        "spec": route_spec,
    }


def service_host(owner: Owner) -> str:
    return f"{owner.name}.{owner.namespace}.svc.cluster.local"


def build_virtual_service(
    spec: AutoGLMDeploymentSpec, owner: Owner, versions: list[VersionPlan]
) -> Manifest:
    host = service_host(owner)
    vs_spec: Manifest = {"hosts": [host, *(spec.traffic.hostnames if spec.traffic else [])]}
    gw = spec.traffic.gateway if spec.traffic is not None else None
    if gw is not None:
        vs_spec["gateways"] = [f"{gw.namespace or owner.namespace}/{gw.name}", "mesh"]
    vs_spec["http"] = [
        {
            "name": "revisions",
            "route": [
                {"destination": {"host": host, "subset": v.revision}, "weight": v.weight}
                for v in versions
            ],
        }
    ]
    return {
        "apiVersion": ISTIO_API_VERSION,
        "kind": "VirtualService",
        "metadata": _metadata(owner),
        "spec": vs_spec,
    }


def build_destination_rule(
    spec: AutoGLMDeploymentSpec, owner: Owner, versions: list[VersionPlan]
) -> Manifest:
    return {
        "apiVersion": ISTIO_API_VERSION,
        "kind": "DestinationRule",
        "metadata": _metadata(owner),
        "spec": {
            "host": service_host(owner),
            "subsets": [
                {"name": v.revision, "labels": {REVISION_LABEL: v.revision}} for v in versions
            ],
        },
    }


def build_traffic(
    spec: AutoGLMDeploymentSpec, owner: Owner, versions: list[VersionPlan]
) -> list[Manifest]:
    """The provider's objects for these per-revision weights (none for ``replicas``)."""
    provider = compute_provider(spec)
    if provider == "gatewayAPI":
        return [build_grpc_route(spec, owner, versions), build_http_route(spec, owner, versions)]
    if provider == "istio":
        # The subsets first: a route to a subset that does not exist yet fails requests.
        return [
            build_destination_rule(spec, owner, versions),
            build_virtual_service(spec, owner, versions),
        ]
    return []
