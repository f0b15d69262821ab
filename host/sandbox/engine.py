"""Process-wide wasmtime engines and the epoch ticker that enforces wall-clock timeouts.

One Engine per process (per distinct stack size, the only engine-wide limit we
vary): engines are expensive, and wasmtime types must never be shared across
engines (reusing a FuncType on a second Engine aborts the process), so every
type we build is built from the engine that uses it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import threading
import time
from dataclasses import dataclass, field

import wasmtime

__all__ = ["EPOCH_TICK_S", "EngineHandle", "WASMTIME_VERSION", "get_engine", "ticks_for"]

#: Epoch granularity. A timeout fires between ``timeout`` and ``timeout + tick``.
EPOCH_TICK_S = 0.005

WASMTIME_VERSION = importlib.metadata.version("wasmtime")


@dataclass(eq=False)
class EngineHandle:
    """An engine and the facts that make compiled code valid for it."""

    engine: wasmtime.Engine
    stack_bytes: int
    fuel: bool
    #: Part of the module cache key: code compiled under another config must not be reused.
    fingerprint: str = field(default="")


_engines: dict[tuple[int, bool], EngineHandle] = {}
_lock = threading.Lock()
_ticker: threading.Thread | None = None


def _make_engine(stack_bytes: int, fuel: bool) -> EngineHandle:
    cfg = wasmtime.Config()
    cfg.consume_fuel = fuel
    cfg.epoch_interruption = True
    cfg.max_wasm_stack = stack_bytes
    cfg.cranelift_opt_level = "speed"
    cfg.wasm_bulk_memory = True
    cfg.wasm_multi_value = True
    cfg.wasm_reference_types = True
    cfg.wasm_simd = True
    # Threads and shared memory stay off: a guest must not escape the
    # one-call-at-a-time model our limits are written for.
    cfg.wasm_threads = False
    cfg.shared_memory = False
    fp = f"wt{WASMTIME_VERSION}-{'fuel-' if fuel else ''}epoch-stack{stack_bytes}-speed"
    return EngineHandle(wasmtime.Engine(cfg), stack_bytes, fuel, fp)


def _tick_forever() -> None:
    while True:
        time.sleep(EPOCH_TICK_S)
        # Copy: a new engine may be added while we iterate.
        for handle in list(_engines.values()):
            handle.engine.increment_epoch()


def get_engine(stack_bytes: int, fuel: bool = True) -> EngineHandle:
    """The shared engine for this stack size and fuel setting; starts the epoch ticker on first use."""
    global _ticker
    with _lock:
        handle = _engines.get((stack_bytes, fuel))
        if handle is None:
            handle = _engines[(stack_bytes, fuel)] = _make_engine(stack_bytes, fuel)
        if _ticker is None:
            _ticker = threading.Thread(target=_tick_forever, name="sandbus-epoch", daemon=True)
            _ticker.start()
        return handle


@functools.lru_cache(maxsize=256)  # on every inline call, with a handful of distinct values
def ticks_for(timeout_s: float) -> int:
    """Epoch ticks covering ``timeout_s`` (+1: the current tick may be nearly over)."""
    return max(1, int(timeout_s / EPOCH_TICK_S + 0.999999)) + 1
