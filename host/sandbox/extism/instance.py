"""One live Extism plugin: our kernel and the plugin in one store, linked wasm to wasm.

Everything else is a :class:`~sandbus.host.sandbox.instance.PluginInstance`: the same store limits (fuel,
epoch timeout, memory, stack, tables), the same WASI wiring (grants, the file guard, the decoy root),
the same guarded call and error translation. What differs is linking (the kernel is instantiated first,
and the plugin's ``extism:host/env`` imports are bound to its exports or to the Python host functions)
and the call itself (host/sandbox/extism/invoker.py).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import orjson
import wasmtime

from sandbus.host.sandbox.abi import INITIALIZE, WASI_MODULE
from sandbus.host.sandbox.engine import EngineHandle
from sandbus.host.sandbox.extism.abi import EXTISM_ENV
from sandbus.host.sandbox.extism.hostfuncs import extism_host_functions
from sandbus.host.sandbox.extism.invoker import ExtismInvoker, config_values
from sandbus.host.sandbox.extism.kernel import FAIL_MODULE, KERNEL_IMPORTS, kernel_failure, kernel_module
from sandbus.host.sandbox.hostcall import RecordingLinker, take_failure
from sandbus.host.sandbox.hostfuncs import HostFunction, HostFunctions
from sandbus.host.sandbox.instance import PluginInstance, bind_host_function
from sandbus.sdk.errors import InvalidModuleError, SandbusError

__all__ = ["ExtismInstance"]

_Binding = tuple[str, str, wasmtime.FuncType, HostFunction | None]
#: Where an instance's linker holds the plugin's own exports, for looking them up by name.
_PLUGIN = "sandbus:extism-plugin"


class ExtismInstance(PluginInstance):
    """A single instantiated Extism plugin (see :class:`PluginInstance` for the parameters).

    The kernel's memory is the plugin's second memory: the store's memory limit caps each memory, and the
    kernel may grow only to ``memory_bytes`` less what the plugin's own memory holds when a call begins,
    so that the two together stay within the limit (the plugin growing its own memory during a call is
    capped by the store as usual).
    """

    STORE_INSTANCES = 3  # the plugin, its kernel, the WASI trampoline
    STORE_MEMORIES = 2  # the plugin's memory and the kernel's

    #: With ``isolation = "per-call"``: the instance serves one call and is then retired (the pool builds the
    #: next one), so nothing of a call -- memory, globals, variables -- reaches the next.
    single_use = False

    def call(self, function: str, payload: bytes, *, budget_s: float | None = None) -> bytes:
        try:
            return super().call(function, payload, budget_s=budget_s)
        finally:
            if self.single_use:
                self.poisoned = True  # the pool drops a poisoned instance and builds a fresh one

    def _link_host_functions(self, linker: wasmtime.Linker, module: wasmtime.Module,
                             host_functions: HostFunctions) -> None:
        """Instantiate the kernel in this store, then bind every import of the plugin: kernel names to the
        kernel's exports, Extism's host names to Python (a node's own ``http_request`` first), anything
        else (``extism:host/user``, ``sandbus_v1``) as for our own plugins."""
        engine = self._store.engine
        klinker = RecordingLinker(engine, self.ctx)
        ctx = self.ctx

        def fail(code: int, value: int, extra: int) -> None:
            raise kernel_failure(ctx, code, value, extra)

        limit = self.limits.memory_bytes

        def room() -> int:
            # What the kernel may grow to now, beside the plugin's memory as it is now (the plugin may have
            # grown it since its call began; before the instance is set up -- a start function -- nothing).
            inv = ctx.invoker
            return 0 if inv is None else max(limit - inv.memory_size(), 0)

        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        klinker.define_func(FAIL_MODULE, "fail", wasmtime.FuncType([i32, i64, i64], []), fail)
        klinker.define_func(FAIL_MODULE, "room", wasmtime.FuncType([], [i64]), room)
        try:
            self._kernel = klinker.instantiate(self._store, kernel_module(engine))
        except (wasmtime.Trap, wasmtime.WasmtimeError, SandbusError) as e:
            raise self._translate(take_failure(self.ctx, e), "kernel instantiation") from e
        # The kernel's exports in one definition (one C call, not one per import): a plugin can only reach
        # the ones inspect_extism let it import. They are also where the invoker finds the kernel's functions.
        linker.define_instance(self._store, EXTISM_ENV, self._kernel)
        self._linker = linker
        plan, self._exports_memory = _link_plan(module, host_functions, self.plugin)
        for module_name, name, ty, fn in plan:
            if fn is not None:
                linker.define_func(module_name, name, ty, bind_host_function(fn, self.ctx, self._auditor))

    def _start(self, handle: EngineHandle, instance: wasmtime.Instance, *, fast: bool, native: bool) -> None:
        store, linker = self._store, self._linker
        # Looked up by name, not through instance.exports(), which wraps every export of the module.
        linker.define_instance(store, _PLUGIN, instance)

        def plugin_export(name: str) -> wasmtime.Func:
            f = linker.get(store, _PLUGIN, name)
            assert isinstance(f, wasmtime.Func)
            return f

        def kernel_export(name: str) -> wasmtime.Func:
            f = linker.get(store, EXTISM_ENV, name)
            assert isinstance(f, wasmtime.Func)
            return f

        memory = linker.get(store, _PLUGIN, "memory") if self._exports_memory else None
        assert memory is None or isinstance(memory, wasmtime.Memory)
        kmem = linker.get(store, EXTISM_ENV, "memory")
        assert isinstance(kmem, wasmtime.Memory)
        if self.info.uses_wasi:
            assert memory is not None  # inspect_extism requires it with WASI
            self._link_passthrough(handle, memory)
        self._invoker = ExtismInvoker(self.ctx, store, plugin_export, memory, kernel_export, kmem, self.info.signatures,
                                      self.limits.memory_bytes, fast=fast, native=native)
        self.ctx.invoker = self._invoker
        if self.info.has(INITIALIZE):
            self._guarded(lambda: self._invoker.call(INITIALIZE), INITIALIZE)

    def init(self, config: bytes) -> None:
        """Serve ``config`` (the manifest's settings, JSON) to ``config_get``; Extism has no init export."""
        settings: Any = orjson.loads(config) if config else {}
        assert isinstance(self._invoker, ExtismInvoker)
        self._invoker.config = config_values(settings if isinstance(settings, dict) else {})

    def health(self) -> bool:
        return not self.poisoned

    def shutdown(self) -> None:
        return None



#: What each module's imports are bound to, worked out (and type-checked) once per module and set of host
#: functions: (module, name, type, host function or None for a kernel export). Walking a module's imports
#: through wasmtime-py costs more than the rest of building an instance.
_plans: weakref.WeakKeyDictionary[wasmtime.Module, tuple[HostFunctions, list[_Binding], bool]] = (
    weakref.WeakKeyDictionary())
_plans_lock = threading.Lock()


def _link_plan(module: wasmtime.Module, host_functions: HostFunctions, plugin: str
               ) -> tuple[list[_Binding], bool]:
    """The module's bindings, and whether it exports a memory named "memory"."""
    with _plans_lock:
        cached = _plans.get(module)
    if cached is not None and cached[0] is host_functions:
        return cached[1], cached[2]
    builtin = extism_host_functions()
    plan: list[_Binding] = []
    for imp in module.imports:
        name = imp.name or ""
        if imp.module == WASI_MODULE:
            continue
        ty = imp.type
        if imp.module == EXTISM_ENV and name in KERNEL_IMPORTS:  # types were checked at load (extism/abi.py)
            assert isinstance(ty, wasmtime.FuncType)
            plan.append((EXTISM_ENV, name, ty, None))
            continue
        fn = host_functions.get(imp.module, name)
        if fn is None and imp.module == EXTISM_ENV:
            fn = builtin.get(EXTISM_ENV, name)
        if fn is None:
            raise InvalidModuleError(f"imports {imp.module}.{name}, which this host does not provide",
                                     plugin=plugin, missing_import=f"{imp.module}.{name}")
        _check_type(imp, fn, plugin)
        assert isinstance(ty, wasmtime.FuncType)
        plan.append((imp.module, name, ty, fn))
    exports_memory = any(e.name == "memory" and isinstance(e.type, wasmtime.MemoryType) for e in module.exports)
    with _plans_lock:
        _plans[module] = (host_functions, plan, exports_memory)
    return plan, exports_memory


def _check_type(imp: wasmtime.ImportType, fn: HostFunction, plugin: str) -> None:
    """The import's type must be the host function's (else the module is refused, naming both)."""
    ty = imp.type
    if not isinstance(ty, wasmtime.FuncType) or (
            tuple(str(p) for p in ty.params) != fn.params or tuple(str(r) for r in ty.results) != fn.results):
        raise InvalidModuleError(f"import {imp.module}.{imp.name} has type {ty}, the host provides "
                                 f"({', '.join(fn.params)}) -> ({', '.join(fn.results)})", plugin=plugin)
