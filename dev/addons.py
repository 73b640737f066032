"""The add-ons of a live local cluster: Prometheus, prometheus-adapter, and the
Gateway API with Traefik as its data plane. All run as local processes on
127.0.0.1 against the cluster's apiserver, like the control plane itself, and
``LocalCluster.stop()`` (``cluster down``) stops them with it.

- **Prometheus** (3.x, built from its Go module) discovers pods with
  ``kubernetes_sd_configs`` (role ``pod``) and keeps those that carry the scrape
  annotations the operator writes (``prometheus.io/scrape``, ``/port``,
  ``/path``), relabelled to ``namespace`` and ``pod`` labels, every
  ``SCRAPE_INTERVAL``. It reads the apiserver with a ServiceAccount token
  allowed only to list and watch pods.
- **prometheus-adapter** serves ``custom.metrics.k8s.io/v1beta1`` through the
  apiserver's aggregation layer, with the rules the Helm chart ships (rendered
  from ``charts/autoglm`` by helm, the one source). kube-controller-manager's
  HPA controller reads Pods metrics through it as in any cluster. It runs as
  ServiceAccount ``prometheus-adapter`` (read namespaces/pods/services/nodes,
  ``system:auth-delegator``, the authentication ConfigMap). Its Service is
  an ExternalName one pointing at 127.0.0.1: EndpointSlices can't hold loopback
  addresses (see ``autoglm_dev.pki.aggregation_layer_args``).
- **Gateway API** CRDs (standard channel) from the ``sigs.k8s.io/gateway-api``
  module at ``GATEWAY_API_VERSION``, the release Traefik is built against, and
  **Traefik** (``kubernetesgateway`` provider) as the data plane: GatewayClass
  ``GATEWAY_CLASS``, and Gateway ``GATEWAY_NAME`` in ``ADDONS_NAMESPACE`` with
  one HTTP listener on a loopback port that takes HTTPRoutes and GRPCRoutes
  (h2c) from every namespace. Traefik balances over the ready addresses of the
  backend Services' EndpointSlices, so no kube-proxy is needed.
- **Istio CRDs** (``networking.istio.io`` and the rest) from the
  ``istio.io/api`` Go module at ``ISTIO_API_VERSION``
  (``kubernetes/customresourcedefinitions.gen.yaml``, copied into the cache
  under a folder named by the version), so the apiserver checks the operator's
  VirtualServices and DestinationRules against Istio's own schemas. There is no
  Istio control plane and no Envoy here: nothing routes by those objects.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .binaries import (
    GATEWAY_API_VERSION,
    HACK_DIR,
    KUBERNETES_VERSION,
    cache_root,
    ensure_binaries,
    find_binary,
)
from .pki import PKIPaths, write_serving_cert

if TYPE_CHECKING:
    from .cluster import ClusterState, LocalCluster

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
CHART_DIR = ROOT / "charts" / "autoglm"
ADAPTER_RULES_TEMPLATE = "templates/adapter-rules.yaml"

ADDON_COMPONENTS = ("prometheus", "prometheus-adapter", "traefik")
ADDONS_NAMESPACE = "autoglm-addons"
ADAPTER_SERVICE = "prometheus-adapter"
CUSTOM_METRICS_APISERVICES = ("v1beta1.custom.metrics.k8s.io", "v1beta2.custom.metrics.k8s.io")
GATEWAY_CLASS = "autoglm-traefik"
GATEWAY_CONTROLLER = "traefik.io/gateway-controller"
GATEWAY_NAME = "autoglm"
GATEWAY_LISTENER = "http"
SCRAPE_INTERVAL = "2s"
# istio.io/api: the CRDs of Istio's networking, security, telemetry and extensions APIs.
ISTIO_API_VERSION = "v1.32.0"
ISTIO_CRDS_FILE = "kubernetes/customresourcedefinitions.gen.yaml"
# The pod label a revision of an AutoGLMDeployment carries; Prometheus copies it to `revision`.
REVISION_POD_LABEL = "serving.autoglm.io/revision"
# The adapter re-lists the series it can serve this often (its default is 10 minutes).
ADAPTER_RELIST_INTERVAL = "3s"


class AddonError(RuntimeError):
    """An add-on could not be set up."""


@dataclass(frozen=True, slots=True)
class AddonEndpoints:
    """Where the add-ons of a running cluster listen."""

    prometheus: str  # http://127.0.0.1:<port>
    gateway: str  # http://127.0.0.1:<port>, the Gateway's listener
    gateway_port: int
    traefik_api: str  # Traefik's own API and ping, http://127.0.0.1:<port>


def endpoints(state: ClusterState) -> AddonEndpoints:
    ports = state.ports
    missing = [p for p in ("prometheus", "traefik-web", "traefik-api") if p not in ports]
    if missing:
        raise AddonError(f"the add-ons are not running (no port for {', '.join(missing)})")
    return AddonEndpoints(
        prometheus=f"http://127.0.0.1:{ports['prometheus']}",
        gateway=f"http://127.0.0.1:{ports['traefik-web']}",
        gateway_port=ports["traefik-web"],
        traefik_api=f"http://127.0.0.1:{ports['traefik-api']}",
    )


# ---- manifests and configs (pure) ---------------------------------------------------


def build_prometheus_config(
    server: str, ca_file: Path, token_file: Path, interval: str = SCRAPE_INTERVAL
) -> dict[str, Any]:
    """Prometheus' config: pods found through the apiserver, kept when annotated."""
    meta = "__meta_kubernetes_pod_annotation_prometheus_io_"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": "kubernetes-pods",
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "kubernetes_sd_configs": [
                    {
                        "role": "pod",
                        "api_server": server,
                        "authorization": {"credentials_file": str(token_file)},
                        "tls_config": {"ca_file": str(ca_file)},
                    }
                ],
                "relabel_configs": [
                    {"source_labels": [f"{meta}scrape"], "action": "keep", "regex": "true"},
                    {
                        "source_labels": ["__meta_kubernetes_pod_phase"],
                        "action": "drop",
                        "regex": "Pending|Succeeded|Failed",
                    },
                    {
                        "source_labels": [f"{meta}path"],
                        "action": "replace",
                        "target_label": "__metrics_path__",
                        "regex": "(.+)",
                    },
                    {
                        # One target per pod, on its IP and the annotated port
                        # (role pod yields one per container port; equal label
                        # sets are merged).
                        "source_labels": ["__meta_kubernetes_pod_ip", f"{meta}port"],
                        "action": "replace",
                        "regex": "(.+);(\\d+)",
                        "replacement": "$1:$2",
                        "target_label": "__address__",
                    },
                    {
                        "source_labels": ["__meta_kubernetes_namespace"],
                        "target_label": "namespace",
                    },
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                    {
                        "source_labels": ["__meta_kubernetes_pod_node_name"],
                        "target_label": "node",
                    },
                    {
                        # The canary's series by revision (absent label: no `revision`).
                        "source_labels": [_sd_label(REVISION_POD_LABEL)],
                        "target_label": "revision",
                        "regex": "(.+)",
                    },
                ],
            }
        ],
    }


def _sd_label(label: str) -> str:
    """kubernetes_sd's meta label of a pod label (every character outside [a-zA-Z0-9_] -> _)."""
    return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in label)


def build_rbac(namespace: str = ADDONS_NAMESPACE) -> list[dict[str, Any]]:
    """ServiceAccounts and least-privilege roles for Prometheus and Traefik."""

    def rule(groups: list[str], resources: list[str], verbs: list[str]) -> dict[str, Any]:
        return {"apiGroups": groups, "resources": resources, "verbs": verbs}

    read = ["get", "list", "watch"]
    gw = "gateway.networking.k8s.io"
    roles = {
        "prometheus": [rule([""], ["pods"], ["list", "watch"])],
        # What the adapter's own deployment grants: read the objects its rules
        # map series to. It also delegates authentication and authorization
        # (bindings below).
        "prometheus-adapter": [rule([""], ["namespaces", "pods", "services", "nodes"], read)],
        "traefik": [
            rule([""], ["namespaces", "services", "secrets", "configmaps"], read),
            rule(["discovery.k8s.io"], ["endpointslices"], read),
            rule(
                [gw],
                [
                    "gatewayclasses",
                    "gateways",
                    "httproutes",
                    "grpcroutes",
                    "referencegrants",
                    "backendtlspolicies",
                    "tcproutes",
                    "tlsroutes",
                ],
                read,
            ),
            rule(
                [gw],
                [
                    "gatewayclasses/status",
                    "gateways/status",
                    "httproutes/status",
                    "grpcroutes/status",
                    "backendtlspolicies/status",
                    "tcproutes/status",
                    "tlsroutes/status",
                ],
                ["update", "patch"],
            ),
        ],
    }
    items: list[dict[str, Any]] = []
    for name, rules in roles.items():
        full = f"autoglm-addons-{name}"
        items += [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": name, "namespace": namespace},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": full},
                "rules": rules,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": full},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": full,
                },
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            },
        ]
    binding = {"apiGroup": "rbac.authorization.k8s.io"}
    adapter = [{"kind": "ServiceAccount", "name": "prometheus-adapter", "namespace": namespace}]
    items += [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "autoglm-addons-prometheus-adapter:auth-delegator"},
            "roleRef": {**binding, "kind": "ClusterRole", "name": "system:auth-delegator"},
            "subjects": adapter,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {
                "name": "autoglm-addons-prometheus-adapter:auth-reader",
                "namespace": "kube-system",
            },
            "roleRef": {
                **binding,
                "kind": "Role",
                "name": "extension-apiserver-authentication-reader",
            },
            "subjects": adapter,
        },
    ]
    return items


def build_token_kubeconfig(server: str, ca_file: Path, token_file: Path) -> dict[str, Any]:
    """A kubeconfig that authenticates with a ServiceAccount token."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": "sa", "user": {"tokenFile": str(token_file)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "sa"}}],
        "current-context": "local",
    }


def build_adapter_registration(
    port: int, ca_bundle: bytes, namespace: str = ADDONS_NAMESPACE
) -> list[dict[str, Any]]:
    """The adapter's ExternalName Service and its custom.metrics APIServices
    (v1beta1 and v1beta2, as the adapter's own deployment registers them).

    The apiserver dials ``<externalName>:<APIService port>`` and checks the
    serving certificate against ``<service>.<namespace>.svc``.
    """
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": ADAPTER_SERVICE, "namespace": namespace},
        "spec": {"type": "ExternalName", "externalName": "localhost"},
    }
    apiservices = [
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": name},
            "spec": {
                "group": "custom.metrics.k8s.io",
                "version": name.split(".", 1)[0],
                "service": {"namespace": namespace, "name": ADAPTER_SERVICE, "port": port},
                "caBundle": base64.b64encode(ca_bundle).decode(),
                "groupPriorityMinimum": 100,
                "versionPriority": 200 if name.startswith("v1beta2") else 100,
            },
        }
        for name in CUSTOM_METRICS_APISERVICES
    ]
    return [service, *apiservices]


def build_gateway(
    port: int, namespace: str = ADDONS_NAMESPACE, name: str = GATEWAY_NAME
) -> list[dict[str, Any]]:
    """The GatewayClass Traefik controls and one Gateway with an HTTP listener
    (HTTPRoute and GRPCRoute over h2c) open to routes of every namespace."""
    return [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": {"name": GATEWAY_CLASS},
            "spec": {"controllerName": GATEWAY_CONTROLLER},
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "gatewayClassName": GATEWAY_CLASS,
                "listeners": [
                    {
                        "name": GATEWAY_LISTENER,
                        "protocol": "HTTP",
                        "port": port,
                        "allowedRoutes": {
                            "namespaces": {"from": "All"},
                            "kinds": [{"kind": "HTTPRoute"}, {"kind": "GRPCRoute"}],
                        },
                    }
                ],
            },
        },
    ]


def traefik_args(ports: dict[str, int], server: str, ca_file: Path, token_file: Path) -> list[str]:
    provider = "--providers.kubernetesgateway"
    return [
        f"--entryPoints.web.address=127.0.0.1:{ports['traefik-web']}",
        f"--entryPoints.traefik.address=127.0.0.1:{ports['traefik-api']}",
        "--ping=true",
        "--api.insecure=true",  # the API on the loopback "traefik" entry point only
        "--api.dashboard=false",  # its web assets are not part of the Go build
        f"{provider}=true",
        f"{provider}.endpoint={server}",
        f"{provider}.certauthfilepath={ca_file}",
        f"{provider}.token={token_file}",
        f"{provider}.statusaddress.ip=127.0.0.1",
        "--global.checknewversion=false",
        "--global.sendanonymoususage=false",
        "--log.level=INFO",
    ]


def prometheus_args(port: int, config: Path, data: Path) -> list[str]:
    return [
        f"--config.file={config}",
        f"--storage.tsdb.path={data}",
        "--storage.tsdb.retention.time=2h",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]


def adapter_args(
    port: int, kubeconfig: Path, prometheus_url: str, rules: Path, cert: Path, key: Path
) -> list[str]:
    return [
        "--bind-address=127.0.0.1",
        f"--secure-port={port}",
        f"--tls-cert-file={cert}",
        f"--tls-private-key-file={key}",
        f"--lister-kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--prometheus-url={prometheus_url}/",
        f"--config={rules}",
        f"--metrics-relist-interval={ADAPTER_RELIST_INTERVAL}",
        "--metrics-max-age=1m",
        "--v=1",
    ]


# ---- the chart's adapter rules (one source) -----------------------------------------


def render_adapter_rules(chart_dir: Path = CHART_DIR) -> str:
    """prometheus-adapter's config as the Helm chart renders it (the ConfigMap's
    ``config.yaml``), so the local cluster serves the rules users install."""
    helm = ensure_binaries(("helm",))["helm"]
    proc = subprocess.run(
        [
            str(helm),
            "template",
            "autoglm",
            str(chart_dir),
            "--kube-version",
            KUBERNETES_VERSION,
            "--show-only",
            ADAPTER_RULES_TEMPLATE,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise AddonError(f"helm template {ADAPTER_RULES_TEMPLATE} failed: {proc.stderr.strip()}")
    doc = yaml.safe_load(proc.stdout)
    try:
        config: str = doc["data"]["config.yaml"]
    except (TypeError, KeyError) as exc:
        raise AddonError(f"{ADAPTER_RULES_TEMPLATE} rendered no data.config.yaml") from exc
    return config


# ---- Gateway API CRDs ---------------------------------------------------------------


def go_module_dir(module: str, version: str) -> Path:
    """The folder of ``module@version`` in the Go module cache (downloaded through the
    module proxy when missing)."""
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=mod"}
    proc = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        cwd=HACK_DIR / "traefik",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise AddonError(f"go mod download {module}@{version}: {proc.stderr}")
    return Path(json.loads(proc.stdout)["Dir"])


def gateway_api_crd_dir(version: str = GATEWAY_API_VERSION) -> Path:
    """The standard-channel CRDs of ``sigs.k8s.io/gateway-api@version`` from the
    Go module cache (downloaded through the module proxy when missing).
    ``AUTOGLM_GATEWAY_API_CRDS`` names a folder of CRDs to use instead."""
    override = os.environ.get("AUTOGLM_GATEWAY_API_CRDS")
    if override:
        return Path(override)
    crds = go_module_dir("sigs.k8s.io/gateway-api", version) / "config" / "crd" / "standard"
    if not crds.is_dir():
        raise AddonError(f"{crds}: no standard-channel CRDs in the module")
    return crds


# ---- Istio CRDs ---------------------------------------------------------------------


def istio_crds_file(version: str = ISTIO_API_VERSION) -> Path:
    """Istio's CRDs from ``istio.io/api@version`` (through the module proxy when
    not cached), kept in the cache folder ``istio-api-<version>``.
    ``AUTOGLM_ISTIO_CRDS`` names a CRD file to use instead."""
    override = os.environ.get("AUTOGLM_ISTIO_CRDS")
    if override:
        return Path(override)
    cached = cache_root() / f"istio-api-{version}" / Path(ISTIO_CRDS_FILE).name
    if cached.is_file():
        return cached
    source = go_module_dir("istio.io/api", version) / ISTIO_CRDS_FILE
    if not source.is_file():
        raise AddonError(f"{source}: no CRDs in istio.io/api@{version}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(cached)
    return cached


def istio_crd_names(path: Path) -> list[str]:
    return [
        doc["metadata"]["name"]
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "CustomResourceDefinition"
    ]


def wait_established(cluster: LocalCluster, names: list[str], timeout: float = 60) -> None:
    """Poll until every CRD is Established: `kubectl wait --for=condition=Established` fails
    at once (".status.conditions accessor error") on a fresh CRD with no condition yet."""
    from .waiting import wait_until

    jsonpath = "jsonpath={.status.conditions[?(@.type=='Established')].status}"

    def established() -> bool:
        for name in names:
            got = cluster.kubectl("get", name, "-o", jsonpath, check=False)
            if got.stdout.strip() != "True":
                return False
        return True

    wait_until(established, timeout=timeout, interval=0.2, message=f"{names} Established")


def _istio_crd_state(cluster: LocalCluster) -> str:
    """``absent``, ``terminating`` or ``present`` for Istio's VirtualService CRD."""
    probe = cluster.kubectl(
        "get", "crd", "virtualservices.networking.istio.io", "-o", "json", check=False
    )
    if probe.returncode != 0:
        return "absent"
    meta = json.loads(probe.stdout).get("metadata") or {}
    return "terminating" if meta.get("deletionTimestamp") else "present"


def remove_istio_crds(cluster: LocalCluster, timeout: float = 120) -> None:
    """Delete Istio's CRDs and poll until the API server no longer has them: tests share
    one cluster, and a test of a cluster without a mesh must not depend on test order."""
    from .waiting import wait_until

    names = [f"crd/{n}" for n in istio_crd_names(istio_crds_file())]
    cluster.kubectl("delete", *names, "--ignore-not-found", "--wait=false", timeout=60)

    def gone() -> bool:
        return all(
            cluster.kubectl("get", name, "-o", "name", check=False).returncode != 0
            for name in names
        )

    wait_until(gone, timeout=timeout, interval=0.5, message=f"{names} deleted")


def install_istio_crds(cluster: LocalCluster) -> Path:
    """Server-side apply Istio's CRDs (skipped when VirtualService is served) and wait.
    CRDs still being deleted are waited out first, or they would vanish after this returns."""
    crds = istio_crds_file()
    state = _istio_crd_state(cluster)
    if state == "present":
        return crds
    if state == "terminating":
        remove_istio_crds(cluster)
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds), timeout=120)
    names = [f"crd/{n}" for n in istio_crd_names(crds)]
    wait_established(cluster, names)
    return crds


# ---- processes ----------------------------------------------------------------------


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _apply(cluster: LocalCluster, items: list[dict[str, Any]]) -> None:
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=autoglm-dev",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
    )


def _token(cluster: LocalCluster, name: str, path: Path) -> Path:
    """A ServiceAccount token in a file (30 days: longer than a local cluster lives)."""
    token = cluster.kubectl(
        "create", "token", name, "-n", ADDONS_NAMESPACE, "--duration=720h"
    ).stdout.strip()
    path.write_text(token)
    path.chmod(0o600)
    return path


def addons_running(cluster: LocalCluster) -> bool:
    state = cluster.load_state()
    if state is None:
        return False
    alive = {s.name: s.alive for s in cluster.status()}
    return all(alive.get(name, False) for name in ADDON_COMPONENTS)


def install_gateway_api(cluster: LocalCluster) -> Path:
    """Server-side apply the Gateway API CRDs and wait until they are served."""
    crds = gateway_api_crd_dir()
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
    names = []
    for path in sorted(crds.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                names.append(f"crd/{doc['metadata']['name']}")
    wait_established(cluster, names)
    return crds


def start_addons(
    cluster: LocalCluster, state: ClusterState, pki: PKIPaths, timeout_s: float = 180.0
) -> AddonEndpoints:
    """Start Prometheus, prometheus-adapter and Traefik for a running control
    plane and register them; returns when each answers and the APIService and
    the Gateway are available. Idempotent."""
    from .cluster import free_port

    if addons_running(cluster):
        install_istio_crds(cluster)  # a cluster whose add-ons predate them
        return endpoints(state)
    started = time.monotonic()
    deadline = started + timeout_s
    bins = ensure_binaries(("prometheus", "prometheus-adapter", "traefik", "helm"))
    workdir = cluster.workdir / "addons"
    workdir.mkdir(parents=True, exist_ok=True)
    for name in ("prometheus", "prometheus-adapter", "traefik-web", "traefik-api"):
        state.ports[name] = free_port()
    ports = state.ports

    # Namespace, identities and CRDs first: the processes read them at start.
    _apply(
        cluster,
        [
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ADDONS_NAMESPACE}},
            *build_rbac(),
        ],
    )
    install_gateway_api(cluster)
    install_istio_crds(cluster)

    prom_token = _token(cluster, "prometheus", workdir / "prometheus.token")
    prom_config = workdir / "prometheus.yml"
    prom_config.write_text(
        yaml.safe_dump(build_prometheus_config(state.server, pki.ca_cert, prom_token))
    )
    cluster._spawn(
        "prometheus",
        bins["prometheus"],
        prometheus_args(ports["prometheus"], prom_config, workdir / "prometheus-data"),
        state,
    )

    adapter_token = _token(cluster, "prometheus-adapter", workdir / "prometheus-adapter.token")
    adapter_kubeconfig = workdir / "prometheus-adapter.kubeconfig"
    adapter_kubeconfig.write_text(
        json.dumps(build_token_kubeconfig(state.server, pki.ca_cert, adapter_token))
    )
    prometheus_url = f"http://127.0.0.1:{ports['prometheus']}"
    # The adapter lists series from Prometheus as it starts.
    cluster._wait("prometheus", lambda: _http_ok(f"{prometheus_url}/-/ready"), deadline)

    rules = workdir / "adapter-rules.yaml"
    rules.write_text(render_adapter_rules())
    cert, key = write_serving_cert(
        pki,
        "prometheus-adapter",
        [f"{ADAPTER_SERVICE}.{ADDONS_NAMESPACE}.svc", "localhost"],
        ["127.0.0.1"],
    )
    cluster._spawn(
        "prometheus-adapter",
        bins["prometheus-adapter"],
        adapter_args(
            ports["prometheus-adapter"], adapter_kubeconfig, prometheus_url, rules, cert, key
        ),
        state,
    )

    traefik_token = _token(cluster, "traefik", workdir / "traefik.token")
    # Traefik prefers $KUBECONFIG over its endpoint and token flags: without
    # this, a KUBECONFIG in the environment (a test session's) picks its cluster.
    cluster._spawn(
        "traefik",
        Path("/usr/bin/env"),
        [
            "-u",
            "KUBECONFIG",
            str(bins["traefik"]),
            *traefik_args(ports, state.server, pki.ca_cert, traefik_token),
        ],
        state,
    )
    _apply(cluster, build_gateway(ports["traefik-web"]))
    _apply(
        cluster, build_adapter_registration(ports["prometheus-adapter"], pki.ca_cert.read_bytes())
    )

    cluster._wait(
        "traefik", lambda: _http_ok(f"http://127.0.0.1:{ports['traefik-api']}/ping"), deadline
    )
    cluster._wait("prometheus-adapter", lambda: _apiservice_available(cluster), deadline)
    cluster._wait("traefik", lambda: _gateway_programmed(cluster), deadline)
    log.info("add-ons up in %.1fs", time.monotonic() - started)
    return endpoints(state)


def _condition(obj: dict[str, Any], ctype: str) -> bool:
    return any(
        c.get("type") == ctype and c.get("status") == "True"
        for c in obj.get("status", {}).get("conditions") or []
    )


def _apiservice_available(cluster: LocalCluster) -> bool:
    for name in CUSTOM_METRICS_APISERVICES:
        proc = cluster.kubectl("get", "apiservice", name, "-o", "json", check=False)
        if proc.returncode != 0 or not _condition(json.loads(proc.stdout), "Available"):
            return False
    return True


def _gateway_programmed(cluster: LocalCluster) -> bool:
    proc = cluster.kubectl(
        "get", "gateway", GATEWAY_NAME, "-n", ADDONS_NAMESPACE, "-o", "json", check=False
    )
    return proc.returncode == 0 and _condition(json.loads(proc.stdout), "Programmed")


def binaries_present() -> bool:
    """Whether every add-on binary is found without building."""
    return all(find_binary(n) is not None for n in ADDON_COMPONENTS)
