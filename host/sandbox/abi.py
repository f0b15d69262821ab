"""Guest ABI v1 as the host checks it: which exports a module must have, with which signatures.

The authors' description is docs/abi.md. Checked once per module (not per
instance): only exports verified here are ever called through the unchecked
fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import wasmtime

from sandbus.host.sandbox.invoke import Signature
from sandbus.sdk.errors import AbiViolationError, InvalidModuleError

__all__ = [
    "ABI_VERSION",
    "ALLOC",
    "DEALLOC",
    "DEFAULT_FUNCTION",
    "HEALTH",
    "INIT",
    "INITIALIZE",
    "ModuleInfo",
    "SHUTDOWN",
    "VERSION_EXPORT",
    "WASI_MODULE",
    "inspect_module",
]

ABI_VERSION = 1
VERSION_EXPORT = "sandbus_abi_version"
ALLOC = "sandbus_alloc"
DEALLOC = "sandbus_dealloc"
INIT = "sandbus_init"
SHUTDOWN = "sandbus_shutdown"
HEALTH = "sandbus_health"
INITIALIZE = "_initialize"
DEFAULT_FUNCTION = "handle_request"
WASI_MODULE = "wasi_snapshot_preview1"

_ENTRY: Signature = (("i32", "i32"), "i64")
_REQUIRED: dict[str, Signature] = {VERSION_EXPORT: ((), "i32"), ALLOC: (("i32",), "i32")}
_OPTIONAL: dict[str, Signature] = {
    DEALLOC: (("i32", "i32"), None),
    INIT: (("i32", "i32"), "i32"),
    SHUTDOWN: ((), None),
    HEALTH: ((), "i32"),
    INITIALIZE: ((), None),
}


@dataclass(frozen=True)
class ModuleInfo:
    """What the host learned about a module at load."""

    functions: tuple[str, ...]
    signatures: dict[str, Signature]
    imports: tuple[tuple[str, str], ...]

    def has(self, export: str) -> bool:
        return export in self.signatures

    @property
    def uses_wasi(self) -> bool:
        return any(m == WASI_MODULE for m, _ in self.imports)

    def imports_of(self, module: str) -> set[str]:
        return {n for m, n in self.imports if m == module}


def _signature(ft: wasmtime.FuncType) -> Signature | None:
    params = tuple(str(p) for p in ft.params)
    results = [str(r) for r in ft.results]
    if len(results) > 1:
        return None
    return params, (results[0] if results else None)


def inspect_module(module: wasmtime.Module, plugin: str) -> ModuleInfo:
    """Check the ABI's exports and signatures; raise a typed error naming what is wrong."""
    exports = {e.name: e.type for e in module.exports}
    if not isinstance(exports.get("memory"), wasmtime.MemoryType):
        raise AbiViolationError("module does not export a memory named 'memory' (ABI v1)", plugin=plugin,
                                missing="memory")
    sigs: dict[str, Signature] = {}
    for name, want in _REQUIRED.items():
        ty = exports.get(name)
        if ty is None:
            raise AbiViolationError(f"missing required export {name!r} (ABI v1)", plugin=plugin, missing=name)
        got = _signature(ty) if isinstance(ty, wasmtime.FuncType) else None
        if got != want:
            raise AbiViolationError(f"export {name!r} has signature {got}, expected {want}", plugin=plugin,
                                    export=name)
        sigs[name] = want
    for name, want in _OPTIONAL.items():
        ty = exports.get(name)
        if ty is None:
            continue
        got = _signature(ty) if isinstance(ty, wasmtime.FuncType) else None
        if got != want:
            raise AbiViolationError(f"export {name!r} has signature {got}, expected {want}", plugin=plugin,
                                    export=name)
        sigs[name] = want
    functions = []
    for name, ty in exports.items():
        if name in sigs or name.startswith("sandbus_") or not isinstance(ty, wasmtime.FuncType):
            continue
        if _signature(ty) == _ENTRY:
            functions.append(name)
            sigs[name] = _ENTRY
    if not functions:
        raise AbiViolationError(
            "module exports no callable function: expected at least one export of type (i32, i32) -> i64",
            plugin=plugin,
        )
    imports = tuple((i.module, i.name or "") for i in module.imports)
    for m, n in imports:
        if m == "" or n == "":
            raise InvalidModuleError(f"import {m!r}.{n!r} has an empty name", plugin=plugin)
    return ModuleInfo(tuple(sorted(functions)), sigs, imports)
