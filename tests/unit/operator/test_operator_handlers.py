"""The thin kopf layer: what can be checked without a cluster."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace
from typing import Any

import kopf
import pytest

from autoglm_operator.handlers import (
    _controller_owner,
    compute_priority,
    on_change,
    on_timer,
    run_reconcile,
)
from autoglm_operator.k8s import KubeApi, KubeError


def test_priority_is_configured_or_newest_first() -> None:
    assert compute_priority("7", started_ms=5, jitter=1) == 7
    older = compute_priority(None, started_ms=1_000, jitter=999)
    newer = compute_priority(None, started_ms=1_001, jitter=0)
    assert newer > older
    assert compute_priority(None, started_ms=1_000, jitter=1) != compute_priority(
        None, started_ms=1_000, jitter=2
    )


def test_child_events_find_the_controlling_owner() -> None:
    child = {
        "metadata": {
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Other", "name": "x", "controller": False},
                {
                    "apiVersion": "serving.autoglm.io/v1alpha1",
                    "kind": "AutoGLMDeployment",
                    "name": "glm",
                    "controller": True,
                },
            ]
        }
    }
    assert _controller_owner(child) == "glm"
    assert _controller_owner({"metadata": {}}) is None


# ---- run_reconcile and the kopf handlers against a fake API (no cluster) --------

AGD_PATH = "/apis/serving.autoglm.io/v1alpha1/namespaces/ns/autoglmdeployments/glm"


class FakeKube(KubeApi):
    """KubeApi with the transport replaced: objects by path, requests recorded."""

    def __init__(self, objects: dict[str, dict[str, Any]], fail: KubeError | None = None) -> None:
        super().__init__(api_client=None)
        self.objects = objects
        self.fail = fail
        self.requests: list[tuple[str, str, Any]] = []

    def _request(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        self.requests.append((method, path, body))
        if self.fail is not None:
            raise self.fail
        if method == "GET":
            if path not in self.objects:
                raise KubeError(404, "NotFound", path)
            return copy.deepcopy(self.objects[path])
        return {}

    def status_patches(self) -> list[dict[str, Any]]:
        return [b["status"] for m, p, b in self.requests if m == "PATCH" and p.endswith("/status")]

    def events(self) -> list[dict[str, Any]]:
        return [b for m, p, b in self.requests if m == "POST" and p.endswith("/events")]


def agd_body(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "serving.autoglm.io/v1alpha1",
        "kind": "AutoGLMDeployment",
        "metadata": {"name": "glm", "namespace": "ns", "uid": "u1", "generation": 2},
        "spec": spec,
    }


LOG = logging.getLogger("test-handlers")


@pytest.mark.parametrize(("status", "delay"), [(0, 5), (429, 5), (503, 15), (403, 15)])
def test_api_trouble_is_a_temporary_error(status: int, delay: float) -> None:
    api = FakeKube({}, fail=KubeError(status, "Trouble", "the API server is unhappy"))
    with pytest.raises(kopf.TemporaryError) as info:
        run_reconcile(api, "ns", "glm", LOG)
    assert info.value.delay == delay
    assert isinstance(info.value.__cause__, KubeError)


def test_unexpected_error_is_a_temporary_error_too() -> None:
    api = FakeKube({AGD_PATH: {"metadata": {}}})  # no name: reconcile trips over it
    with pytest.raises(kopf.TemporaryError):
        run_reconcile(api, "ns", "glm", LOG)


def test_invalid_spec_writes_ready_false_and_is_a_permanent_error_on_change() -> None:
    # A spec the API server let through (a CRD older than the operator) that pydantic rejects.
    api = FakeKube({AGD_PATH: agd_body({"model": {"source": "s3://bucket/glm"}})})
    with pytest.raises(kopf.PermanentError) as info:
        on_change(namespace="ns", name="glm", memo=SimpleNamespace(api=api), logger=LOG)
    assert "spec.model" in str(info.value)
    (patch,) = api.status_patches()
    ready = next(c for c in patch["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["observedGeneration"] == 2
    assert "hf://, pvc:// or /" in ready["message"]
    assert [(e["type"], e["reason"]) for e in api.events()] == [("Warning", "InvalidSpec")]
    # No child was applied for a spec that can never work.
    assert not [r for r in api.requests if r[0] == "PATCH" and not r[1].endswith("/status")]


def test_invalid_spec_on_the_timer_is_no_error_so_drift_repair_goes_on() -> None:
    api = FakeKube({AGD_PATH: agd_body({"model": {"source": "s3://bucket/glm"}})})
    on_timer(namespace="ns", name="glm", memo=SimpleNamespace(api=api), logger=LOG)
    assert len(api.status_patches()) == 1


def test_gone_object_is_no_error() -> None:
    api = FakeKube({})
    outcome = run_reconcile(api, "ns", "glm", LOG)
    assert outcome.found is False
    assert [m for m, _, _ in api.requests] == ["GET"]
