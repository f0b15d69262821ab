"""Per-plugin call statistics: counts, recent latencies (for p50/p99), fuel and memory.

Recording sits on the request path, so it is a few additions under a lock; the
sorting that percentiles need happens only when someone asks (``snapshot``).
Latencies are kept in a fixed ring of the most recent calls: percentiles then
describe the plugin as it behaves *now*, memory stays bounded however many
calls are served, and an old slow spell does not haunt the numbers forever.

For the debug view (``sandbus debug``) latency and fuel also go into histograms over
every call since the plugin was first loaded. Their bounds are fixed and log-scale
(:data:`LATENCY_BOUNDS_S`, :data:`FUEL_BOUNDS`), the same on every node, so histograms
of several nodes add up; recording one is a binary search in C and one addition. The
latest failures are kept too, each with its function and code, in a short ring.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from sandbus.sdk.errors import BusError, HostError, PayloadTooLargeError, RequestError, SandbusError

__all__ = ["FUEL_BOUNDS", "LATENCY_BOUNDS_S", "MAX_RECENT_ERRORS", "LatencyWindow", "PluginStats", "StatsSnapshot",
           "blames_caller", "blames_plugin"]

#: Upper bounds of the latency histogram's buckets, seconds: 1-2-5 steps from 10 us to 30 s (a last
#: bucket counts what is above).
LATENCY_BOUNDS_S: tuple[float, ...] = (
    1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: Upper bounds of the fuel histogram's buckets: powers of ten from 100 to 10^12.
FUEL_BOUNDS: tuple[int, ...] = tuple(10 ** k for k in range(2, 13))
#: Failures kept per plugin for the debug view.
MAX_RECENT_ERRORS = 32
#: Characters of a failure's message kept in that ring.
MAX_ERROR_MESSAGE = 1024


def blames_plugin(error: SandbusError) -> bool:
    """Whether a failed call counts against the plugin (its ``errors`` and ``last_error``).

    A :class:`~sandbus.sdk.errors.BusError` (and its subclasses) means the bus or the network failed under
    a host function -- NATS down or reconnecting, a publish never acknowledged, a granted server
    unreachable -- and a :class:`~sandbus.sdk.errors.HostError` that a host function itself failed (a bug
    of the host); no plugin can cause or fix either: an operator reading ``last_error`` must not be
    sent to the plugin's author. Such calls count in ``host_errors`` instead. Everything else
    (traps, limits, denials, bad replies) is the plugin's.
    """
    return not isinstance(error, BusError | HostError)


def blames_caller(error: SandbusError) -> bool:
    """Whether a failed call was the caller's mistake: a ``request.*`` error, or an input above the
    plugin's input cap (refused before the plugin ran). It counts in ``rejected``, and in neither
    ``executions`` nor ``errors`` nor ``last_error``: the plugin did nothing wrong and nothing ran."""
    return isinstance(error, RequestError) or (
        isinstance(error, PayloadTooLargeError) and error.details.get("direction") == "input")


class LatencyWindow:
    """The most recent ``size`` latencies, in seconds. Not thread-safe: :class:`PluginStats` locks it.

    Parameters:
        size: how many recent samples the percentiles are computed over.
    """

    __slots__ = ("_samples", "_size", "add")

    def __init__(self, size: int = 1024) -> None:
        if size <= 0:
            raise ValueError(f"window size must be positive, found {size}")
        self._size = size
        # A bounded deque drops the oldest sample itself, in C: adding is one call on the request path.
        self._samples: deque[float] = deque(maxlen=size)
        self.add: Callable[[float], None] = self._samples.append

    def __len__(self) -> int:
        return len(self._samples)

    def percentiles(self, *qs: float) -> tuple[float | None, ...]:
        """Nearest-rank percentiles (``q`` in 0..100) of the window; ``None`` when it is empty."""
        if not self._samples:
            return tuple(None for _ in qs)
        ordered = sorted(self._samples)
        n = len(ordered)
        out: list[float | None] = []
        for q in qs:
            if not 0 <= q <= 100:
                raise ValueError(f"percentile must be within 0..100, found {q}")
            rank = max(1, math.ceil(q * n / 100))  # nearest rank; at least the first sample
            out.append(ordered[min(rank, n) - 1])
        return tuple(out)


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """A consistent copy of :class:`PluginStats` at one moment (latencies in milliseconds)."""

    executions: int
    errors: int
    host_errors: int
    rejected: int
    p50_ms: float | None
    p99_ms: float | None
    fuel_used: int
    last_fuel_used: int
    memory_bytes_per_instance: int
    last_error: str | None
    last_error_code: str | None
    last_error_at: datetime | None


class PluginStats:
    """Thread-safe statistics of one plugin, kept across its reloads (a reload is not a new plugin).

    Parameters:
        window: how many recent latencies p50/p99 are computed over.
    """

    def __init__(self, window: int = 1024) -> None:
        self._lock = threading.Lock()
        self._latencies = LatencyWindow(window)
        self._add_latency = self._latencies.add
        self.executions = 0
        self.errors = 0
        self.host_errors = 0
        self.rejected = 0
        self.fuel_used = 0
        self.last_fuel_used = 0
        self.memory_bytes_per_instance = 0
        self.last_error: str | None = None
        self.last_error_code: str | None = None
        self.last_error_at: datetime | None = None
        self._latency_counts = [0] * (len(LATENCY_BOUNDS_S) + 1)
        self._fuel_counts = [0] * (len(FUEL_BOUNDS) + 1)
        #: (when, code, message, function) of the latest failures, oldest first
        self._errors: deque[tuple[datetime, str | None, str, str | None]] = deque(maxlen=MAX_RECENT_ERRORS)

    def record_call(self, seconds: float, fuel: int, memory_bytes: int) -> None:
        """A call that returned a reply."""
        with self._lock:
            self.executions += 1
            self._add_latency(seconds)
            self._latency_counts[bisect_left(LATENCY_BOUNDS_S, seconds)] += 1
            self._fuel_counts[bisect_left(FUEL_BOUNDS, fuel)] += 1
            self.fuel_used += fuel
            self.last_fuel_used = fuel
            # Linear memory only grows within an instance: the largest seen is what instances hold.
            if memory_bytes > self.memory_bytes_per_instance:
                self.memory_bytes_per_instance = memory_bytes

    def record_rejected(self) -> None:
        """A request or message refused as the caller's mistake (see :func:`blames_caller`)."""
        with self._lock:
            self.rejected += 1

    def record_error(self, seconds: float, error: SandbusError, function: str | None = None) -> None:
        """A call that failed (its latency counts too: a slow failure is still slow for the caller).

        Failures that are not the plugin's (see :func:`blames_plugin`) count in ``host_errors`` and
        leave ``errors`` and ``last_error`` alone; the caller's own mistakes (:func:`blames_caller`)
        count only in ``rejected``.
        """
        if blames_caller(error):
            self.record_rejected()
            return
        blame = blames_plugin(error)
        with self._lock:
            self.executions += 1
            if blame:
                self.errors += 1
            else:
                self.host_errors += 1
            self._latencies.add(seconds)
            self._latency_counts[bisect_left(LATENCY_BOUNDS_S, seconds)] += 1
        if blame:
            self.note_error(error, function)

    def note_error(self, error: SandbusError, function: str | None = None) -> None:
        """Remember ``error`` as the latest (a failed call, load or reload; ``function``: the call's)."""
        message = str(error)
        with self._lock:
            self.last_error = message
            self.last_error_code = error.code
            self.last_error_at = at = datetime.now(UTC)
            self._errors.append((at, error.code, message[:MAX_ERROR_MESSAGE], function))

    def histograms(self) -> dict[str, dict[str, list[float] | list[int]]]:
        """``latency_ms`` (every call, failed ones included) and ``fuel`` (calls that returned) as
        ``{"bounds": [...], "counts": [...]}``; ``counts[i]`` is the calls at most ``bounds[i]`` and above
        ``bounds[i - 1]``, the last count the calls above every bound."""
        with self._lock:
            latency, fuel = list(self._latency_counts), list(self._fuel_counts)
        return {"latency_ms": {"bounds": [round(b * 1000, 6) for b in LATENCY_BOUNDS_S], "counts": latency},
                "fuel": {"bounds": list(FUEL_BOUNDS), "counts": fuel}}

    def recent_errors(self) -> list[dict[str, str | None]]:
        """The latest failures, oldest first: ``{"at", "code", "message", "function"}``."""
        with self._lock:
            errors = list(self._errors)
        return [{"at": at.isoformat(), "code": code, "message": message, "function": function}
                for at, code, message, function in errors]

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            p50, p99 = self._latencies.percentiles(50, 99)
            return StatsSnapshot(
                executions=self.executions,
                errors=self.errors,
                host_errors=self.host_errors,
                rejected=self.rejected,
                p50_ms=None if p50 is None else p50 * 1000,
                p99_ms=None if p99 is None else p99 * 1000,
                fuel_used=self.fuel_used,
                last_fuel_used=self.last_fuel_used,
                memory_bytes_per_instance=self.memory_bytes_per_instance,
                last_error=self.last_error,
                last_error_code=self.last_error_code,
                last_error_at=self.last_error_at,
            )
