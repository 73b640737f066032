"""The AutoGLMDeployment API as pydantic v2 models.

These mirror ``crds/serving.autoglm.io_autoglmdeployments.yaml`` (the API of
record) field by field, default by default; ``tests/unit/operator/test_operator_spec.py``
checks both directions. The API server has already applied the schema's
defaults and CEL rules, so parsing here is a second line of defence (against a
CRD older than the operator) and the typed entry point of the pure core.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "serving.autoglm.io"
VERSION = "v1alpha1"
KIND = "AutoGLMDeployment"
PLURAL = "autoglmdeployments"
API_VERSION = f"{GROUP}/{VERSION}"

QUANTITY_PATTERN = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE])?$"
Quantity = Annotated[str, Field(max_length=32, pattern=QUANTITY_PATTERN)]

_HF_SOURCE = re.compile(
    r"^hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*(@[-A-Za-z0-9_./]+)?$"
)
_PVC_SOURCE = re.compile(r"^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/[^/]+)*/?$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME_LENGTH = 54


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


# A Kubernetes object name (DNS-1123 subdomain) and a ConfigMap/Secret data key.
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=OBJECT_NAME_PATTERN)]
DATA_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
DataKey = Annotated[str, Field(min_length=1, max_length=253, pattern=DATA_KEY_PATTERN)]


class FileRef(_Model):
    """A file from a ConfigMap or a Secret (exactly one), mounted as a directory."""

    config_map: ObjectName | None = None
    secret: ObjectName | None = None
    key: DataKey

    @model_validator(mode="after")
    def _check(self) -> FileRef:
        if (self.config_map is None) == (self.secret is None):
            raise ValueError("a file reference needs exactly one of configMap or secret")
        return self


class SignatureSpec(_Model):
    """``spec.model.signature``: an OpenSSF model-signing signature checked before load."""

    public_key: FileRef
    bundle: FileRef | None = None
    bundle_path: str | None = Field(default=None, min_length=1, max_length=512)

    @model_validator(mode="after")
    def _check(self) -> SignatureSpec:
        if self.bundle is not None and self.bundle_path is not None:
            raise ValueError("model.signature takes bundle or bundlePath, not both")
        if self.bundle_path is not None and check_digest_key(self.bundle_path) is not None:
            raise ValueError(
                "model.signature.bundlePath must be a path relative to the model directory "
                "(not starting with '/', no '..')"
            )
        return self


class ModelSpec(_Model):
    """``spec.model``: which model to serve and how to load it."""

    source: str = Field(min_length=1, max_length=512)
    served_name: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_./]*$"
    )
    version: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[-A-Za-z0-9_./]+$"
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_model_len: int | None = Field(default=None, ge=2, le=4194304)
    trust_remote_code: bool = False
    sha256: dict[str, Annotated[str, Field(max_length=64, pattern=r"^[a-f0-9]{64}$")]] | None = (
        Field(default=None, max_length=256)
    )
    hf_cache_claim: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    )
    quantization: Literal["none", "fp8", "int8", "int4", "auto"] | None = None
    signature: SignatureSpec | None = None

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        s = self.source
        if not (s.startswith("hf://") or s.startswith("pvc://") or s.startswith("/")):
            raise ValueError(
                "model.source must start with hf://, pvc:// or / (an absolute path in the image); "
                "other schemes are not supported"
            )
        if s.startswith("hf://") and not _HF_SOURCE.match(s):
            raise ValueError(
                "model.source with hf:// must look like hf://org/name or hf://org/name@revision"
            )
        if s.startswith("pvc://") and not _PVC_SOURCE.match(s):
            raise ValueError(
                "model.source with pvc:// must look like pvc://claim-name/path/in/claim"
            )
        if self.hf_cache_claim is not None and not s.startswith("hf://"):
            raise ValueError("model.hfCacheClaim is only valid with an hf:// model.source")
        for key in self.sha256 or {}:
            problem = check_digest_key(key)
            if problem is not None:
                raise ValueError(problem)
        if (
            self.signature is not None
            and self.signature.bundle_path is not None
            and s.startswith("hf://")
        ):
            raise ValueError(
                "model.signature.bundlePath needs a pvc:// or image path model.source; "
                "with hf:// give model.signature.bundle (or leave both out: <model>/model.sig)"
            )
        return self


class Toleration(_Model):
    """One entry of ``spec.resources.tolerations``."""

    key: str | None = Field(default=None, max_length=253)
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("toleration value must be empty when operator is Exists")
        if self.key is None and self.operator != "Exists":
            raise ValueError("toleration key may be empty only when operator is Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds is only valid with effect NoExecute")
        return self


TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)


class ResourcesSpec(_Model):
    """``spec.resources``: what each server pod gets from its node."""

    gpus: int = Field(default=1, ge=1, le=64)
    gpu_product: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=16)
    cpu: Quantity = "4"
    memory: Quantity = "32Gi"
    shm_size: Quantity = "8Gi"

    @model_validator(mode="after")
    def _check(self) -> ResourcesSpec:
        if self.gpus not in TENSOR_PARALLEL_SIZES:
            raise ValueError(
                "resources.gpus must be 1, 2, 4 or 8 (more than one GPU means tensor "
                "parallelism over them, --tensor-parallel-size)"
            )
        return self


class BatchingSpec(_Model):
    """``spec.server.batching``: the continuous-batching policy."""

    max_batch_size: int = Field(default=64, ge=1, le=4096)
    max_batch_tokens: int = Field(default=8192, ge=1, le=1048576)
    max_queue_delay_ms: int = Field(default=0, ge=0, le=60000)
    max_queue_length: int = Field(default=1024, ge=1, le=1000000)
    priority_levels: int = Field(default=1, ge=1, le=16)

    @model_validator(mode="after")
    def _check(self) -> BatchingSpec:
        if self.max_batch_tokens < self.max_batch_size:
            raise ValueError("server.batching.maxBatchTokens must be >= maxBatchSize")
        return self


class AuthSpec(_Model):
    """``spec.server.auth``: API keys from a Secret (re-read when it rotates)."""

    api_keys_secret: ObjectName
    key: DataKey = "keys.json"
    metrics_auth: bool = False


class TLSSpec(_Model):
    """``spec.server.tls``: TLS (and mTLS) on the gRPC and HTTP ports."""

    secret_name: ObjectName
    client_ca_secret: ObjectName | None = Field(default=None, alias="clientCASecret")
    client_ca_key: DataKey = Field(default="ca.crt", alias="clientCAKey")


class ChatTemplateSpec(_Model):
    """``spec.server.chatTemplate``: a Jinja chat template from a ConfigMap."""

    config_map: ObjectName
    key: DataKey


class HTTPSpec(_Model):
    """``spec.server.http``: the HTTP front end's limits."""

    max_body_bytes: int | None = Field(default=None, ge=1024, le=1073741824)
    request_timeout_seconds: int | None = Field(default=None, ge=0, le=86400)


class CompileCacheVolume(_Model):
    """``spec.server.compile.cacheVolume``: a PVC (exactly one of claimName, emptyDir)."""

    claim_name: ObjectName | None = None
    empty_dir: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> CompileCacheVolume:
        if (self.claim_name is None) == (not self.empty_dir):
            raise ValueError(
                "server.compile.cacheVolume needs exactly one of claimName or emptyDir: true"
            )
        return self


class CompileSpec(_Model):
    """``spec.server.compile``: torch.compile and where its cache lives."""

    enabled: bool = True
    cache_volume: CompileCacheVolume | None = None


ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"


class KeyRef(_Model):
    """``valueFrom.secretKeyRef`` / ``configMapKeyRef``."""

    name: ObjectName
    key: DataKey
    optional: bool | None = None


class EnvVarSource(_Model):
    """``env[].valueFrom``: exactly one of secretKeyRef, configMapKeyRef."""

    secret_key_ref: KeyRef | None = None
    config_map_key_ref: KeyRef | None = None

    @model_validator(mode="after")
    def _check(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("env valueFrom needs exactly one of secretKeyRef or configMapKeyRef")
        return self


class EnvVar(_Model):
    """One entry of ``spec.server.env``."""

    name: str = Field(min_length=1, max_length=253, pattern=ENV_NAME_PATTERN)
    value: str | None = Field(default=None, max_length=32768)
    value_from: EnvVarSource | None = None

    @model_validator(mode="after")
    def _check(self) -> EnvVar:
        if self.name.startswith("AUTOGLM_"):
            raise ValueError(
                f"server.env {self.name}: AUTOGLM_* variables are set by the operator from "
                "the typed fields"
            )
        if self.value is not None and self.value_from is not None:
            raise ValueError(f"server.env {self.name}: value and valueFrom are exclusive")
        return self


class ObjectRef(_Model):
    """``envFrom[].secretRef`` / ``configMapRef``."""

    name: ObjectName
    optional: bool | None = None


class EnvFromSource(_Model):
    """One entry of ``spec.server.envFrom``: exactly one of secretRef, configMapRef."""

    prefix: str | None = Field(default=None, max_length=253, pattern=ENV_NAME_PATTERN)
    secret_ref: ObjectRef | None = None
    config_map_ref: ObjectRef | None = None

    @model_validator(mode="after")
    def _check(self) -> EnvFromSource:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("server.envFrom entries need exactly one of secretRef or configMapRef")
        return self


# Labels the operator sets on its pods: a pod label may not take these keys.
RESERVED_LABEL_PREFIXES = ("app.kubernetes.io/", "serving.autoglm.io/")
LabelKey = Annotated[str, Field(min_length=1, max_length=317)]


class PodSpec(_Model):
    """``spec.server.pod``: pod-level knobs that reach every server pod."""

    labels: dict[LabelKey, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=64
    )
    annotations: dict[LabelKey, Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None, max_length=64
    )
    service_account_name: ObjectName | None = None
    priority_class_name: ObjectName | None = None
    image_pull_secrets: list[ObjectName] | None = Field(default=None, max_length=16)
    affinity: dict[str, Any] | None = None
    topology_spread_constraints: list[dict[str, Any]] | None = Field(default=None, max_length=8)

    @model_validator(mode="after")
    def _check(self) -> PodSpec:
        for kind, keys in (("labels", self.labels), ("annotations", self.annotations)):
            for key in keys or {}:
                if key.startswith(RESERVED_LABEL_PREFIXES) or key.startswith("prometheus.io/"):
                    raise ValueError(
                        f"server.pod.{kind} may not set {key!r}: app.kubernetes.io/*, "
                        "serving.autoglm.io/* and prometheus.io/* are the operator's"
                    )
        return self


class ServerSpec(_Model):
    """``spec.server``: the inference server container."""

    image: str = Field(default="ghcr.io/autoglm/autoglm-server:0.1.0", min_length=1, max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    grpc_port: int = Field(default=8001, ge=1024, le=65535)
    http_port: int = Field(default=8000, ge=1024, le=65535)
    metrics_port: int = Field(default=8002, ge=1024, le=65535)
    shutdown_grace_seconds: int = Field(default=30, ge=0, le=3600)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    auth: AuthSpec | None = None
    tls: TLSSpec | None = None
    chat_template: ChatTemplateSpec | None = None
    tool_call_parser: Literal["glm4", "llama3_json"] | None = None
    http: HTTPSpec | None = None
    compile: CompileSpec | None = None
    env: list[EnvVar] | None = Field(default=None, max_length=64)
    env_from: list[EnvFromSource] | None = Field(default=None, max_length=16)
    pod: PodSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> ServerSpec:
        if len({self.grpc_port, self.http_port, self.metrics_port}) != 3:
            raise ValueError(
                "server.grpcPort, server.httpPort and server.metricsPort must all differ"
            )
        names = [e.name for e in self.env or []]
        if len(names) != len(set(names)):
            raise ValueError("server.env names must be unique")
        return self


TargetType = Literal["gpuUtilization", "requestsPerSecond", "queueDepth", "timeToFirstTokenP95"]


class AutoscalingTarget(_Model):
    """One entry of ``spec.autoscaling.targets``."""

    type: TargetType
    average_value: Quantity
    source: Literal["server", "dcgm"] | None = None

    @model_validator(mode="after")
    def _check(self) -> AutoscalingTarget:
        if self.source is not None and self.type != "gpuUtilization":
            raise ValueError("source is only valid for the gpuUtilization target")
        return self


class AutoscalingSpec(_Model):
    """``spec.autoscaling``: a HorizontalPodAutoscaler on the server's metrics."""

    min_replicas: int = Field(default=1, ge=1, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, le=3600)
    targets: list[AutoscalingTarget] = Field(default_factory=list, max_length=4)

    @model_validator(mode="after")
    def _check(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must be <= autoscaling.maxReplicas")
        if self.max_replicas > self.min_replicas and not self.targets:
            raise ValueError(
                "autoscaling.targets needs at least one target when maxReplicas > minReplicas"
            )
        types = [t.type for t in self.targets]
        if len(types) != len(set(types)):
            raise ValueError("autoscaling.targets may name each type at most once")
        return self


DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
Duration = Annotated[str, Field(max_length=32, pattern=DURATION_PATTERN)]
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
REVISION_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def parse_duration(text: str) -> float:
    """Seconds in a validated duration (``500ms``, ``30s``, ``5m``, ``1h30m``)."""
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


class PauseStep(_Model):
    """``steps[].pause``: hold the weight; without a duration, until resumed."""

    duration: Duration | None = None


class AnalysisStep(_Model):
    """``steps[].analysis``: judge canary against stable on Prometheus until a verdict."""

    interval: Duration = "10s"
    successful_intervals: int = Field(default=3, ge=1, le=100)
    failed_intervals: int = Field(default=2, ge=1, le=100)
    timeout: Duration = "5m"
    min_requests: int = Field(default=20, ge=0, le=1000000)
    window: Duration | None = None


class CanaryStep(_Model):
    """One entry of ``spec.canary.steps``: exactly one of setWeight, pause, analysis."""

    set_weight: int | None = Field(default=None, ge=0, le=100)
    pause: PauseStep | None = None
    analysis: AnalysisStep | None = None

    @model_validator(mode="after")
    def _check(self) -> CanaryStep:
        given = [x for x in (self.set_weight, self.pause, self.analysis) if x is not None]
        if len(given) != 1:
            raise ValueError("each canary step must have exactly one of setWeight, pause, analysis")
        return self


class MetricCheckSpec(_Model):
    """One entry of ``spec.canary.analysis.metrics``: a user PromQL query and its limits."""

    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    query: str = Field(min_length=1, max_length=4096)
    max: float | None = None
    min: float | None = None

    @model_validator(mode="after")
    def _check(self) -> MetricCheckSpec:
        if self.max is None and self.min is None:
            raise ValueError("canary.analysis.metrics needs max, min or both")
        return self


class CanaryAnalysisSpec(_Model):
    """``spec.canary.analysis``: the thresholds every analysis step applies."""

    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    max_ttft_p95_seconds: float = Field(default=1.0, ge=0, le=3600, alias="maxTTFTP95Seconds")
    max_tpot_p95_seconds: float = Field(default=1.0, ge=0, le=3600, alias="maxTPOTP95Seconds")
    max_ttft_ratio: float = Field(default=2.0, ge=0, le=1000, alias="maxTTFTRatio")
    max_tpot_ratio: float = Field(default=2.0, ge=0, le=1000, alias="maxTPOTRatio")
    latency_action: Literal["pause", "rollback"] = "pause"
    metrics: list[MetricCheckSpec] = Field(default_factory=list, max_length=8)

    @model_validator(mode="after")
    def _check(self) -> CanaryAnalysisSpec:
        names = [m.name for m in self.metrics]
        if len(names) != len(set(names)):
            raise ValueError("canary.analysis.metrics names must be unique")
        return self


class CanaryBatchingSpec(_Model):
    """``spec.canary.server.batching``: the batching fields the canary changes."""

    max_batch_size: int | None = Field(default=None, ge=1, le=4096)
    max_batch_tokens: int | None = Field(default=None, ge=1, le=1048576)
    max_queue_delay_ms: int | None = Field(default=None, ge=0, le=60000)
    max_queue_length: int | None = Field(default=None, ge=1, le=1000000)
    priority_levels: int | None = Field(default=None, ge=1, le=16)


class CanaryServerSpec(_Model):
    """``spec.canary.server``: server settings the canary changes (ports stay shared)."""

    batching: CanaryBatchingSpec | None = None
    shutdown_grace_seconds: int | None = Field(default=None, ge=0, le=3600)
    chat_template: ChatTemplateSpec | None = None
    tool_call_parser: Literal["glm4", "llama3_json"] | None = None
    http: HTTPSpec | None = None
    compile: CompileSpec | None = None


class CanarySpec(_Model):
    """``spec.canary``: a second revision and how traffic moves to it."""

    model: ModelSpec | None = None
    image: str | None = Field(default=None, min_length=1, max_length=512)
    server: CanaryServerSpec | None = None
    weight: int | None = Field(default=None, ge=0, le=100)
    steps: list[CanaryStep] | None = Field(default=None, min_length=1, max_length=32)
    analysis: CanaryAnalysisSpec = Field(default_factory=CanaryAnalysisSpec)
    auto_promote: bool = True
    auto_rollback: bool = True
    paused: bool = False
    strategy: Literal["surge", "replace"] = "surge"
    min_replicas: int | None = Field(default=None, ge=1, le=1000)
    max_replicas: int | None = Field(default=None, ge=1, le=1000)
    ready_timeout: Duration = "10m"

    @model_validator(mode="after")
    def _check(self) -> CanarySpec:
        if (self.weight is None) == (self.steps is None):
            raise ValueError("canary needs exactly one of weight or steps")
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.min_replicas > self.max_replicas
        ):
            raise ValueError("canary.minReplicas must be <= canary.maxReplicas")
        return self


class GatewayRef(_Model):
    """``spec.traffic.gateway``: the parent Gateway of the routes."""

    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(default=None, min_length=1, max_length=63)
    section_name: str | None = Field(default=None, min_length=1, max_length=253)


class TrafficSpec(_Model):
    """``spec.traffic``: how requests are split between revisions."""

    provider: Literal["gatewayAPI", "istio", "replicas"] = "replicas"
    gateway: GatewayRef | None = None
    hostnames: list[Annotated[str, Field(max_length=253)]] = Field(
        default_factory=list, max_length=16
    )

    @model_validator(mode="after")
    def _check(self) -> TrafficSpec:
        if self.provider == "gatewayAPI" and self.gateway is None:
            raise ValueError("traffic.gateway is required with provider gatewayAPI")
        return self


class RolloutSpec(_Model):
    """``spec.rollout``: revision history and instant rollback."""

    revision_history_limit: int = Field(default=3, ge=1, le=10)
    instant_rollback_window: Duration = "10m"


NamespaceName = Annotated[
    str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
]


class NetworkPolicySpec(_Model):
    """``spec.networkPolicy``: ingress to the server pods only from where it is expected."""

    enabled: bool = True
    allow_same_namespace: bool = True
    from_namespaces: list[NamespaceName] = Field(default_factory=list, max_length=16)
    from_prometheus_namespaces: list[NamespaceName] = Field(default_factory=list, max_length=8)


class AutoGLMDeploymentSpec(_Model):
    """``spec`` of an AutoGLMDeployment."""

    replicas: int = Field(default=1, ge=0, le=1000)
    model: ModelSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    server: ServerSpec = Field(default_factory=ServerSpec)
    autoscaling: AutoscalingSpec | None = None
    canary: CanarySpec | None = None
    traffic: TrafficSpec | None = None
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    network_policy: NetworkPolicySpec = Field(default_factory=NetworkPolicySpec)
    rollback_to: str | None = Field(
        default=None, min_length=1, max_length=63, pattern=REVISION_NAME_PATTERN
    )

    @model_validator(mode="after")
    def _check_canary(self) -> AutoGLMDeploymentSpec:
        canary = self.canary
        if canary is not None and canary.server is not None and canary.server.batching is not None:
            merged = {
                **self.server.batching.model_dump(),
                **canary.server.batching.model_dump(exclude_none=True),
            }
            if merged["max_batch_tokens"] < merged["max_batch_size"]:
                raise ValueError(
                    "canary.server.batching: maxBatchTokens must be >= maxBatchSize "
                    "(together with spec.server.batching)"
                )
        return self


# ---- status -----------------------------------------------------------------


class Condition(_Model):
    """One entry of ``status.conditions`` (the shape of metav1.Condition)."""

    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    observed_generation: int | None = Field(default=None, ge=0)
    last_transition_time: str
    reason: str = Field(max_length=1024)
    message: str = Field(max_length=32768)


class Endpoints(_Model):
    """``status.endpoints``: how clients reach the model."""

    grpc: str | None = None
    grpc_headless: str | None = None
    http: str | None = None


CanaryPhase = Literal[
    "Progressing",
    "Paused",
    "Analyzing",
    "Promoting",
    "Promoted",
    "RollingBack",
    "RolledBack",
    "Failed",
]


class LastAnalysis(_Model):
    """``status.canary.lastAnalysis``: the latest analysis interval and the step's counts."""

    time: str | None = None
    verdict: Literal["Pass", "Fail", "Inconclusive"] | None = None
    good_intervals: int | None = None
    bad_intervals: int | None = None
    values: dict[str, float] | None = None
    step: int | None = None
    step_verdict: Literal["Running", "Pass", "Fail"] | None = None
    started_at: float | None = None
    reason: str | None = None
    action: Literal["pause", "rollback"] | None = None


class RevisionReplicas(_Model):
    """``status.canary.replicas.<revision>``."""

    replicas: int | None = None
    ready_replicas: int | None = None


class CanaryStatus(_Model):
    """``status.canary``: where the rollout between two revisions stands."""

    phase: CanaryPhase | None = None
    stable_revision: str | None = None
    canary_revision: str | None = None
    step: int | None = None
    weight: int | None = None
    message: str | None = None
    reason: str | None = None
    last_analysis: LastAnalysis | None = None
    replicas: dict[str, RevisionReplicas] | None = None
    started_at: str | None = None
    step_started_at: str | None = None
    promoted_at: str | None = None
    rollback_started_at: str | None = None
    weight_zero_at: str | None = None
    action: str | None = None


class RevisionStatus(_Model):
    """One entry of ``status.revisions``: a revision that served, newest first."""

    name: str
    image: str | None = None
    model: dict[str, Any] | None = None
    server: dict[str, Any] | None = None
    promoted_at: str | None = None
    warm_until: str | None = None


class AutoGLMDeploymentStatus(_Model):
    """``status`` of an AutoGLMDeployment, written by the operator only."""

    observed_generation: int | None = None
    conditions: list[Condition] | None = Field(default=None, max_length=8)
    replicas: int | None = None
    ready_replicas: int | None = None
    updated_replicas: int | None = None
    selector: str | None = None
    model_revision: str | None = None
    endpoints: Endpoints | None = None
    canary: CanaryStatus | None = None
    revisions: list[RevisionStatus] | None = Field(default=None, max_length=10)


# ---- parsing helpers (pure) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelSource:
    """``spec.model.source`` taken apart."""

    scheme: Literal["hf", "pvc", "path"]
    repo: str | None = None  # hf: org/name
    revision: str | None = None  # hf: the part after @
    claim: str | None = None  # pvc: claim name
    path: str = ""  # pvc: path inside the claim; path: the absolute path


def parse_source(source: str) -> ModelSource:
    """Split a validated ``model.source`` into its parts."""
    if source.startswith("hf://"):
        rest = source.removeprefix("hf://")
        repo, _, revision = rest.partition("@")
        return ModelSource(scheme="hf", repo=repo, revision=revision or None)
    if source.startswith("pvc://"):
        claim, _, path = source.removeprefix("pvc://").partition("/")
        return ModelSource(scheme="pvc", claim=claim, path=path.strip("/"))
    return ModelSource(scheme="path", path=source)


def compute_model_version(model: ModelSpec) -> str:
    """The revision label the server reports (AUTOGLM_MODEL_VERSION)."""
    if model.version is not None:
        return model.version
    src = parse_source(model.source)
    if src.scheme == "hf":
        return src.revision or "main"
    return "local"


def parse_spec(raw: Any) -> AutoGLMDeploymentSpec:
    """Validate a ``spec`` mapping; raises pydantic.ValidationError."""
    return AutoGLMDeploymentSpec.model_validate(raw)


def compute_canary_spec(spec: AutoGLMDeploymentSpec) -> AutoGLMDeploymentSpec:
    """The spec the canary revision runs: ``spec`` with ``spec.canary``'s overrides.

    ``canary.model`` replaces the model (signature and quantization included),
    ``canary.image`` the image, and ``canary.server`` changes the batching fields,
    drain time, chat template, tool-call parser, HTTP limits and compile settings
    it names (each of the last four whole). Auth, TLS, env and the pod knobs stay
    those of ``spec.server``: both revisions answer the same clients.
    Raises pydantic.ValidationError when the result is inconsistent.
    """
    canary = spec.canary
    if canary is None:
        return spec
    server = spec.server.model_dump(by_alias=False)
    if canary.image is not None:
        server["image"] = canary.image
    if canary.server is not None:
        if canary.server.shutdown_grace_seconds is not None:
            server["shutdown_grace_seconds"] = canary.server.shutdown_grace_seconds
        if canary.server.batching is not None:
            server["batching"].update(canary.server.batching.model_dump(exclude_none=True))
        for field in ("chat_template", "tool_call_parser", "http", "compile"):
            value = getattr(canary.server, field)
            if value is not None:
                server[field] = value.model_dump() if isinstance(value, BaseModel) else value
    return spec.model_copy(
        update={
            "model": canary.model if canary.model is not None else spec.model,
            "server": ServerSpec.model_validate(server),
        }
    )


def compute_revision_spec(
    spec: AutoGLMDeploymentSpec, model: Any, server: Any
) -> AutoGLMDeploymentSpec:
    """``spec`` serving a recorded revision (``status.revisions[]``: its model and server)."""
    return spec.model_copy(
        update={
            "model": ModelSpec.model_validate(model),
            "server": ServerSpec.model_validate(server),
        }
    )


MAX_DIGEST_KEY_LENGTH = 512


def check_digest_key(key: str) -> str | None:
    """Why a ``model.sha256`` key is not a file path inside the model, or None (the CRD's CEL rule)."""
    if not key or len(key) > MAX_DIGEST_KEY_LENGTH or key.startswith("/") or ".." in key.split("/"):
        return (
            f"model.sha256 key {key!r} must be a file path relative to the model directory: "
            f"non-empty, at most {MAX_DIGEST_KEY_LENGTH} characters, not starting with '/', "
            "with no '..' component"
        )
    return None


def check_name(name: str) -> str | None:
    """Why ``metadata.name`` can't name the children, or None when it can."""
    if len(name) > MAX_NAME_LENGTH or not _NAME.match(name):
        return (
            f"metadata.name must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters "
            "(the headless Service adds '-headless')"
        )
    return None
