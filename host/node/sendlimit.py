"""How fast, and how many per call, a plugin may send (``publish`` and ``request``).

The hop limit bounds how *deep* a chain of plugin messages goes, not how *wide*: a plugin that
publishes K messages for each message it receives on a topic it subscribes to sends K + K^2 + ... +
K^hops messages from one request (K = 3: almost 10,000). Two bounds close that, both from the
operator policy (``[messaging]``, see host/lifecycle/policy.py):

* a token bucket per plugin (per node process): ``per_second`` tokens a second, at most ``burst``
  banked; every send takes one, and a send with none left is refused;
* a cap per call, so one call cannot fire its whole burst (or loop on ``publish``) at once.

A refused send fails the call with :class:`~sandbus.sdk.errors.RateLimitError` (``limit.rate``), which the call
path audits like every other limit.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from sandbus.sdk.errors import RateLimitError

if TYPE_CHECKING:
    from sandbus.host.lifecycle.policy import SendLimits
    from sandbus.host.sandbox import CallContext

__all__ = ["SendLimiter", "TokenBucket"]

#: ``ctx.extra`` slot holding ``[call marker, sends so far]`` of the instance's current call.
_SENDS = "bus_sends"


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` held; starts full. Thread-safe (calls run in workers)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Take one token if there is one."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(float(self.burst), self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False


class SendLimiter:
    """One bucket per plugin name, built from that plugin's :class:`~sandbus.host.lifecycle.policy.SendLimits`
    (rebuilt when they change, e.g. after a reload under another policy)."""

    def __init__(self) -> None:
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, plugin: str, limits: SendLimits) -> TokenBucket:
        with self._lock:
            bucket = self._buckets.get(plugin)
            if bucket is None or (bucket.rate, bucket.burst) != (limits.per_second, limits.burst):
                bucket = self._buckets[plugin] = TokenBucket(limits.per_second, limits.burst)
            return bucket

    def check(self, ctx: CallContext, limits: SendLimits, what: str, **details: Any) -> None:
        """Count one send (``what``) of the current call against both bounds.

        The call is told apart from the instance's previous one by its deadline (host/sandbox/deadline.py
        sets a new one at the start of every call), so the per-call count needs no hook in the call path.

        Raises:
            RateLimitError: the call already made ``limits.per_call`` sends, or the plugin's bucket is
                empty (nothing is sent; the call fails and is audited as ``limit.rate``).
        """
        marker = ctx.deadline
        state = ctx.extra.get(_SENDS)
        if not isinstance(state, list) or state[0] != marker:
            state = ctx.extra[_SENDS] = [marker, 0]
        if state[1] >= limits.per_call:
            raise RateLimitError(
                f"{what} would be send {state[1] + 1} of this call, above the limit of {limits.per_call} sends "
                "(publish and request) per call ([messaging] max_sends_per_call)",
                plugin=ctx.plugin, limit=limits.per_call, scope="call", **details,
            )
        if not self._bucket(ctx.plugin, limits).take():
            raise RateLimitError(
                f"{what} refused: the plugin sends more than {limits.per_second:g} messages a second "
                f"(burst {limits.burst}; [messaging] max_sends_per_second / send_burst)",
                plugin=ctx.plugin, limit=limits.per_second, burst=limits.burst, scope="plugin", **details,
            )
        state[1] += 1
