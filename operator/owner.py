"""Who owns the children, and the names, labels and selectors that follow from it (pure).

Both ``builders.py`` (what to create) and ``status.py`` (what was observed)
need these; keeping them here lets the status code stand without the builders.
"""

from __future__ import annotations

from dataclasses import dataclass

APP_NAME = "autoglm"
COMPONENT = "server"
MANAGED_BY = "autoglm-operator"
ANNOTATION_PREFIX = "serving.autoglm.io"
REVISION_ANNOTATION = f"{ANNOTATION_PREFIX}/model-version"
# The rollout revision (a hash of model, image and server) on every pod and on
# the per-revision children; set in the pod template, so a pod keeps it for life.
REVISION_LABEL = f"{ANNOTATION_PREFIX}/revision"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
INSTANCE_LABEL = "app.kubernetes.io/instance"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
CONTAINER_NAME = "server"


@dataclass(frozen=True, slots=True)
class Owner:
    """Identity of the AutoGLMDeployment that owns the children."""

    name: str
    namespace: str
    uid: str


def build_selector_labels(owner: Owner) -> dict[str, str]:
    """The pod selector: stable for the life of the object (selectors are immutable)."""
    return {
        "app.kubernetes.io/component": COMPONENT,
        INSTANCE_LABEL: owner.name,
        "app.kubernetes.io/name": APP_NAME,
    }


def build_labels(owner: Owner) -> dict[str, str]:
    """The ``app.kubernetes.io/*`` labels on every child (and on the pods)."""
    return {
        **build_selector_labels(owner),
        MANAGED_BY_LABEL: MANAGED_BY,
        "app.kubernetes.io/part-of": APP_NAME,
    }


def build_selector_string(owner: Owner) -> str:
    """The selector as a string, for ``status.selector`` (the scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in sorted(build_selector_labels(owner).items()))


def headless_service_name(owner: Owner) -> str:
    return f"{owner.name}-headless"


def digests_configmap_name(owner: Owner, revision: str | None = None) -> str:
    """The digests ConfigMap of a revision (``<name>-model-digests`` before revisions)."""
    if revision is None:
        return f"{owner.name}-model-digests"
    return f"{owner.name}-{revision}-digests"


def revision_name(owner: Owner, revision: str) -> str:
    """The Deployment and Service of one revision: ``<name>-<revision>``."""
    return f"{owner.name}-{revision}"


def build_revision_selector(owner: Owner, revision: str) -> dict[str, str]:
    """The pods of one revision."""
    return {**build_selector_labels(owner), REVISION_LABEL: revision}
