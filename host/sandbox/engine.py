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

__all__ = ["EPOCH_TICK_S", "EngineHandle", "PROPOSALS_OFF", "PROPOSALS_ON", "WASMTIME_VERSION", "get_engine",
           "make_config", "ticks_for"]

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


#: The wasm proposals a plugin may use: what clang (wasi-libc), AssemblyScript and componentize-py
#: emit, and what our limits were written for. Everything else is turned off *explicitly*: wasmtime
#: turns several proposals on by default (GC, memory64, multi-memory, tail calls, ...), and a default
#: that changes in a wasmtime upgrade must not widen what a plugin can do.
PROPOSALS_ON: tuple[str, ...] = (
    "wasm_bulk_memory",        # memcpy/memset in clang and asc output
    "wasm_multi_value",        # componentize-py's core modules
    "wasm_reference_types",    # funcref tables (call_indirect) in modern toolchains
    "wasm_simd",               # asc -O3 and clang auto-vectorisation
    "wasm_component_model",    # Python plugins are components
)
#: Proposal -> the name an error uses for it. Off: the engine refuses a module that needs one at load.
PROPOSALS_OFF: dict[str, str] = {
    "wasm_threads": "threads (shared memory, atomics)",  # one call at a time per instance; limits assume it
    "shared_memory": "shared memory",
    "wasm_memory64": "memory64 (64-bit memories)",      # the guest ABI's pointers and lengths are 32-bit
    "wasm_multi_memory": "multi-memory",                # limits and bounds checks cover one memory
    "wasm_gc": "garbage collection (GC)",               # heap outside linear memory: not under memory_bytes
    "wasm_function_references": "typed function references",
    "wasm_exceptions": "exception handling",
    "wasm_tail_call": "tail calls",
    "wasm_stack_switching": "stack switching",
    "wasm_relaxed_simd": "relaxed SIMD",                # results differ by CPU: replies must not
    "wasm_wide_arithmetic": "wide arithmetic",
    "wasm_custom_page_sizes": "custom page sizes",
    "wasm_component_model_map": "component-model map types",
    "wasm_component_model_implements": "component-model implements",
}


def make_config(stack_bytes: int, fuel: bool) -> wasmtime.Config:
    """The engine configuration for this stack size and fuel setting.

    Also used by the compile worker (host/sandbox/_compile_worker.py), which loads this file alone: code
    it compiles must be valid for the engine that deserializes it, so keep this module free of imports
    from the package.
    """
    cfg = wasmtime.Config()
    cfg.consume_fuel = fuel
    cfg.epoch_interruption = True
    cfg.max_wasm_stack = stack_bytes
    cfg.cranelift_opt_level = "speed"
    for name in PROPOSALS_ON:
        setattr(cfg, name, True)
    for name in PROPOSALS_OFF:
        if not hasattr(type(cfg), name):  # pragma: no cover - an older wasmtime-py without the switch
            continue
        setattr(cfg, name, False)
    # No GC heap at all: with GC off, nothing may allocate one.
    cfg.gc_support = False
    return cfg


def _make_engine(stack_bytes: int, fuel: bool) -> EngineHandle:
    cfg = make_config(stack_bytes, fuel)
    fp = f"wt{WASMTIME_VERSION}-{'fuel-' if fuel else ''}epoch-stack{stack_bytes}-speed-p1"
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
