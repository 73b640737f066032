"""Canary analysis: PromQL for one interval, a verdict per interval, a verdict per step.

```
AnalysisSpec (spec.canary.analysis + the step's analysis block)
  --build_queries (pure)--> PromQL per measured value (canary and stable, by pod regex)
  --measure (I/O: Prometheus HTTP API)--> Sample (None where there is no data; error when unreachable)
  --evaluate (pure)--> IntervalResult: Pass | Fail(reason, action) | Inconclusive(reason)
  --fold (pure)--> AnalysisState: Running | Pass | Fail(action) | timed out (Fail, rollback)
```

What is measured, per version (series picked by ``namespace`` and
``pod=~"<name>-<revision>-.*"``, so any Prometheus with the standard ``pod``
label works):

- **error rate**: server-side failures over all finished requests of the canary
  in the window. Server-side means the gRPC codes in :data:`SERVER_ERROR_CODES`;
  the server counts every HTTP 5xx under one of them (500 INTERNAL, 503
  UNAVAILABLE, 504 DEADLINE_EXCEEDED), and client errors (INVALID_ARGUMENT,
  NOT_FOUND, RESOURCE_EXHAUSTED, CANCELLED: 4xx) are not failures. A breach
  rolls back.
- **TTFT p95 and TPOT p95** of the canary, from the histograms, as absolute
  limits and as ratios to the stable side's p95 over the same window. A breach
  takes ``latencyAction`` (pause by default).
- **user metrics**: any PromQL returning one number, with ``{{namespace}}``,
  ``{{pods}}`` (the canary's pod regex) and ``{{stablePods}}`` filled in, checked
  against ``max`` and/or ``min``. A breach rolls back.

Defaults follow the issue: roll back when server errors exceed 5 %, pause when
a p95 latency exceeds 1 s (or is twice the stable side's).

Folding: a step passes after ``successfulIntervals`` consecutive good intervals
(a bad one resets the run) and fails after ``failedIntervals`` bad intervals in
all (so a flapping canary fails too). An inconclusive interval (fewer than
``minRequests`` canary requests in the window, no data, or Prometheus
unreachable) changes neither count: the step holds, and once ``timeout`` has
passed since its first interval without a verdict it fails with the last
inconclusive reason and action rollback (the canary could not be shown good).
The worst action of the bad intervals wins: rollback over pause.

Everything here is pure except :class:`PrometheusClient` and :func:`measure`.
"""

from __future__ import annotations

import asyncio
import enum
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

# gRPC codes that count as the server's fault. HTTP 5xx are counted by the
# server under these names (server/errors.py: 500 INTERNAL, 503 UNAVAILABLE,
# 504 DEADLINE_EXCEEDED); 4xx codes (INVALID_ARGUMENT, NOT_FOUND,
# RESOURCE_EXHAUSTED, CANCELLED, ...) are the client's.
SERVER_ERROR_CODES = (
    "INTERNAL",
    "UNAVAILABLE",
    "UNKNOWN",
    "DATA_LOSS",
    "DEADLINE_EXCEEDED",
    "UNIMPLEMENTED",
)

REQUESTS_METRIC = "autoglm_requests_total"
TTFT_METRIC = "autoglm_time_to_first_token_seconds"
TPOT_METRIC = "autoglm_time_per_output_token_seconds"

# Keys of the values reported in status.canary.lastAnalysis.values.
ERROR_RATE = "errorRate"
REQUESTS = "requests"
TTFT_P95 = "ttftP95"
TPOT_P95 = "tpotP95"
TTFT_RATIO = "ttftRatio"
TPOT_RATIO = "tpotRatio"
STABLE_TTFT_P95 = "stableTtftP95"
STABLE_TPOT_P95 = "stableTpotP95"

# Query names (keys of build_queries' result); user metrics are "metric:<name>".
Q_CANARY_REQUESTS = "canary_requests"
Q_CANARY_ERRORS = "canary_errors"
Q_CANARY_TTFT = "canary_ttft_p95"
Q_CANARY_TPOT = "canary_tpot_p95"
Q_STABLE_TTFT = "stable_ttft_p95"
Q_STABLE_TPOT = "stable_tpot_p95"
USER_PREFIX = "metric:"

# The shortest query window: a rate needs two scrapes in it.
MIN_WINDOW_S = 10.0


class Verdict(enum.StrEnum):
    PASS = "Pass"
    FAIL = "Fail"
    INCONCLUSIVE = "Inconclusive"


class Action(enum.StrEnum):
    """What a failed analysis asks the step machine to do."""

    ROLLBACK = "rollback"
    PAUSE = "pause"


class StepVerdict(enum.StrEnum):
    RUNNING = "Running"
    PASS = "Pass"
    FAIL = "Fail"


class AnalysisSpecError(ValueError):
    """A threshold or duration that can't be used (the CRD's schema should have refused it)."""


# ---- spec ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricCheck:
    """A user's PromQL, one number, checked against ``max`` and/or ``min``."""

    name: str
    query: str
    max: float | None = None
    min: float | None = None


@dataclass(frozen=True, slots=True)
class AnalysisSpec:
    """Thresholds (spec.canary.analysis) and timing (the step's analysis block)."""

    interval_s: float = 10.0
    successful_intervals: int = 3
    failed_intervals: int = 2
    timeout_s: float = 300.0
    min_requests: int = 20
    max_error_rate: float = 0.05
    max_ttft_p95_s: float | None = 1.0
    max_tpot_p95_s: float | None = 1.0
    max_ttft_ratio: float | None = 2.0
    max_tpot_ratio: float | None = 2.0
    latency_action: Action = Action.PAUSE
    metrics: tuple[MetricCheck, ...] = ()
    # The PromQL range of each interval's queries; None: the interval, at least MIN_WINDOW_S.
    window_s: float | None = None

    @property
    def window(self) -> str:
        """The range selector of the queries, e.g. ``"10s"``."""
        seconds = self.window_s if self.window_s is not None else self.interval_s
        return f"{max(math.ceil(seconds), int(MIN_WINDOW_S))}s"

    @classmethod
    def from_spec(cls, analysis: Any = None, step: Any = None) -> AnalysisSpec:
        """From ``spec.canary.analysis`` and a step's ``analysis`` block: mappings
        with the CRD's camelCase keys (or pydantic models, dumped by alias).
        Absent keys take the defaults above."""
        a = _as_mapping(analysis)
        s = _as_mapping(step)
        d = cls()
        metrics = tuple(
            MetricCheck(
                name=str(m["name"]),
                query=str(m["query"]),
                max=_opt_float(m.get("max")),
                min=_opt_float(m.get("min")),
            )
            for m in (_as_mapping(x) for x in a.get("metrics") or ())
        )
        action = str(a.get("latencyAction") or d.latency_action.value)
        try:
            latency_action = Action(action)
        except ValueError:
            raise AnalysisSpecError(
                f"latencyAction must be pause or rollback, got {action!r}"
            ) from None
        spec = cls(
            interval_s=_duration(s.get("interval"), d.interval_s, "interval"),
            successful_intervals=int(s.get("successfulIntervals", d.successful_intervals)),
            failed_intervals=int(s.get("failedIntervals", d.failed_intervals)),
            timeout_s=_duration(s.get("timeout"), d.timeout_s, "timeout"),
            min_requests=int(s.get("minRequests", d.min_requests)),
            max_error_rate=float(a.get("maxErrorRate", d.max_error_rate)),
            max_ttft_p95_s=_opt_float(a.get("maxTTFTP95Seconds", d.max_ttft_p95_s)),
            max_tpot_p95_s=_opt_float(a.get("maxTPOTP95Seconds", d.max_tpot_p95_s)),
            max_ttft_ratio=_opt_float(a.get("maxTTFTRatio", d.max_ttft_ratio)),
            max_tpot_ratio=_opt_float(a.get("maxTPOTRatio", d.max_tpot_ratio)),
            latency_action=latency_action,
            metrics=metrics,
            window_s=(_duration(s["window"], d.interval_s, "window") if s.get("window") else None),
        )
        spec.check()
        return spec

    def check(self) -> None:
        if self.interval_s <= 0:
            raise AnalysisSpecError(f"interval must be > 0, got {self.interval_s}s")
        if self.successful_intervals < 1 or self.failed_intervals < 1:
            raise AnalysisSpecError("successfulIntervals and failedIntervals must be >= 1")
        if self.timeout_s <= 0:
            raise AnalysisSpecError(f"timeout must be > 0, got {self.timeout_s}s")
        if self.min_requests < 0:
            raise AnalysisSpecError(f"minRequests must be >= 0, got {self.min_requests}")
        if not 0 <= self.max_error_rate <= 1:
            raise AnalysisSpecError(f"maxErrorRate must be 0-1, got {self.max_error_rate}")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise AnalysisSpecError(f"metrics names must be unique, got {names}")
        for m in self.metrics:
            if m.max is None and m.min is None:
                raise AnalysisSpecError(f"metrics[{m.name}]: give max, min or both")


def _as_mapping(value: Any) -> Mapping[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return value
    dump = getattr(value, "model_dump", None)
    if dump is not None:
        dumped: Mapping[str, Any] = dump(by_alias=True, exclude_none=True)
        return dumped
    raise TypeError(f"expected a mapping, got {type(value).__name__}")


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration: ``500ms``, ``30s``, ``5m``, ``1h30m``; a bare number is seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise AnalysisSpecError(f"not a duration: {text!r} (e.g. 30s, 5m, 1h30m)")
    return total


def _duration(value: Any, default: float, name: str) -> float:
    if value is None:
        return default
    if isinstance(value, int | float):
        return float(value)
    try:
        return parse_duration(str(value))
    except AnalysisSpecError as exc:
        raise AnalysisSpecError(f"{name}: {exc}") from None


# ---- queries (pure) ------------------------------------------------------------------------


def pods_regex(deployment: str) -> str:
    """The RE2 regex of the pods of Deployment ``deployment`` (``<name>-<revision>``).

    A Deployment's pods are ``<deployment>-<template hash>-<suffix>``. Names are
    DNS labels, so only ``.`` needs escaping (as ``[.]``: no backslashes to
    escape again inside a PromQL string).
    """
    return deployment.replace(".", "[.]") + "-[a-z0-9]+-[a-z0-9]+"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _selector(namespace: str, pods: str, extra: str = "") -> str:
    return f"{{namespace={_quote(namespace)},pod=~{_quote(pods)}{extra}}}"


def _p95(metric: str, selector: str, window: str) -> str:
    return f"histogram_quantile(0.95, sum by (le) (rate({metric}_bucket{selector}[{window}])))"


def render_user_query(query: str, namespace: str, canary_pods: str, stable_pods: str) -> str:
    """A user's PromQL with ``{{namespace}}``, ``{{pods}}`` and ``{{stablePods}}`` filled in."""
    return (
        query.replace("{{namespace}}", namespace)
        .replace("{{pods}}", canary_pods)
        .replace("{{stablePods}}", stable_pods)
    )


def build_queries(
    spec: AnalysisSpec, namespace: str, stable_pods: str, canary_pods: str, window: str
) -> dict[str, str]:
    """The PromQL of one interval, by name. ``*_pods`` are RE2 regexes of pod names
    (:func:`pods_regex`); ``window`` a range such as ``"10s"`` (``spec.window``)."""
    canary = _selector(namespace, canary_pods)
    stable = _selector(namespace, stable_pods)
    codes = "|".join(SERVER_ERROR_CODES)
    errors = _selector(namespace, canary_pods, f",code=~{_quote(codes)}")
    queries = {
        Q_CANARY_REQUESTS: f"sum(increase({REQUESTS_METRIC}{canary}[{window}]))",
        # No failure yet means no series: count it as 0.
        Q_CANARY_ERRORS: f"sum(increase({REQUESTS_METRIC}{errors}[{window}])) or vector(0)",
        Q_CANARY_TTFT: _p95(TTFT_METRIC, canary, window),
        Q_CANARY_TPOT: _p95(TPOT_METRIC, canary, window),
        Q_STABLE_TTFT: _p95(TTFT_METRIC, stable, window),
        Q_STABLE_TPOT: _p95(TPOT_METRIC, stable, window),
    }
    for m in spec.metrics:
        queries[USER_PREFIX + m.name] = render_user_query(
            m.query, namespace, canary_pods, stable_pods
        )
    return queries


# ---- evaluation (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One interval's measured values. None: no data (no series, or NaN)."""

    at: float  # when it was measured, seconds since the epoch
    canary_requests: float | None = None  # finished requests of the canary in the window
    canary_errors: float | None = None  # of them, server-side failures
    canary_ttft_p95: float | None = None
    canary_tpot_p95: float | None = None
    stable_ttft_p95: float | None = None
    stable_tpot_p95: float | None = None
    user: tuple[tuple[str, float | None], ...] = ()  # (metric name, value)
    error: str | None = None  # why nothing could be measured (Prometheus unreachable, ...)

    @classmethod
    def from_results(cls, at: float, results: Mapping[str, float | None]) -> Sample:
        """From :func:`build_queries`' names mapped to the values Prometheus returned."""
        user = tuple(
            (k[len(USER_PREFIX) :], v) for k, v in results.items() if k.startswith(USER_PREFIX)
        )
        return cls(
            at=at,
            canary_requests=results.get(Q_CANARY_REQUESTS),
            canary_errors=results.get(Q_CANARY_ERRORS),
            canary_ttft_p95=results.get(Q_CANARY_TTFT),
            canary_tpot_p95=results.get(Q_CANARY_TPOT),
            stable_ttft_p95=results.get(Q_STABLE_TTFT),
            stable_tpot_p95=results.get(Q_STABLE_TPOT),
            user=user,
        )

    @property
    def error_rate(self) -> float | None:
        if not self.canary_requests:
            return None
        # Each increase() extrapolates on its own: keep the ratio within 0..1.
        return min(1.0, max(0.0, (self.canary_errors or 0.0) / self.canary_requests))

    @property
    def ttft_ratio(self) -> float | None:
        return _ratio(self.canary_ttft_p95, self.stable_ttft_p95)

    @property
    def tpot_ratio(self) -> float | None:
        return _ratio(self.canary_tpot_p95, self.stable_tpot_p95)

    def values(self) -> dict[str, float]:
        """The measured values for status (``lastAnalysis.values``); absent ones left out."""
        out: dict[str, float | None] = {
            REQUESTS: self.canary_requests,
            ERROR_RATE: self.error_rate,
            TTFT_P95: self.canary_ttft_p95,
            TPOT_P95: self.canary_tpot_p95,
            TTFT_RATIO: self.ttft_ratio,
            TPOT_RATIO: self.tpot_ratio,
            STABLE_TTFT_P95: self.stable_ttft_p95,
            STABLE_TPOT_P95: self.stable_tpot_p95,
            **dict(self.user),
        }
        return {k: _round(v) for k, v in out.items() if v is not None and math.isfinite(v)}


def _ratio(canary: float | None, stable: float | None) -> float | None:
    if canary is None or stable is None or stable <= 0:
        return None
    return canary / stable


def _round(value: float) -> float:
    return float(f"{value:.6g}")


@dataclass(frozen=True, slots=True)
class IntervalResult:
    """One interval's verdict. ``action`` is set on Fail only."""

    verdict: Verdict
    reason: str
    at: float
    action: Action | None = None
    values: Mapping[str, float] = field(default_factory=dict)


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def evaluate(spec: AnalysisSpec, sample: Sample) -> IntervalResult:
    """Judge one interval: Fail with every breach named, else Pass, unless there
    is too little to judge (Inconclusive, with the reason)."""
    values = sample.values()
    if sample.error is not None:
        return IntervalResult(
            Verdict.INCONCLUSIVE, f"no measurement: {sample.error}", sample.at, values=values
        )
    requests = sample.canary_requests or 0.0
    if sample.canary_requests is None or requests < max(spec.min_requests, 1):
        return IntervalResult(
            Verdict.INCONCLUSIVE,
            f"too little traffic: {requests:.0f} canary requests in {spec.window} "
            f"(minRequests {spec.min_requests})",
            sample.at,
            values=values,
        )
    breaches: list[tuple[str, Action]] = []
    rate = sample.error_rate or 0.0
    if rate > spec.max_error_rate:
        breaches.append(
            (
                f"server error rate {rate:.1%} > {spec.max_error_rate:.1%} "
                f"({sample.canary_errors or 0:.0f} of {requests:.0f} requests)",
                Action.ROLLBACK,
            )
        )
    latency = spec.latency_action
    limits = (
        ("TTFT p95", sample.canary_ttft_p95, spec.max_ttft_p95_s, sample.ttft_ratio,
         spec.max_ttft_ratio, sample.stable_ttft_p95),
        ("TPOT p95", sample.canary_tpot_p95, spec.max_tpot_p95_s, sample.tpot_ratio,
         spec.max_tpot_ratio, sample.stable_tpot_p95),
    )  # fmt: skip
    for label, value, limit, ratio, max_ratio, stable in limits:
        if value is not None and limit is not None and value > limit:
            breaches.append((f"{label} {_fmt(value)}s > {_fmt(limit)}s", latency))
        if ratio is not None and max_ratio is not None and ratio > max_ratio:
            assert stable is not None and value is not None
            breaches.append(
                (
                    f"{label} {_fmt(value)}s is {ratio:.2f}x stable's {_fmt(stable)}s "
                    f"(> {_fmt(max_ratio)}x)",
                    latency,
                )
            )
    user = dict(sample.user)
    missing: list[str] = []
    for m in spec.metrics:
        value = user.get(m.name)
        if value is None or math.isnan(value):
            missing.append(m.name)
            continue
        if m.max is not None and value > m.max:
            breaches.append((f"{m.name} {_fmt(value)} > {_fmt(m.max)}", Action.ROLLBACK))
        if m.min is not None and value < m.min:
            breaches.append((f"{m.name} {_fmt(value)} < {_fmt(m.min)}", Action.ROLLBACK))
    if breaches:
        action = Action.ROLLBACK if any(a is Action.ROLLBACK for _, a in breaches) else Action.PAUSE
        return IntervalResult(
            Verdict.FAIL, "; ".join(r for r, _ in breaches), sample.at, action, values
        )
    if missing:
        return IntervalResult(
            Verdict.INCONCLUSIVE,
            f"no data for metric {', '.join(missing)}",
            sample.at,
            values=values,
        )
    return IntervalResult(
        Verdict.PASS,
        f"{requests:.0f} requests, server error rate {rate:.1%}, within the limits",
        sample.at,
        values=values,
    )


@dataclass(frozen=True, slots=True)
class AnalysisState:
    """An analysis step's progress, kept between intervals (in status, see ``to_status``)."""

    verdict: StepVerdict = StepVerdict.RUNNING
    good_intervals: int = 0  # consecutive
    bad_intervals: int = 0  # in all, this step
    started_at: float | None = None  # the first interval's time
    reason: str = ""
    action: Action | None = None  # on Fail
    last: IntervalResult | None = None

    @property
    def done(self) -> bool:
        return self.verdict is not StepVerdict.RUNNING

    def to_status(self) -> dict[str, Any]:
        """camelCase, JSON-safe; :meth:`from_status` reads it back."""
        out: dict[str, Any] = {
            "stepVerdict": self.verdict.value,
            "goodIntervals": self.good_intervals,
            "badIntervals": self.bad_intervals,
        }
        if self.started_at is not None:
            out["startedAt"] = self.started_at
        if self.reason:
            out["reason"] = self.reason
        if self.action is not None:
            out["action"] = self.action.value
        return out

    @classmethod
    def from_status(cls, data: Mapping[str, Any] | None) -> AnalysisState:
        if not data:
            return cls()
        action = data.get("action")
        started = data.get("startedAt")
        return cls(
            verdict=StepVerdict(data.get("stepVerdict", StepVerdict.RUNNING.value)),
            good_intervals=int(data.get("goodIntervals", 0)),
            bad_intervals=int(data.get("badIntervals", 0)),
            started_at=float(started) if started is not None else None,
            reason=str(data.get("reason", "")),
            action=Action(action) if action else None,
        )


def fold(spec: AnalysisSpec, history: AnalysisState, result: IntervalResult) -> AnalysisState:
    """The step's state after one more interval (a finished step stays as it is)."""
    if history.done:
        return history
    started = history.started_at if history.started_at is not None else result.at
    state = replace(history, started_at=started, last=result)
    if result.verdict is Verdict.PASS:
        good = state.good_intervals + 1
        state = replace(state, good_intervals=good, reason=result.reason)
        if good >= spec.successful_intervals:
            return replace(
                state,
                verdict=StepVerdict.PASS,
                reason=f"{good} consecutive good intervals: {result.reason}",
            )
        return state
    if result.verdict is Verdict.FAIL:
        bad = state.bad_intervals + 1
        worst = (
            Action.ROLLBACK
            if Action.ROLLBACK in (state.action, result.action)
            else (result.action or Action.ROLLBACK)
        )
        state = replace(state, good_intervals=0, bad_intervals=bad, action=worst)
        state = replace(state, reason=result.reason)
        if bad >= spec.failed_intervals:
            return replace(
                state,
                verdict=StepVerdict.FAIL,
                reason=f"{bad} bad intervals: {result.reason}",
            )
        return state
    # Inconclusive: hold, until the step's timeout.
    elapsed = result.at - started
    if elapsed >= spec.timeout_s:
        return replace(
            state,
            verdict=StepVerdict.FAIL,
            action=Action.ROLLBACK,
            reason=(
                f"analysis timed out after {elapsed:.0f}s without a verdict "
                f"({state.good_intervals} good, {state.bad_intervals} bad intervals): "
                f"{result.reason}"
            ),
        )
    return replace(state, reason=result.reason)


# ---- Prometheus (I/O) ----------------------------------------------------------------------


class PrometheusError(RuntimeError):
    """Prometheus could not answer a query (down, timed out, bad query): the reason, for status."""


class PrometheusClient:
    """Instant queries over the Prometheus HTTP API (``/api/v1/query``).

    One aiohttp session, made on first use in the running event loop; use
    ``async with`` or call :meth:`close`. Every failure is a
    :class:`PrometheusError` naming what went wrong; never a hang (each query
    is bounded by ``timeout_s``).
    """

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PrometheusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        return self._session

    async def query(self, promql: str, at: float | None = None) -> float | None:
        """The value of a query returning one number (a scalar or a one-series
        vector), evaluated at ``at`` (seconds since the epoch; None: now); None
        when the vector is empty or the value is NaN."""
        data = await self._query_raw(promql, at)
        kind = data.get("resultType")
        result = data.get("result")
        if kind == "scalar" and isinstance(result, list):
            return _sample_value(result)
        if kind != "vector" or not isinstance(result, list):
            raise PrometheusError(f"query {promql!r}: expected a vector, got {kind}")
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(
                f"query {promql!r} returned {len(result)} series; it must return one number"
            )
        return _sample_value(result[0].get("value"))

    async def _query_raw(self, promql: str, at: float | None) -> dict[str, Any]:
        url = f"{self.url}/api/v1/query"
        form = {"query": promql}
        if at is not None:
            form["time"] = f"{at:.3f}"
        try:
            session = self._get_session()
            async with session.post(url, data=form) as resp:
                text = await resp.text()
                status = resp.status
        except TimeoutError:
            raise PrometheusError(
                f"Prometheus at {self.url} did not answer within {self.timeout_s:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise PrometheusError(f"Prometheus at {self.url} is unreachable: {exc}") from None
        try:
            body = _json_loads(text)
        except ValueError:
            raise PrometheusError(
                f"Prometheus at {self.url} answered HTTP {status} with no JSON: {text[:200]!r}"
            ) from None
        if status != 200 or body.get("status") != "success":
            raise PrometheusError(
                f"query {promql!r} failed: HTTP {status} "
                f"{body.get('errorType', '')}: {body.get('error', text[:200])}"
            )
        data = body.get("data")
        if not isinstance(data, dict):
            raise PrometheusError(f"query {promql!r}: no data in the answer")
        return data


def _json_loads(text: str) -> dict[str, Any]:
    body = json.loads(text)
    if not isinstance(body, dict):
        raise ValueError("not an object")
    return body


def _sample_value(pair: Any) -> float | None:
    """A ``[timestamp, "value"]`` pair's value; NaN is None, +Inf stays."""
    try:
        value = float(pair[1])
    except (TypeError, ValueError, IndexError):
        raise PrometheusError(f"not a sample: {pair!r}") from None
    return None if math.isnan(value) else value


async def measure(
    client: PrometheusClient,
    spec: AnalysisSpec,
    namespace: str,
    stable_pods: str,
    canary_pods: str,
    *,
    now: float | None = None,
) -> Sample:
    """One interval's Sample, every query evaluated at the same instant (so the
    error rate's two counts cover one window). A Prometheus failure is a Sample
    with ``error`` set (evaluated as Inconclusive), never an exception."""
    at = time.time() if now is None else now
    queries = build_queries(spec, namespace, stable_pods, canary_pods, spec.window)
    names = list(queries)
    outcomes = await asyncio.gather(
        *(client.query(queries[n], at) for n in names), return_exceptions=True
    )
    results: dict[str, float | None] = {}
    for name, outcome in zip(names, outcomes, strict=True):
        if isinstance(outcome, PrometheusError):
            return Sample(at=at, error=str(outcome))
        if isinstance(outcome, BaseException):
            raise outcome
        results[name] = outcome
    return Sample.from_results(at, results)


def measure_blocking(
    url: str,
    spec: AnalysisSpec,
    namespace: str,
    stable_pods: str,
    canary_pods: str,
    *,
    timeout_s: float = 5.0,
) -> Sample:
    """:func:`measure` for code that runs in a worker thread (no event loop there):
    a client of its own, closed before it returns."""

    async def run() -> Sample:
        async with PrometheusClient(url, timeout_s=timeout_s) as client:
            return await measure(client, spec, namespace, stable_pods, canary_pods)

    return asyncio.run(run())
