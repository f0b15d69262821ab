"""Per-call isolation: a fresh instance for every call, discarded when the call ends.

A pooled instance keeps its linear memory, globals and tables from one call to the next, so a plugin bug
(a buffer not cleared, a "last request" global) hands one caller's data to the next caller. With
``Limits.isolation = "per-call"`` nothing survives a call: each runs in a new store, instantiated from an
``InstancePre`` on an engine with wasmtime's pooling allocator (host/sandbox/engine.py), whose memory
slots map the module's data segments copy-on-write; the store is deleted after the call and its slot
is wiped for the next instance.

Two ways to build the instance:

* **native** (core modules that import no WASI, with host/sandbox/_native.c built): the whole fresh
  call -- store, limits, fuel, deadline, instantiation, ``_initialize``, ``sandbus_init(config)``, the
  ABI round trip, store deletion -- is one call into C (``fresh_call``); a few microseconds on top of a
  pooled call (bench/bench_isolation.py).
* **general** (a plugin importing WASI, or without the compiled helper): a whole
  :class:`~.instance.PluginInstance` is built for the call on the pooling engine, with its WASI context,
  granted directories and output pipes, and dropped after it: tens of microseconds more. Being slow, it
  never runs on an event loop (``NotInline``: the node runs the call in a worker thread).

What a call may do is the same as pooled: fuel (the setup and the call each get the plugin's fuel), one
wall-clock deadline for the setup and the call together, the memory limit (a store limiter), output and
log caps, typed errors and audit events. A trap ends only that call's instance: there is nothing to
poison. ``sandbus_shutdown`` never runs (there is no long-lived instance to shut down).

Concurrency: the sandbox's pool (host/sandbox/pool.py) hands out :class:`PerCallSlot` objects, at most
``max_instances`` of them, one caller each; a slot holds no guest state, only what the host needs to
build an instance (a linker bound to the slot's call context, the ``InstancePre``). The engine's pool of
slots is process-wide (:data:`~.engine.PERCALL_SLOTS`); a call that finds it full gets an
:class:`~sandbus.sdk.errors.InstanceLimitError`.

Components (Python guests) are refused: instantiating one costs milliseconds, and the C API has no
``InstancePre`` for them.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any

import wasmtime

from sandbus.host.sandbox import abi, invoke
from sandbus.host.sandbox.audit import AuditLevel, Auditor
from sandbus.host.sandbox.config import Capabilities, Limits
from sandbus.host.sandbox.engine import PERCALL_MAX_MEMORY, EngineHandle, get_pooling_engine, ticks_for
from sandbus.host.sandbox.grants import GrantSet
from sandbus.host.sandbox.hostcall import LostTrapReport, RecordingLinker, take_failure
from sandbus.host.sandbox.hostfuncs import HostFunctions
from sandbus.host.sandbox.instance import (
    BudgetExceeded,
    CallContext,
    PluginInstance,
    _first_line,
    _frames,
    link_host_functions,
    size_limit_error,
    translate_error,
)
from sandbus.host.sandbox.invoke import _check_bounds, _raise_failure
from sandbus.host.sandbox.pool import NotInline, on_event_loop
from sandbus.sdk.errors import (
    AbiViolationError,
    InstanceLimitError,
    InvalidModuleError,
    MemoryLimitError,
    PluginInitError,
    SandbusError,
)

if TYPE_CHECKING:
    from types import ModuleType

__all__ = ["FRESH_REASON", "PerCallPlugin", "PerCallSlot", "fresh_available"]

log = logging.getLogger("sandbus.sandbox")

WASM_PAGE = 65536
# The scratch block of host/sandbox/_native.c (u64 words): [0] the live context, [1..8] the memory extern,
# [9] memory and [10] fuel left when the instance was discarded, [11..17] the slot's constants.
_SCRATCH_WORDS = 18
_MEMORY_AT_END, _FUEL_AT_END = 9, 10
_ENGINE, _PRE, _MEMORY_LIMIT, _TABLE_LIMIT, _FLAGS, _MAX_OUTPUT, _FUEL = range(11, 18)
_MEM_OFFSET = 16  # the memory item inside the scratch block: word 1 (the extern) + the extern's item offset
_HAS_DEALLOC, _HAS_INITIALIZE, _HAS_INIT = 1, 2, 4
_STAGES = {0: None, 1: abi.INITIALIZE, 2: abi.INIT}
#: How wasmtime's pooling allocator refuses an instance when every slot (of instances, memories or tables)
#: is taken: "maximum concurrent limit of N for core instances reached" (tests/host/test_isolation.py).
_POOL_FULL = "maximum concurrent"


def _bind_fresh() -> tuple[ModuleType | None, str]:
    """The compiled fresh call, bound to this process's libwasmtime; (None, why) when unavailable."""
    if invoke._native is None:
        return None, invoke.NATIVE_REASON
    mod = invoke._native
    if not hasattr(mod, "fresh_call"):  # pragma: no cover - a stale build of _native.c
        return None, "host/sandbox/_native.c was built before it had fresh_call; pip install -e . rebuilds it"
    try:
        from wasmtime import _ffi as ffi

        # The C side reads an extern's item at offset 8 of a buffer of 64 bytes (_native.c).
        if ffi.wasmtime_extern_t.of.offset != 8 or ctypes.sizeof(ffi.wasmtime_extern_t) > 64:
            return None, "wasmtime_extern_t changed layout"
        dll = ffi.dll
        names = ("wasmtime_store_new", "wasmtime_store_context", "wasmtime_store_limiter", "wasmtime_store_delete",
                 "wasmtime_instance_pre_instantiate", "wasmtime_instance_export_get", "wasmtime_error_delete")
        addrs = [ctypes.cast(dll._FuncPtr((n, dll)), ctypes.c_void_p).value for n in names]
    except (ImportError, AttributeError) as e:  # pragma: no cover - depends on the installed wasmtime
        return None, f"wasmtime-py internals changed: {e}"
    mod.bind_fresh(*addrs)
    return mod, ""


_fresh, FRESH_REASON = _bind_fresh()


def _no_fresh_call(scratch: int, function: bytes, config: bytes, payload: bytes, ticks: int
                   ) -> tuple[int, bytes | None, int, int, int]:
    raise RuntimeError(f"the compiled fresh call is unavailable: {FRESH_REASON}")  # pragma: no cover


#: (scratch, function, config, payload, ticks) -> (code, reply, a, b, c): see host/sandbox/_native.c.
_fresh_call: Callable[[int, bytes, bytes, bytes, int], tuple[int, bytes | None, int, int, int]] = (
    _fresh.fresh_call if _fresh is not None else _no_fresh_call)


def fresh_available() -> bool:
    """Whether per-call instances of plugins without WASI are built in the compiled helper."""
    return _fresh is not None


class _FreshView:
    """The live fresh instance's memory, for host functions (``CallContext.read`` and ``write``).

    The C side writes the store's context into the slot's scratch block once the instance exists and
    clears it before the store goes: a host function outside that window finds no instance.
    """

    __slots__ = ("__weakref__", "_ctx_word", "_mem")

    def __init__(self, scratch: ctypes.Array[ctypes.c_uint64]) -> None:
        self._ctx_word = scratch
        self._mem = ctypes.addressof(scratch) + _MEM_OFFSET

    def _ctx(self) -> int:
        ctx = int(self._ctx_word[0])
        if not ctx:
            raise AbiViolationError("host function called outside a call of a live instance")
        return ctx

    # invoke's ctypes functions exist only where its fast path does, as this class's use does.
    def memory_size(self) -> int:
        return int(invoke._mem_size(self._ctx(), self._mem))

    def read(self, ptr: int, length: int) -> bytes:
        ctx = self._ctx()
        # Size and base are read now: memory.grow may have moved them since the last access.
        _check_bounds(ptr, length, int(invoke._mem_size(ctx, self._mem)), "read")
        return ctypes.string_at(int(invoke._mem_data(ctx, self._mem)) + ptr, length)

    def write(self, ptr: int, data: bytes) -> None:
        ctx = self._ctx()
        _check_bounds(ptr, len(data), int(invoke._mem_size(ctx, self._mem)), "write")
        ctypes.memmove(int(invoke._mem_data(ctx, self._mem)) + ptr, data, len(data))


class PerCallPlugin:
    """What every per-call instance of one sandbox is built from: the module on the pooling engine, and
    what a :class:`~.instance.PluginInstance` is given.

    Raises (at construction):
        InvalidModuleError: a component, or a module the pooling engine cannot take.
        MemoryLimitError: ``memory_bytes`` above what a pool slot holds.
        InstanceLimitError: the process cannot reserve the address space of the engine's slot pool.
    """

    def __init__(self, plugin: str, handle: EngineHandle, module: wasmtime.Module, info: abi.ModuleInfo,
                 limits: Limits, capabilities: Capabilities, host_functions: HostFunctions, auditor: Auditor,
                 config: bytes, *, fast: bool = True, native: bool = True,
                 context_factory: Callable[[], dict[str, Any]] | None = None, grants: GrantSet | None = None,
                 slots: int | None = None) -> None:
        self.plugin = plugin
        self.info = info
        self.limits = limits
        self.capabilities = capabilities
        self.host_functions = host_functions
        self.auditor = auditor
        self.config = config
        self.fast = fast
        self.native = native
        self.context_factory = context_factory
        self.grants = grants
        if limits.memory_bytes > PERCALL_MAX_MEMORY:
            raise MemoryLimitError(
                f"isolation = \"per-call\" takes at most {PERCALL_MAX_MEMORY} bytes of memory a call, "
                f"{limits.memory_bytes} were asked for", plugin=plugin, limit=PERCALL_MAX_MEMORY)
        try:
            self.handle = get_pooling_engine(handle.stack_bytes, handle.fuel, slots)
        except InstanceLimitError as e:  # the process cannot reserve the slot pool (engine.py)
            err = InstanceLimitError(e.message, plugin=plugin, **e.details)
            auditor.emit(AuditLevel.WARNING, err.code, plugin, err.message)
            raise err from e
        try:
            # Compiled for `handle`'s engine (through the module cache and its bounds); the pooling
            # allocator changes no compilation setting, so the code is valid here as it is.
            self.module = wasmtime.Module.deserialize(self.handle.engine, module.serialize())
        except wasmtime.WasmtimeError as e:  # pragma: no cover - a wasmtime that ties code to the allocator
            raise InvalidModuleError(f"cannot move the compiled module to the per-call engine: {_first_line(e)}",
                                     plugin=plugin) from e
        #: The compiled path: every call in C. Else each call builds a whole PluginInstance.
        self.fresh = fast and native and _fresh is not None and not info.uses_wasi
        self.flags = ((_HAS_DEALLOC if info.has(abi.DEALLOC) else 0)
                      | (_HAS_INITIALIZE if info.has(abi.INITIALIZE) else 0)
                      | (_HAS_INIT if info.has(abi.INIT) else 0))
        self.ticks = ticks_for(limits.timeout_s)

    def build(self) -> PluginInstance:
        """A whole instance on the pooling engine, initialised: the general path, and the load-time check
        (ABI version, ``_initialize``, ``sandbus_init``) of the compiled one."""
        inst = PluginInstance(self.plugin, self.handle, self.module, self.info, self.limits, self.capabilities,
                              self.host_functions, self.auditor, fast=self.fast, native=self.native,
                              context_factory=self.context_factory, grants=self.grants)
        inst.init(self.config)
        return inst

    def slot(self) -> PerCallSlot:
        """One more caller's slot (for the sandbox's pool)."""
        return PerCallSlot(self)


class PerCallSlot:
    """One caller's way to a fresh instance: what the pool hands out in place of a warm instance.

    Holds no guest state: only a call context (stats, the log cap, host-function failures, what the
    embedding layer keeps per caller) and, on the compiled path, a linker bound to it and its
    ``InstancePre``. Never poisoned: a failed call's instance is gone with the call.
    """

    poisoned = False

    def __init__(self, plugin: PerCallPlugin) -> None:
        self._p = plugin
        self.plugin = plugin.plugin
        self.info = plugin.info
        self.limits = plugin.limits
        self._auditor = plugin.auditor
        self.ctx = CallContext(plugin.plugin, plugin.capabilities, plugin.limits, plugin.auditor,
                               logging.getLogger(f"sandbus.plugin.{plugin.plugin}"))
        if plugin.context_factory is not None:
            self.ctx.extra.update(plugin.context_factory())
        self._scratch = (ctypes.c_uint64 * _SCRATCH_WORDS)()
        self._scratch_addr = ctypes.addressof(self._scratch)
        self._view = _FreshView(self._scratch)
        self._names: dict[str, bytes] = {}
        self._config = plugin.config
        self._ticks = plugin.ticks
        self._timeout = plugin.limits.timeout_s
        if plugin.fresh:
            linker = RecordingLinker(plugin.handle.engine, self.ctx)  # host-function failures stay per call
            link_host_functions(linker, plugin.module, plugin.host_functions, self.ctx, plugin.auditor)
            self._pre = linker.instantiate_pre(plugin.module)
            self._linker = linker
            limits = plugin.limits
            sc = self._scratch
            sc[_ENGINE] = invoke.address_of(plugin.handle.engine.ptr())
            sc[_PRE] = invoke.address_of(self._pre.ptr())  # kept alive by self._pre
            sc[_MEMORY_LIMIT] = limits.memory_bytes
            sc[_TABLE_LIMIT] = limits.table_elements
            sc[_FLAGS] = plugin.flags
            sc[_MAX_OUTPUT] = limits.max_output_bytes
            sc[_FUEL] = (1 << 64) - 1 if limits.fuel is None else limits.fuel  # -1 as int64: no metering
            self.ctx.invoker = self._view  # type: ignore[assignment]  # read/write/memory_size suffice

    def init(self, config: bytes) -> None:
        """Nothing to do: ``sandbus_init`` runs on every fresh instance, with the sandbox's config."""

    def health(self) -> bool:
        """A fresh instance's ``sandbus_health() == 0`` (built, initialised and dropped here)."""
        try:
            inst = self._p.build()
        except SandbusError:
            return False
        return inst.health()

    def shutdown(self) -> None:
        """Nothing to shut down: no instance outlives its call."""

    def call(self, function: str, payload: bytes, *, budget_s: float | None = None) -> bytes:
        """Run ``function`` on a fresh instance; as :meth:`PluginInstance.call` (``budget_s`` included)."""
        p = self._p
        if not p.fresh:
            return self._call_general(function, payload, budget_s)
        limits = self.limits
        if len(payload) > limits.max_input_bytes:
            raise size_limit_error(self._auditor, self.plugin, limits, "input", len(payload))
        name = self._names.get(function)
        if name is None:
            if function not in self.info.functions:
                raise AbiViolationError(
                    f"no function {function!r}; exported functions: {', '.join(self.info.functions)}",
                    plugin=self.plugin, function=function,
                )
            name = self._names[function] = function.encode()
        ctx = self.ctx
        stats = ctx.stats
        stats.log_bytes = stats.log_dropped = 0
        ctx.log_overflow = False
        ctx.host_error = None
        if ctx.extra or p.context_factory is not None:
            # What host functions kept for a call (a result for take_result, ...) is that call's, as the
            # instance was: the next call starts from what a fresh instance gets.
            ctx.extra.clear()
            if p.context_factory is not None:
                ctx.extra.update(p.context_factory())
        # Host functions share the call's deadline (host/sandbox/deadline.py's start, inlined: every call).
        if budget_s is None:
            ticks = self._ticks
            ctx.deadline = monotonic() + self._timeout
        else:
            ticks = min(self._ticks, ticks_for(budget_s))
            ctx.deadline = monotonic() + min(self._timeout, budget_s)
        if type(payload) is not bytes:  # a bytearray or memoryview from a caller: the C side takes bytes
            payload = bytes(payload)
        code, reply, a, b, c = _fresh_call(self._scratch_addr, name, self._config, payload, ticks)
        fuel = limits.fuel
        if code == 0:
            stats.fuel_used = 0 if fuel is None else fuel - a
            stats.memory_bytes = b
            if ctx.log_overflow:
                raise size_limit_error(self._auditor, self.plugin, limits, "log", stats.log_dropped)
            assert reply is not None
            return reply
        stats.fuel_used = 0 if fuel is None else fuel - int(self._scratch[_FUEL_AT_END])
        stats.memory_bytes = int(self._scratch[_MEMORY_AT_END])
        raise self._failure(function, code, a, b, c, ticks < self._ticks)

    def _failure(self, function: str, code: int, a: int, b: int, c: int, budgeted: bool) -> BaseException:
        """The exception for a failed fresh call (_native.c's codes)."""
        limits = self.limits
        if code == 1 or code == 6:  # the guest or wasmtime failed (6: while instantiating)
            where = "instantiation" if code == 6 else (_STAGES.get(c) or function)
            try:
                _raise_failure(a or None, b or None)
            except (wasmtime.Trap, wasmtime.WasmtimeError) as raised:
                e = take_failure(self.ctx, raised)
                if not isinstance(e, (wasmtime.Trap, wasmtime.WasmtimeError, SandbusError, LostTrapReport)):
                    return e  # e.g. a KeyboardInterrupt from a host function: not the guest's doing
                if budgeted and isinstance(e, wasmtime.Trap) and e.trap_code == wasmtime.TrapCode.INTERRUPT:
                    err: BaseException = BudgetExceeded(function)
                elif code == 6 and isinstance(e, wasmtime.WasmtimeError) and not isinstance(e, wasmtime.Trap):
                    err = self._instantiation_error(e)
                else:
                    err = self._translate(e, where)
                err.__cause__ = raised
                return err
        if code == 2:
            where = abi.INIT if c == 2 else function
            return self._translate(MemoryLimitError(
                f"sandbus_alloc({a}) returned 0 in {where}: the guest is out of memory",
                plugin=self.plugin, limit=limits.memory_bytes), where)
        if code == 3:
            return size_limit_error(self._auditor, self.plugin, limits, "output", a)
        if code in (4, 5):
            try:
                _check_bounds(a, b, c, "input buffer from sandbus_alloc" if code == 4 else "reply")
            except AbiViolationError as e:
                return self._translate(e, function)
        if code == 7:
            status = a - (1 << 32) if a >= 1 << 31 else a
            return PluginInitError(f"sandbus_init returned {status} (non-zero means failure)",
                                   plugin=self.plugin, status=status)
        return InvalidModuleError(f"a fresh instance of {self.plugin} failed unexpectedly (code {code})",
                                  plugin=self.plugin)

    def _instantiation_error(self, e: wasmtime.WasmtimeError) -> SandbusError:
        text = str(e)
        if "exceeds memory limits" in text:
            return self._translate(MemoryLimitError(
                f"the module's initial memory exceeds the {self.limits.memory_bytes}-byte limit: {_first_line(e)}",
                plugin=self.plugin, limit=self.limits.memory_bytes), "instantiation")
        if _POOL_FULL in text:
            err = InstanceLimitError(f"no per-call instance slot is free in this process: {_first_line(e)}",
                                     plugin=self.plugin)
            self._auditor.emit(AuditLevel.WARNING, err.code, self.plugin, err.message)
            return err
        return InvalidModuleError(f"cannot instantiate: {_first_line(e)}", plugin=self.plugin)

    def _translate(self, exc: BaseException, where: str) -> SandbusError:
        limits = self.limits
        memory = int(self._scratch[_MEMORY_AT_END])
        headroom = max(WASM_PAGE, limits.memory_bytes // 8)
        return translate_error(exc, where, plugin=self.plugin, limits=limits, auditor=self._auditor,
                               code=exc.trap_code if isinstance(exc, wasmtime.Trap) else None,
                               frames=_frames(exc),
                               memory_exhausted=lambda: memory + headroom > limits.memory_bytes)

    def _call_general(self, function: str, payload: bytes, budget_s: float | None) -> bytes:
        """A whole PluginInstance for this call: WASI plugins, or no compiled helper."""
        if on_event_loop():
            raise NotInline(self.plugin)  # building it runs _initialize and sandbus_init: not on a loop
        try:
            inst = self._p.build()
        except InvalidModuleError as e:
            if _POOL_FULL in e.message:
                err = InstanceLimitError(f"no per-call instance slot is free in this process: {e.message}",
                                         plugin=self.plugin)
                self._auditor.emit(AuditLevel.WARNING, err.code, self.plugin, err.message)
                raise err from e
            raise
        try:
            return inst.call(function, payload, budget_s=budget_s)
        finally:
            # The caller reads the stats after the call: this slot's context shows the call's.
            stats, done = self.ctx.stats, inst.ctx.stats
            stats.fuel_used, stats.memory_bytes = done.fuel_used, done.memory_bytes
            stats.log_bytes, stats.log_dropped = done.log_bytes, done.log_dropped
