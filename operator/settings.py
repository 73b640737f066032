"""The operator's settings, from its environment variables, in one place (pure).

``Settings.from_environ`` reads every ``AUTOGLM_OPERATOR_*`` variable once and
raises ``SettingsError`` naming the variable when a value is wrong, so a bad
deployment fails at start rather than somewhere in a handler.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

PREFIX = "AUTOGLM_OPERATOR_"


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the operator process; the env variable is ``AUTOGLM_OPERATOR_<NAME>``."""

    # Period of the resync timer. Reads come from the watch cache, so a tick of
    # an unchanged object sends no request; it only repairs what an event missed.
    resync_seconds: float = 60.0
    # Prometheus metrics port; 0 turns the endpoint off.
    metrics_port: int = 8080
    # "json" or "text".
    log_format: str = "json"
    # kopf peering object for leader election (``--standalone`` turns peering off).
    peering: str = "autoglm-operator"
    # This instance's peering priority; None: by start time (the newest leads).
    priority: int | None = None
    # Seconds a peer counts as alive after its last heartbeat: how long a
    # standby waits before it takes over from a leader that died without leaving.
    peering_lifetime: int = 60
    # Worker threads that run reconciles (the work queue's, workqueue.py): at most
    # this many objects reconcile at once, so at most this many of the operator's
    # requests are in flight (operator/README.md, "Concurrency and load").
    workers: int = 16
    # Client-side rate limit of the operator's own requests: sustained and burst.
    api_qps: float = 100.0
    api_burst: int = 200
    # glibc malloc arenas (mallopt M_ARENA_MAX); 0 leaves glibc's default (8 per
    # core). Each worker thread would otherwise get an arena of its own, and
    # memory freed in one is not reused by the others (peak RSS at scale).
    malloc_arenas: int = 2
    # Prometheus HTTP API base URL for canary analysis ("" : no analysis source).
    prometheus_url: str = ""
    # Timer period while a rollout is in flight (pause steps, analysis intervals,
    # readiness deadlines); an analysis is measured at its own interval.
    rollout_tick_seconds: float = 1.0

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            var = PREFIX + f.name.upper()
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(var, raw, f.name)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.resync_seconds <= 0:
            raise SettingsError(f"{PREFIX}RESYNC_SECONDS must be > 0, got {self.resync_seconds}")
        if not 0 <= self.metrics_port <= 65535:
            raise SettingsError(f"{PREFIX}METRICS_PORT must be 0-65535, got {self.metrics_port}")
        if self.log_format not in ("json", "text"):
            raise SettingsError(f"{PREFIX}LOG_FORMAT must be json or text, got {self.log_format!r}")
        if self.peering_lifetime < 2:
            raise SettingsError(
                f"{PREFIX}PEERING_LIFETIME must be >= 2, got {self.peering_lifetime}"
            )
        if self.workers < 1:
            raise SettingsError(f"{PREFIX}WORKERS must be >= 1, got {self.workers}")
        if self.prometheus_url and not self.prometheus_url.startswith(("http://", "https://")):
            raise SettingsError(
                f"{PREFIX}PROMETHEUS_URL must start with http:// or https://, "
                f"got {self.prometheus_url!r}"
            )
        if self.rollout_tick_seconds <= 0:
            raise SettingsError(
                f"{PREFIX}ROLLOUT_TICK_SECONDS must be > 0, got {self.rollout_tick_seconds}"
            )
        if self.malloc_arenas < 0:
            raise SettingsError(f"{PREFIX}MALLOC_ARENAS must be >= 0, got {self.malloc_arenas}")
        if self.api_burst < 1:
            raise SettingsError(f"{PREFIX}API_BURST must be >= 1, got {self.api_burst}")


_TYPES: dict[str, type] = {
    "resync_seconds": float,
    "metrics_port": int,
    "log_format": str,
    "peering": str,
    "priority": int,
    "peering_lifetime": int,
    "workers": int,
    "api_qps": float,
    "api_burst": int,
    "malloc_arenas": int,
    "prometheus_url": str,
    "rollout_tick_seconds": float,
}


def _parse(var: str, raw: str, name: str) -> Any:
    kind = _TYPES[name]
    try:
        return kind(raw.strip())
    except ValueError:
        raise SettingsError(f"{var} must be {kind.__name__}, got {raw!r}") from None
