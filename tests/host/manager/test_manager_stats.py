"""Latency window and per-plugin statistics."""

from __future__ import annotations

import threading

import pytest

from sandbus.host.lifecycle import LatencyWindow, PluginStats
from sandbus.sdk.errors import TrapError


def test_percentiles_nearest_rank() -> None:
    window = LatencyWindow(100)
    for ms in range(1, 101):
        window.add(ms / 1000)
    p50, p99, p100, p0 = window.percentiles(50, 99, 100, 0)
    assert (p50, p99, p100, p0) == (0.050, 0.099, 0.100, 0.001)


def test_empty_window_has_no_percentiles() -> None:
    assert LatencyWindow(4).percentiles(50, 99) == (None, None)


def test_window_keeps_only_recent_samples() -> None:
    window = LatencyWindow(4)
    for s in (9.0, 9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0):
        window.add(s)
    assert len(window) == 4
    assert window.percentiles(99) == (1.0,)


@pytest.mark.parametrize("bad", [-1.0, 100.5])
def test_percentile_out_of_range(bad: float) -> None:
    window = LatencyWindow(2)
    window.add(1.0)
    with pytest.raises(ValueError, match="percentile"):
        window.percentiles(bad)


def test_stats_count_calls_errors_fuel_memory() -> None:
    stats = PluginStats(window=8)
    stats.record_call(0.002, fuel=100, memory_bytes=65536)
    stats.record_call(0.004, fuel=50, memory_bytes=131072)
    stats.record_error(0.010, TrapError("boom", plugin="p"))
    snap = stats.snapshot()
    assert (snap.executions, snap.errors) == (3, 1)
    assert (snap.fuel_used, snap.last_fuel_used) == (150, 50)
    assert snap.memory_bytes_per_instance == 131072
    assert snap.p50_ms == pytest.approx(4.0)
    assert snap.p99_ms == pytest.approx(10.0)
    assert snap.last_error == "plugin 'p': boom"
    assert snap.last_error_code == "sandbox.trap"
    assert snap.last_error_at is not None


def test_stats_are_thread_safe() -> None:
    stats = PluginStats(window=64)

    def hammer() -> None:
        for _ in range(5000):
            stats.record_call(0.001, fuel=1, memory_bytes=1)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert (snap.executions, snap.fuel_used) == (20000, 20000)
