"""Sharing the event loop between plugins whose calls run on it (inline calls).

An inline call runs synchronously on the event loop. While it runs, nothing else does: not the
socket reader, not the flusher that sends replies, not another subscription. A subscription whose
queue already holds many messages never lets go by itself either: nats-py's ``await queue.get()``
returns without suspending while the queue is not empty, and a task per message (direct messages,
topics) runs all of its tasks' first steps in one loop iteration. So one plugin's backlog of 8 ms
calls would hold the loop for the whole backlog, and another plugin's request behind it would wait
seconds.

:class:`LoopTurns` bounds that. Inline work within one loop iteration may run for :attr:`slice_s`;
after that, whoever wants to run inline waits for a turn. Turns go round-robin between plugins (FIFO
within a plugin), one per loop iteration, so between two turns the loop reads the socket, sends
the replies and runs every other ready callback, and a plugin with one request waits behind at most
one call of each other busy plugin, not behind their backlogs. While nobody waits and the slice is not
spent, taking a turn costs a clock read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Final

__all__ = ["DEFAULT_SLICE_S", "LoopTurns"]

#: how long inline work may hold the loop in one iteration before others get a turn: well below the
#: 20 ms inline budget of one call, well above a typical call (microseconds), so a burst of fast calls
#: never waits
DEFAULT_SLICE_S: Final = 0.005

#: most times one caller waits for a turn before it runs anyway (each wait is a loop iteration that
#: handed a turn to someone: reaching it means hundreds of plugins are queued, which must not hang)
_MAX_WAITS: Final = 1000


class LoopTurns:
    """Turns on the event loop for inline work (see the module docstring). One per event loop."""

    __slots__ = ("_round_due", "_since", "_waiters", "slice_s")

    def __init__(self, slice_s: float = DEFAULT_SLICE_S) -> None:
        self.slice_s = slice_s
        #: when inline work started in this loop iteration (None: not yet)
        self._since: float | None = None
        self._round_due = False
        #: waiting callers, per plugin, in the order plugins started waiting (dicts keep insertion order)
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}

    def due(self) -> bool:
        """Whether inline work must take a turn (:meth:`wait`) before it runs now."""
        if self._waiters:
            return True
        since = self._since
        return since is not None and time.monotonic() - since >= self.slice_s

    async def wait(self, plugin: str) -> None:
        """Wait for this plugin's next turn: round-robin between plugins, one turn per loop iteration."""
        for _ in range(_MAX_WAITS):
            future = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(plugin, deque()).append(future)
            self._schedule_round()
            try:
                await future
            except asyncio.CancelledError:
                self._forget(plugin, future)
                raise
            # Woken: run now, unless the turn was spent by work that did not wait (a newcomer that
            # found nobody waiting in the iteration the turn was handed out).
            if not self._spent():
                return

    def begin(self) -> None:
        """Inline work starts now (after :meth:`wait` when :meth:`due`)."""
        if self._since is None:
            self._since = time.monotonic()
            self._schedule_round()

    def _spent(self) -> bool:
        since = self._since
        return since is not None and time.monotonic() - since >= self.slice_s

    def _schedule_round(self) -> None:
        # call_soon from inside an iteration runs in the next one (asyncio runs only the callbacks that
        # were ready when the iteration began), after the loop has polled the socket.
        if not self._round_due:
            self._round_due = True
            asyncio.get_running_loop().call_soon(self._round)

    def _round(self) -> None:
        """A new loop iteration: the slice starts again, and the next plugin in line gets a turn."""
        self._round_due = False
        self._since = None
        waiters = self._waiters
        while waiters:
            plugin = next(iter(waiters))
            queue = waiters.pop(plugin)
            woken = False
            while queue and not woken:
                future = queue.popleft()
                if not future.done():
                    future.set_result(None)
                    woken = True
            if queue:
                waiters[plugin] = queue  # to the back of the line
            if woken:
                break
        if waiters:
            self._schedule_round()

    def _forget(self, plugin: str, future: asyncio.Future[None]) -> None:
        queue = self._waiters.get(plugin)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(future)
        if not queue:
            del self._waiters[plugin]
