"""The guest's OOM kills (the agent's GetOOMEvent) as containerd's /tasks/oom events.

The guest decides what GetOOMEvent answers and how fast. Only an event that names a task of this pod
counts, a task's events within a quiet period make one, and the calls themselves are paced by a token
bucket: a guest answering in a loop costs the host a few calls a second, not a core.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kata.errors import KataError
from kata.ttrpc import TTRPCError

# Events (and calls) per second in the long run, and how many may come at once.
RATE = 5.0
BURST = 10
# A task's further events within this many seconds of one reported are the same OOM kill, or noise.
QUIET = 1.0
_MAX_REMEMBERED = 1024


class OomForwarder:
    def __init__(
        self,
        next_event: Callable[[], str],
        is_task: Callable[[str], bool],
        publish: Callable[[str], None],
        *,
        rate: float = RATE,
        burst: int = BURST,
        quiet: float = QUIET,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``next_event``: the next container id the guest reports (blocks; raises once the agent
        connection is gone); ``publish``: report one task's OOM kill."""
        self._next_event = next_event
        self._is_task = is_task
        self._publish = publish
        self._rate = rate
        self._burst = burst
        self._quiet = quiet
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._refilled = clock()
        self._reported: dict[str, float] = {}  # task -> when its last event was reported

    def run(self) -> None:
        """Forward events for as long as the agent connection lasts (or the agent has the call)."""
        while True:
            self._pace()
            try:
                cid = self._next_event()
            except (KataError, TTRPCError):
                return
            if self._accept(cid):
                self._publish(cid)

    def _pace(self) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1:
            self._sleep((1 - self._tokens) / self._rate)
            self._tokens = 1.0
            self._refilled = self._clock()
        self._tokens -= 1

    def _accept(self, cid: str) -> bool:
        if not self._is_task(cid):
            return False
        now = self._clock()
        last = self._reported.get(cid)
        if last is not None and now - last < self._quiet:
            return False
        if len(self._reported) >= _MAX_REMEMBERED:
            self._reported = {k: t for k, t in self._reported.items() if now - t < self._quiet}
        self._reported[cid] = now
        return True
