"""The thin kopf layer: what can be checked without a cluster."""

from __future__ import annotations

from autoglm_operator.handlers import _controller_owner, compute_priority


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
