"""One live Extism plugin: our kernel and the plugin in one store, linked wasm to wasm.

Everything else is a :class:`~sandbus.host.sandbox.instance.PluginInstance`: the same store limits (fuel,
epoch timeout, memory, stack, tables), the same WASI wiring (grants, the file guard, the decoy root),
the same guarded call and error translation. What differs is linking (the kernel is instantiated first,
and the plugin's ``extism:host/env`` imports are bound to its exports or to the Python host functions)
and the call itself (host/sandbox/extism/invoker.py).
"""

from __future__ import annotations

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

        i32, i64 = wasmtime.ValType.i32(), wasmtime.ValType.i64()
        klinker.define_func(FAIL_MODULE, "fail", wasmtime.FuncType([i32, i64, i64], []), fail)
        try:
            self._kernel = klinker.instantiate(self._store, kernel_module(engine))
        except (wasmtime.Trap, wasmtime.WasmtimeError, SandbusError) as e:
            raise self._translate(take_failure(self.ctx, e), "kernel instantiation") from e
        kexports = self._kernel.exports(self._store)
        builtin = extism_host_functions()
        for imp in module.imports:
            name = imp.name or ""
            if imp.module == WASI_MODULE:
                continue
            if imp.module != EXTISM_ENV:
                fn = host_functions.get(imp.module, name)
                if fn is None:
                    raise InvalidModuleError(f"imports {imp.module}.{name}, which this host does not provide",
                                             plugin=self.plugin, missing_import=f"{imp.module}.{name}")
                _check_type(imp, fn, self.plugin)
            elif name in KERNEL_IMPORTS:  # types were checked at load (extism/abi.py)
                linker.define(self._store, EXTISM_ENV, name, kexports[name])
                continue
            else:
                fn = host_functions.get(EXTISM_ENV, name) or builtin.get(EXTISM_ENV, name)
                if fn is None:  # pragma: no cover - inspect_extism refused the module already
                    raise InvalidModuleError(f"imports {EXTISM_ENV}.{name}, which this host does not provide",
                                             plugin=self.plugin, missing_import=f"{EXTISM_ENV}.{name}")
                _check_type(imp, fn, self.plugin)
            ty = imp.type
            assert isinstance(ty, wasmtime.FuncType)
            linker.define_func(imp.module, name, ty, bind_host_function(fn, self.ctx, self._auditor))

    def _start(self, handle: EngineHandle, instance: wasmtime.Instance, *, fast: bool, native: bool) -> None:
        store = self._store
        exported = instance.exports(store)
        found = exported.get("memory")
        memory = found if isinstance(found, wasmtime.Memory) else None
        kmem = self._kernel.exports(store)["memory"]
        assert isinstance(kmem, wasmtime.Memory)
        if self.info.uses_wasi:
            assert memory is not None  # inspect_extism requires it with WASI
            self._link_passthrough(handle, memory)
        self._invoker = ExtismInvoker(self.ctx, store, instance, memory, self._kernel, kmem, self.info.signatures,
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



def _check_type(imp: wasmtime.ImportType, fn: HostFunction, plugin: str) -> None:
    """The import's type must be the host function's (else the module is refused, naming both)."""
    ty = imp.type
    if not isinstance(ty, wasmtime.FuncType) or (
            tuple(str(p) for p in ty.params) != fn.params or tuple(str(r) for r in ty.results) != fn.results):
        raise InvalidModuleError(f"import {imp.module}.{imp.name} has type {ty}, the host provides "
                                 f"({', '.join(fn.params)}) -> ({', '.join(fn.results)})", plugin=plugin)
