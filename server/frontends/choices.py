"""n choices of one request: n engine requests, and their deltas merged as they come."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

from autoglm_server.engine.api import SEED_MAX, GenerationDelta, GenerationRequest, SamplingParams
from autoglm_server.frontend import new_request_id
from autoglm_server.security.keys import cap_priority, charge_tokens

MAX_CHOICES = 16


def generation_requests(
    prompt_ids: list[int], params: SamplingParams, n: int, priority: int
) -> list[GenerationRequest]:
    """n engine requests; a seeded request gives choice i the seed ``seed + i``.

    The request's API key (if any) is charged the prompt tokens of every choice,
    and its priority cap applies.
    """
    priority = cap_priority(priority)
    charge_tokens(len(prompt_ids) * n)
    out = []
    for i in range(n):
        p = params
        if i and params.seed is not None:
            p = dataclasses.replace(params, seed=(params.seed + i) % SEED_MAX)
        out.append(
            GenerationRequest(
                request_id=new_request_id(),
                prompt_token_ids=prompt_ids,
                params=p,
                priority=priority,
            )
        )
    return out


async def merge(
    streams: Sequence[AsyncIterator[GenerationDelta]],
) -> AsyncIterator[tuple[int, GenerationDelta]]:
    """(choice index, delta) as they come, from every stream; the first error raises.

    Generated tokens are charged to the request's API key (if any) as they come.
    """
    if len(streams) == 1:
        async for delta in streams[0]:
            charge_tokens(len(delta.token_ids))
            yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, GenerationDelta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async for delta in streams[index]:
                queue.put_nowait((index, delta))
            queue.put_nowait((index, None))
        except Exception as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(streams))]
    try:
        live = len(tasks)
        while live:
            index, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                charge_tokens(len(item.token_ids))
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
