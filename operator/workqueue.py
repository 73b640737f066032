"""The reconcile work queue: client-go's workqueue semantics for kopf's handlers.

Every trigger of an AutoGLMDeployment's reconcile (its own events, its
children's and pods' events, the resync timer, the rollout tick) only adds the
object's key here and returns; ``workers`` threads take keys in the order they
came and run the reconcile:

- a key waits in the queue at most once: triggers that come while it waits
  are one (the reconcile reads the cache as it is when it starts, so it sees
  all of them);
- a key is never reconciled by two workers at once: a trigger that comes
  while it is being reconciled queues it again for when that one is done;
- a reconcile that fails is queued again after the delay it asks for.

Why not run the reconcile in the kopf handler: kopf runs synchronous handlers
on one thread pool, in the order the events came. A reconcile that waits on a
busy API server for seconds holds a thread, so every other event waits behind
it, the echoes of our own writes (which need no reconcile) included, each
holding its event's whole body in memory; and a child's event for an object
already being reconciled held a second thread blocked on that object's lock.
Here a handler takes microseconds, the pool only runs reconciles, and the
queue holds keys, not bodies.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class WorkQueue(Generic[K]):
    """Keys to process, each at most once in the queue and by one worker at a time.

    ``process(key)`` returns None when done, or the seconds after which to try
    the key again (a temporary failure). An exception it raises is logged and
    the key is not retried until the next trigger.
    """

    def __init__(
        self,
        process: Callable[[K], float | None],
        workers: int,
        *,
        name: str = "reconcile",
        clock: Callable[[], float] = time.monotonic,
        on_wait: Callable[[float], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._process = process
        self._workers = workers
        self._name = name
        self._clock = clock
        self._on_wait = on_wait  # seconds a key waited in the queue, for metrics
        self._cond = threading.Condition()
        self._queue: deque[K] = deque()
        self._queued_at: dict[K, float] = {}  # the keys in _queue ("dirty" in client-go)
        self._processing: set[K] = set()
        self._again: set[K] = set()  # added while processing: queue once it is done
        self._later: list[tuple[float, int, K]] = []  # (due, sequence, key), a heap
        self._sequence = 0
        self._threads: list[threading.Thread] = []
        self._stopping = False

    # ---- producers (any thread) ------------------------------------------------

    def add(self, key: K) -> None:
        with self._cond:
            self._add_locked(key)

    def add_after(self, key: K, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        with self._cond:
            if self._stopping:
                return
            self._sequence += 1
            heapq.heappush(self._later, (self._clock() + delay, self._sequence, key))
            self._cond.notify()

    def _add_locked(self, key: K) -> None:
        if self._stopping or key in self._queued_at:
            return
        if key in self._processing:
            self._again.add(key)
            return
        self._queued_at[key] = self._clock()
        self._queue.append(key)
        self._cond.notify()

    # ---- inspection ------------------------------------------------------------

    def __len__(self) -> int:
        """Keys waiting (not those being processed, nor those added for later)."""
        with self._cond:
            return len(self._queue)

    @property
    def busy(self) -> int:
        with self._cond:
            return len(self._processing)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing waits, nothing runs and nothing is due later; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._processing or self._later:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
            return True

    # ---- workers -----------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._threads:
                return
            self._stopping = False
            for i in range(self._workers):
                thread = threading.Thread(target=self._run, name=f"{self._name}-{i}", daemon=True)
                self._threads.append(thread)
                thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Take no new keys; wait up to ``timeout`` for the reconciles that run."""
        with self._cond:
            self._stopping = True
            self._queue.clear()
            self._queued_at.clear()
            self._later.clear()
            self._cond.notify_all()
            threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _next(self) -> K | None:
        """The next key to process (None: stopping). Called with the lock held."""
        while not self._stopping:
            now = self._clock()
            while self._later and self._later[0][0] <= now:
                _, _, key = heapq.heappop(self._later)
                self._add_locked(key)
            if self._queue:
                key = self._queue.popleft()
                waited = now - self._queued_at.pop(key)
                self._processing.add(key)
                if self._on_wait is not None:
                    self._on_wait(max(0.0, waited))
                return key
            timeout = self._later[0][0] - now if self._later else None
            self._cond.wait(timeout)
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                key = self._next()
            if key is None:
                return
            retry: float | None = None
            try:
                retry = self._process(key)
            except Exception:  # the worker must survive whatever one reconcile does
                log.exception("%s of %s failed", self._name, key)
            with self._cond:
                self._processing.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self._add_locked(key)
                self._cond.notify_all()  # wait_idle
            if retry is not None:
                self.add_after(key, retry)
