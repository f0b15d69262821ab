"""A bounded pool of warm instances of one plugin.

Creating an instance costs tens of microseconds to milliseconds; calling a warm
one costs a few. The pool keeps up to ``max_instances`` (the plugin's
concurrency limit), hands each to one caller at a time, and replaces any
instance that failed inside the guest.

Building an instance runs guest code (instantiation, ``_initialize``, ``sandbus_init``) under
the plugin's full timeout, and so does ``sandbus_shutdown``. Neither may run on a thread that
runs an asyncio event loop, where it would stall every other plugin's replies: an event loop
takes instances with :meth:`InstancePool.try_acquire`, which never builds nor waits, and the
shutdowns a release or a close starts there are handed to a background thread.

A plugin with ``isolation = "per-call"`` pools slots instead of instances (host/sandbox/percall.py): the
same bound on calls at once, but each call builds its own instance and drops it.

For the debug view the pool keeps an inventory of its live instances (:meth:`InstancePool.inventory`):
a number for each, the calls it served, whether it is busy and the memory its latest call left it.
Keeping it costs one dictionary update per call; reading it never touches an instance's store.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sandbus.host.sandbox.instance import PluginInstance
from sandbus.sdk.errors import InstanceLimitError

__all__ = ["InstancePool", "NotInline", "on_event_loop"]

log = logging.getLogger("sandbus.sandbox")

_background_lock = threading.Lock()
_background: ThreadPoolExecutor | None = None


class NotInline(Exception):
    """A call asked to run inline on an event loop cannot: nothing ran, run it in a worker thread.

    Raised when no instance is idle (the loop may neither wait for one nor build one), and for a
    plugin whose calls must not be re-run (see :func:`sandbus.host.sandbox.sandbox.rerun_safe`).
    """


def on_event_loop() -> bool:
    """Whether the calling thread is running an asyncio event loop (where guest code must not run long)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _off_loop(work: Callable[[], None]) -> None:
    """Run ``work`` now, or on a background thread when the caller runs an event loop."""
    if not on_event_loop():
        work()
        return
    global _background
    with _background_lock:
        if _background is None:
            _background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbus-pool")
        executor = _background
    executor.submit(_logged, work)


def _logged(work: Callable[[], None]) -> None:
    try:
        work()
    except Exception:  # a background shutdown has no caller to report to
        log.exception("background instance work failed")


class InstancePool:
    """Parameters:
    factory: builds (and initialises) a fresh instance.
    max_instances: ceiling on live instances = concurrent calls.
    acquire_timeout_s: how long a caller waits for a free instance before an InstanceLimitError.
    """

    def __init__(self, plugin: str, factory: Callable[[], PluginInstance], max_instances: int,
                 acquire_timeout_s: float) -> None:
        self.plugin = plugin
        self._factory = factory
        self.max_instances = max_instances
        self._timeout = acquire_timeout_s
        self._idle: list[PluginInstance] = []
        self._created = 0
        self._closed = False
        self._cond = threading.Condition()
        self._waiting = 0
        self.replaced = 0
        #: live instances -> [their number in this pool, calls they took]
        self._live: dict[PluginInstance, list[int]] = {}
        self._numbers = itertools.count(1)

    @property
    def size(self) -> int:
        return self._created

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_use(self) -> int:
        with self._cond:
            return self._created - len(self._idle)

    def inventory(self) -> list[dict[str, Any]]:
        """The live instances, by number: ``{"id", "memory_bytes", "busy", "calls"}``; ``memory_bytes`` is
        the linear memory its latest call left (0 before its first call)."""
        with self._cond:
            live = list(self._live.items())
            idle = {id(inst) for inst in self._idle}
        out = []
        for inst, (number, calls) in sorted(live, key=lambda item: item[1][0]):
            stats = getattr(getattr(inst, "ctx", None), "stats", None)
            memory = getattr(stats, "memory_bytes", 0)
            out.append({"id": number, "memory_bytes": memory if isinstance(memory, int) else 0,
                        "busy": id(inst) not in idle, "calls": calls})
        return out

    def _count(self, inst: PluginInstance) -> PluginInstance:
        entry = self._live.get(inst)
        if entry is not None:
            entry[1] += 1  # one caller holds the instance: nobody else writes its count now
        return inst

    def warm(self, count: int) -> None:
        """Create instances ahead of the first calls (on the calling thread: never call it on an event loop)."""
        fresh = [self.acquire() for _ in range(min(count, self.max_instances))]
        for inst in fresh:
            entry = self._live.get(inst)
            if entry is not None:
                entry[1] -= 1  # warming is not a call
            self.release(inst)

    def try_acquire(self) -> PluginInstance | None:
        """An idle instance, or None at once: never builds one and never waits (for event loops).

        The caller that gets None runs the call where it may block (a worker thread calling
        :meth:`acquire`), which also builds the replacement of an instance that failed.
        """
        try:
            return self._count(self._idle.pop())  # atomic; a closed pool's idle list is empty
        except IndexError:
            return None

    def acquire(self, timeout_s: float | None = None) -> PluginInstance:
        """An idle instance, a new one while fewer than ``max_instances`` live, else wait for one
        (up to ``timeout_s``, default ``acquire_timeout_s``, then :class:`InstanceLimitError`).
        May build: not for event loops."""
        # Fast path without the condition's lock: list.pop is atomic, and a pool that is
        # closed has an empty idle list, so what we pop is always a live instance.
        try:
            return self._count(self._idle.pop())
        except IndexError:
            pass
        wait_s = self._timeout if timeout_s is None else timeout_s
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                if self._closed:
                    raise InstanceLimitError("the sandbox is closed", plugin=self.plugin)
                if self._idle:
                    return self._count(self._idle.pop())
                if self._created < self.max_instances:
                    self._created += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise InstanceLimitError(
                        f"all {self.max_instances} instances stayed busy for {max(0.0, wait_s):.3g} s",
                        plugin=self.plugin, limit=self.max_instances,
                    )
                # Short slices: release() skips the lock when nobody was waiting, so an instance
                # can land in the idle list just after we looked without waking us.
                self._waiting += 1
                try:
                    self._cond.wait(min(remaining, 0.005))
                finally:
                    self._waiting -= 1
        try:
            inst = self._factory()
        except BaseException:
            with self._cond:
                self._created -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._live[inst] = [next(self._numbers), 1]
        return inst

    def release(self, inst: PluginInstance) -> None:
        if not inst.poisoned and not self._closed and not self._waiting:
            self._idle.append(inst)
            # close() may have run between the check and the append: hand the instance back to it.
            if self._closed:
                self._drain()
            return
        retire = False
        with self._cond:
            if inst.poisoned or self._closed:
                self._created -= 1
                self._live.pop(inst, None)
                if inst.poisoned:
                    self.replaced += 1
                else:
                    retire = True
            else:
                self._idle.append(inst)
            self._cond.notify()
        if retire:
            _off_loop(inst.shutdown)  # it was busy when the pool closed: its sandbus_shutdown runs now

    def close(self) -> None:
        """Shut down idle instances now, busy ones when their call returns."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._drain()

    def _drain(self) -> None:
        idle = []
        with self._cond:
            while self._idle:
                idle.append(self._idle.pop())
            self._created -= len(idle)
            for inst in idle:
                self._live.pop(inst, None)
        if idle:
            _off_loop(lambda: _shutdown_all(idle))


def _shutdown_all(instances: list[PluginInstance]) -> None:
    for inst in instances:
        inst.shutdown()
