"""Benchmark stages that run unless their output is already there, each timed."""

from __future__ import annotations

import time
from collections.abc import Callable


class Stages:
    def __init__(self, echo: Callable[[str], None]) -> None:
        self.echo = echo
        self.timings: dict[str, float] = {}  # seconds of each stage that ran

    def run(self, name: str, done: bool, work: Callable[[], object]) -> None:
        """Announce and time ``work()`` unless ``done`` (its output exists from an earlier run)."""
        if done:
            return
        self.echo(name)
        started = time.perf_counter()
        work()
        self.timings[name] = round(time.perf_counter() - started, 1)
