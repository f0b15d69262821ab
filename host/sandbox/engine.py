"""Process-wide wasmtime engines and the epoch ticker that enforces wall-clock timeouts.

One Engine per process (per distinct stack size, the only engine-wide limit we
vary): engines are expensive, and wasmtime types must never be shared across
engines (reusing a FuncType on a second Engine aborts the process), so every
type we build is built from the engine that uses it.

Plugins with ``isolation = "per-call"`` run on a second engine of the same settings plus wasmtime's
pooling allocator (:func:`get_pooling_engine`), which the epoch ticker ticks too.

The ticker is a native thread (host/sandbox/_ticker.c) that never takes the GIL: a Python thread
waking 200 times a second made the event loop hand the GIL over at every tick, which cost a node
about 4 us of CPU per request. Without the compiled helper (no C compiler at install, the compile
worker, which loads this file alone, or ``SANDBUS_NATIVE=0``) a Python thread ticks instead.

A plugin the operator runs with debug info (``Limits.debug_info``: ``sandbus run --debug``, or a node
policy's ``[debug] plugins``) gets engines of its own: wasmtime then keeps the guest's DWARF, translated
to the machine code, and registers every compiled module with the native debugger (gdb's JIT interface),
and Cranelift does not optimise, so that lines and locals are where the source says. Code compiled that
way is slower and larger, so its engines and its cache entries (the fingerprint) never mix with the
ordinary ones.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

import wasmtime

__all__ = ["EPOCH_TICK_S", "PERCALL_MAX_MEMORY", "PERCALL_SLOTS", "EngineHandle", "PROPOSALS_OFF", "PROPOSALS_ON",
           "WASMTIME_VERSION", "engine_for", "get_engine", "get_pooling_engine", "make_config", "ticks_for"]

#: Epoch granularity. A timeout fires between ``timeout`` and ``timeout + tick``.
EPOCH_TICK_S = 0.005

WASMTIME_VERSION = importlib.metadata.version("wasmtime")

log = logging.getLogger("sandbus.sandbox")


@dataclass(eq=False)
class EngineHandle:
    """An engine and the facts that make compiled code valid for it."""

    engine: wasmtime.Engine
    stack_bytes: int
    fuel: bool
    #: Part of the module cache key: code compiled under another config must not be reused.
    fingerprint: str = field(default="")
    #: Compiled with debug info for a native debugger (see the module docstring).
    debug: bool = False


class _EngineLimits(Protocol):
    """What :func:`engine_for` reads of a ``Limits`` (a protocol: the compile worker loads this file alone,
    without the package)."""

    @property
    def stack_bytes(self) -> int: ...
    @property
    def fuel(self) -> int | None: ...
    @property
    def debug_info(self) -> bool: ...


_engines: dict[tuple[int, bool, bool], EngineHandle] = {}
_pooling: dict[tuple[int, bool, int, bool], EngineHandle] = {}
_lock = threading.Lock()
#: what ticks the engines: the compiled ticker (a module), a Python thread, or nothing yet
_ticker: ModuleType | threading.Thread | None = None


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


def make_config(stack_bytes: int, fuel: bool, debug: bool = False) -> wasmtime.Config:
    """The engine configuration for this stack size and fuel setting (``debug``: with debug info for a
    native debugger, unoptimised).

    Also used by the compile worker (host/sandbox/_compile_worker.py), which loads this file alone: code
    it compiles must be valid for the engine that deserializes it, so keep this module free of imports
    from the package.
    """
    cfg = wasmtime.Config()
    cfg.consume_fuel = fuel
    cfg.epoch_interruption = True
    cfg.max_wasm_stack = stack_bytes
    if debug:
        cfg.debug_info = True
        cfg.cranelift_opt_level = "none"  # optimised code moves lines and drops locals the debugger shows
    else:
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


def _fingerprint(stack_bytes: int, fuel: bool, debug: bool) -> str:
    """What makes compiled code valid for an engine: the module cache keeps one file per fingerprint."""
    opt = "none-debug" if debug else "speed"
    return f"wt{WASMTIME_VERSION}-{'fuel-' if fuel else ''}epoch-stack{stack_bytes}-{opt}-p1"


def _make_engine(stack_bytes: int, fuel: bool, debug: bool) -> EngineHandle:
    cfg = make_config(stack_bytes, fuel, debug)
    return EngineHandle(wasmtime.Engine(cfg), stack_bytes, fuel, _fingerprint(stack_bytes, fuel, debug), debug)


#: Per-call instances (``Limits.isolation = "per-call"``) alive at once in one process, per engine: the
#: pooling allocator reserves this many slots up front (~4 GiB of address space each, not memory). A
#: call that finds every slot taken fails with an InstanceLimitError.
PERCALL_SLOTS = 256
#: The largest linear memory a pooled slot holds; a per-call plugin's ``memory_bytes`` may not exceed it.
PERCALL_MAX_MEMORY = 4096 * 1024 * 1024
#: Of a discarded instance's memory, the bytes its slot zeroes and keeps mapped for the next instance;
#: the rest is given back (madvise), in batches of ``_DECOMMIT_BATCH`` slots. Measured on the echo plugin
#: (bench/bench_isolation.py): 4 KiB and batches of 16 cost least; 64 KiB-1 MiB kept resident cost
#: ~1.5 us more a call (zeroing pages that a small plugin never touched).
_KEEP_RESIDENT = 4096
_DECOMMIT_BATCH = 16
_POOL_TABLE_ELEMENTS = 100_000  # Limits.table_elements' default
_POOL_TABLES_PER_MODULE = 4  # as a pooled store allows


def _pool_reservation(slots: int) -> int:
    """An upper bound of the address space the pooling allocator reserves for ``slots`` (memories with
    their guard regions, and tables); measured ~4.03 GiB a slot in wasmtime 50."""
    memories = slots * (PERCALL_MAX_MEMORY + 64 * 1024 * 1024)
    tables = slots * _POOL_TABLES_PER_MODULE * (_POOL_TABLE_ELEMENTS * 16 + 64 * 1024)
    return memories + tables + (1 << 30)


def _require_address_space(slots: int) -> None:
    """Refuse (typed) a pool whose reservation this process cannot map.

    wasmtime's engine constructor panics when the reservation fails, which aborts the whole process: under
    an address-space limit (``ulimit -v``, systemd's ``LimitAS=``) loading one per-call plugin killed the
    host. So the same amount is mapped first (no access, nothing committed) and given back at once."""
    import mmap

    need = _pool_reservation(slots)
    try:
        probe = mmap.mmap(-1, need, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=0)
    except (OSError, OverflowError, ValueError) as e:
        from sandbus.sdk.errors import InstanceLimitError  # lazily: the compile worker loads this file alone

        raise InstanceLimitError(
            f"isolation = \"per-call\" needs {need >> 30} GiB of address space for its {slots} instance slots "
            f"(reserved, not used), which this process cannot map ({getattr(e, 'strerror', None) or e}): "
            "raise the process's address-space limit (ulimit -v, LimitAS=) or use isolation = \"pooled\"",
            slots=slots, address_space=need) from e
    probe.close()


def _make_pooling_engine(stack_bytes: int, fuel: bool, slots: int, debug: bool = False) -> EngineHandle:
    """The engine for per-call instances: :func:`make_config` plus wasmtime's pooling allocator.

    A separate engine: its reservation (``slots`` x ~4 GiB of address space) must not be made by the
    compile worker, which runs :func:`make_config` under an address-space limit. wasmtime-py's Config
    has no setter for the allocator; its bindings declare the C API's, which we call. The pooling
    allocator changes no compilation setting, so code compiled for :func:`get_engine`'s engine of the
    same stack and fuel deserializes here (tests/host/test_isolation.py checks it).
    """
    from wasmtime import _ffi as ffi

    _require_address_space(slots)
    cfg = make_config(stack_bytes, fuel, debug)
    pc = ffi.wasmtime_pooling_allocation_config_new()
    try:
        ffi.wasmtime_pooling_allocation_config_total_core_instances_set(pc, slots)
        ffi.wasmtime_pooling_allocation_config_total_memories_set(pc, slots)
        ffi.wasmtime_pooling_allocation_config_total_tables_set(pc, slots)
        ffi.wasmtime_pooling_allocation_config_total_component_instances_set(pc, 0)
        ffi.wasmtime_pooling_allocation_config_total_gc_heaps_set(pc, 0)
        ffi.wasmtime_pooling_allocation_config_max_memory_size_set(pc, PERCALL_MAX_MEMORY)
        ffi.wasmtime_pooling_allocation_config_table_elements_set(pc, _POOL_TABLE_ELEMENTS)
        ffi.wasmtime_pooling_allocation_config_max_tables_per_module_set(pc, _POOL_TABLES_PER_MODULE)
        ffi.wasmtime_pooling_allocation_config_linear_memory_keep_resident_set(pc, _KEEP_RESIDENT)
        ffi.wasmtime_pooling_allocation_config_table_keep_resident_set(pc, 64 * 1024)
        ffi.wasmtime_pooling_allocation_config_decommit_batch_size_set(pc, _DECOMMIT_BATCH)
        ffi.wasmtime_pooling_allocation_strategy_set(cfg.ptr(), pc)
    finally:
        ffi.wasmtime_pooling_allocation_config_delete(pc)
    fp = f"{_fingerprint(stack_bytes, fuel, debug)}-pooling{slots}"
    return EngineHandle(wasmtime.Engine(cfg), stack_bytes, fuel, fp, debug)


def get_pooling_engine(stack_bytes: int, fuel: bool = True, slots: int | None = None,
                       debug: bool = False) -> EngineHandle:
    """The shared engine for per-call instances of this stack size, fuel and debug setting (``slots``:
    default :data:`PERCALL_SLOTS`, read when the engine is first made)."""
    slots = PERCALL_SLOTS if slots is None else slots
    with _lock:
        key = (stack_bytes, fuel, slots, debug)
        handle = _pooling.get(key)
        if handle is None:
            handle = _make_pooling_engine(stack_bytes, fuel, slots, debug)
            _tick(handle)  # raises: the engine is not kept, so the next caller makes it and tries again
            _pooling[key] = handle
        elif not _ticking():
            _tick(handle)
    return handle


def _tick_forever() -> None:
    while True:
        time.sleep(EPOCH_TICK_S)
        # Copy: a new engine may be added while we iterate.
        for handle in [*_engines.values(), *_pooling.values()]:
            handle.engine.increment_epoch()


def _native_ticker() -> ModuleType | None:
    """The compiled ticker, or None (see the module docstring for when)."""
    if os.environ.get("SANDBUS_NATIVE", "1") == "0":
        return None
    try:
        from sandbus.host.sandbox import _ticker
    except ImportError:  # not built, or this file loaded alone (the compile worker)
        return None
    return _ticker


def _address(obj: object) -> int:
    """The address behind a ctypes pointer or function."""
    value = ctypes.cast(obj, ctypes.c_void_p).value  # type: ignore[arg-type]
    if not value:
        raise ValueError("a null wasmtime address")
    return value


def _tick(handle: EngineHandle) -> None:
    """Have the ticker tick ``handle``'s engine from now on, starting it when it does not run. Under ``_lock``.

    Raises (``OSError``, ``RuntimeError``: no thread could be started) only with nothing changed for
    ``handle``: the caller then keeps no engine that nothing ticks, whose guests would never time out.
    Which ticker ticks is chosen once (``SANDBUS_NATIVE`` read at the first engine, and again in a
    forked child): an environment changed later must not add a second ticker, which would tick the
    first one's engines twice and halve every timeout.
    """
    global _ticker
    native = _ticker if isinstance(_ticker, ModuleType) else _native_ticker() if _ticker is None else None
    if native is not None:
        if not native.running():  # first use, or a forked child: started before any engine is added
            from wasmtime import _ffi as ffi

            increment = ffi.dll._FuncPtr(("wasmtime_engine_increment_epoch", ffi.dll))
            native.start(_address(increment), int(EPOCH_TICK_S * 1e9))
        _ticker = native
        if native.add(_address(handle.engine.ptr())):
            _outlive_interpreter(handle.engine)
            return
        # More engines than it holds: a Python thread ticks them all (the caller keeps ``handle`` in
        # the dicts it reads), started before the native thread stops so no tick is missed.
        thread = _start_thread()
        native.stop()
        _ticker = thread
        return
    if not isinstance(_ticker, threading.Thread) or not _ticker.is_alive():
        _ticker = _start_thread()


def _outlive_interpreter(obj: object) -> None:
    """Give ``obj`` a reference nothing releases, so the interpreter's teardown never frees it.

    Why: the native thread ticks until the process ends, through ``atexit`` handlers and the
    interpreter's teardown. Stopping it at exit instead (before the engines are freed) left every
    guest called from an ``atexit`` handler registered earlier (a ``close`` that runs a plugin's
    ``sandbus_shutdown``) without a timeout: a guest looping there hung the exit forever. Engines
    live as long as the process anyway; this only keeps the one the thread ticks from being freed
    under it.
    """
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _start_thread() -> threading.Thread:
    thread = threading.Thread(target=_tick_forever, name="sandbus-epoch", daemon=True)
    thread.start()
    return thread


def _ticking() -> bool:
    """Whether a ticker runs (one that failed to start, or a forked child's, is started again by
    the next :func:`get_engine`)."""
    ticker = _ticker
    if isinstance(ticker, threading.Thread):
        return ticker.is_alive()
    return ticker is not None and bool(ticker.running())


def _restart_after_fork() -> None:
    """A forked child has no ticker thread: start it again (the engines are the parent's, copied)."""
    global _ticker
    if _ticker is None:
        return
    _ticker = None
    try:
        for handle in [*_engines.values(), *_pooling.values()]:
            _tick(handle)
    except (OSError, RuntimeError) as e:  # no thread now: the child's next get_engine tries again
        log.error("the epoch ticker could not start in a forked child (%s): plugin timeouts wait for it", e)


os.register_at_fork(after_in_child=_restart_after_fork)


def get_engine(stack_bytes: int, fuel: bool = True, debug: bool = False) -> EngineHandle:
    """The shared engine for this stack size, fuel and debug setting; starts the epoch ticker on first use."""
    with _lock:
        key = (stack_bytes, fuel, debug)
        handle = _engines.get(key)
        if handle is None:
            handle = _make_engine(stack_bytes, fuel, debug)
            _tick(handle)  # raises: the engine is not kept, so the next caller makes it and tries again
            _engines[key] = handle
        elif not _ticking():
            _tick(handle)
        return handle


def engine_for(limits: _EngineLimits) -> EngineHandle:
    """The shared engine a plugin under ``limits`` (a :class:`~sandbus.host.sandbox.config.Limits`) runs
    on: the one place that reads which limits choose the engine."""
    return get_engine(limits.stack_bytes, fuel=limits.fuel is not None, debug=limits.debug_info)


@functools.lru_cache(maxsize=256)  # on every inline call, with a handful of distinct values
def ticks_for(timeout_s: float) -> int:
    """Epoch ticks covering ``timeout_s`` (+1: the current tick may be nearly over)."""
    return max(1, int(timeout_s / EPOCH_TICK_S + 0.999999)) + 1
