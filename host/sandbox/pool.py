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
                if remaining <= 0 or not self._cond.wait(remaining):
                    raise InstanceLimitError(
                        f"all {self.max_instances} instances stayed busy for {self._timeout:g} s",
                        plugin=self.plugin, limit=self.max_instances,
                    )
        try:
            return self._factory()
        except BaseException:
            with self._cond:
                self._created -= 1
                self._cond.notify()
            raise

    def release(self, inst: PluginInstance) -> None:
        with self._cond:
            if inst.poisoned or self._closed:
                self._created -= 1
                if inst.poisoned:
                    self.replaced += 1
            else:
                self._idle.append(inst)
            self._cond.notify()

    def close(self) -> None:
        """Shut down idle instances; busy ones are dropped when released."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._created -= len(idle)
            self._cond.notify_all()
        for inst in idle:
            inst.shutdown()
