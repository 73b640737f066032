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


class ServerSpec(_Model):
    """``spec.server``: the inference server container."""

    image: str = Field(default="ghcr.io/autoglm/autoglm-server:0.1.0", min_length=1, max_length=512)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    grpc_port: int = Field(default=8001, ge=1024, le=65535)
    http_port: int = Field(default=8000, ge=1024, le=65535)
    metrics_port: int = Field(default=8002, ge=1024, le=65535)
    shutdown_grace_seconds: int = Field(default=30, ge=0, le=3600)
    batching: BatchingSpec = Field(default_factory=BatchingSpec)

    @model_validator(mode="after")
    def _check(self) -> ServerSpec:
        if len({self.grpc_port, self.http_port, self.metrics_port}) != 3:
            raise ValueError(
                "server.grpcPort, server.httpPort and server.metricsPort must all differ"
            )
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


class AutoGLMDeploymentSpec(_Model):
    """``spec`` of an AutoGLMDeployment."""

    replicas: int = Field(default=1, ge=0, le=1000)
    model: ModelSpec
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    server: ServerSpec = Field(default_factory=ServerSpec)
    autoscaling: AutoscalingSpec | None = None


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
