"""The rollout step machine as a pure function: spec, status, pods and analysis in; status,
plans, weights and events out. Each test drives it tick by tick like the reconcile would."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from autoglm_operator.analysis import Action, IntervalResult, Verdict
from autoglm_operator.canary import (
    ROLLBACK_DRAIN_SECONDS,
    Inputs,
    Pods,
    RolloutError,
    RolloutPlan,
    compute_analysis_due,
    compute_canary_spec,
    compute_next,
    compute_next_tick,
    compute_revision,
    format_time,
    parse_time,
)
from autoglm_operator.spec import AutoGLMDeploymentSpec, parse_spec

T0 = 1_800_000_000.0
# Routed (the canary's pods follow its share of requests); the replicas provider has its own test.
BASE: dict[str, Any] = {
    "model": {"source": "hf://org/glm@v1"},
    "replicas": 4,
    "traffic": {"provider": "gatewayAPI", "gateway": {"name": "gw"}},
}
V2 = {"source": "hf://org/glm@v2"}


def spec_of(**extra: Any) -> AutoGLMDeploymentSpec:
    return parse_spec({**BASE, **extra})


def canary_of(**canary: Any) -> AutoGLMDeploymentSpec:
    return spec_of(canary={"model": V2, **canary})


@dataclass
class World:
    """The status and the pods, advanced like a cluster would (pods become ready as planned)."""

    spec: AutoGLMDeploymentSpec
    now: float = T0
    status: dict[str, Any] = field(default_factory=dict)
    pods: dict[str, Pods] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)  # revisions whose pods never become ready
    plan: RolloutPlan | None = None
    events: list[tuple[str, str]] = field(default_factory=list)

    def tick(
        self,
        seconds: float = 1.0,
        *,
        analysis: IntervalResult | None = None,
        action: str | None = None,
        settle: bool = True,
    ) -> RolloutPlan:
        self.now += seconds
        plan = compute_next(
            Inputs(
                self.spec,
                self.status,
                self.now,
                dict(self.pods),
                analysis,
                action,
                "pod x: CrashLoopBackOff" if self.broken else None,
            )
        )
        self.plan = plan
        self.events += [(e.type, e.reason) for e in plan.events]
        self.status = {"revisions": plan.revisions}
        if plan.canary is not None:
            self.status["canary"] = plan.canary
        if settle:
            self.pods = {}
            for v in plan.versions:
                want = v.replicas if v.replicas is not None else (v.hpa or (0, 0))[0]
                ready = 0 if v.revision in self.broken else want
                self.pods[v.revision] = Pods(desired=want, ready=ready, replicas=want, exists=True)
        return plan

    @property
    def phase(self) -> str | None:
        return (self.status.get("canary") or {}).get("phase")

    @property
    def weight(self) -> int:
        return int((self.status.get("canary") or {}).get("weight", 0))

    def run_until(self, phase: str, limit: int = 50, **kw: Any) -> RolloutPlan:
        for _ in range(limit):
            plan = self.tick(**kw)
            if self.phase == phase:
                return plan
        raise AssertionError(f"never reached {phase}; at {self.status.get('canary')}")


def good(at: float) -> IntervalResult:
    return IntervalResult(Verdict.PASS, "ok", at, values={"requests": 50.0, "errorRate": 0.0})


def bad(at: float, action: Action = Action.ROLLBACK) -> IntervalResult:
    return IntervalResult(Verdict.FAIL, "server error rate 40%", at, action, {"errorRate": 0.4})


def established(spec: AutoGLMDeploymentSpec) -> World:
    """An object that has served its base revision, then gets ``spec``."""
    world = World(spec.model_copy(update={"canary": None}))
    world.tick()
    world.spec = spec
    return world


V1_REV = compute_revision(parse_spec(BASE))


# ---- no canary ----------------------------------------------------------------------------


def test_a_new_object_records_its_revision_and_serves_it_alone() -> None:
    world = World(parse_spec(BASE))
    plan = world.tick()
    assert plan.canary is None and not plan.in_flight
    assert [r["name"] for r in plan.revisions] == [V1_REV]
    assert plan.revisions[0]["model"]["source"] == "hf://org/glm@v1"
    (stable,) = plan.versions
    assert (stable.revision, stable.weight, stable.replicas, stable.role) == (
        V1_REV,
        100,
        4,
        "stable",
    )
    assert stable.hpa_is_stable


def test_the_revision_is_a_short_hash_of_model_image_and_server() -> None:
    a = parse_spec(BASE)
    assert compute_revision(a) == compute_revision(parse_spec(BASE))
    assert len(compute_revision(a)) == 8
    assert compute_revision(spec_of(server={"image": "img:2"})) != compute_revision(a)
    assert compute_revision(spec_of(server={"batching": {"maxBatchSize": 8}})) != compute_revision(
        a
    )
    # Replicas and resources are not part of it: scaling never makes a new revision.
    assert compute_revision(spec_of(replicas=9, resources={"gpus": 2})) == compute_revision(a)


def test_a_plain_change_without_canary_rolls_one_pod_at_a_time_and_switches_when_ready() -> None:
    """maxSurge 1, maxUnavailable 0 across the two revisions: the new one +1 pod at a
    time, the old one -1 per new ready pod, the weight following the ready ratio."""
    world = World(parse_spec(BASE))
    world.tick()
    world.spec = spec_of(server={"image": "img:2"})
    new = compute_revision(world.spec)
    plan = world.tick(settle=False)
    assert world.phase == "Promoting"
    assert plan.weights() == {V1_REV: 100, new: 0}
    assert [v.replicas for v in plan.versions] == [4, 1]  # one extra pod, not a second set
    for ready in range(1, 4):
        world.pods[new] = Pods(desired=ready, ready=ready, replicas=ready, exists=True)
        plan = world.tick(settle=False)
        assert world.phase == "Promoting"
        old_pods, new_pods = (v.replicas for v in plan.versions)
        assert (old_pods, new_pods) == (4 - ready, ready + 1)
        assert old_pods + new_pods == 5  # never more than size + 1 pods
        assert old_pods + ready == 4  # never fewer than size ready (old pods stay ready)
        assert plan.weights() == {V1_REV: 100 - 25 * ready, new: 25 * ready}
    # A new pod that stops being ready gives its place back to an old one.
    world.pods[new] = Pods(desired=4, ready=2, replicas=4, exists=True)
    plan = world.tick(settle=False)
    assert [v.replicas for v in plan.versions] == [2, 3]
    assert plan.weights() == {V1_REV: 50, new: 50}
    world.pods[new] = Pods(desired=4, ready=4, replicas=4, exists=True)
    plan = world.tick()
    assert world.phase == "Promoted"
    assert plan.weights() == {new: 100}  # no warm window for a plain change
    assert [r["name"] for r in plan.revisions] == [new, V1_REV]
    assert "warmUntil" not in plan.revisions[1]
    assert [(v.revision, v.replicas) for v in plan.versions] == [(new, 4)]


def test_a_plain_change_settles_in_size_ticks() -> None:
    world = World(parse_spec(BASE))
    world.tick()
    world.spec = spec_of(server={"image": "img:2"})
    new = compute_revision(world.spec)
    sizes = []
    for _ in range(10):
        plan = world.tick()  # pods become ready as planned
        sizes.append([v.replicas for v in plan.versions])
        if world.phase == "Promoted":
            break
    assert world.phase == "Promoted"
    assert sizes == [[4, 1], [3, 2], [2, 3], [1, 4], [4]]
    assert plan.versions[0].revision == new


def test_a_plain_change_of_one_replica_surges_one_pod() -> None:
    world = World(spec_of(replicas=1))
    world.tick()
    world.spec = spec_of(replicas=1, server={"image": "img:2"})
    plan = world.tick(settle=False)
    assert [v.replicas for v in plan.versions] == [1, 1]
    assert world.weight == 0


def test_a_plain_change_under_an_hpa_still_brings_the_new_revision_up_whole() -> None:
    auto = {
        "minReplicas": 2,
        "maxReplicas": 6,
        "targets": [{"type": "queueDepth", "averageValue": "4"}],
    }
    world = World(spec_of(autoscaling=auto))
    world.tick()
    world.spec = spec_of(autoscaling=auto, server={"image": "img:2"})
    plan = world.tick(settle=False)
    assert world.phase == "Promoting"
    assert [v.hpa for v in plan.versions] == [(2, 6), (2, 6)]


# ---- a progressive rollout -------------------------------------------------------------------

STEPS = [
    {"setWeight": 25},
    {"pause": {"duration": "30s"}},
    {"analysis": {"interval": "10s", "successfulIntervals": 2}},
    {"setWeight": 50},
]


def test_steps_move_the_weight_only_when_the_canary_has_its_pods_then_promote() -> None:
    world = established(canary_of(steps=STEPS))
    target = compute_revision(compute_canary_spec(world.spec))
    plan = world.tick(settle=False)
    assert world.phase == "Progressing" and world.weight == 0
    canary = plan.versions[1]
    assert (canary.revision, canary.role, canary.replicas) == (target, "canary", 1)  # 25% of 4
    assert plan.versions[0].replicas == 4  # the stable is never below its size (surge)
    assert ("Normal", "CanaryStarted") in world.events
    world.tick()  # pods come up
    plan = world.tick()
    assert world.weight == 25 and world.phase == "Paused"
    assert plan.weights() == {V1_REV: 75, target: 25}
    world.tick(29)
    assert world.phase == "Paused"
    world.tick(2)
    assert world.phase == "Analyzing"
    step_status = dict(world.status)
    assert compute_analysis_due(world.spec, step_status, world.now + 5) is None
    due = compute_analysis_due(world.spec, step_status, world.now + 10)
    assert due is not None and due.successful_intervals == 2
    assert compute_next_tick(world.spec, step_status) == 10
    world.tick(10, analysis=good(world.now + 10))
    assert world.phase == "Analyzing"
    last = world.status["canary"]["lastAnalysis"]
    assert (last["verdict"], last["goodIntervals"], last["step"]) == ("Pass", 1, 2)
    assert last["values"]["requests"] == 50.0
    plan = world.tick(10, analysis=good(world.now + 10))
    # analysis passed; setWeight 50 needs 2 canary pods first
    assert world.weight == 25 and plan.versions[1].replicas == 2
    world.tick()
    # all steps done: Promoting, the canary to full size; then Promoted
    world.run_until("Promoted")
    plan = world.plan
    assert plan is not None
    assert [r["name"] for r in plan.revisions] == [target, V1_REV]
    assert parse_time(plan.revisions[1]["warmUntil"]) == pytest.approx(
        parse_time(world.status["canary"]["promotedAt"]) + 600  # type: ignore[operator]
    )
    assert plan.weights() == {target: 100, V1_REV: 0}  # the old stable stays warm, no traffic
    assert plan.versions[1].role == "warm" and plan.versions[1].replicas == 4
    assert world.status["canary"]["stableRevision"] == target
    reasons = [r for _, r in world.events]
    assert "WeightSet" in reasons and "AnalysisPassed" in reasons and reasons[-1] == "Promoted"
    # After the window the old stable goes.
    plan = world.tick(601)
    assert plan.weights() == {target: 100}
    assert not plan.in_flight


def test_a_failing_analysis_sets_weight_zero_in_the_same_step_then_removes_the_canary() -> None:
    world = established(canary_of(steps=[{"setWeight": 50}, {"analysis": {"interval": "10s"}}]))
    world.run_until("Analyzing")
    target = world.status["canary"]["canaryRevision"]
    world.tick(10, analysis=bad(world.now + 10))
    assert world.phase == "Analyzing"  # one bad interval of two
    plan = world.tick(10, analysis=bad(world.now + 10))
    assert world.phase == "RollingBack"
    assert plan.weights()[target] == 0 and plan.weights()[V1_REV] == 100
    st = world.status["canary"]
    assert parse_time(st["weightZeroAt"]) == pytest.approx(world.now, abs=1e-5)
    assert st["weightZeroAt"].endswith("Z") and "." in st["weightZeroAt"]  # sub-second
    assert st["reason"] == "AnalysisFailed" and "server error rate" in st["message"]
    # Its pods are kept (not scaled down) while the route drains ...
    canary = next(v for v in plan.versions if v.revision == target)
    assert canary.replicas == 2 and canary.weight == 0
    assert ("Warning", "AnalysisFailed") in world.events
    world.tick(ROLLBACK_DRAIN_SECONDS - 1)
    assert world.phase == "RollingBack"
    # ... then removed.
    plan = world.tick(2)
    assert world.phase == "RolledBack"
    assert plan.weights() == {V1_REV: 100}
    assert [r["name"] for r in plan.revisions] == [V1_REV]
    # It stays rolled back while the spec asks for the same canary.
    world.tick(60)
    assert world.phase == "RolledBack"


@pytest.mark.parametrize(
    ("auto_rollback", "action", "phase"),
    [
        (True, Action.PAUSE, "Paused"),  # latency: latencyAction pause
        (False, Action.ROLLBACK, "Paused"),  # errors, but autoRollback off
        (True, Action.ROLLBACK, "RollingBack"),
    ],
)
def test_what_a_failed_analysis_does(auto_rollback: bool, action: Action, phase: str) -> None:
    world = established(
        canary_of(
            steps=[{"setWeight": 50}, {"analysis": {"failedIntervals": 1}}, {"setWeight": 100}],
            autoRollback=auto_rollback,
        )
    )
    world.run_until("Analyzing")
    world.tick(10, analysis=bad(world.now + 10, action))
    assert world.phase == phase
    if phase == "Paused":
        assert world.weight == 50  # held, not rolled back
        assert world.status["canary"]["reason"] == "AnalysisFailedPaused"
        world.tick(10)
        assert world.phase == "Paused"
        # resume continues past the failed analysis
        world.tick(action="resume")
        assert world.plan is not None and world.plan.action_done == "resume"
        world.run_until("Promoted")


def test_a_canary_that_never_becomes_ready_gets_no_traffic_and_fails() -> None:
    world = established(canary_of(steps=[{"setWeight": 50}], readyTimeout="2m"))
    target = compute_revision(compute_canary_spec(world.spec))
    world.broken.add(target)
    for _ in range(10):
        world.tick(10)
        assert world.weight == 0
        assert world.plan is not None and world.plan.weights()[target] == 0
    assert world.phase == "Progressing"
    plan = world.tick(100)
    assert world.phase == "Failed"
    st = world.status["canary"]
    assert st["reason"] == "CanaryNotReady"
    assert "not Ready within 2m" in st["message"] and "CrashLoopBackOff" in st["message"]
    assert plan.weights() == {V1_REV: 100}
    assert ("Warning", "CanaryNotReady") in world.events


def test_pause_and_resume_through_spec_canary_paused() -> None:
    steps = [{"setWeight": 25}, {"pause": {}}, {"setWeight": 75}]
    world = established(canary_of(steps=steps))
    world.run_until("Paused")
    assert world.weight == 25 and world.status["canary"]["reason"] == "PauseStep"
    world.tick(3600)
    assert world.phase == "Paused"  # an open pause holds
    world.spec = canary_of(steps=steps, paused=True)
    world.tick()
    assert world.status["canary"]["reason"] == "PausedBySpec"
    world.spec = canary_of(steps=steps)
    world.tick()
    world.run_until("Promoted")
    assert "CanaryResumed" in [r for _, r in world.events]


def test_spec_paused_holds_a_rollout_mid_steps() -> None:
    steps = [{"setWeight": 25}, {"pause": {"duration": "10s"}}, {"setWeight": 75}]
    world = established(canary_of(steps=steps, paused=True))
    for _ in range(5):
        world.tick(30)
        assert world.phase == "Paused" and world.weight == 0
    world.spec = canary_of(steps=steps)
    world.run_until("Promoted")


def test_abort_annotation_rolls_back_and_is_consumed() -> None:
    world = established(canary_of(steps=[{"setWeight": 50}, {"pause": {}}]))
    world.run_until("Paused")
    plan = world.tick(action="abort")
    assert world.phase == "RollingBack" and world.weight == 0
    assert plan.action_done == "abort"
    assert world.status["canary"]["action"].startswith("abort at ")
    assert world.status["canary"]["reason"] == "Aborted"
    world.run_until("RolledBack")


def test_promote_annotation_skips_the_remaining_steps() -> None:
    world = established(canary_of(steps=[{"setWeight": 10}, {"pause": {}}, {"setWeight": 20}]))
    world.run_until("Paused")
    world.tick(action="promote", settle=False)
    assert world.phase == "Promoting"
    assert world.plan is not None and world.plan.versions[1].replicas == 4  # full size first
    world.run_until("Promoted")


def test_a_fixed_weight_holds_until_resumed_or_promoted() -> None:
    world = established(canary_of(weight=20))
    world.run_until("Paused")
    assert world.weight == 20
    world.tick(3600)
    assert world.phase == "Paused" and world.weight == 20
    world.tick(action="resume")
    world.run_until("Promoted")


def test_without_auto_promote_the_last_step_waits_for_promotion() -> None:
    world = established(canary_of(steps=[{"setWeight": 100}], autoPromote=False))
    world.run_until("Paused")
    assert world.status["canary"]["reason"] == "AwaitingPromotion"
    world.tick(action="resume")
    world.run_until("Promoted")


def test_removing_the_canary_mid_rollout_drops_it_at_once() -> None:
    world = established(canary_of(steps=[{"setWeight": 50}, {"pause": {}}]))
    world.run_until("Paused")
    target = world.status["canary"]["canaryRevision"]
    world.spec = parse_spec(BASE)
    plan = world.tick()
    assert world.phase == "RolledBack" and world.status["canary"]["reason"] == "CanaryRemoved"
    assert plan.weights() == {V1_REV: 100}
    assert plan.keep == (target,)  # its pods drain this once, untouched
    assert world.tick().keep == ()


def test_a_new_canary_supersedes_the_one_in_flight() -> None:
    world = established(canary_of(steps=[{"setWeight": 50}, {"pause": {}}]))
    world.run_until("Paused")
    first = world.status["canary"]["canaryRevision"]
    world.spec = spec_of(canary={"model": {"source": "hf://org/glm@v3"}, "steps": [{"pause": {}}]})
    plan = world.tick()
    second = world.status["canary"]["canaryRevision"]
    assert second != first and world.status["canary"]["step"] == 0
    assert first not in plan.weights() and plan.keep == (first,)
    assert world.tick().keep == ()


# ---- history and instant rollback -------------------------------------------------------------


def promoted_world() -> tuple[World, str]:
    world = established(canary_of(steps=[{"setWeight": 100}]))
    world.run_until("Promoted")
    return world, world.status["canary"]["stableRevision"]


def test_rollback_to_a_warm_revision_is_a_weight_flip_in_one_reconcile() -> None:
    world, v2 = promoted_world()
    world.spec = world.spec.model_copy(update={"rollback_to": V1_REV})
    plan = world.tick(settle=False)  # the warm pods are ready: no waiting
    assert world.phase == "Promoted"
    assert world.status["canary"]["reason"] == "RolledBackTo"
    assert plan.weights()[V1_REV] == 100 and plan.weights()[v2] == 0
    assert [r["name"] for r in plan.revisions] == [V1_REV, v2]
    assert plan.versions[0].replicas == 4


def test_rollback_to_after_the_window_is_a_normal_rollout() -> None:
    world, v2 = promoted_world()
    world.tick(601)  # the window passes: v1's pods go
    assert V1_REV not in world.pods
    world.spec = world.spec.model_copy(update={"rollback_to": V1_REV})
    plan = world.tick(settle=False)
    assert world.phase == "Promoting"
    assert plan.weights() == {v2: 100, V1_REV: 0}
    world.run_until("Promoted")
    assert world.status["revisions"][0]["name"] == V1_REV


def test_rollback_to_an_unknown_revision_is_an_error_naming_the_known_ones() -> None:
    world, _ = promoted_world()
    world.spec = world.spec.model_copy(update={"rollback_to": "deadbeef"})
    with pytest.raises(RolloutError, match=r"deadbeef.*known"):
        world.tick()


def test_history_keeps_the_last_n_newest_first() -> None:
    world = World(spec_of(rollout={"revisionHistoryLimit": 2}))
    world.tick()
    names = []
    for image in ("img:2", "img:3", "img:4"):
        world.spec = spec_of(rollout={"revisionHistoryLimit": 2}, server={"image": image})
        names.append(compute_revision(world.spec))
        world.run_until("Promoted")
    assert [r["name"] for r in world.status["revisions"]] == [names[2], names[1]]
    assert world.status["revisions"][0]["image"] == "img:4"


# ---- replicas ---------------------------------------------------------------------------------


AUTO = {
    "minReplicas": 2,
    "maxReplicas": 10,
    "targets": [{"type": "queueDepth", "averageValue": "4"}],
}


@pytest.mark.parametrize(
    ("weight", "canary_hpa"),
    [(0, (1, 1)), (10, (1, 1)), (30, (1, 3)), (50, (1, 5)), (100, (2, 10))],
)
def test_canary_hpa_follows_the_weight_and_the_stable_keeps_its_minimum(
    weight: int, canary_hpa: tuple[int, int]
) -> None:
    spec = spec_of(
        autoscaling=AUTO, canary={"model": V2, "steps": [{"setWeight": weight}, {"pause": {}}]}
    )
    world = established(spec)
    world.run_until("Paused")
    plan = world.plan
    assert plan is not None
    stable, canary = plan.versions[0], plan.versions[1]
    assert (stable.hpa, stable.replicas, stable.hpa_is_stable) == ((2, 10), None, True)
    assert (canary.hpa, canary.hpa_is_stable) == (canary_hpa, False)


def test_canary_own_bounds() -> None:
    world = established(
        canary_of(steps=[{"setWeight": 10}, {"pause": {}}], minReplicas=2, maxReplicas=3)
    )
    world.run_until("Paused")
    assert world.plan is not None and world.plan.versions[1].replicas == 2
    world = established(canary_of(steps=[{"setWeight": 100}, {"pause": {}}], maxReplicas=3))
    world.run_until("Paused")
    assert world.plan is not None and world.plan.versions[1].replicas == 3


@pytest.mark.parametrize(("weight", "stable", "canary"), [(25, 3, 1), (50, 2, 2), (75, 1, 3)])
def test_replace_strategy_trades_stable_pods_for_canary_pods(
    weight: int, stable: int, canary: int
) -> None:
    world = established(canary_of(steps=[{"setWeight": weight}, {"pause": {}}], strategy="replace"))
    world.run_until("Paused")
    plan = world.plan
    assert plan is not None
    assert (plan.versions[0].replicas, plan.versions[1].replicas) == (stable, canary)
    assert plan.versions[0].replicas + plan.versions[1].replicas == 4  # no extra GPU


def test_replace_strategy_promotes_without_extra_pods() -> None:
    world = established(canary_of(steps=[{"setWeight": 50}], strategy="replace"))
    world.run_until("Promoting")
    totals = []
    for _ in range(5):
        plan = world.tick()
        totals.append(sum(v.replicas or 0 for v in plan.versions if v.role != "warm"))
        if world.phase == "Promoted":
            break
    assert world.phase == "Promoted"
    assert max(totals) <= 4


# ---- properties ---------------------------------------------------------------------------------


def test_weights_always_sum_to_100_and_the_machine_is_deterministic() -> None:
    world = established(canary_of(steps=STEPS))
    for i in range(40):
        status = dict(world.status)
        result = good(world.now + 10) if world.phase == "Analyzing" else None
        inputs = Inputs(world.spec, status, world.now + 10, dict(world.pods), result)
        assert compute_next(inputs) == compute_next(inputs)
        plan = world.tick(10, analysis=result)
        assert sum(plan.weights().values()) == 100, (i, plan.weights())
        assert plan.versions[0].replicas == 4 or world.phase == "Promoted"


def test_events_only_on_transitions() -> None:
    world = established(canary_of(steps=[{"setWeight": 50}, {"pause": {}}]))
    world.run_until("Paused")
    world.events.clear()
    for _ in range(5):
        world.tick(10)
    assert world.events == []


def test_an_unknown_action_is_dropped() -> None:
    world = established(canary_of(steps=[{"setWeight": 50}, {"pause": {}}]))
    world.run_until("Paused")
    plan = world.tick(action="yolo")
    assert plan.action_done == "yolo" and world.phase == "Paused"


def test_time_format_round_trips_with_microseconds() -> None:
    text = format_time(T0 + 0.123456)
    assert text == "2027-01-15T08:00:00.123456Z"
    assert parse_time(text) == pytest.approx(T0 + 0.123456)


# ---- one transition at a time: a table ------------------------------------------------------

TABLE_STEPS = [
    {"setWeight": 25},  # 0
    {"pause": {"duration": "30s"}},  # 1
    {"analysis": {"interval": "10s", "successfulIntervals": 1, "failedIntervals": 1}},  # 2
    {"pause": {}},  # 3
]
TARGET = compute_revision(compute_canary_spec(canary_of(steps=TABLE_STEPS)))
READY = Pods(desired=1, ready=1, replicas=1, exists=True)
FULL = Pods(desired=4, ready=4, replicas=4, exists=True)


def row_status(
    phase: str, step: int, weight: int, reason: str = "", since: float = 0
) -> dict[str, Any]:
    return {
        "revisions": [
            {"name": V1_REV, "model": BASE["model"] | {"dtype": "auto", "trustRemoteCode": False},
             "server": parse_spec(BASE).server.model_dump(mode="json", by_alias=True, exclude_none=True),
             "promotedAt": format_time(T0 - 3600)}
        ],
        "canary": {
            "phase": phase, "stableRevision": V1_REV, "canaryRevision": TARGET, "step": step,
            "weight": weight, "reason": reason, "startedAt": format_time(T0 - 100),
            "stepStartedAt": format_time(T0 - since),
        },
    }  # fmt: skip


# (id, status, canary pods, analysis verdict, action, spec.canary.paused) -> (phase, step, weight, reason)
ROWS: list[tuple[str, dict[str, Any], Pods | None, Verdict | None, str | None, bool, tuple[Any, ...]]] = [
    ("setWeight waits for pods", row_status("Progressing", 0, 0), None, None, None, False,
     ("Progressing", 0, 0, "CanaryNotReadyYet")),
    ("setWeight with pods", row_status("Progressing", 0, 0), READY, None, None, False,
     ("Paused", 1, 25, "PauseStep")),
    ("timed pause holds", row_status("Paused", 1, 25, "PauseStep", since=10), READY, None, None, False,
     ("Paused", 1, 25, "PauseStep")),
    ("timed pause ends", row_status("Paused", 1, 25, "PauseStep", since=31), READY, None, None, False,
     ("Analyzing", 2, 25, "Analyzing")),
    ("analysis waits", row_status("Analyzing", 2, 25, "Analyzing", since=5), READY, None, None, False,
     ("Analyzing", 2, 25, "Analyzing")),
    ("analysis passes", row_status("Analyzing", 2, 25, "Analyzing", since=10), READY, Verdict.PASS, None, False,
     ("Paused", 3, 25, "PauseStep")),
    ("analysis fails", row_status("Analyzing", 2, 25, "Analyzing", since=10), READY, Verdict.FAIL, None, False,
     ("RollingBack", 2, 0, "AnalysisFailed")),
    ("analysis inconclusive", row_status("Analyzing", 2, 25, "Analyzing", since=10), READY, Verdict.INCONCLUSIVE, None, False,
     ("Analyzing", 2, 25, "Analyzing")),
    ("open pause holds", row_status("Paused", 3, 25, "PauseStep", since=9999), READY, None, None, False,
     ("Paused", 3, 25, "PauseStep")),
    ("resume ends an open pause", row_status("Paused", 3, 25, "PauseStep"), FULL, None, "resume", False,
     ("Promoted", 4, 100, "Promoted")),
    ("promote skips steps, waits for full size", row_status("Paused", 1, 25, "PauseStep"), READY, None, "promote", False,
     ("Promoting", 1, 25, "Promoting")),
    ("abort", row_status("Paused", 1, 25, "PauseStep"), READY, None, "abort", False,
     ("RollingBack", 1, 0, "Aborted")),
    ("spec paused", row_status("Analyzing", 2, 25, "Analyzing"), READY, None, None, True,
     ("Paused", 2, 25, "PausedBySpec")),
    ("spec resumed", row_status("Paused", 2, 25, "PausedBySpec"), READY, None, None, False,
     ("Analyzing", 2, 25, "Analyzing")),
    ("drain not over", row_status("RollingBack", 2, 0, "AnalysisFailed") | {}, READY, None, None, False,
     ("RollingBack", 2, 0, "AnalysisFailed")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("status", "pods", "verdict", "action", "paused", "expected"),
    [r[1:] for r in ROWS],
    ids=[r[0] for r in ROWS],
)
def test_one_transition(
    status: dict[str, Any],
    pods: Pods | None,
    verdict: Verdict | None,
    action: str | None,
    paused: bool,
    expected: tuple[Any, ...],
) -> None:
    spec = canary_of(steps=TABLE_STEPS, paused=paused)
    if status["canary"]["phase"] == "RollingBack":
        status["canary"]["weightZeroAt"] = format_time(T0 - 1)
    result = None
    if verdict is not None:
        action_for = Action.ROLLBACK if verdict is Verdict.FAIL else None
        result = IntervalResult(verdict, "measured", T0, action_for, {"requests": 30.0})
        assert compute_analysis_due(spec, status, T0) is not None
    observed = {V1_REV: FULL} | ({TARGET: pods} if pods is not None else {})
    plan = compute_next(Inputs(spec, status, T0, observed, result, action))
    st = plan.canary
    assert st is not None
    assert (st["phase"], st["step"], st["weight"], st["reason"]) == expected
    assert sum(plan.weights().values()) == 100
    stable = plan.versions[0]
    if st["phase"] != "Promoted":
        assert stable.revision == V1_REV and stable.replicas == 4  # surge: never below its size


def test_promotion_waits_for_as_many_pods_as_the_scaled_out_stable_has() -> None:
    spec = spec_of(autoscaling=AUTO, canary={"model": V2, "steps": [{"setWeight": 10}]})
    world = established(spec)
    world.run_until("Promoting")
    target = world.status["canary"]["canaryRevision"]
    # The stable's HPA had scaled out to 6 under load.
    world.pods[V1_REV] = Pods(desired=6, ready=6, replicas=6, exists=True)
    world.pods[target] = Pods(desired=2, ready=2, replicas=2, exists=True)
    plan = world.tick(settle=False)
    assert world.phase == "Promoting"
    canary = next(v for v in plan.versions if v.revision == target)
    assert canary.hpa == (6, 10)
    world.pods[target] = Pods(desired=6, ready=6, replicas=6, exists=True)
    world.tick(settle=False)
    assert world.phase == "Promoted"


@pytest.mark.parametrize(
    ("replicas", "weight", "canary", "share"),
    [(2, 33, 1, 33.3), (2, 50, 2, 50.0), (4, 20, 1, 20.0), (3, 25, 1, 25.0), (4, 10, 1, 20.0)],
)
def test_replicas_provider_sizes_the_canary_for_the_replica_ratio(
    replicas: int, weight: int, canary: int, share: float
) -> None:
    spec = parse_spec(
        {
            "model": BASE["model"],
            "replicas": replicas,
            "canary": {"model": V2, "steps": [{"setWeight": weight}, {"pause": {}}]},
        }
    )
    world = established(spec)
    world.run_until("Paused")
    plan = world.plan
    assert plan is not None
    stable, got = plan.versions[0].replicas, plan.versions[1].replicas
    assert (stable, got) == (replicas, canary)
    assert got is not None and stable is not None
    assert 100 * got / (stable + got) == pytest.approx(
        share, abs=0.1
    )  # the smallest share is one pod


def test_a_canary_block_without_overrides_rolls_out_every_later_spec_change_by_its_steps() -> None:
    steps = {"steps": [{"setWeight": 25}, {"pause": {}}]}
    world = World(spec_of(canary=steps))
    plan = world.tick()
    assert plan.canary is None and plan.weights() == {V1_REV: 100}  # nothing to roll out yet
    world.spec = spec_of(canary=steps, server={"image": "img:2"})
    world.run_until("Paused")
    new = compute_revision(world.spec)
    assert world.status["canary"]["canaryRevision"] == new and world.weight == 25
    world.tick(action="resume")
    world.run_until("Promoted")
    assert world.status["revisions"][0]["name"] == new


def test_dropping_a_failed_canary_from_the_spec_clears_the_failure() -> None:
    world = established(canary_of(steps=[{"setWeight": 50}, {"analysis": {"failedIntervals": 1}}]))
    world.run_until("Analyzing")
    world.tick(10, analysis=bad(world.now + 10))
    world.run_until("RolledBack")
    assert world.status["canary"]["reason"] == "AnalysisFailed"
    world.spec = parse_spec(BASE)
    world.tick()
    st = world.status["canary"]
    assert (st["phase"], st["reason"]) == ("RolledBack", "CanaryRemoved")
    assert "no longer asks" in st["message"]
    world.events.clear()
    world.tick()
    assert world.events == []  # once


def test_a_canary_asked_for_again_after_it_was_dropped_starts_afresh() -> None:
    spec = canary_of(steps=[{"setWeight": 50}, {"analysis": {"failedIntervals": 1}}])
    world = established(spec)
    world.run_until("Analyzing")
    world.tick(10, analysis=bad(world.now + 10))
    world.run_until("RolledBack")
    world.tick(30)
    assert world.phase == "RolledBack"  # the same spec does not retry by itself
    world.spec = parse_spec(BASE)
    world.tick()
    world.spec = spec
    world.tick()
    st = world.status["canary"]
    assert (st["phase"], st["step"], st["reason"]) in {
        ("Progressing", 0, "CanaryStarted"),
        ("Progressing", 0, "CanaryNotReadyYet"),
    }
