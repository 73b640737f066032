"""Polling with a deadline: the one way tests wait for the cluster."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold in time. An AssertionError, so pytest shows it as a failure."""


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float = 60.0,
    interval: float = 0.25,
    message: str | Callable[[], str] = "condition",
) -> T:
    """Call ``probe`` until it returns something truthy and return that.

    On timeout, raise WaitTimeout with ``message`` (a callable is evaluated
    then, so it can describe the last observed state).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"timed out after {timeout:.0f}s waiting for {text}")
        time.sleep(interval)
