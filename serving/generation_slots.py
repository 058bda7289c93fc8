"""Admission of generations on one replica, apart from everything else it answers.

Serve's ``max_ongoing_requests`` counts every request a replica holds. If that number were the
generation limit, a replica busy with generations would make ``/healthz``, ``/readyz`` and the
concept reads wait behind them, and Kubernetes would restart a healthy replica for being busy.
So the replica takes more requests than it generates at once (``ServeSettings.deployment_options``)
and generations queue here instead: ``slots`` run, ``queue`` wait, and the next is refused at once
with 503 and Retry-After (``OverloadedError``). Light routes never take a slot.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class OverloadedError(Exception):
    """Every slot and queue place of this replica is taken."""


class GenerationSlots:
    """At most ``slots`` generations at once and ``queue`` waiting for one (-1: no limit)."""

    def __init__(self, slots: int, queue: int):
        self.slots, self.queue = slots, queue
        self.running = 0
        self.waiting = 0
        self._free: asyncio.Semaphore | None = None  # made on first use, in the replica's event loop

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Holds a slot for the body of the ``async with``; waits for one, or raises ``OverloadedError``."""
        if self._free is None:
            self._free = asyncio.Semaphore(self.slots)
        full = self.running >= self.slots
        if full and 0 <= self.queue <= self.waiting:
            raise OverloadedError(f"all {self.slots} generation slots and {self.queue} queue places are taken")
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._free.release()
