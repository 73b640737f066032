"""The Argo CD health check (Lua) maps conditions and the canary phase to
Healthy/Progressing/Suspended/Degraded.
Run in a real Lua interpreter (lupa), the way Argo CD runs it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

lupa = pytest.importorskip("lupa")

ROOT = Path(__file__).resolve().parents[2]
LUA = (ROOT / "manifests" / "argocd" / "health.lua").read_text()


def _health(obj: dict[str, Any]) -> tuple[str, str]:
    rt = lupa.LuaRuntime(unpack_returned_tuples=True)

    def to_lua(value: Any) -> Any:
        if isinstance(value, dict):
            return rt.table_from({k: to_lua(v) for k, v in value.items()})
        if isinstance(value, list):
            return rt.table_from([to_lua(v) for v in value])
        return value

    rt.globals().obj = to_lua(obj)
    result = rt.execute(LUA)
    return str(result["status"]), str(result["message"])


def _obj(generation: int, observed: int | None, *conditions: dict[str, str]) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": list(conditions)}
    if observed is not None:
        status["observedGeneration"] = observed
    return {"metadata": {"generation": generation}, "status": status}


def _c(type_: str, status: str, reason: str = "R", message: str = "m") -> dict[str, str]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"metadata": {"generation": 1}}, "Progressing"),
        (_obj(2, 1, _c("Ready", "True")), "Progressing"),  # stale status
        (_obj(2, 2, _c("Ready", "True", "Available"), _c("Degraded", "False")), "Healthy"),
        (_obj(1, 1, _c("Ready", "False", "InvalidSpec", "model.source: bad")), "Degraded"),
        (_obj(1, 1, _c("Ready", "False", "Unschedulable")), "Degraded"),
        (_obj(1, 1, _c("Ready", "False", "MinimumReplicasUnavailable")), "Progressing"),
        (
            _obj(1, 1, _c("Ready", "True"), _c("Degraded", "True", "PodsFailing", "2 pods crash")),
            "Degraded",
        ),
    ],
)
def test_health_from_conditions(obj: dict[str, Any], expected: str) -> None:
    status, _ = _health(obj)
    assert status == expected


READY = _c("Ready", "True", "ReplicasReady", "2/2 replicas ready")
NOT_DEGRADED = _c("Degraded", "False", "AsExpected", "all is as expected")


def _canary(phase: str, reason: str = "R", *, ready: dict[str, str] = READY) -> dict[str, Any]:
    obj = _obj(3, 3, ready, NOT_DEGRADED)
    obj["status"]["canary"] = {
        "phase": phase,
        "reason": reason,
        "message": f"{phase} message",
        "weight": 20,
        "stableRevision": "aaaaaaaa",
        "canaryRevision": "bbbbbbbb",
    }
    return obj


def _stale_canary() -> dict[str, Any]:
    obj = _canary("Promoted")
    obj["metadata"]["generation"] = 4
    return obj


# Every phase of the rollout, and the states around it.
PHASES = [
    ("Progressing", "CanaryStarted", "Progressing"),
    ("Analyzing", "Analyzing", "Progressing"),
    ("Promoting", "Promoting", "Progressing"),
    ("Promoted", "Promoted", "Healthy"),
    ("Promoted", "RolledBackTo", "Healthy"),  # rollbackTo done: the asked revision serves
    ("Paused", "PauseStep", "Suspended"),
    ("Paused", "PausedBySpec", "Suspended"),
    ("Paused", "AnalysisFailedPaused", "Suspended"),
    ("Paused", "AwaitingPromotion", "Suspended"),
    ("RollingBack", "AnalysisFailed", "Degraded"),
    ("RolledBack", "AnalysisFailed", "Degraded"),
    ("RolledBack", "Aborted", "Degraded"),
    ("Failed", "CanaryNotReady", "Degraded"),
    ("RolledBack", "CanaryRemoved", "Healthy"),  # the spec dropped it: nothing failed
]


@pytest.mark.parametrize(("phase", "reason", "expected"), PHASES)
def test_health_of_every_canary_phase(phase: str, reason: str, expected: str) -> None:
    status, message = _health(_canary(phase, reason))
    assert status == expected
    if expected != "Healthy":
        assert f"{phase} message" in message


def test_a_stale_observed_generation_is_progressing_whatever_the_phase() -> None:
    assert _health(_stale_canary())[0] == "Progressing"


def test_scaled_to_zero_on_purpose_is_suspended() -> None:
    obj = _obj(1, 1, _c("Ready", "False", "ScaledToZero", "scaled to zero"), NOT_DEGRADED)
    assert _health(obj) == ("Suspended", "scaled to zero")


def test_a_failed_canary_wins_over_a_ready_stable() -> None:
    status, message = _health(_canary("Failed", "CanaryNotReady"))
    assert status == "Degraded" and message.startswith("Canary Failed")


def test_invalid_spec_message_reaches_argo() -> None:
    _, message = _health(
        _obj(1, 1, _c("Ready", "False", "InvalidSpec", "model.source: bad scheme"))
    )
    assert message == "model.source: bad scheme"


def test_argocd_cm_patch_embeds_the_same_script() -> None:
    patch = yaml.safe_load((ROOT / "manifests" / "argocd" / "argocd-cm-patch.yaml").read_text())
    embedded = patch["data"]["resource.customizations.health.serving.autoglm.io_AutoGLMDeployment"]
    assert embedded.strip() == LUA.strip(), "stale: run `make manifests`"
