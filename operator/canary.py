"""The rollout step machine: a pure function from (spec, status, observations) to the next state.

    spec, previous status, now, per-revision pods, this tick's analysis result, the one-shot action
      --compute_next--> status.canary, status.revisions, per-revision plans (replicas), weights, events

It reads no clock, no API and no Prometheus: the reconcile shell measures an
analysis interval only when ``compute_analysis_due`` says so and passes the
result in. Everything here is unit-tested as a table of cases.

Revisions. A revision is a short hash of the pod-affecting spec (model, image,
server); its Deployment and Service are ``<name>-<revision>``. The stable one is
``status.revisions[0]`` (recorded with its model and server, so any revision in
the history can be rebuilt); the target is the spec's own revision, the spec with
``spec.canary``'s overrides, or ``spec.rollbackTo``'s. While they differ a rollout
is in flight:

- with ``spec.canary``: the steps (setWeight, pause, analysis), then Promoting;
- without it (a plain change, or rollbackTo): Promoting at once: the new revision
  comes up at full size and takes all traffic when Ready. A target that is still
  warm (inside the instant-rollback window) is Ready already: a weight flip.

Weights move forward only when the canary has the pods for them; any failure
writes weight 0 first (RollingBack, ``weightZeroAt``) and removes the canary's
pods only after ``ROLLBACK_DRAIN_SECONDS``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .analysis import (
    AnalysisSpec,
    AnalysisSpecError,
    AnalysisState,
    IntervalResult,
    StepVerdict,
    fold,
)
from .spec import (
    AutoGLMDeploymentSpec,
    CanarySpec,
    CanaryStep,
    PauseStep,
    compute_canary_spec,
    compute_revision_spec,
    parse_duration,
)
from .status import EventSpec

ACTION_ANNOTATION = "serving.autoglm.io/canary-action"
ACTIONS = ("promote", "abort", "resume")
# After weight 0 is written, the canary's pods stay this long (requests in flight
# finish, the Gateway applies the route) before they are removed.
ROLLBACK_DRAIN_SECONDS = 5.0

IN_FLIGHT = frozenset({"Progressing", "Paused", "Analyzing", "Promoting", "RollingBack"})

# Reasons (CamelCase) in status.canary.reason and in Events.
R_STARTED = "CanaryStarted"
R_WAITING = "CanaryNotReadyYet"
R_STEP = "StepCompleted"
R_WEIGHT = "WeightSet"
R_PAUSED_STEP = "PauseStep"
R_PAUSED_SPEC = "PausedBySpec"
R_AWAITING = "AwaitingPromotion"
R_ANALYZING = "Analyzing"
R_ANALYSIS_PAUSED = "AnalysisFailedPaused"
R_ANALYSIS_FAILED = "AnalysisFailed"
R_ABORTED = "Aborted"
R_PROMOTING = "Promoting"
R_REPLACING = "Replacing"
R_PROMOTED = "Promoted"
R_ROLLED_BACK_TO = "RolledBackTo"
R_NOT_READY = "CanaryNotReady"
R_REMOVED = "CanaryRemoved"
R_SUPERSEDED = "Superseded"


# ---- time (RFC 3339 with microseconds) ---------------------------------------------------


def format_time(t: float) -> str:
    """RFC 3339 in UTC with microseconds (the rollback timing needs sub-second precision)."""
    moment = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp()


# ---- revisions -------------------------------------------------------------------------


def compute_revision(spec: AutoGLMDeploymentSpec) -> str:
    """The revision name: 8 hex characters of SHA-256 over model and server (image included)."""
    payload = {
        "model": spec.model.model_dump(mode="json", by_alias=True, exclude_none=True),
        "server": spec.server.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:8]


def build_revision_record(
    name: str, spec: AutoGLMDeploymentSpec, promoted_at: float
) -> dict[str, Any]:
    """A ``status.revisions`` entry: enough to rebuild the revision's pods later."""
    return {
        "name": name,
        "image": spec.server.image,
        "model": spec.model.model_dump(mode="json", by_alias=True, exclude_none=True),
        "server": spec.server.model_dump(mode="json", by_alias=True, exclude_none=True),
        "promotedAt": format_time(promoted_at),
    }


class RolloutError(ValueError):
    """The spec asks for something the history can't give (an unknown rollbackTo)."""


# ---- inputs and outputs ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pods:
    """One revision's Deployment as observed."""

    desired: int = 0  # spec.replicas (ours or the HPA's)
    ready: int = 0
    replicas: int = 0
    exists: bool = False


@dataclass(frozen=True, slots=True)
class VersionPlan:
    """What one revision's Deployment, Service and HPA should be."""

    revision: str
    spec: AutoGLMDeploymentSpec
    role: Literal["stable", "canary", "warm"]
    weight: int  # percent of requests
    replicas: int | None  # fixed; None: an HPA owns the count
    hpa: tuple[int, int] | None = None  # (min, max) when autoscaled
    hpa_is_stable: bool = False  # the HPA named <name> (else <name>-<revision>)


@dataclass(frozen=True, slots=True)
class RolloutPlan:
    """The machine's answer for one reconcile."""

    canary: dict[str, Any] | None  # status.canary (None: never had a rollout)
    revisions: list[dict[str, Any]]  # status.revisions
    versions: list[VersionPlan]  # the stable first
    events: list[EventSpec] = field(default_factory=list)
    action_done: str | None = None  # the annotation's action, handled: remove it
    in_flight: bool = False
    # Revisions whose objects stay as they are this reconcile (a canary draining
    # whose spec is gone from spec.canary): no traffic, not applied, not deleted.
    keep: tuple[str, ...] = ()

    @property
    def stable(self) -> VersionPlan:
        return self.versions[0]

    def weights(self) -> dict[str, int]:
        return {v.revision: v.weight for v in self.versions}


@dataclass(slots=True)
class _State:
    """status.canary while it is being worked on (camelCase keys as in status)."""

    phase: str
    stable: str
    canary: str
    step: int = 0
    weight: int = 0
    reason: str = ""
    message: str = ""
    started_at: float | None = None
    step_started_at: float | None = None
    promoted_at: float | None = None
    rollback_started_at: float | None = None
    weight_zero_at: float | None = None
    last_analysis: dict[str, Any] | None = None
    action: str | None = None

    @classmethod
    def from_status(cls, data: Mapping[str, Any]) -> _State:
        return cls(
            phase=str(data.get("phase", "Progressing")),
            stable=str(data.get("stableRevision", "")),
            canary=str(data.get("canaryRevision", "")),
            step=int(data.get("step", 0)),
            weight=int(data.get("weight", 0)),
            reason=str(data.get("reason", "")),
            message=str(data.get("message", "")),
            started_at=parse_time(data.get("startedAt")),
            step_started_at=parse_time(data.get("stepStartedAt")),
            promoted_at=parse_time(data.get("promotedAt")),
            rollback_started_at=parse_time(data.get("rollbackStartedAt")),
            weight_zero_at=parse_time(data.get("weightZeroAt")),
            last_analysis=dict(data["lastAnalysis"]) if data.get("lastAnalysis") else None,
            action=data.get("action"),
        )

    def to_status(self, previous: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "phase": self.phase,
            "stableRevision": self.stable,
            "canaryRevision": self.canary,
            "step": self.step,
            "weight": self.weight,
            "reason": self.reason,
            "message": self.message[:1024],
        }
        for key, value in (
            ("startedAt", self.started_at),
            ("stepStartedAt", self.step_started_at),
            ("promotedAt", self.promoted_at),
            ("rollbackStartedAt", self.rollback_started_at),
            ("weightZeroAt", self.weight_zero_at),
        ):
            if value is not None:
                # Keep the exact text we wrote (a round trip through float may move a microsecond).
                old = previous.get(key)
                out[key] = (
                    old if old is not None and parse_time(old) == value else format_time(value)
                )
        if self.last_analysis is not None:
            out["lastAnalysis"] = self.last_analysis
        if self.action is not None:
            out["action"] = self.action
        return out


# ---- replicas ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Scale:
    """A revision's size: fixed, or an HPA range."""

    fixed: int | None
    hpa: tuple[int, int] | None

    @property
    def minimum(self) -> int:
        if self.fixed is not None:
            return self.fixed
        assert self.hpa is not None
        return self.hpa[0]


def compute_full_scale(spec: AutoGLMDeploymentSpec) -> _Scale:
    """The size the spec asks for (the stable's)."""
    auto = spec.autoscaling
    if auto is None:
        return _Scale(spec.replicas, None)
    if not auto.targets:
        return _Scale(auto.min_replicas, None)
    return _Scale(None, (auto.min_replicas, auto.max_replicas))


def _share(n: int, weight: int, by_ratio: bool = False) -> int:
    if by_ratio:
        # Next to n stable pods, c canary pods get c / (n + c) of the requests.
        return n if weight >= 100 else round(n * weight / (100 - weight))
    return math.ceil(n * weight / 100)


def compute_canary_scale(spec: AutoGLMDeploymentSpec, canary: CanarySpec, weight: int) -> _Scale:
    """The canary's size for ``weight``, within the canary's own bounds (minReplicas,
    default 1; maxReplicas, default the stable's size).

    With a router (gatewayAPI, istio) the canary needs the weight's share of the
    stable's size. With the ``replicas`` provider next to the whole stable
    (surge) the replica ratio *is* the split, so the canary gets ``n·w/(100-w)``
    pods (a canary above 50% then needs maxReplicas above the stable's size).
    """
    by_ratio = (
        (spec.traffic is None or spec.traffic.provider == "replicas")
        and canary.strategy == "surge"
        and weight < 100
    )
    full = compute_full_scale(spec)
    top = full.fixed if full.fixed is not None else (full.hpa or (1, 1))[1]
    lo = canary.min_replicas or 1
    hi = max(lo, canary.max_replicas or max(top, 1))
    if full.fixed is not None:
        return _Scale(min(max(_share(full.fixed, weight, by_ratio), lo), hi), None)
    assert full.hpa is not None
    mn = min(max(_share(full.hpa[0], weight, by_ratio), lo), hi)
    mx = min(max(_share(full.hpa[1], weight, by_ratio), mn), hi)
    return _Scale(None, (mn, mx))


def compute_replaced_stable_scale(spec: AutoGLMDeploymentSpec, canary_scale: _Scale) -> _Scale:
    """strategy replace: the stable gives up as many pods as the canary takes."""
    full = compute_full_scale(spec)
    if full.fixed is not None:
        taken = canary_scale.fixed if canary_scale.fixed is not None else canary_scale.minimum
        return _Scale(max(full.fixed - taken, 0), None)
    assert full.hpa is not None and canary_scale.hpa is not None
    mn = full.hpa[0] - canary_scale.hpa[0]
    mx = full.hpa[1] - canary_scale.hpa[1]
    if mx < 1:
        return _Scale(0, None)
    mn = max(mn, 1)
    return _Scale(None, (mn, max(mn, mx)))


def _ready(pods: Pods | None, scale: _Scale) -> bool:
    """Whether a revision has the pods its size asks for (at least one)."""
    return pods is not None and pods.ready >= max(scale.minimum, 1)


# ---- analysis ------------------------------------------------------------------------------


def compute_analysis_spec(canary: CanarySpec, step: CanaryStep) -> AnalysisSpec:
    """B's AnalysisSpec from the thresholds and the step's block (camelCase mappings)."""
    assert step.analysis is not None
    return AnalysisSpec.from_spec(
        canary.analysis.model_dump(mode="json", by_alias=True, exclude_none=True),
        step.analysis.model_dump(mode="json", by_alias=True, exclude_none=True),
    )


def _current_step(spec: AutoGLMDeploymentSpec, status: Mapping[str, Any]) -> CanaryStep | None:
    canary = spec.canary
    data = status.get("canary") or {}
    if canary is None or data.get("phase") != "Analyzing":
        return None
    steps = compute_steps(canary)
    index = int(data.get("step", 0))
    return steps[index] if 0 <= index < len(steps) else None


def compute_analysis_due(
    spec: AutoGLMDeploymentSpec, status: Mapping[str, Any], now: float
) -> AnalysisSpec | None:
    """The analysis to measure now, or None: the rollout is in an analysis step, not
    paused, and an interval has passed since the step began or since its last measurement."""
    step = _current_step(spec, status)
    if step is None or step.analysis is None or spec.canary is None or spec.canary.paused:
        return None
    data = status.get("canary") or {}
    try:
        analysis = compute_analysis_spec(spec.canary, step)
    except AnalysisSpecError:
        return None
    since = parse_time(data.get("stepStartedAt")) or 0.0
    last = data.get("lastAnalysis") or {}
    if last.get("step") == data.get("step") and last.get("time"):
        since = max(since, parse_time(last["time"]) or 0.0)
    return analysis if now - since >= analysis.interval_s else None


def compute_next_tick(spec: AutoGLMDeploymentSpec, status: Mapping[str, Any]) -> float | None:
    """Seconds until the machine next needs a look while a rollout is in flight, else None."""
    data = status.get("canary") or {}
    if data.get("phase") not in IN_FLIGHT:
        return None
    step = _current_step(spec, status)
    if step is not None and step.analysis is not None:
        return parse_duration(step.analysis.interval)
    return 1.0


# ---- the machine ---------------------------------------------------------------------------


def compute_steps(canary: CanarySpec) -> list[CanaryStep]:
    """The steps; a fixed ``weight`` is ``[setWeight: weight, pause: {}]``."""
    if canary.steps is not None:
        return list(canary.steps)
    return [CanaryStep(set_weight=canary.weight), CanaryStep(pause=PauseStep())]


@dataclass(frozen=True, slots=True)
class Inputs:
    """Everything ``compute_next`` reads."""

    spec: AutoGLMDeploymentSpec
    status: Mapping[str, Any]  # the previous status (canary, revisions)
    now: float  # seconds since the epoch
    pods: Mapping[str, Pods] = field(default_factory=dict)  # by revision
    analysis: IntervalResult | None = None  # measured this tick (compute_analysis_due)
    action: str | None = None  # the canary-action annotation
    canary_problem: str | None = None  # why the canary's pods don't run, if known


def compute_next(inp: Inputs) -> RolloutPlan:
    """The next status.canary, status.revisions, per-revision plans and events."""
    return _Machine(inp).run()


class _Machine:
    def __init__(self, inp: Inputs) -> None:
        self.inp = inp
        self.spec = inp.spec
        self.now = inp.now
        self.events: list[EventSpec] = []
        self.action_done: str | None = None
        self.revisions: list[dict[str, Any]] = [
            dict(r) for r in (inp.status.get("revisions") or []) if r.get("name")
        ]
        prev = inp.status.get("canary")
        self.previous: Mapping[str, Any] = prev or {}
        self.state: _State | None = _State.from_status(prev) if prev else None
        self.superseded: str | None = None  # a canary in flight that a new target replaced

    # -- helpers --

    def event(self, kind: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(EventSpec(kind, reason, message))

    def revision_spec(self, name: str) -> AutoGLMDeploymentSpec | None:
        for r in self.revisions:
            if r["name"] == name and r.get("model") and r.get("server"):
                return compute_revision_spec(self.spec, r["model"], r["server"])
        return None

    def warm_until(self, name: str) -> float | None:
        for r in self.revisions:
            if r["name"] == name:
                return parse_time(r.get("warmUntil"))
        return None

    # -- the run --

    def run(self) -> RolloutPlan:
        spec = self.spec
        base_rev = compute_revision(spec)
        if not self.revisions:
            self.revisions = [build_revision_record(base_rev, spec, self.now)]
        stable_rev = self.revisions[0]["name"]
        stable_spec = self.revision_spec(stable_rev) or spec
        # The target.
        direct = spec.canary is None
        if spec.rollback_to is not None:
            target_spec = self.revision_spec(spec.rollback_to)
            if target_spec is None:
                known = ", ".join(r["name"] for r in self.revisions) or "none"
                raise RolloutError(
                    f"spec.rollbackTo: revision {spec.rollback_to!r} is not in status.revisions "
                    f"(known: {known})"
                )
            target_rev, direct = spec.rollback_to, True
        elif spec.canary is not None:
            target_spec = compute_canary_spec(spec)
            target_rev = compute_revision(target_spec)
        else:
            target_spec, target_rev = spec, base_rev
        st = self.state
        action = self.inp.action if self.inp.action in ACTIONS else None
        if self.inp.action is not None:
            self.action_done = self.inp.action  # handled (an unknown one is dropped too)
        leaving: str | None = None  # a canary dropped this reconcile: weight 0, kept to drain
        if target_rev == stable_rev:
            if st is not None and st.phase == "RollingBack":
                leaving = self._rolling_back(st)
            elif st is not None and st.phase in IN_FLIGHT and st.canary != stable_rev:
                # The spec no longer asks for the canary (removed or back to the stable).
                leaving = self._drop(st, R_REMOVED, "the spec no longer asks for this revision")
            elif (
                st is not None
                and st.phase in ("RolledBack", "Failed")
                and st.canary != stable_rev
                and st.reason != R_REMOVED
            ):
                # A failed canary the spec has dropped: nothing is wrong any more.
                st.reason = R_REMOVED
                st.message = f"{st.message}; the spec no longer asks for revision {st.canary}"
                self.event("Normal", R_REMOVED, st.message)
            return self._plan(stable_rev, stable_spec, None, None, leaving)
        if (
            st is None
            or st.canary != target_rev
            or (st.phase in ("Promoted",) and st.stable != stable_rev)
            # asked for again after the spec had dropped it: a fresh rollout
            or (st.phase not in IN_FLIGHT and st.reason == R_REMOVED)
        ):
            if (
                st is not None
                and st.phase in IN_FLIGHT
                and st.canary not in (target_rev, stable_rev)
            ):
                self.superseded = self._drop(
                    st, R_SUPERSEDED, f"superseded by revision {target_rev}"
                )
            st = self._start(stable_rev, target_rev, direct)
        self.state = st
        if st.phase in ("RolledBack", "Failed"):
            return self._plan(stable_rev, stable_spec, None, None, leaving)
        if st.phase == "RollingBack":
            leaving = self._rolling_back(st)
            return self._plan(stable_rev, stable_spec, None, None, leaving)
        if st.phase == "Promoted":  # promoted, and the stable moved: nothing in flight
            return self._plan(stable_rev, stable_spec, None, None, leaving)
        pods = self.inp.pods.get(target_rev)
        if action == "abort":
            self.event("Normal", "CanaryAction", "abort requested by annotation")
            st.action = f"abort at {format_time(self.now)}"
            self._rollback(st, R_ABORTED, "aborted by the canary-action annotation")
            leaving = target_rev
            return self._plan(stable_rev, stable_spec, None, None, leaving)
        if action == "promote" and st.phase != "Promoting":
            self.event("Normal", "CanaryAction", "promote requested by annotation")
            st.action = f"promote at {format_time(self.now)}"
            self._enter(st, "Promoting", R_PROMOTING, "promoted by the canary-action annotation")
        if st.phase == "Promoting" or direct:
            if st.phase != "Promoting":
                self._enter(
                    st, "Promoting", R_REPLACING, f"replacing {stable_rev} with {target_rev}"
                )
            return self._promoting(st, stable_rev, stable_spec, target_rev, target_spec, pods)
        assert spec.canary is not None
        return self._steps(
            st, spec.canary, stable_rev, stable_spec, target_rev, target_spec, pods, action
        )

    def _start(self, stable: str, target: str, direct: bool) -> _State:
        st = _State(
            phase="Promoting" if direct else "Progressing",
            stable=stable,
            canary=target,
            reason=R_REPLACING if direct else R_STARTED,
            message=f"rolling out revision {target} (stable {stable})",
            started_at=self.now,
            step_started_at=self.now,
        )
        self.event("Normal", st.reason, st.message)
        return st

    def _enter(self, st: _State, phase: str, reason: str, message: str) -> None:
        changed = (st.phase, st.reason) != (phase, reason)
        st.phase, st.reason, st.message = phase, reason, message
        if changed:
            warning = phase in ("RollingBack", "RolledBack", "Failed") or reason in (
                R_ANALYSIS_PAUSED,
            )
            self.event("Warning" if warning else "Normal", reason, message)

    def _rollback(self, st: _State, reason: str, message: str, phase: str = "RollingBack") -> None:
        """Weight 0 now (this very reconcile writes the route), pods removed after a drain."""
        st.weight = 0
        st.rollback_started_at = self.now
        st.weight_zero_at = self.now
        self._enter(st, phase, reason, message)

    def _drop(self, st: _State, reason: str, message: str) -> str:
        """A canary the spec no longer wants: weight 0 and RolledBack; returns it to drain."""
        leaving = st.canary
        st.weight = 0
        st.weight_zero_at = self.now
        self._enter(st, "RolledBack", reason, message)
        self.state = st
        return leaving

    def _rolling_back(self, st: _State) -> str | None:
        zero = st.weight_zero_at if st.weight_zero_at is not None else self.now
        if self.now - zero >= ROLLBACK_DRAIN_SECONDS:
            self._enter(
                st,
                "RolledBack",
                st.reason,
                f"{st.message}; revision {st.canary} got no traffic and its pods were removed",
            )
            return None
        return st.canary

    # -- promoting --

    def _promoting(
        self,
        st: _State,
        stable_rev: str,
        stable_spec: AutoGLMDeploymentSpec,
        target_rev: str,
        target_spec: AutoGLMDeploymentSpec,
        pods: Pods | None,
    ) -> RolloutPlan:
        full = compute_full_scale(target_spec)
        replace_strategy = self.spec.canary is not None and self.spec.canary.strategy == "replace"
        serving = self.inp.pods.get(stable_rev)
        if full.hpa is not None and not replace_strategy and serving is not None:
            # The stable's HPA may have scaled out: take all traffic only with as many pods.
            low = min(max(full.hpa[0], serving.desired), full.hpa[1])
            full = _Scale(None, (low, full.hpa[1]))
        if _ready(pods, full) or (full.minimum == 0 and pods is not None and pods.exists):
            return self._promote(st, stable_rev, target_rev, target_spec)
        if self._deadline(st, pods):
            return self._plan(stable_rev, stable_spec, None, None, None)
        have = pods.ready if pods is not None else 0
        st.message = (
            f"promoting revision {target_rev}: {have}/{max(full.minimum, 1)} pods ready "
            f"before it takes all traffic"
        )
        if self.spec.canary is None and self.spec.rollback_to is None and full.fixed:
            return self._rolling(
                st, stable_rev, stable_spec, target_rev, target_spec, have, full.fixed
            )
        if replace_strategy and pods is not None and pods.ready >= 1:
            # No spare GPU: the canary takes all traffic with the pods it has and the
            # stable's pods make room for the rest.
            st.weight = 100
            return self._plan(
                stable_rev, stable_spec, target_rev, target_spec, None, canary_scale=full,
                stable_scale=_Scale(0, None),
            )  # fmt: skip
        return self._plan(stable_rev, stable_spec, target_rev, target_spec, None, canary_scale=full)

    def _rolling(
        self,
        st: _State,
        stable_rev: str,
        stable_spec: AutoGLMDeploymentSpec,
        target_rev: str,
        target_spec: AutoGLMDeploymentSpec,
        ready: int,
        size: int,
    ) -> RolloutPlan:
        """A plain change (no spec.canary, a fixed size): a rolling update across the
        two revisions with maxSurge 1, maxUnavailable 0. The new revision asks for
        one pod more than it has ready, the old one keeps ``size - ready``, so at most
        ``size + 1`` pods (one extra set of GPUs for one pod, not for the whole size)
        and never fewer than ``size`` ready; the routes' weights follow the ready ratio."""
        st.weight = min(100, round(100 * ready / size))
        st.message = (
            f"replacing revision {stable_rev} with {target_rev} one pod at a time: "
            f"{ready}/{size} new pods ready"
        )
        return self._plan(
            stable_rev, stable_spec, target_rev, target_spec, None,
            canary_scale=_Scale(min(size, ready + 1), None),
            stable_scale=_Scale(max(size - ready, 0), None),
        )  # fmt: skip

    def _promote(
        self, st: _State, stable_rev: str, target_rev: str, target_spec: AutoGLMDeploymentSpec
    ) -> RolloutPlan:
        canary = self.spec.canary
        keep_warm = canary is not None or self.spec.rollback_to is not None
        window = parse_duration(self.spec.rollout.instant_rollback_window)
        record = None
        for r in self.revisions:
            if r["name"] == target_rev:
                record = dict(r)
        if record is None:
            record = build_revision_record(target_rev, target_spec, self.now)
        record["promotedAt"] = format_time(self.now)
        record.pop("warmUntil", None)
        rest = []
        for r in self.revisions:
            if r["name"] == target_rev:
                continue
            r = dict(r)
            r.pop("warmUntil", None)
            if r["name"] == stable_rev and keep_warm and window > 0:
                r["warmUntil"] = format_time(self.now + window)
            rest.append(r)
        self.revisions = [record, *rest][: self.spec.rollout.revision_history_limit]
        st.weight = 100
        st.promoted_at = self.now
        st.stable = target_rev
        rolled_back_to = self.spec.rollback_to == target_rev
        self._enter(
            st,
            "Promoted",
            R_ROLLED_BACK_TO if rolled_back_to else R_PROMOTED,
            (f"rolled back to revision {target_rev}" if rolled_back_to else
             f"revision {target_rev} promoted") + f"; {stable_rev} was the stable",
        )  # fmt: skip
        self.state = st
        return self._plan(target_rev, target_spec, None, None, None)

    def _deadline(self, st: _State, pods: Pods | None) -> bool:
        """The canary never became Ready in time: no traffic, Failed (True when it did)."""
        canary = self.spec.canary
        timeout = parse_duration(canary.ready_timeout) if canary is not None else None
        if timeout is None or st.started_at is None or self.now - st.started_at < timeout:
            return False
        if pods is not None and pods.ready >= 1:
            return False  # it runs: the steps and the analysis judge it, not the deadline
        why = self.inp.canary_problem or (
            f"{pods.ready if pods else 0} of {pods.desired if pods else 0} pods ready"
        )
        self._rollback(
            st,
            R_NOT_READY,
            f"canary revision {st.canary} was not Ready within {canary.ready_timeout if canary else ''}"
            f" and got no traffic: {why}",
            phase="Failed",
        )
        return True

    # -- steps --

    def _steps(
        self,
        st: _State,
        canary: CanarySpec,
        stable_rev: str,
        stable_spec: AutoGLMDeploymentSpec,
        target_rev: str,
        target_spec: AutoGLMDeploymentSpec,
        pods: Pods | None,
        action: str | None,
    ) -> RolloutPlan:
        steps = compute_steps(canary)
        resume = action == "resume" or (not canary.paused and st.reason == R_PAUSED_SPEC)
        if action == "resume":
            st.action = f"resume at {format_time(self.now)}"
            self.event("Normal", "CanaryAction", "resume requested by annotation")
        if canary.paused:
            self._enter(st, "Paused", R_PAUSED_SPEC, "paused by spec.canary.paused")
            return self._plan_steps(
                st, canary, stable_rev, stable_spec, target_rev, target_spec, st.weight
            )
        if self._deadline(st, pods):
            return self._plan(stable_rev, stable_spec, None, None, None)
        if st.reason == R_PAUSED_SPEC:
            # Resumed: back to what the step is doing (an open pause step ends here).
            was_open_pause = (
                st.step < len(steps)
                and steps[st.step].pause is not None
                and steps[st.step].pause.duration is None  # type: ignore[union-attr]
            )
            st.reason, st.phase = R_STEP, "Progressing"
            self.event("Normal", "CanaryResumed", "resumed (spec.canary.paused is false)")
            if was_open_pause:
                self._advance(st)
            resume = False
        if resume and st.phase == "Paused":
            if st.reason == R_AWAITING:
                self._enter(st, "Promoting", R_PROMOTING, "resumed after the last step")
                return self._promoting(st, stable_rev, stable_spec, target_rev, target_spec, pods)
            self._advance(st)
        pending = st.weight
        for _ in range(len(steps) + 1):
            if st.step >= len(steps):
                if canary.auto_promote:
                    self._enter(st, "Promoting", R_PROMOTING, "all steps passed")
                    return self._promoting(
                        st, stable_rev, stable_spec, target_rev, target_spec, pods
                    )
                self._enter(
                    st, "Paused", R_AWAITING,
                    "all steps passed; promote with the canary-action annotation",
                )  # fmt: skip
                break
            step = steps[st.step]
            if step.set_weight is not None:
                pending = step.set_weight
                scale = compute_canary_scale(self.spec, canary, pending)
                if not _ready(pods, scale):
                    have = pods.ready if pods is not None else 0
                    self._enter(
                        st, "Progressing", R_WAITING,
                        f"step {st.step}: waiting for {max(scale.minimum, 1)} ready canary pods "
                        f"({have} now) before weight {pending}",
                    )  # fmt: skip
                    break
                st.weight = pending
                self.event("Normal", R_WEIGHT, f"step {st.step}: canary weight {pending}%")
                self._advance(st)
                continue
            if step.pause is not None:
                duration = step.pause.duration
                if duration is not None and self.now - (
                    st.step_started_at or self.now
                ) >= parse_duration(duration):
                    self._advance(st)
                    continue
                self._enter(
                    st, "Paused", R_PAUSED_STEP,
                    f"step {st.step}: paused "
                    + (f"for {duration}" if duration else "until resumed (canary-action: resume)"),
                )  # fmt: skip
                break
            # analysis
            if not self._analysis(st, canary, step, stable_rev):
                break
        return self._plan_steps(
            st, canary, stable_rev, stable_spec, target_rev, target_spec, max(pending, st.weight)
        )

    def _advance(self, st: _State) -> None:
        st.step += 1
        st.step_started_at = self.now
        if st.phase in ("Paused", "Analyzing"):
            st.phase = "Progressing"
        st.reason, st.message = R_STEP, f"step {st.step - 1} completed"

    def _analysis(self, st: _State, canary: CanarySpec, step: CanaryStep, stable_rev: str) -> bool:
        """Fold this tick's interval into the step; True when the step passed."""
        if st.phase == "Paused" and st.reason == R_ANALYSIS_PAUSED:
            return False  # held after a failed analysis until resumed, promoted or aborted
        last = st.last_analysis if (st.last_analysis or {}).get("step") == st.step else None
        state = AnalysisState.from_status(last)
        result = self.inp.analysis
        if result is not None:
            try:
                spec = compute_analysis_spec(canary, step)
            except AnalysisSpecError as exc:
                self._rollback(st, R_ANALYSIS_FAILED, f"step {st.step}: {exc}")
                return False
            state = fold(spec, state, result)
            last = {
                **state.to_status(),
                "step": st.step,
                "time": format_time(result.at),
                "verdict": result.verdict.value,
                "values": dict(result.values),
            }
            st.last_analysis = last
        if state.verdict is StepVerdict.PASS:
            self.event("Normal", "AnalysisPassed", f"step {st.step}: {state.reason}")
            self._advance(st)
            return True
        if state.verdict is StepVerdict.FAIL:
            rollback = canary.auto_rollback and (
                state.action is None or state.action.value == "rollback"
            )
            if rollback:
                self._rollback(st, R_ANALYSIS_FAILED, f"step {st.step}: {state.reason}")
            else:
                self._enter(st, "Paused", R_ANALYSIS_PAUSED, f"step {st.step}: {state.reason}")
            return False
        reason = state.reason or "waiting for the first interval"
        self._enter(st, "Analyzing", R_ANALYZING, f"step {st.step}: {reason}")
        return False

    # -- plans --

    def _plan_steps(
        self,
        st: _State,
        canary: CanarySpec,
        stable_rev: str,
        stable_spec: AutoGLMDeploymentSpec,
        target_rev: str,
        target_spec: AutoGLMDeploymentSpec,
        pending: int,
    ) -> RolloutPlan:
        if st.phase in ("RollingBack", "Failed", "RolledBack"):
            leaving = target_rev if st.phase == "RollingBack" else None
            return self._plan(stable_rev, stable_spec, None, None, leaving)
        scale = compute_canary_scale(self.spec, canary, pending)
        stable_scale = None
        if canary.strategy == "replace":
            stable_scale = compute_replaced_stable_scale(self.spec, scale)
        return self._plan(
            stable_rev, stable_spec, target_rev, target_spec, None,
            canary_scale=scale, stable_scale=stable_scale,
        )  # fmt: skip

    def _plan(
        self,
        stable_rev: str,
        stable_spec: AutoGLMDeploymentSpec,
        canary_rev: str | None,
        canary_spec: AutoGLMDeploymentSpec | None,
        leaving: str | None,
        *,
        canary_scale: _Scale | None = None,
        stable_scale: _Scale | None = None,
    ) -> RolloutPlan:
        st = self.state
        weight = st.weight if (st is not None and canary_rev is not None) else 0
        full = stable_scale or compute_full_scale(stable_spec)
        versions = [
            VersionPlan(
                stable_rev, stable_spec, "stable", 100 - weight, full.fixed, full.hpa,
                hpa_is_stable=True,
            )
        ]  # fmt: skip
        seen = {stable_rev}
        if canary_rev is not None and canary_spec is not None and canary_scale is not None:
            versions.append(
                VersionPlan(
                    canary_rev, canary_spec, "canary", weight, canary_scale.fixed, canary_scale.hpa
                )
            )
            seen.add(canary_rev)
        # Kept without traffic: a canary draining after weight 0, previous stables still warm.
        keep: list[str] = []
        for gone in (leaving, self.superseded):
            if gone is not None and gone not in seen:
                keep.append(gone)
        for r in self.revisions[1:]:
            until = parse_time(r.get("warmUntil"))
            if until is not None and until > self.now and r["name"] not in seen:
                keep.append(r["name"])
        untouched: list[str] = []
        for name in keep:
            if name in seen:
                continue
            seen.add(name)
            spec = self.revision_spec(name)
            if spec is None and st is not None and name == st.canary:
                spec = compute_canary_spec(self.spec) if self.spec.canary is not None else None
            if spec is None:
                untouched.append(name)
                continue
            live = self.inp.pods.get(name)
            count = (
                live.desired
                if live is not None and live.exists
                else compute_full_scale(spec).minimum
            )
            versions.append(VersionPlan(name, spec, "warm", 0, count, None))
        in_flight = st is not None and st.phase in IN_FLIGHT
        canary_status = st.to_status(self.previous) if st is not None else None
        if canary_status is not None:
            if st is not None and st.phase not in IN_FLIGHT:
                canary_status["stableRevision"] = stable_rev
            canary_status["replicas"] = {
                v.revision: {
                    "replicas": (self.inp.pods.get(v.revision) or Pods()).replicas,
                    "readyReplicas": (self.inp.pods.get(v.revision) or Pods()).ready,
                }
                for v in versions
            }
        return RolloutPlan(
            canary=canary_status,
            revisions=self.revisions,
            versions=versions,
            events=self.events,
            action_done=self.action_done,
            in_flight=in_flight,
            keep=tuple(untouched),
        )


def compute_rollout_note(plan: RolloutPlan) -> str:
    """One line for logs: phase, weights."""
    phase = (plan.canary or {}).get("phase", "-")
    weights = ", ".join(f"{k}={v}" for k, v in plan.weights().items())
    return f"{phase} [{weights}]"


__all__ = [
    "ACTION_ANNOTATION",
    "Inputs",
    "Pods",
    "RolloutError",
    "RolloutPlan",
    "VersionPlan",
    "compute_analysis_due",
    "compute_next",
    "compute_next_tick",
    "compute_revision",
    "format_time",
    "parse_time",
]
