"""The Extism plugin ABI as the host checks it: what makes a module an Extism plugin, which of its
exports are callable, and which imports the host provides.

An Extism plugin imports from ``extism:host/env`` and exports functions of type ``() -> i32``: the
input, the output and the error travel through the kernel (kernel.py), and a non-zero return is a
failure whose message the plugin set with ``error_set``. Checked once per module, at load: only the
exports verified here are ever called through the unchecked fast path.
"""

from __future__ import annotations

import wasmtime

from sandbus.host.sandbox.abi import INITIALIZE, WASI_MODULE, ModuleInfo
from sandbus.host.sandbox.extism.kernel import KERNEL_IMPORTS
from sandbus.host.sandbox.invoke import Signature
from sandbus.sdk.errors import AbiViolationError, InvalidModuleError

__all__ = ["ENTRY", "EXTISM_ENV", "EXTISM_USER", "HOST_IMPORTS", "RESERVED_PREFIXES", "RESERVED_EXPORTS",
           "inspect_extism", "is_extism"]

#: The import namespace of Extism's host ABI.
EXTISM_ENV = "extism:host/env"
#: Where Extism plugins import functions their embedder adds (``host_functions`` of that module).
EXTISM_USER = "extism:host/user"

#: The Python side of Extism's host ABI (host/sandbox/extism/hostfuncs.py), with their wasm types.
HOST_IMPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "config_get": (("i64",), ("i64",)),
    "var_get": (("i64",), ("i64",)),
    "var_set": (("i64", "i64"), ()),
    "http_request": (("i64", "i64"), ("i64",)),
    "http_status_code": ((), ("i32",)),
    "http_headers": ((), ("i64",)),
    "log_trace": (("i64",), ()),
    "log_debug": (("i64",), ()),
    "log_info": (("i64",), ()),
    "log_warn": (("i64",), ()),
    "log_error": (("i64",), ()),
    "get_log_level": ((), ("i32",)),
}

#: A callable export: no parameters, an i32 status (0 = success).
ENTRY: Signature = ((), "i32")
#: Exports of the right type that are not plugin functions: WASI's entry points, and the names the
#: PDKs and sandbus keep for themselves.
RESERVED_EXPORTS = frozenset({"_start", "_initialize"})
RESERVED_PREFIXES = ("extism_", "sandbus_", "__")


def is_extism(module: wasmtime.Module) -> bool:
    """Whether ``module`` is an Extism plugin: it imports anything from ``extism:host/env``."""
    return any(imp.module == EXTISM_ENV for imp in module.imports)


def _signature(ft: wasmtime.FuncType) -> Signature | None:
    results = [str(r) for r in ft.results]
    if len(results) > 1:
        return None
    return tuple(str(p) for p in ft.params), (results[0] if results else None)


def inspect_extism(module: wasmtime.Module, plugin: str) -> ModuleInfo:
    """The callable functions and checked imports of an Extism plugin; a typed error naming what is wrong.

    Every ``extism:host/env`` import must be one this host implements, under Extism's type for it
    (:class:`InvalidModuleError` naming the import otherwise): a plugin built for a newer Extism fails at
    load, not halfway through a call.
    """
    imports = tuple((i.module, i.name or "") for i in module.imports)
    for imp in module.imports:
        name = imp.name or ""
        if imp.module == "" or name == "":
            raise InvalidModuleError(f"import {imp.module!r}.{name!r} has an empty name", plugin=plugin)
        if imp.module != EXTISM_ENV:
            continue
        want = KERNEL_IMPORTS.get(name) or HOST_IMPORTS.get(name)
        if want is None:
            raise InvalidModuleError(f"imports {EXTISM_ENV}.{name}, which this host does not provide",
                                     plugin=plugin, missing_import=f"{EXTISM_ENV}.{name}")
        ty = imp.type
        got = ((tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results))
               if isinstance(ty, wasmtime.FuncType) else None)
        if got != want:
            raise InvalidModuleError(
                f"import {EXTISM_ENV}.{name} has type {got}, the host provides "
                f"({', '.join(want[0])}) -> ({', '.join(want[1])})", plugin=plugin, import_name=name)
    sigs: dict[str, Signature] = {}
    functions = []
    for export in module.exports:
        ty = export.type
        if not isinstance(ty, wasmtime.FuncType):
            continue
        sig = _signature(ty)
        if export.name == INITIALIZE and sig == ((), None):
            sigs[INITIALIZE] = ((), None)
            continue
        if sig != ENTRY or export.name in RESERVED_EXPORTS or export.name.startswith(RESERVED_PREFIXES):
            continue
        functions.append(export.name)
        sigs[export.name] = ENTRY
    if not functions:
        raise AbiViolationError("Extism plugin exports no callable function: expected at least one export of "
                                "type () -> i32", plugin=plugin)
    memory = next((e for e in module.exports if e.name == "memory"), None)
    if any(m == WASI_MODULE for m, _ in imports) and not isinstance(getattr(memory, "type", None),
                                                                       wasmtime.MemoryType):
        raise AbiViolationError("an Extism plugin that imports WASI must export its memory as 'memory'",
                                plugin=plugin, missing="memory")
    return ModuleInfo(tuple(sorted(functions)), sigs, imports)
