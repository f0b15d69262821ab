"""A bounded pool of warm instances of one plugin.

Creating an instance costs tens of microseconds to milliseconds; calling a warm
one costs a few. The pool keeps up to ``max_instances`` (the plugin's
concurrency limit), hands each to one caller at a time, and replaces any
instance that failed inside the guest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from sdk.errors import InstanceLimitError

from .instance import PluginInstance

__all__ = ["InstancePool"]


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

    @property
    def size(self) -> int:
        return self._created

    @property
    def in_use(self) -> int:
        with self._cond:
            return self._created - len(self._idle)

    def warm(self, count: int) -> None:
        """Create instances ahead of the first calls."""
        fresh = [self.acquire() for _ in range(min(count, self.max_instances))]
        for inst in fresh:
            self.release(inst)

    def acquire(self) -> PluginInstance:
        # Fast path without the condition's lock: list.pop is atomic, and a pool that is
        # closed has an empty idle list, so what we pop is always a live instance.
        try:
            return self._idle.pop()
        except IndexError:
            pass
        deadline = time.monotonic() + self._timeout
        with self._cond:
            while True:
                if self._closed:
                    raise InstanceLimitError("the sandbox is closed", plugin=self.plugin)
                if self._idle:
                    return self._idle.pop()
                if self._created < self.max_instances:
                    self._created += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise InstanceLimitError(
                        f"all {self.max_instances} instances stayed busy for {self._timeout:g} s",
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
            return self._factory()
        except BaseException:
            with self._cond:
                self._created -= 1
                self._cond.notify()
            raise

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
                if inst.poisoned:
                    self.replaced += 1
                else:
                    retire = True
            else:
                self._idle.append(inst)
            self._cond.notify()
        if retire:
            inst.shutdown()  # it was busy when the pool closed: its sandbus_shutdown runs now

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
            inst.shutdown()
