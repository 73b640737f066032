"""Blocking start-up work (imports, model load, warm-up) off the event loop.

``asyncio.to_thread`` uses the loop's default executor, and ``asyncio.run``
joins that executor before it returns: a SIGTERM during a minutes-long model
load would wait for the load to finish. :func:`run_in_daemon_thread` runs the
work on a daemon thread instead, so an abandoned start-up (the awaiting task
cancelled) leaves nothing for the loop to wait on; the process then exits
with ``os._exit`` (see ``app.run_server``) rather than finalise the
interpreter around a thread that may be inside C code.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def run_in_daemon_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """``await fn(*args, **kwargs)`` on a new daemon thread; cancelling the await abandons it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # the awaiting task was cancelled
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            error = exc
        # RuntimeError: the loop is closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    name = getattr(fn, "__qualname__", "work")
    threading.Thread(target=work, name=f"autoglm-{name}", daemon=True).start()
    return await future
