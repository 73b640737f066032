"""Desired child manifests, built from the spec: pure and deterministic.

Every ``build_*`` function takes the parsed spec and the owner's identity and
returns plain dicts ready for server-side apply. They read no clock, no API and
no randomness, so building twice gives equal output (tested), and a spec change
is the only thing that changes a manifest.

The manifests are written in the form the API server stores (quantities as
given, explicit ``protocol: TCP``), so comparing them with the live objects'
owned fields finds no difference when nothing changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from .canary import VersionPlan, compute_full_scale, compute_revision
from .owner import (
    ANNOTATION_PREFIX,
    CONTAINER_NAME,
    GPU_PRODUCT_LABEL,
    GPU_RESOURCE,
    REVISION_ANNOTATION,
    REVISION_LABEL,
    Owner,
    build_labels,
    build_revision_selector,
    build_selector_labels,
    digests_configmap_name,
    headless_service_name,
    revision_name,
)
from .spec import (
    API_VERSION,
    KIND,
    AutoGLMDeploymentSpec,
    AutoscalingTarget,
    FileRef,
    compute_model_version,
    parse_source,
)
from .traffic import TRAFFIC_KINDS, build_traffic, compute_provider

Manifest = dict[str, Any]

CHECKSUM_ANNOTATION = f"{ANNOTATION_PREFIX}/config-checksum"
RUN_AS_USER = 10001
HF_HOME = "/var/cache/huggingface"
MODELS_MOUNT = "/models"
DIGESTS_MOUNT = "/etc/autoglm/digests"
DIGESTS_FILE = "sha256.json"
# Secrets and ConfigMaps are mounted as whole directories (never subPath), so an
# update of the object reaches the running pod (the kubelet swaps the files).
API_KEYS_MOUNT = "/etc/autoglm/api-keys"
TLS_MOUNT = "/etc/autoglm/tls"
CLIENT_CA_MOUNT = "/etc/autoglm/client-ca"
CHAT_TEMPLATE_MOUNT = "/etc/autoglm/chat-template"
SIGNING_KEY_MOUNT = "/etc/autoglm/signing-key"
SIGNATURE_MOUNT = "/etc/autoglm/model-signature"
COMPILE_CACHE_MOUNT = "/var/cache/autoglm/compile"
# With more than one GPU the server runs one process per GPU, talking over NCCL.
NCCL_ENV: tuple[tuple[str, str], ...] = (
    ("NCCL_DEBUG", "WARN"),
    ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    ("NCCL_ASYNC_ERROR_HANDLING", "1"),
)
TERMINATION_GRACE_EXTRA_SECONDS = 15
# Before SIGTERM the pod waits this long, so that its removal from the
# EndpointSlices reaches the Gateway and the clients that balance over the
# headless Service: no new request is sent to a server that is draining.
PRESTOP_SLEEP_SECONDS = 5

# autoscaling target type -> the Pods metric name the HPA reads (docs/architecture.md)
TARGET_METRICS: dict[str, str] = {
    "gpuUtilization": "autoglm_gpu_utilization_percent",
    "requestsPerSecond": "autoglm_requests_per_second",
    "queueDepth": "autoglm_queue_depth",
    "timeToFirstTokenP95": "autoglm_time_to_first_token_p95_seconds",
}
DCGM_GPU_UTIL_METRIC = "DCGM_FI_DEV_GPU_UTIL"


# ---- names, labels, references (names and labels live in owner.py) ---------


def build_owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_metadata(
    owner: Owner,
    name: str,
    annotations: dict[str, str] | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    labels = build_labels(owner)
    if revision is not None:
        labels[REVISION_LABEL] = revision
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels,
        "ownerReferences": [build_owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def build_scrape_annotations(spec: AutoGLMDeploymentSpec) -> dict[str, str]:
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(spec.server.metrics_port),
        "prometheus.io/path": "/metrics",
    }


# ---- config checksum ---------------------------------------------------------


# Fields added after the checksum was first computed, left out while unset.
_NEW_MODEL_FIELDS = frozenset({"quantization", "signature"})
_NEW_SERVER_FIELDS = frozenset(
    {"auth", "tls", "chatTemplate", "toolCallParser", "http", "compile", "env", "envFrom", "pod"}
)


def _drop_unset(data: dict[str, Any], fields: frozenset[str]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if not (k in fields and v is None)}


def compute_config_checksum(spec: AutoGLMDeploymentSpec) -> str:
    """SHA-256 of the model and server config: a change rolls the pods.

    Optional fields left unset are left out, so that adding a field to the API
    does not change the checksum (and roll every pod) of specs that don't use it."""
    payload = {
        "model": _drop_unset(spec.model.model_dump(mode="json", by_alias=True), _NEW_MODEL_FIELDS),
        "server": _drop_unset(
            spec.server.model_dump(mode="json", by_alias=True), _NEW_SERVER_FIELDS
        ),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def build_digests_json(spec: AutoGLMDeploymentSpec) -> str:
    return (
        json.dumps(dict(sorted((spec.model.sha256 or {}).items())), indent=2, sort_keys=True) + "\n"
    )


# ---- the Deployment ------------------------------------------------------------


def _bool(value: bool) -> str:
    return "true" if value else "false"


def build_model_path(spec: AutoGLMDeploymentSpec) -> str:
    """Where the server finds the model (AUTOGLM_MODEL)."""
    source = parse_source(spec.model.source)
    if source.scheme == "pvc":
        return f"{MODELS_MOUNT}/{source.path}" if source.path else MODELS_MOUNT
    return spec.model.source  # hf://... (resolved by the server) or an absolute path


def build_feature_env(spec: AutoGLMDeploymentSpec) -> list[tuple[str, str]]:
    """The environment of the optional server features (auth, TLS, signing, ...)."""
    model, server = spec.model, spec.server
    env: list[tuple[str, str]] = []
    if model.quantization is not None:
        env.append(("AUTOGLM_QUANTIZATION", model.quantization))
    if model.signature is not None:
        sig = model.signature
        env.append(
            ("AUTOGLM_MODEL_SIGNING_PUBLIC_KEY", f"{SIGNING_KEY_MOUNT}/{sig.public_key.key}")
        )
        if sig.bundle is not None:
            env.append(("AUTOGLM_MODEL_SIGNATURE", f"{SIGNATURE_MOUNT}/{sig.bundle.key}"))
        elif sig.bundle_path is not None:
            path = f"{build_model_path(spec).rstrip('/')}/{sig.bundle_path}"
            env.append(("AUTOGLM_MODEL_SIGNATURE", path))
    gpus = spec.resources.gpus
    if gpus > 1:
        env.append(("AUTOGLM_TENSOR_PARALLEL_SIZE", str(gpus)))
    if server.auth is not None:
        env.append(("AUTOGLM_API_KEYS_FILE", f"{API_KEYS_MOUNT}/{server.auth.key}"))
        env.append(("AUTOGLM_METRICS_AUTH", _bool(server.auth.metrics_auth)))
    if server.tls is not None:
        tls = server.tls
        env.append(("AUTOGLM_TLS_CERT_FILE", f"{TLS_MOUNT}/tls.crt"))
        env.append(("AUTOGLM_TLS_KEY_FILE", f"{TLS_MOUNT}/tls.key"))
        if tls.client_ca_secret is not None:
            ca_dir = TLS_MOUNT if tls.client_ca_secret == tls.secret_name else CLIENT_CA_MOUNT
            env.append(("AUTOGLM_TLS_CLIENT_CA_FILE", f"{ca_dir}/{tls.client_ca_key}"))
    if server.chat_template is not None:
        env.append(("AUTOGLM_CHAT_TEMPLATE", f"{CHAT_TEMPLATE_MOUNT}/{server.chat_template.key}"))
    if server.tool_call_parser is not None:
        env.append(("AUTOGLM_TOOL_CALL_PARSER", server.tool_call_parser))
    if server.http is not None:
        if server.http.max_body_bytes is not None:
            env.append(("AUTOGLM_HTTP_MAX_BODY_BYTES", str(server.http.max_body_bytes)))
        if server.http.request_timeout_seconds is not None:
            env.append(
                ("AUTOGLM_HTTP_REQUEST_TIMEOUT_SECONDS", str(server.http.request_timeout_seconds))
            )
    if server.compile is not None:
        env.append(("AUTOGLM_COMPILE", _bool(server.compile.enabled)))
        if server.compile.cache_volume is not None:
            env.append(("AUTOGLM_COMPILE_CACHE_DIR", COMPILE_CACHE_MOUNT))
    return env


def build_env(spec: AutoGLMDeploymentSpec, owner: Owner) -> list[Manifest]:
    """The server's environment: the contract in docs/architecture.md.

    The operator's AUTOGLM_* variables, then its defaults (HF_*, NCCL_*), which a
    ``spec.server.env`` entry of the same name replaces, then the user's own."""
    model, server, batching = spec.model, spec.server, spec.server.batching
    source = parse_source(model.source)
    model_path = build_model_path(spec)
    env: list[tuple[str, str]] = [
        ("AUTOGLM_MODEL", model_path),
        ("AUTOGLM_SERVED_MODEL_NAME", model.served_name or owner.name),
        ("AUTOGLM_MODEL_VERSION", compute_model_version(model)),
        ("AUTOGLM_DTYPE", model.dtype),
        ("AUTOGLM_DEVICE", "cuda"),
        ("AUTOGLM_TRUST_REMOTE_CODE", "true" if model.trust_remote_code else "false"),
        ("AUTOGLM_HOST", "0.0.0.0"),
        ("AUTOGLM_GRPC_PORT", str(server.grpc_port)),
        ("AUTOGLM_HTTP_PORT", str(server.http_port)),
        ("AUTOGLM_METRICS_PORT", str(server.metrics_port)),
        ("AUTOGLM_MAX_BATCH_SIZE", str(batching.max_batch_size)),
        ("AUTOGLM_MAX_BATCH_TOKENS", str(batching.max_batch_tokens)),
        ("AUTOGLM_MAX_QUEUE_DELAY_MS", str(batching.max_queue_delay_ms)),
        ("AUTOGLM_MAX_QUEUE_LENGTH", str(batching.max_queue_length)),
        ("AUTOGLM_PRIORITY_LEVELS", str(batching.priority_levels)),
        ("AUTOGLM_SHUTDOWN_GRACE_SECONDS", str(server.shutdown_grace_seconds)),
    ]
    if model.max_model_len is not None:
        env.append(("AUTOGLM_MAX_MODEL_LEN", str(model.max_model_len)))
    if model.sha256:
        env.append(("AUTOGLM_SHA256_FILE", f"{DIGESTS_MOUNT}/{DIGESTS_FILE}"))
    env += build_feature_env(spec)
    defaults: list[tuple[str, str]] = []
    if source.scheme == "hf":
        defaults.append(("HF_HOME", HF_HOME))
        if model.hf_cache_claim is not None:
            # A pre-populated cache: resolve offline. Without one the server
            # downloads into the (empty, writable) HF_HOME at start.
            defaults.append(("HF_HUB_OFFLINE", "1"))
    if spec.resources.gpus > 1:
        defaults += NCCL_ENV
    user = [e.model_dump(mode="json", by_alias=True, exclude_none=True) for e in server.env or []]
    mine = {e["name"] for e in user}
    out: list[Manifest] = [{"name": k, "value": v} for k, v in env]
    out += [{"name": k, "value": v} for k, v in defaults if k not in mine]
    return out + user


def _file_volume(name: str, ref: FileRef) -> Manifest:
    if ref.secret is not None:
        return {"name": name, "secret": {"secretName": ref.secret}}
    return {"name": name, "configMap": {"name": ref.config_map}}


def build_feature_volumes(spec: AutoGLMDeploymentSpec) -> tuple[list[Manifest], list[Manifest]]:
    """(volumes, volumeMounts) of the optional features: whole Secrets and
    ConfigMaps as read-only directories (rotation reaches the pod), the compile cache."""
    server, sig = spec.server, spec.model.signature
    volumes: list[Manifest] = []
    mounts: list[Manifest] = []

    def add(volume: Manifest, path: str, read_only: bool = True) -> None:
        volumes.append(volume)
        mount: Manifest = {"name": volume["name"], "mountPath": path}
        if read_only:
            mount["readOnly"] = True
        mounts.append(mount)

    if server.auth is not None:
        add(
            {"name": "api-keys", "secret": {"secretName": server.auth.api_keys_secret}},
            API_KEYS_MOUNT,
        )
    if server.tls is not None:
        tls = server.tls
        add({"name": "tls", "secret": {"secretName": tls.secret_name}}, TLS_MOUNT)
        if tls.client_ca_secret is not None and tls.client_ca_secret != tls.secret_name:
            add(
                {"name": "client-ca", "secret": {"secretName": tls.client_ca_secret}},
                CLIENT_CA_MOUNT,
            )
    if server.chat_template is not None:
        add(
            {"name": "chat-template", "configMap": {"name": server.chat_template.config_map}},
            CHAT_TEMPLATE_MOUNT,
        )
    if sig is not None:
        add(_file_volume("signing-key", sig.public_key), SIGNING_KEY_MOUNT)
        if sig.bundle is not None:
            add(_file_volume("model-signature", sig.bundle), SIGNATURE_MOUNT)
    cache = server.compile.cache_volume if server.compile is not None else None
    if cache is not None:
        if cache.claim_name is not None:
            volume: Manifest = {
                "name": "compile-cache",
                "persistentVolumeClaim": {"claimName": cache.claim_name},
            }
        else:
            volume = {"name": "compile-cache", "emptyDir": {}}
        add(volume, COMPILE_CACHE_MOUNT, read_only=False)
    return volumes, mounts


def build_volumes(
    spec: AutoGLMDeploymentSpec, owner: Owner, revision: str | None = None
) -> tuple[list[Manifest], list[Manifest]]:
    """(volumes, volumeMounts): /dev/shm, /tmp, the model and the digests."""
    source = parse_source(spec.model.source)
    volumes: list[Manifest] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[Manifest] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if source.scheme == "hf":
        claim = spec.model.hf_cache_claim
        if claim is not None:
            volumes.append(
                {
                    "name": "hf-cache",
                    "persistentVolumeClaim": {"claimName": claim, "readOnly": True},
                }
            )
            mounts.append({"name": "hf-cache", "mountPath": HF_HOME, "readOnly": True})
        else:
            volumes.append({"name": "hf-cache", "emptyDir": {}})
            mounts.append({"name": "hf-cache", "mountPath": HF_HOME})
    elif source.scheme == "pvc":
        assert source.claim is not None
        volumes.append(
            {
                "name": "model",
                "persistentVolumeClaim": {"claimName": source.claim, "readOnly": True},
            }
        )
        mounts.append({"name": "model", "mountPath": MODELS_MOUNT, "readOnly": True})
    if spec.model.sha256:
        volumes.append(
            {
                "name": "model-digests",
                "configMap": {"name": digests_configmap_name(owner, revision)},
            }
        )
        mounts.append({"name": "model-digests", "mountPath": DIGESTS_MOUNT, "readOnly": True})
    more_volumes, more_mounts = build_feature_volumes(spec)
    return volumes + more_volumes, mounts + more_mounts


def build_tolerations(spec: AutoGLMDeploymentSpec) -> list[Manifest]:
    tolerations: list[Manifest] = [
        {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
    ]
    for t in spec.resources.tolerations:
        tolerations.append(t.model_dump(mode="json", by_alias=True, exclude_none=True))
    return tolerations


def build_probes(spec: AutoGLMDeploymentSpec) -> dict[str, Manifest]:
    """Native gRPC probes against grpc.health.v1 on the gRPC port; with TLS (which
    the kubelet's gRPC probe can't speak) HTTP GETs of /readyz and /healthz on
    the metrics port, which stays plain HTTP."""
    if spec.server.tls is not None:
        metrics = spec.server.metrics_port

        def get(path: str) -> Manifest:
            return {"path": path, "port": metrics, "scheme": "HTTP"}

        return {
            # /readyz answers 503 until the model is loaded and warm, as the
            # gRPC overall status answers NOT_SERVING.
            "startupProbe": {
                "httpGet": get("/readyz"),
                "periodSeconds": 10,
                "failureThreshold": 180,
            },
            "livenessProbe": {
                "httpGet": get("/healthz"),
                "periodSeconds": 10,
                "timeoutSeconds": 5,
                "failureThreshold": 6,
            },
            "readinessProbe": {
                "httpGet": get("/readyz"),
                "periodSeconds": 5,
                "timeoutSeconds": 5,
                "failureThreshold": 3,
            },
        }
    port = spec.server.grpc_port
    return {
        # Loading and warming a large model takes minutes: up to 30 min here.
        "startupProbe": {"grpc": {"port": port}, "periodSeconds": 10, "failureThreshold": 180},
        "livenessProbe": {
            "grpc": {"port": port},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "readinessProbe": {
            "grpc": {"port": port, "service": "autoglm.v1.AutoGLM"},
            "periodSeconds": 5,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
    }


def build_pod_knobs(spec: AutoGLMDeploymentSpec, owner: Owner) -> Manifest:
    """``spec.server.pod``'s pod-level fields, in Pod spec form."""
    knobs = spec.server.pod
    if knobs is None:
        return {}
    out: Manifest = {}
    if knobs.service_account_name is not None:
        out["serviceAccountName"] = knobs.service_account_name
    if knobs.priority_class_name is not None:
        out["priorityClassName"] = knobs.priority_class_name
    if knobs.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": n} for n in knobs.image_pull_secrets]
    if knobs.affinity is not None:
        out["affinity"] = knobs.affinity
    if knobs.topology_spread_constraints:
        out["topologySpreadConstraints"] = [
            c
            if "labelSelector" in c
            else {**c, "labelSelector": {"matchLabels": build_selector_labels(owner)}}
            for c in knobs.topology_spread_constraints
        ]
    return out


def compute_fixed_replicas(spec: AutoGLMDeploymentSpec) -> int | None:
    """Replicas the Deployment is given, or None when an HPA owns the field."""
    if spec.autoscaling is None:
        return spec.replicas
    if spec.autoscaling.targets:
        return None
    return spec.autoscaling.min_replicas  # min == max, nothing to scale on


def compute_min_replicas(spec: AutoGLMDeploymentSpec) -> int:
    """The fewest replicas the spec asks for (decides the PodDisruptionBudget)."""
    return spec.autoscaling.min_replicas if spec.autoscaling is not None else spec.replicas


_FROM_SPEC = -1


def build_deployment(
    spec: AutoGLMDeploymentSpec,
    owner: Owner,
    revision: str | None = None,
    replicas: int | None = _FROM_SPEC,
) -> Manifest:
    """The Deployment of one revision, ``<name>-<revision>``.

    ``revision`` defaults to the spec's own; ``replicas`` to what the spec asks
    for (None: an HPA owns the count, so the field is left out).
    """
    revision = revision or compute_revision(spec)
    server, res = spec.server, spec.resources
    volumes, mounts = build_volumes(spec, owner, revision)
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": server.image,
        "imagePullPolicy": server.image_pull_policy,
        "ports": [
            {"name": "grpc", "containerPort": server.grpc_port, "protocol": "TCP"},
            {"name": "http", "containerPort": server.http_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": server.metrics_port, "protocol": "TCP"},
        ],
        "env": build_env(spec, owner),
        **(
            {
                "envFrom": [
                    e.model_dump(mode="json", by_alias=True, exclude_none=True)
                    for e in server.env_from
                ]
            }
            if server.env_from
            else {}
        ),
        "resources": {
            "requests": {"cpu": res.cpu, "memory": res.memory, GPU_RESOURCE: str(res.gpus)},
            "limits": {"memory": res.memory, GPU_RESOURCE: str(res.gpus)},
        },
        "volumeMounts": mounts,
        **build_probes(spec),
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_SLEEP_SECONDS}}},
        # A server that exits before it can write /dev/termination-log (a bad
        # model, a digest mismatch) still explains itself in the pod's status.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: Manifest = {
        "containers": [container],
        "volumes": volumes,
        "tolerations": build_tolerations(spec),
        "terminationGracePeriodSeconds": PRESTOP_SLEEP_SECONDS
        + server.shutdown_grace_seconds
        + TERMINATION_GRACE_EXTRA_SECONDS,
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if res.gpu_product is not None:
        pod_spec["nodeSelector"] = {GPU_PRODUCT_LABEL: res.gpu_product}
    pod_spec.update(build_pod_knobs(spec, owner))
    knobs = server.pod
    # The operator's own keys last: a pod label never replaces a selector label
    # (the schema refuses them too).
    template_annotations = {
        **((knobs.annotations or {}) if knobs is not None else {}),
        CHECKSUM_ANNOTATION: compute_config_checksum(spec),
        REVISION_ANNOTATION: compute_model_version(spec.model),
        **build_scrape_annotations(spec),
    }
    pod_labels = {
        **((knobs.labels or {}) if knobs is not None else {}),
        **build_labels(owner),
        REVISION_LABEL: revision,
    }
    deployment_spec: Manifest = {
        "selector": {"matchLabels": build_revision_selector(owner, revision)},
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        },
        "revisionHistoryLimit": 3,
        # Model loading is slow: give a rollout half an hour before it counts as stuck.
        "progressDeadlineSeconds": 1800,
        "template": {
            "metadata": {"labels": pod_labels, "annotations": template_annotations},
            "spec": pod_spec,
        },
    }
    if replicas == _FROM_SPEC:
        replicas = compute_fixed_replicas(spec)
    if replicas is not None:
        deployment_spec = {"replicas": replicas, **deployment_spec}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": build_metadata(owner, revision_name(owner, revision), revision=revision),
        "spec": deployment_spec,
    }


# ---- Services ------------------------------------------------------------------


def build_service_ports(spec: AutoGLMDeploymentSpec, *, with_metrics: bool) -> list[Manifest]:
    server = spec.server
    ports: list[Manifest] = [
        {
            "name": "grpc",
            "port": server.grpc_port,
            "targetPort": "grpc",
            "protocol": "TCP",
            # gRPC is cleartext HTTP/2: the standard name (KEP-3726) that Gateway
            # API implementations (GEP-1911) read to speak h2c to the backend.
            # Traefik refuses a GRPCRoute backend whose port says "grpc".
            "appProtocol": "kubernetes.io/h2c",
        },
        {
            "name": "http",
            "port": server.http_port,
            "targetPort": "http",
            "protocol": "TCP",
            "appProtocol": "http",
        },
    ]
    if with_metrics:
        ports.append(
            {
                "name": "metrics",
                "port": server.metrics_port,
                "targetPort": "metrics",
                "protocol": "TCP",
                "appProtocol": "http",
            }
        )
    return ports


def build_service(spec: AutoGLMDeploymentSpec, owner: Owner) -> Manifest:
    """The model's gRPC/HTTP/metrics Service, with Prometheus scrape annotations."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": build_metadata(owner, owner.name, build_scrape_annotations(spec)),
        "spec": {
            "type": "ClusterIP",
            "selector": build_selector_labels(owner),
            "ports": build_service_ports(spec, with_metrics=True),
        },
    }


def build_revision_service(spec: AutoGLMDeploymentSpec, owner: Owner, revision: str) -> Manifest:
    """One revision's ClusterIP Service, ``<name>-<revision>``: the routes' backendRefs."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": build_metadata(owner, revision_name(owner, revision), revision=revision),
        "spec": {
            "type": "ClusterIP",
            "selector": build_revision_selector(owner, revision),
            "ports": build_service_ports(spec, with_metrics=False),
        },
    }


def build_headless_service(spec: AutoGLMDeploymentSpec, owner: Owner) -> Manifest:
    """A headless Service: DNS returns every ready pod, so gRPC clients can use round_robin."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": build_metadata(owner, headless_service_name(owner)),
        "spec": {
            "clusterIP": "None",
            "selector": build_selector_labels(owner),
            "ports": build_service_ports(spec, with_metrics=False),
        },
    }


# ---- autoscaling and disruption ------------------------------------------------


def build_hpa_metric(target: AutoscalingTarget) -> Manifest:
    name = TARGET_METRICS[target.type]
    if target.type == "gpuUtilization" and target.source == "dcgm":
        name = DCGM_GPU_UTIL_METRIC
    return {
        "type": "Pods",
        "pods": {
            "metric": {"name": name},
            "target": {"type": "AverageValue", "averageValue": target.average_value},
        },
    }


def build_hpa(
    spec: AutoGLMDeploymentSpec,
    owner: Owner,
    revision: str | None = None,
    bounds: tuple[int, int] | None = None,
    *,
    stable: bool = True,
) -> Manifest | None:
    """An autoscaling/v2 HPA on the server's Pods metrics for one revision's Deployment,
    or None without targets. The stable revision's is named ``<name>``, a canary's
    ``<name>-<revision>``; ``bounds`` (min, max) default to the spec's."""
    auto = spec.autoscaling
    if auto is None or not auto.targets:
        return None
    revision = revision or compute_revision(spec)
    low, high = bounds or (auto.min_replicas, auto.max_replicas)
    name = owner.name if stable else revision_name(owner, revision)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": build_metadata(owner, name, revision=None if stable else revision),
        "spec": {
            "scaleTargetRef": {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "name": revision_name(owner, revision),
            },
            "minReplicas": low,
            "maxReplicas": high,
            "metrics": [build_hpa_metric(t) for t in auto.targets],
            "behavior": {
                "scaleDown": {"stabilizationWindowSeconds": auto.scale_down_stabilization_seconds}
            },
        },
    }


def build_pdb(spec: AutoGLMDeploymentSpec, owner: Owner) -> Manifest | None:
    """A PodDisruptionBudget (one pod down at a time) when more than one replica is asked for."""
    if compute_min_replicas(spec) <= 1:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": build_metadata(owner, owner.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": build_selector_labels(owner)}},
    }


def build_digests_configmap(
    spec: AutoGLMDeploymentSpec, owner: Owner, revision: str | None = None
) -> Manifest | None:
    """The expected SHA-256 digests as the JSON file the server reads, or None without digests."""
    if not spec.model.sha256:
        return None
    revision = revision or compute_revision(spec)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": build_metadata(
            owner, digests_configmap_name(owner, revision), revision=revision
        ),
        "data": {DIGESTS_FILE: build_digests_json(spec)},
    }


# ---- network policy ---------------------------------------------------------------

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def _from_namespaces(names: Iterable[str]) -> list[Manifest]:
    return [
        {"namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: n}}}
        for n in sorted(set(names))
    ]


def build_network_policy(spec: AutoGLMDeploymentSpec, owner: Owner) -> Manifest | None:
    """A NetworkPolicy ``<name>`` over every revision's pods: the gRPC and HTTP ports
    from this namespace (unless turned off), the listed namespaces and the Gateway's;
    the metrics port from the Prometheus namespaces. None when disabled.

    Kubelet probes come from the node and are not subject to NetworkPolicy; with
    TLS they use the metrics port, which stays reachable from the node."""
    policy = spec.network_policy
    if not policy.enabled:
        return None
    server = spec.server
    serving_from: list[Manifest] = []
    if policy.allow_same_namespace:
        serving_from.append({"podSelector": {}})
    clients = list(policy.from_namespaces)
    if spec.traffic is not None and spec.traffic.gateway is not None:
        clients.append(spec.traffic.gateway.namespace or owner.namespace)
    serving_from += _from_namespaces(n for n in clients if n != owner.namespace)
    ingress: list[Manifest] = []
    if serving_from:
        ingress.append(
            {
                "from": serving_from,
                "ports": [
                    {"port": server.grpc_port, "protocol": "TCP"},
                    {"port": server.http_port, "protocol": "TCP"},
                ],
            }
        )
    if policy.from_prometheus_namespaces:
        ingress.append(
            {
                "from": _from_namespaces(policy.from_prometheus_namespaces),
                "ports": [{"port": server.metrics_port, "protocol": "TCP"}],
            }
        )
    policy_spec: Manifest = {
        "podSelector": {"matchLabels": build_selector_labels(owner)},
        "policyTypes": ["Ingress"],
    }
    if ingress:  # none: deny all ingress (the API server drops an empty list)
        policy_spec["ingress"] = ingress
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": build_metadata(owner, owner.name),
        "spec": policy_spec,
    }


# ---- everything ------------------------------------------------------------------

# Every child kind the operator owns -> its apiVersion. Children of these kinds
# that the desired set leaves out are deleted (plan_deletions).
CHILD_KINDS: dict[str, str] = {
    "ConfigMap": "v1",
    "Deployment": "apps/v1",
    "Service": "v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    **TRAFFIC_KINDS,
}


def build_single_plan(spec: AutoGLMDeploymentSpec) -> list[VersionPlan]:
    """The spec's own revision alone, at the size the spec asks for (no rollout)."""
    full = compute_full_scale(spec)
    return [
        VersionPlan(
            compute_revision(spec), spec, "stable", 100, full.fixed, full.hpa, hpa_is_stable=True
        )
    ]


def build_version_children(
    owner: Owner, version: VersionPlan, *, revision_service: bool = True
) -> list[Manifest]:
    """One revision's ConfigMap, Deployment, HPA and, with ``revision_service``, its
    Service (only the Gateway API routes' backendRefs point at one)."""
    spec, rev = version.spec, version.revision
    hpa = (
        build_hpa(spec, owner, rev, version.hpa, stable=version.hpa_is_stable)
        if version.hpa is not None
        else None
    )
    children = [
        build_digests_configmap(spec, owner, rev),
        build_deployment(spec, owner, rev, version.replicas),
        build_revision_service(spec, owner, rev) if revision_service else None,
        hpa,
    ]
    return [c for c in children if c is not None]


def build_children(
    spec: AutoGLMDeploymentSpec, owner: Owner, versions: list[VersionPlan] | None = None
) -> list[Manifest]:
    """All desired children in apply order: the routes first (a rollback's weight 0
    goes out before anything scales), then per revision the ConfigMap before the
    pods that mount it, then the Services over all revisions and the PDB.

    ``versions`` is the step machine's plan (the stable first); None: the spec's
    own revision alone."""
    versions = versions if versions is not None else build_single_plan(spec)
    stable = versions[0].spec
    children: list[Manifest] = list(build_traffic(spec, owner, versions))
    # A revision's own Service is a backendRef of the Gateway API routes and nothing
    # else (Istio's subsets and the replicas provider use the shared Services). Each
    # ClusterIP costs the apiserver an allocation, the slowest step of a burst of new
    # objects (bench/README.md, operator scale), so the other providers get none.
    revision_service = compute_provider(spec) == "gatewayAPI"
    for version in versions:
        children += build_version_children(owner, version, revision_service=revision_service)
    tail = [
        build_service(stable, owner),
        build_headless_service(stable, owner),
        build_pdb(spec, owner),
        build_network_policy(spec, owner),
    ]
    return children + [c for c in tail if c is not None]


def plan_deletions(
    children: list[Manifest],
    owner: Owner,
    live: Mapping[str, Iterable[str]],
    keep: Iterable[tuple[str, str]] = (),
) -> list[tuple[str, str, str]]:
    """Owned children that ``children`` (``build_children``'s output) leaves out:
    (apiVersion, kind, name) to delete. ``live`` maps each kind to the names of the
    owner's live children of that kind; (kind, name) pairs in ``keep`` stay."""
    wanted = {(c["kind"], c["metadata"]["name"]) for c in children}
    kept = set(keep)
    out: list[tuple[str, str, str]] = []
    for kind, api_version in CHILD_KINDS.items():
        for name in sorted(live.get(kind, ())):
            if (kind, name) not in wanted and (kind, name) not in kept:
                out.append((api_version, kind, name))
    return out
