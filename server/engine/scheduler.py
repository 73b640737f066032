"""The continuous-batching scheduler: pure Python, no torch.

One engine step is ``schedule() -> runner.execute() -> update()`` (the vLLM V1
shape). The scheduler decides which tokens run in the next forward pass; the
runner only executes what it is told. Because nothing here touches a device,
the policy is unit-tested with a fake runner.

Policy, in order, on every step:

1. Every running request that has finished its prompt decodes one token.
   Requests join and leave the running batch between any two steps.
2. Running requests whose prompt is only partly in the KV cache (chunked
   prefill) continue with the next chunk, under the token budget.
3. Waiting requests are admitted, most urgent priority first and FIFO within a
   priority, while a KV slot is free and the token budget
   (``max_batch_tokens``) has room for (a chunk of) their prompt.

KV memory is a pool of fixed-size blocks (``block_manager.py``). A request
takes blocks as its tokens are computed and gives them back when it finishes or
is aborted. At admission, the full blocks at the start of its prompt that are
already in the prefix cache are shared instead of computed. ``max_batch_size``
bounds the running requests (each holds one *slot*, the runner's row for its
sampling state); the blocks bound their tokens.

Preemption: when a running request needs a block and none is free, the
running request that matters least (highest priority number, then the newest)
is preempted by recompute: its blocks are released (its full blocks stay in the
prefix cache), and it goes back to the front of its queue; when admitted again
it recomputes prompt + output so far (mostly prefix-cache hits) and continues.
A new request is admitted only if its first chunk fits in the free blocks
without preempting anybody.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..errors import QueueFullError
from .api import FinishReason, GenerationRequest, SamplingParams, TokenLogprob
from .block_manager import BlockManager
from .config import BatchingConfig

DEFAULT_BLOCK_SIZE = 16
# The input of a decode whose token was sampled by a step still in flight: the
# runner reads it from the device (each slot's last sampled token).
PENDING_TOKEN = -1


@dataclass(slots=True)
class RequestState:
    """The scheduler's book-keeping for one request."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    arrival_time: float  # time.monotonic() at intake
    eos_token_ids: frozenset[int]  # empty when params.ignore_eos
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the request's blocks
    slot: int = -1  # the runner's row for this request while running, -1 otherwise
    finish_reason: FinishReason | None = None
    block_table: list[int] = field(default_factory=list)  # KV blocks, in token order
    num_blocks_sent: int = 0  # entries of block_table the runner has been given
    num_cached_tokens: int = 0  # tokens of full blocks registered with the prefix cache
    num_preemptions: int = 0
    # Tokens sampled by a step that was launched but whose result update() has not
    # applied yet (0 or 1): the next step can already decode them (PENDING_TOKEN).
    num_pending: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_ahead(self) -> int:
        """Tokens including the one still in flight."""
        return self.num_tokens + self.num_pending

    @property
    def prefill_target(self) -> int:
        """Tokens to compute before decoding: the prompt, or after a preemption every
        token but the last sampled one (which the next decode step feeds)."""
        if self.output_token_ids:
            return self.num_tokens - 1
        return len(self.prompt_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step: a prompt chunk, or the last sampled token."""

    request_id: str
    slot: int  # the request's row: its sampling state and block table live there in the runner
    token_ids: list[int]  # the tokens fed to the model this step
    start_pos: int  # position of token_ids[0] in the sequence (= tokens already cached)
    sample: bool  # True: sample the next token after this chunk (decode, or last prefill chunk)
    is_new: bool  # first chunk of a freshly admitted request: the runner resets slot state
    params: SamplingParams  # sampling settings (the runner reads them when is_new / sample)
    # True: token_ids are prompt tokens (a prefill chunk, possibly of one token);
    # False: the last sampled token (decode). Set by the scheduler; the runner
    # must not infer it from len(token_ids), which is 1 for both.
    is_prefill: bool = False
    # Blocks appended to this request's block table since its previous step (all
    # of them when is_new). The runner keeps each slot's table.
    new_blocks: list[int] = field(default_factory=list)
    # When is_new: the tokens before start_pos, already in the KV cache (prefix
    # hits); the runner's repetition penalty must count them as seen.
    cached_token_ids: list[int] = field(default_factory=list)
    # When is_new after a preemption: the tokens the request generated before it,
    # so the sampler's presence/frequency counts start from them, not from zero.
    output_token_ids: list[int] = field(default_factory=list)
    # The request's preemption count when scheduled: update() drops the result of a
    # step that ran before a preemption, even if the request got its slot back.
    epoch: int = 0


@dataclass(slots=True)
class SchedulerOutput:
    """What the runner executes in one forward pass."""

    step_id: int  # increases by one per non-empty step
    seqs: list[ScheduledSeq]  # decodes first (ordered by slot), then prefill chunks
    num_tokens: int  # sum of len(seq.token_ids): never above max_batch_tokens
    freed_slots: list[int]  # slots released since the previous step (runner drops their state)
    wait_s: float | None = None  # nothing scheduled because of max_queue_delay_ms: retry after

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass(slots=True)
class RunnerOutput:
    """What the runner returns: one sampled token per ``seq.sample`` in schedule order."""

    sampled_token_ids: list[int]  # aligned with [s for s in seqs if s.sample]
    # Aligned the same way when any sampled request asked for logprobs, else None.
    logprobs: list[TokenLogprob | None] | None = None
    # Indexes into the sampled rows whose logits were NaN or inf (a broken model):
    # the engine fails those requests; their token ids are meaningless.
    non_finite_rows: list[int] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """One request's result from one step (new token ids; the engine detokenizes)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None  # set when the request is done
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # total generated so far, including new_token_ids
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked


class Scheduler:
    """Continuous batching over a pool of KV blocks and ``max_batch_size`` slots.

    Not thread-safe: the engine serialises access with its own lock.
    """

    def __init__(
        self,
        config: BatchingConfig,
        max_model_len: int,
        *,
        blocks: BlockManager | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.num_slots = config.max_batch_size
        if blocks is None:
            # As many tokens as one full-length request per slot, and the scratch block.
            per_slot = -(-max_model_len // DEFAULT_BLOCK_SIZE)
            blocks = BlockManager(self.num_slots * per_slot + 1, DEFAULT_BLOCK_SIZE)
        self.blocks = blocks
        self._clock = clock
        # One FIFO per priority level; index 0 is the most urgent.
        self._waiting: list[deque[RequestState]] = [deque() for _ in range(config.priority_levels)]
        self._num_waiting = 0
        self._running: dict[str, RequestState] = {}  # insertion order = admission order
        self._requests: dict[str, RequestState] = {}  # waiting and running
        self._free_slots: list[int] = list(range(self.num_slots))  # a min-heap: lowest slot first
        self._freed_since_step: list[int] = []
        self._step_id = 0
        self.num_preemptions = 0

    # -- intake ------------------------------------------------------------------------------

    def add_request(
        self, request: GenerationRequest, eos_token_ids: Iterable[int] = ()
    ) -> RequestState:
        """Queue a validated request. Raises ``QueueFullError`` when the queue is full."""
        if request.request_id in self._requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        if not 0 <= request.priority < self.config.priority_levels:
            raise ValueError(f"priority {request.priority} out of range")
        if self._num_waiting >= self.config.max_queue_length:
            raise QueueFullError(
                f"the waiting queue is full ({self.config.max_queue_length} requests)"
            )
        state = RequestState(
            request_id=request.request_id,
            prompt_token_ids=list(request.prompt_token_ids),
            params=request.params,
            priority=request.priority,
            arrival_time=request.arrival_time or self._clock(),
            eos_token_ids=frozenset() if request.params.ignore_eos else frozenset(eos_token_ids),
        )
        self._waiting[request.priority].append(state)
        self._num_waiting += 1
        self._requests[request.request_id] = state
        return state

    def abort_request(self, request_id: str) -> RequestState | None:
        """Remove a request wherever it is and free its slot. Returns None if unknown.

        A step in flight may still write the request's K/V into the freed blocks:
        the device runs steps in order, so a later request given those blocks
        writes after it, and blocks are never shared while being written (only
        full, computed blocks enter the prefix cache). The runner sees slot
        changes in step order (``freed_slots``, ``is_new``).
        """
        return self._finish(request_id, FinishReason.ABORT)

    def finish_request(self, request_id: str, reason: FinishReason) -> RequestState | None:
        """Finish a request for a reason found outside the scheduler (a stop string, an error)."""
        return self._finish(request_id, reason)

    def _finish(self, request_id: str, reason: FinishReason) -> RequestState | None:
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        state.finish_reason = reason
        if state.slot >= 0:
            del self._running[request_id]
            self._release(state)
        else:
            self._waiting[state.priority].remove(state)
            self._num_waiting -= 1
        return state

    def _release(self, state: RequestState) -> None:
        heapq.heappush(self._free_slots, state.slot)
        self._freed_since_step.append(state.slot)
        state.slot = -1
        self.blocks.free(state.block_table)
        state.num_blocks_sent = 0
        state.num_cached_tokens = 0

    def _preempt(self, state: RequestState) -> None:
        """Back to the front of its queue; its K/V will be recomputed (see the module doc)."""
        del self._running[state.request_id]
        self._release(state)
        state.num_computed_tokens = 0
        state.num_pending = 0  # a token still in flight is dropped and recomputed
        state.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting[state.priority].appendleft(state)
        self._num_waiting += 1

    # -- the step ----------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick the work for one forward pass (see the module docstring for the policy)."""
        budget = self.config.max_batch_tokens
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []

        # Most important first; preemption victims are taken from the end.
        order = sorted(self._running.values(), key=_importance)
        scheduled: set[str] = set()

        # 1: decodes.
        for state in order:
            if budget <= 0:
                break
            if state.slot < 0 or not (state.output_token_ids or state.num_pending):
                continue
            if state.num_computed_tokens < state.prefill_target:
                continue
            if state.num_pending and not self._can_run_ahead(state):
                continue
            total = state.num_tokens_ahead
            if not self._grow(state, total, order, scheduled):
                continue  # preempted itself
            decodes.append(
                ScheduledSeq(
                    request_id=state.request_id,
                    slot=state.slot,
                    token_ids=[PENDING_TOKEN if state.num_pending else state.output_token_ids[-1]],
                    start_pos=total - 1,
                    sample=True,
                    is_new=False,
                    params=state.params,
                    is_prefill=False,
                    new_blocks=self._new_blocks(state),
                    epoch=state.num_preemptions,
                )
            )
            state.num_computed_tokens = total
            state.num_pending += 1
            scheduled.add(state.request_id)
            budget -= 1

        # 2: prefill chunks of running requests.
        for state in order:
            if budget <= 0:
                break
            if state.slot < 0 or state.num_computed_tokens >= state.prefill_target:
                continue
            seq = self._prefill_chunk(state, budget, is_new=False)
            if seq is None:
                break
            if not self._grow(state, seq.start_pos + len(seq.token_ids), order, scheduled):
                continue
            seq.new_blocks = self._new_blocks(state)
            self._launched(state, seq)
            prefills.append(seq)
            scheduled.add(state.request_id)
            budget -= len(seq.token_ids)

        # 3: admissions.
        wait_s: float | None = None
        if self._num_waiting and self._free_slots and budget > 0:
            wait_s = self._queue_delay_remaining(idle=not self._running)
            if wait_s is None:
                budget = self._admit(budget, prefills)

        decodes.sort(key=lambda s: s.slot)
        seqs = decodes + prefills
        freed, self._freed_since_step = self._freed_since_step, []
        if seqs:
            self._step_id += 1
        return SchedulerOutput(
            step_id=self._step_id,
            seqs=seqs,
            num_tokens=self.config.max_batch_tokens - budget,
            freed_slots=freed,
            wait_s=wait_s if not seqs else None,
        )

    def _grow(
        self, state: RequestState, num_tokens: int, order: list[RequestState], scheduled: set[str]
    ) -> bool:
        """Blocks for ``num_tokens``, preempting the least important unscheduled requests.

        Returns False if ``state`` itself had to be preempted.
        """
        while not self.blocks.allocate(state.block_table, num_tokens):
            victim = next(
                (
                    v
                    for v in reversed(order)
                    if v.slot >= 0 and v.request_id not in scheduled and v is not state
                ),
                None,
            )
            if victim is None or _importance(victim) < _importance(state):
                self._preempt(state)
                return False
            self._preempt(victim)
        return True

    def _can_run_ahead(self, state: RequestState) -> bool:
        """Whether a request whose last token is still in flight can decode again now.

        Not when that token already ends it by length (no step is wasted on it),
        and not with a grammar, whose matcher must see the token on the host first.
        """
        if state.params.grammar is not None:
            return False
        return (
            len(state.output_token_ids) + state.num_pending < state.params.max_new_tokens
            and state.num_tokens_ahead < self.max_model_len
        )

    @staticmethod
    def _launched(state: RequestState, seq: ScheduledSeq) -> None:
        """Book a scheduled prefill chunk as computed (the next chunk can follow at once)."""
        seq.epoch = state.num_preemptions
        state.num_computed_tokens = seq.start_pos + len(seq.token_ids)
        if seq.sample:
            state.num_pending += 1

    def _new_blocks(self, state: RequestState) -> list[int]:
        new = state.block_table[state.num_blocks_sent :]
        state.num_blocks_sent = len(state.block_table)
        return new

    def _queue_delay_remaining(self, *, idle: bool) -> float | None:
        """Seconds the idle batch should still wait for company, or None to admit now.

        Only an idle batch waits: once requests are running, every step admits
        whatever is waiting, so waiting would only add latency.
        """
        delay_s = self.config.max_queue_delay_ms / 1000.0
        if not idle or delay_s <= 0 or self._num_waiting >= self.num_slots:
            return None
        oldest = min(q[0].arrival_time for q in self._waiting if q)
        remaining = oldest + delay_s - self._clock()
        return remaining if remaining > 0 else None

    def _admit(self, budget: int, prefills: list[ScheduledSeq]) -> int:
        for queue in self._waiting:
            while queue and self._free_slots and budget > 0:
                state = queue[0]
                target = state.prefill_target
                hit = self.blocks.match_prefix(state.token_ids(0, target), state.block_table)
                state.num_computed_tokens = hit
                state.num_cached_tokens = hit
                seq = self._prefill_chunk(state, budget, is_new=True)
                if seq is None or not self.blocks.allocate(
                    state.block_table, seq.start_pos + len(seq.token_ids)
                ):
                    # Head of line does not fit: keep the order, stop admitting.
                    self.blocks.free(state.block_table)
                    state.num_computed_tokens = state.num_cached_tokens = 0
                    return budget
                queue.popleft()
                self._num_waiting -= 1
                state.slot = heapq.heappop(self._free_slots)
                seq.slot = state.slot
                seq.new_blocks = self._new_blocks(state)
                if hit:
                    seq.cached_token_ids = state.token_ids(0, hit)
                self._launched(state, seq)
                self._running[state.request_id] = state
                prefills.append(seq)
                budget -= len(seq.token_ids)
            if not self._free_slots or budget <= 0:
                break
        return budget

    def _prefill_chunk(
        self, state: RequestState, budget: int, *, is_new: bool
    ) -> ScheduledSeq | None:
        start = state.num_computed_tokens
        target = state.prefill_target
        remaining = target - start
        if remaining > budget:
            # Without chunking a prompt must fit in one step; a prompt longer than the
            # whole budget still runs, alone, when the budget is untouched.
            if not self.config.chunked_prefill and budget < self.config.max_batch_tokens:
                return None
            n = budget if self.config.chunked_prefill else remaining
        else:
            n = remaining
        return ScheduledSeq(
            request_id=state.request_id,
            slot=state.slot,
            token_ids=state.token_ids(start, start + n),
            start_pos=start,
            # After a preemption the last chunk samples nothing: the next decode
            # feeds the last token sampled before it.
            sample=start + n == target and not state.output_token_ids,
            is_new=is_new,
            params=state.params,
            is_prefill=True,
            output_token_ids=list(state.output_token_ids) if is_new else [],
        )

    def update(self, scheduled: SchedulerOutput, result: RunnerOutput) -> list[RequestOutput]:
        """Apply the runner's sampled tokens; finish requests on EOS or length."""
        outputs: list[RequestOutput] = []
        sampled = iter(result.sampled_token_ids)
        logprobs = iter(result.logprobs) if result.logprobs is not None else None
        bs = self.blocks.block_size
        for seq in scheduled.seqs:
            token = next(sampled) if seq.sample else -1
            logprob = next(logprobs) if seq.sample and logprobs is not None else None
            state = self._running.get(seq.request_id)
            if state is None or state.slot != seq.slot or state.num_preemptions != seq.epoch:
                continue  # aborted or preempted since it was scheduled: its result is dropped
            # The K/V of tokens [0, end) are now in the cache (a later step may be in
            # flight already: num_computed_tokens can be ahead of this).
            end = seq.start_pos + len(seq.token_ids)
            if end // bs > state.num_cached_tokens // bs:
                state.num_cached_tokens = self.blocks.cache_full_blocks(
                    state.token_ids(0, end),
                    state.block_table,
                    state.num_cached_tokens,
                    end,
                )
            if not seq.sample:
                continue
            state.num_pending -= 1
            state.output_token_ids.append(token)
            reason: FinishReason | None = None
            if token in state.eos_token_ids:
                reason = FinishReason.STOP
            elif (
                len(state.output_token_ids) >= state.params.max_new_tokens
                or state.num_tokens >= self.max_model_len
            ):
                reason = FinishReason.LENGTH
            if reason is not None:
                self._finish(state.request_id, reason)
            outputs.append(
                RequestOutput(
                    request_id=state.request_id,
                    new_token_ids=[token],
                    finish_reason=reason,
                    num_prompt_tokens=len(state.prompt_token_ids),
                    num_output_tokens=len(state.output_token_ids),
                    logprobs=[logprob] if logprob is not None else None,
                )
            )
        return outputs

    # -- introspection -----------------------------------------------------------------------

    def get(self, request_id: str) -> RequestState | None:
        return self._requests.get(request_id)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def kv_usage(self) -> float:
        """KV blocks held by requests / usable blocks, 0..1."""
        return self.blocks.usage()


def _importance(state: RequestState) -> tuple[int, float]:
    """Sort key: most important first (lowest priority number, then the oldest)."""
    return (state.priority, state.arrival_time)
