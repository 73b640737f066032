"""The reconcile work queue: coalescing, one worker per key, order, retries (real threads)."""

from __future__ import annotations

import threading

import pytest

from autoglm_operator.workqueue import WorkQueue

WAIT = 10.0  # a generous bound for threads to finish, never a measured figure


class Recorder:
    """A ``process`` that records calls and can hold a key until released."""

    def __init__(self, hold: set[str] | None = None) -> None:
        self.calls: list[str] = []
        self.hold = hold or set()
        self.started = {k: threading.Event() for k in self.hold}
        self.release = {k: threading.Event() for k in self.hold}
        self.running: set[str] = set()
        self.overlap = False
        self._lock = threading.Lock()

    def __call__(self, key: str) -> float | None:
        with self._lock:
            if key in self.running:
                self.overlap = True
            self.running.add(key)
            self.calls.append(key)
        if key in self.hold:
            self.started[key].set()
            assert self.release[key].wait(WAIT)
        with self._lock:
            self.running.discard(key)
        return None


def test_a_key_added_many_times_while_it_waits_is_processed_once() -> None:
    rec = Recorder(hold={"blocker"})
    q: WorkQueue[str] = WorkQueue(rec, workers=1)
    q.start()
    q.add("blocker")
    assert rec.started["blocker"].wait(WAIT)
    for _ in range(50):
        q.add("a")
    assert len(q) == 1
    rec.release["blocker"].set()
    assert q.wait_idle(WAIT)
    assert rec.calls == ["blocker", "a"]
    q.stop()


def test_a_key_is_never_processed_twice_at_once_and_a_trigger_meanwhile_runs_it_again() -> None:
    rec = Recorder(hold={"a"})
    q: WorkQueue[str] = WorkQueue(rec, workers=4)
    q.start()
    q.add("a")
    assert rec.started["a"].wait(WAIT)
    q.add("a")  # while "a" runs: three idle workers, none may take it now
    q.add("a")
    assert len(q) == 0 and q.busy == 1
    rec.hold.discard("a")  # the second run goes straight through
    rec.release["a"].set()
    assert q.wait_idle(WAIT)
    assert rec.calls == ["a", "a"]
    assert not rec.overlap
    q.stop()


def test_keys_are_taken_in_the_order_they_came() -> None:
    rec = Recorder(hold={"first"})
    q: WorkQueue[str] = WorkQueue(rec, workers=1)
    q.start()
    q.add("first")
    assert rec.started["first"].wait(WAIT)
    names = [f"m-{i:03d}" for i in range(100)]
    for name in names:
        q.add(name)
    rec.release["first"].set()
    assert q.wait_idle(WAIT)
    assert rec.calls == ["first", *names]  # oldest first: none starves behind newer ones
    q.stop()


def test_a_failed_key_comes_back_after_its_delay_and_an_exception_does_not_kill_a_worker() -> None:
    attempts: dict[str, int] = {}
    done = threading.Event()

    def process(key: str) -> float | None:
        attempts[key] = attempts.get(key, 0) + 1
        if key == "boom" and attempts[key] == 1:
            raise RuntimeError("unexpected")
        if key == "flaky" and attempts[key] < 3:
            return 0.01  # a temporary failure: again in 10 ms
        if key == "flaky":
            done.set()
        return None

    q: WorkQueue[str] = WorkQueue(process, workers=1)
    q.start()
    q.add("boom")
    q.add("flaky")
    assert done.wait(WAIT)
    assert q.wait_idle(WAIT)
    assert attempts == {"boom": 1, "flaky": 3}  # an exception is not retried by itself
    q.add("boom")  # the single worker survived it
    assert q.wait_idle(WAIT)
    assert attempts["boom"] == 2
    q.stop()


def test_wait_time_is_reported_and_stop_takes_no_new_keys() -> None:
    waits: list[float] = []
    rec = Recorder()
    q: WorkQueue[str] = WorkQueue(rec, workers=2, on_wait=waits.append)
    q.start()
    for key in ("a", "b", "c"):
        q.add(key)
    assert q.wait_idle(WAIT)
    assert len(waits) == 3 and all(w >= 0 for w in waits)
    q.stop()
    q.add("d")
    q.add_after("e", 0.01)
    assert len(q) == 0
    assert sorted(rec.calls) == ["a", "b", "c"]


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        WorkQueue(lambda key: None, workers=0)
