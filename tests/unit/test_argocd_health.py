"""The Argo CD health check (Lua) maps conditions to Healthy/Progressing/Degraded.
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


def test_invalid_spec_message_reaches_argo() -> None:
    _, message = _health(
        _obj(1, 1, _c("Ready", "False", "InvalidSpec", "model.source: bad scheme"))
    )
    assert message == "model.source: bad scheme"


def test_argocd_cm_patch_embeds_the_same_script() -> None:
    patch = yaml.safe_load((ROOT / "manifests" / "argocd" / "argocd-cm-patch.yaml").read_text())
    embedded = patch["data"]["resource.customizations.health.serving.autoglm.io_AutoGLMDeployment"]
    assert embedded.strip() == LUA.strip(), "stale: run `make manifests`"
