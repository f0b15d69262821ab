"""Plugins that are WebAssembly *components* (Python guests built with componentize-py), behind the same
interface as core modules: :class:`ComponentInstance` offers what the pool and :class:`Sandbox` use of
:class:`PluginInstance` (``call``, ``init``, ``health``, ``shutdown``, ``poisoned``, ``ctx.stats``).

The contract is the WIT world ``sandbus:plugin/plugin`` (``sdk/guest/python/wit/sandbus.wit``): the guest
exports ``handle-request(function, request) -> result<string, string>`` and optionally ``init`` and
``health``; it imports the interface ``sandbus:plugin/host@1.0.0`` and WASI 0.2.

What is enforced for a component, compared with a core module (docs/abi.md):

* **Fuel, wall-clock timeout, wasm stack**: the same (the same engine, ``set_fuel`` / epoch deadline per
  call, instantiation and ``init`` under the same budgets). Traps come back from the component API as
  text, not trap codes; ``_trap_code`` maps the text back.
* **Memory**: ``memory_bytes`` caps each linear memory, and a component may have only one (store limit
  ``memories=1``), so it is the same cap as for a core module. The reported ``memory_bytes`` of a call is
  0: the component API does not expose the guest's memory. A guest that runs out of memory traps; it is
  reported as ``MemoryLimitError`` when the guest said ``MemoryError`` on stderr (CPython does), else as a
  trap.
* **Input / output / log caps, instance pool**: the same.
* **Host functions** (``host`` interface): the same Python implementations as the core ABI's ``sandbus_v1``
  imports (the registry handed to the Sandbox, including the bus's publish / kv / http), with the same
  capability checks, env allowlist and audit events. They are written against guest memory
  (ptr, len); a component passes values, so :class:`ComponentCallContext` gives them a scratch buffer in
  host memory to read their arguments from and write their results to. ``take_result`` is used, not
  exposed. A host function this host does not provide (publish/request/kv/http on a plain Sandbox) fails the
  call with a ``SandboxError`` when called: a component imports the whole interface, so it cannot be
  refused at load as a core module importing it would be.
* **Environment**: only granted variables, through both ``env-get`` and ``wasi:cli/environment``.
* **Clock**: without the ``clock`` grant, ``wasi:clocks/*`` (wall and monotonic ``now`` / ``resolution``)
  and ``time-now-ms`` fail the call with ``SecurityViolationError`` (audited), like core modules. Timers
  (``subscribe-duration`` / ``subscribe-instant``, i.e. ``time.sleep``) are always refused the same way: a
  blocking wait happens outside wasm, where the epoch deadline cannot stop it (core modules get
  ``ENOTSUP`` from ``poll_oneoff`` for the same reason).
* **Random**: NOT enforced. ``wasi:random`` is always available: CPython's runtime seeds its ``random``
  module from it (2,496 bytes) on the first call into every componentize-py guest, so denying it would
  make every Python plugin fail. The bytes come from wasmtime's CSPRNG.
* **Network**: none. ``wasi:sockets/instance-network`` (the only way to obtain the network handle that
  connect, bind and name lookup need) and socket creation fail the call with ``SecurityViolationError``.
* **Files**: only granted directories are preopened, read-only unless granted writable, each one the
  directory the sandbox opened once at load (:class:`~sandbus.host.sandbox.grants.GrantSet`), never its path
  resolved again: renaming, replacing or symlinking a granted directory's name changes nothing for a
  later instance. wasmtime's WASI confines every path to the grants. Unlike core modules there is no
  decoy root and no wrapping of the ``wasi:filesystem`` resource methods (wasmtime-py's component API
  cannot wrap a method of a resource that wasmtime's own WASI defines, nor forward to it), so an
  attempt outside the grants is an ordinary ``ENOENT`` / ``EPERM`` for the guest, not a
  ``SecurityViolationError`` and not audited, and a symlink whose target leaves the grant can be
  created (wasmtime refuses to follow it).
* **stdin** empty; **stdout / stderr** captured into the plugin log under the log cap, as for core
  modules: through pipes read after each call on the calling thread, never through Python callbacks on
  wasmtime's threads (guest_output.py: those made the process abort at exit after a guest trapped).
* **Errors** stay with their call: a linked host function's exception is kept on its own instance and
  never reaches wasmtime-py's process-wide "last exception" slot (:func:`_guard`).
* **Callable functions**: a component has one entry point that receives the function name, so every
  name reaches the guest (the SDK answers an unknown one with a plugin-level error); ``Sandbox.functions``
  lists ``handle_request`` only.
* **shutdown**: the world has no ``shutdown`` export; ``shutdown()`` just drops the instance.
* **Call path**: ``handle-request`` runs through host/sandbox/_component.c when it is built (one native
  call: budget, call, result, post-return, fuel), not through wasmtime-py's component API, which lowers and
  lifts every value in Python (~150 us of a 100-byte echo). Both strings are checked to be UTF-8 in C before
  wasmtime sees them (a bad byte there aborts the process); strings from the guest are checked by wasmtime.
  ``init`` and ``health`` (once per instance) and a host without the extension use wasmtime-py's API;
  ``SANDBUS_NATIVE=0`` turns the extension off, as for core modules.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NoReturn

import orjson
import wasmtime
from wasmtime import component as wc

from sandbus.host.sandbox import abi
from sandbus.host.sandbox.audit import Auditor
from sandbus.host.sandbox.config import Capabilities, Limits
from sandbus.host.sandbox.deadline import start as start_deadline
from sandbus.host.sandbox.engine import EngineHandle, ticks_for
from sandbus.host.sandbox.grants import GrantSet
from sandbus.host.sandbox.guest_output import GuestOutput
from sandbus.host.sandbox.guest_text import escape_controls
from sandbus.host.sandbox.hostfuncs import ABI_NAMESPACE, HostFunctions
from sandbus.host.sandbox.instance import (
    MAX_FRAME_NAME,
    MAX_FRAMES,
    BudgetExceeded,
    CallContext,
    _first_line,
    bind_host_function,
    deny,
    size_limit_error,
    translate_error,
)
from sandbus.host.sandbox.invoke import _check_bounds
from sandbus.sdk.errors import (
    AbiViolationError,
    InvalidModuleError,
    MemoryLimitError,
    PluginInitError,
    SandboxError,
    SandbusError,
    TrapError,
)

__all__ = [
    "COMPONENT_MAX_CORE_INSTANCES",
    "COMPONENT_NATIVE_REASON",
    "ComponentCallContext",
    "ComponentInfo",
    "ComponentInstance",
    "HOST_INTERFACE",
    "component_native_available",
    "inspect_component",
]

#: The interface a plugin imports (sdk/guest/python/wit/sandbus.wit).
HOST_INTERFACE = "sandbus:plugin/host@1.0.0"
HANDLE_REQUEST = "handle-request"
INIT = "init"
HEALTH = "health"

#: Core instances / tables one component may create. A componentize-py guest needs about 15 of each
#: (CPython, its libraries, adapters and shims); the cap only bounds a hostile component.
COMPONENT_MAX_CORE_INSTANCES = 64

#: Host functions of the `host` interface: WIT name -> (sandbus_v1 name, parameter shapes, result shape).
_HOST_SIGNATURES: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "log": ("log", ("u32", "string"), None),
    "time-now-ms": ("time_now_ms", (), "u64"),
    "env-get": ("env_get", ("string",), "option<string>"),
    "publish": ("publish", ("string", "string"), None),
    "kv-get": ("kv_get", ("string",), "option<list<u8>>"),
    "kv-put": ("kv_put", ("string", "list<u8>"), None),
    "kv-delete": ("kv_delete", ("string",), None),
    "http-request": ("http_request", ("string",), "string"),
    "request": ("request", ("string", "string"), "result<string, string>"),
}
#: Exports: name -> (parameter shapes, accepted result shapes, required).
_EXPORTS: dict[str, tuple[tuple[str, ...], frozenset[str], bool]] = {
    HANDLE_REQUEST: (("string", "string"), frozenset({"result<string, string>", "string"}), True),
    INIT: (("string",), frozenset({"result<_, string>"}), False),
    HEALTH: ((), frozenset({"bool"}), False),
}

#: First result buffer for env-get / kv-get / http-request; a longer result is fetched once more.
_FIRST_CAP = 64 * 1024
#: Bytes of guest stderr kept per call, to name what went wrong when the guest traps.
_STDERR_TAIL = 4096

_TRAP_TEXT = {
    "all fuel consumed by WebAssembly": wasmtime.TrapCode.OUT_OF_FUEL,
    "interrupt": wasmtime.TrapCode.INTERRUPT,
    "call stack exhausted": wasmtime.TrapCode.STACK_OVERFLOW,
}
_FRAME = re.compile(r"^\s*\d+:\s+0x[0-9a-f]+\s+-\s+(.+?)\s*$")


# ---------------------------------------------------------------------------
# The native call (host/sandbox/_component.c)
# ---------------------------------------------------------------------------

#: wasmtime-py majors whose C API was checked against _component.c's assumptions (the value layout, and
#: that a call reads its arguments and assigns its results). Another major runs on wasmtime-py's API until
#: someone checks again (tests/host/test_component_native.py says what to check).
VERIFIED_WASMTIME_MAJORS = frozenset({50})

#: _component.call's result codes.
_CC_OK, _CC_WASM_ERROR, _CC_NOT_UTF8, _CC_REPLY_TOO_LARGE = 0, 1, 2, 3

_C_FUNCTIONS = ("wasmtime_component_func_call", "wasmtime_component_func_post_return",
                "wasmtime_component_val_delete", "wasmtime_context_set_fuel", "wasmtime_context_get_fuel",
                "wasmtime_context_set_epoch_deadline", "wasmtime_error_new",
                "wasmtime_component_linker_instance_add_func")


def expected_layout() -> tuple[int, ...]:
    """The value layout of the installed wasmtime, read from wasmtime-py's bindings (generated from its C
    headers), in the shape of ``_component.layout()``."""
    from wasmtime import _ffi as ffi

    def offset(struct: Any, field: str) -> int:
        return int(getattr(struct, field).offset)  # a ctypes field descriptor, typed as the field's value

    val, name, res = ffi.wasmtime_component_val_t, ffi.wasm_name_t, ffi.wasmtime_component_valresult_t
    return (ctypes.sizeof(val), offset(val, "of"), offset(name, "size"), offset(name, "data"), offset(res, "is_ok"),
            offset(res, "val"), ffi.WASMTIME_COMPONENT_STRING.value, ffi.WASMTIME_COMPONENT_RESULT.value,
            ffi.WASMTIME_COMPONENT_U32.value)


def _bind_component_native() -> tuple[ModuleType | None, str]:  # the module is host/sandbox/_component
    """The compiled component call, bound to this process's libwasmtime; (None, why) when unavailable."""
    if os.environ.get("SANDBUS_NATIVE", "1") == "0":
        return None, "turned off by SANDBUS_NATIVE=0"
    version = importlib.metadata.version("wasmtime")
    if int(version.split(".")[0]) not in VERIFIED_WASMTIME_MAJORS:
        return None, f"wasmtime-py {version} is not a version _component.c was checked against"
    try:
        from sandbus.host.sandbox import _component as mod
    except ImportError as e:
        return None, f"host/sandbox/_component.c is not built ({e}); pip install -e . builds it"
    try:
        from wasmtime import _ffi as ffi

        layout = expected_layout()
        # The host-function callback type _component.c implements: (env, context, function type, args,
        # nargs, results, nresults) -> error.
        if len(ffi.wasmtime_component_func_callback_t._argtypes_) != 7:
            raise AttributeError("wasmtime_component_func_callback_t changed")
        dll = ffi.dll
        addrs = [ctypes.cast(dll._FuncPtr((name, dll)), ctypes.c_void_p).value for name in _C_FUNCTIONS]
    except (AttributeError, ImportError) as e:  # pragma: no cover - depends on the installed wasmtime
        return None, f"wasmtime-py internals changed: {e}"
    if mod.layout() != layout:  # pragma: no cover - depends on the installed wasmtime
        return None, f"wasmtime's component value layout {layout} is not _component.c's {mod.layout()}"
    mod.bind(*addrs)
    return mod, ""


_native, COMPONENT_NATIVE_REASON = _bind_component_native()


def component_native_available() -> bool:
    """Whether ``handle-request`` runs through host/sandbox/_component.c (else wasmtime-py's API)."""
    return _native is not None


# ---------------------------------------------------------------------------
# Inspection (once per component, at load)
# ---------------------------------------------------------------------------


def _shape(ty: Any) -> str:
    """A WIT-like spelling of a component value type, for comparing signatures and naming them."""
    simple = {wc.String: "string", wc.Bool: "bool", wc.U8: "u8", wc.U32: "u32", wc.U64: "u64",
              wc.S32: "s32", wc.S64: "s64"}
    for cls, name in simple.items():
        if isinstance(ty, cls):
            return name
    if isinstance(ty, wc.ListType):
        return f"list<{_shape(ty.element)}>"
    if isinstance(ty, wc.OptionType):
        return f"option<{_shape(ty.payload)}>"
    if isinstance(ty, wc.ResultType):
        ok, err = ty.ok, ty.err
        return f"result<{'_' if ok is None else _shape(ok)}, {'_' if err is None else _shape(err)}>"
    return type(ty).__name__


def _signature(ft: wc.FuncType) -> tuple[tuple[str, ...], str | None]:
    params = tuple(_shape(t) for _, t in ft.params)
    result = ft.result
    return params, (None if result is None else _shape(result))


@dataclass(frozen=True)
class ComponentInfo:
    """What the host learned about a component at load.

    Parameters:
        host_functions: WIT names of the ``host`` functions the component imports.
        wasi_imports: the WASI interfaces it imports (``wasi:clocks/wall-clock@0.2.9``, ...).
        guarded_wasi: the imported clock and socket interfaces with their functions: the ones an instance
            may have to replace with deniers (looked up once here, not per instance).
        has_init / has_health: optional exports present.
        returns_result: ``handle-request`` returns ``result<string, string>`` (else a plain ``string``).
    """

    host_functions: tuple[str, ...]
    wasi_imports: tuple[str, ...]
    guarded_wasi: tuple[tuple[str, tuple[str, ...]], ...]
    has_init: bool
    has_health: bool
    returns_result: bool

    def module_info(self) -> abi.ModuleInfo:
        """The core-module view the rest of the host reads (functions; ``sandbus_v1`` imports, which the
        node uses to decide whether a plugin may run inline on its event loop)."""
        imports = tuple((ABI_NAMESPACE, _HOST_SIGNATURES[n][0]) for n in self.host_functions)
        return abi.ModuleInfo((abi.DEFAULT_FUNCTION,), {}, imports)


def inspect_component(component: wc.Component, handle: EngineHandle, plugin: str) -> ComponentInfo:
    """Check the component's exports and imports against the world; raise a typed error naming what is wrong."""
    engine = handle.engine
    ctype = component.type
    exports = ctype.exports(engine)
    found: dict[str, tuple[tuple[str, ...], str | None]] = {}
    for name, (params, results, required) in _EXPORTS.items():
        ext = exports.get(name)
        item = ext.ty if ext is not None else None
        if not isinstance(item, wc.FuncType):
            if required:
                raise AbiViolationError(
                    f"component does not export the function {name!r} (world sandbus:plugin/plugin)",
                    plugin=plugin, missing=name)
            continue
        sig = _signature(item)
        if sig[0] != params or (sig[1] or "()") not in results:
            want = " or ".join(sorted(results))
            raise AbiViolationError(
                f"export {name!r} has type ({', '.join(sig[0])}) -> {sig[1] or '()'}, expected "
                f"({', '.join(params)}) -> {want}", plugin=plugin, export=name)
        found[name] = sig
    host_functions: list[str] = []
    wasi: list[str] = []
    guarded: list[tuple[str, tuple[str, ...]]] = []
    for name, ext in ctype.imports(engine).items():
        if name.startswith("wasi:"):
            wasi.append(name)
            item = ext.ty
            if name.startswith(("wasi:clocks/", "wasi:sockets/")) and isinstance(item, wc.ComponentInstanceType):
                funcs = tuple(f for f, fx in item.exports(engine).items() if isinstance(fx.ty, wc.FuncType))
                guarded.append((name, funcs))
            continue
        if name != HOST_INTERFACE:
            raise InvalidModuleError(f"imports {name}, which this host does not provide (it provides "
                                     f"{HOST_INTERFACE} and WASI 0.2)", plugin=plugin, missing_import=name)
        item = ext.ty
        if not isinstance(item, wc.ComponentInstanceType):
            raise InvalidModuleError(f"import {name} is not an interface", plugin=plugin)
        for fname, fext in item.exports(engine).items():
            fty = fext.ty
            expected = _HOST_SIGNATURES.get(fname)
            if not isinstance(fty, wc.FuncType) or expected is None:
                raise InvalidModuleError(f"imports {name}#{fname}, which this host does not provide",
                                         plugin=plugin, missing_import=f"{name}#{fname}")
            sig = _signature(fty)
            if sig != expected[1:]:
                raise InvalidModuleError(
                    f"import {name}#{fname} has type ({', '.join(sig[0])}) -> {sig[1] or '()'}, the host "
                    f"provides ({', '.join(expected[1])}) -> {expected[2] or '()'}", plugin=plugin)
            host_functions.append(fname)
    return ComponentInfo(tuple(host_functions), tuple(wasi), tuple(guarded), INIT in found, HEALTH in found,
                         found[HANDLE_REQUEST][1] != "string")


# ---------------------------------------------------------------------------
# Host functions for components
# ---------------------------------------------------------------------------


class ComponentCallContext(CallContext):
    """The :class:`CallContext` of a component instance.

    Host functions are written against the core ABI: they take (ptr, len) pairs and read and write guest
    memory through ``ctx.read`` / ``ctx.write``. A component hands the host values instead, so the adapter
    lays the arguments out in a scratch buffer and points the host function at it; reads and writes are
    bounds-checked against that buffer as they would be against guest memory.
    """

    def __init__(self, plugin: str, capabilities: Capabilities, limits: Limits, auditor: Auditor,
                 logger: logging.Logger) -> None:
        super().__init__(plugin, capabilities, limits, auditor, logger)
        self.scratch = bytearray()

    def stage(self, *parts: bytes, room: int = 0) -> tuple[list[int], int]:
        """Put ``parts`` one after another in a fresh scratch buffer followed by ``room`` free bytes;
        return the offsets of the parts and of the free area."""
        offsets = []
        buf = bytearray()
        for part in parts:
            offsets.append(len(buf))
            buf += part
        free = len(buf)
        buf += bytes(room)
        self.scratch = buf
        return offsets, free

    def read(self, ptr: int, length: int) -> bytes:
        _check_bounds(ptr, length, len(self.scratch), "read")
        return bytes(self.scratch[ptr:ptr + length])

    def write(self, ptr: int, data: bytes) -> None:
        _check_bounds(ptr, len(data), len(self.scratch), "write")
        self.scratch[ptr:ptr + len(data)] = data

    def memory_size(self) -> int:
        return len(self.scratch)


class _CallState:
    """Per-instance facts the linked closures record. Kept apart from the instance on purpose: wasmtime-py
    keeps linked Python functions in a process-wide table until the store goes, so a closure holding the
    instance would keep the instance (and its store) alive for ever."""

    __slots__ = ("host_error", "stderr_tail")

    def __init__(self) -> None:
        self.host_error: BaseException | None = None
        self.stderr_tail = b""


def _host_adapters(ctx: ComponentCallContext, host_functions: HostFunctions, auditor: Auditor
                   ) -> dict[str, Callable[..., Any]]:
    """The ``host`` interface as Python callables over the registered (core ABI) host functions."""
    plugin = ctx.plugin

    def bound(name: str) -> Callable[..., Any]:
        fn = host_functions.get(ABI_NAMESPACE, name)
        if fn is None:
            def missing(*_args: Any) -> Any:
                raise SandboxError(f"host function {ABI_NAMESPACE}.{name} is not provided by this host "
                                   "(publish, request, kv and http come with the bus: serve the plugin from a node)",
                                   plugin=plugin, function=name)

            return missing
        return bind_host_function(fn, ctx, auditor)

    log, time_now, env_get = bound("log"), bound("time_now_ms"), bound("env_get")
    publish, kv_get, kv_put = bound("publish"), bound("kv_get"), bound("kv_put")
    kv_delete, http, take_result = bound("kv_delete"), bound("http_request"), bound("take_result")
    request = bound("request")

    def fetch(fn: Callable[..., Any], *parts: bytes, refetch: Callable[[int], bytes] | None = None
              ) -> bytes | None:
        offsets, out = ctx.stage(*parts, room=_FIRST_CAP)
        args = [x for off, part in zip(offsets, parts, strict=True) for x in (off, len(part))]
        n = int(fn(*args, out, _FIRST_CAP))
        if n < 0:
            return None
        if n <= _FIRST_CAP:
            return ctx.read(out, n)
        if refetch is not None:
            return refetch(n)
        _, out = ctx.stage(room=n)  # take_result: the same result again, now with room for all of it
        if int(take_result(out, n)) != n:
            raise SandboxError(f"take_result did not return the {n} bytes announced", plugin=plugin)
        return ctx.read(out, n)

    def h_log(level: int, message: str | bytes) -> None:
        # bytes from _component.c's trampoline (UTF-8, checked by wasmtime), str from wasmtime-py
        data = message if isinstance(message, bytes) else message.encode()
        ctx.stage(data)
        log(level, 0, len(data))

    def h_time_now_ms() -> int:
        return int(time_now())

    def h_env_get(name: str) -> str | None:
        key = name.encode()

        def again(n: int) -> bytes:
            _, out = ctx.stage(key, room=n)
            env_get(0, len(key), out, n)
            return ctx.read(out, n)

        value = fetch(env_get, key, refetch=again)
        return None if value is None else value.decode(errors="replace")

    def h_publish(topic: str, json: str) -> None:
        t, j = topic.encode(), json.encode()
        ctx.stage(t, j)
        publish(0, len(t), len(t), len(j))

    def h_kv_get(key: str) -> bytes | None:
        return fetch(kv_get, key.encode())

    def h_kv_put(key: str, value: bytes) -> None:
        k = key.encode()
        ctx.stage(k, bytes(value))
        kv_put(0, len(k), len(k), len(value))

    def h_kv_delete(key: str) -> None:
        k = key.encode()
        ctx.stage(k)
        kv_delete(0, len(k))

    def h_http_request(request_json: str) -> str:
        reply = fetch(http, request_json.encode())
        return "" if reply is None else reply.decode(errors="replace")

    def taken() -> bytes:
        """What ``take_result`` holds (the error JSON of a failed request)."""
        _, out = ctx.stage(room=_FIRST_CAP)
        n = int(take_result(out, _FIRST_CAP))
        if n <= _FIRST_CAP:
            return ctx.read(out, max(n, 0))
        _, out = ctx.stage(room=n)
        take_result(out, n)
        return ctx.read(out, n)

    def h_request(target: str, request_json: str) -> wc.Variant:
        reply = fetch(request, target.encode(), request_json.encode())
        if reply is None:  # a negative status: the error JSON waits in take_result
            return wc.Variant("err", taken().decode(errors="replace"))
        return wc.Variant("ok", reply.decode(errors="replace"))

    return {"log": h_log, "time-now-ms": h_time_now_ms, "env-get": h_env_get, "publish": h_publish,
            "kv-get": h_kv_get, "kv-put": h_kv_put, "kv-delete": h_kv_delete, "http-request": h_http_request,
            "request": h_request}


# ---------------------------------------------------------------------------
# The instance
# ---------------------------------------------------------------------------


class ComponentInstance:
    """A single instantiated component. Not thread-safe: the pool hands it to one caller at a time.

    Parameters: as :class:`~sandbus.host.sandbox.instance.PluginInstance`, with the compiled ``component`` and its
    checked :class:`ComponentInfo` in place of the module and its ABI facts. ``grants``: the sandbox's
    directories, opened once (:class:`~sandbus.host.sandbox.grants.GrantSet`); every instance is given these same
    directories, whatever a guest did to the tree since. ``native``: call ``handle-request`` through
    host/sandbox/_component.c when it is built (else, or with ``False``, through wasmtime-py's API).
    """

    def __init__(
        self,
        plugin: str,
        handle: EngineHandle,
        component: wc.Component,
        info: ComponentInfo,
        limits: Limits,
        capabilities: Capabilities,
        host_functions: HostFunctions,
        auditor: Auditor,
        *,
        context_factory: Callable[[], dict[str, Any]] | None = None,
        grants: GrantSet | None = None,
        native: bool = True,
    ) -> None:
        self.plugin = plugin
        #: Whether :meth:`call` goes through host/sandbox/_component.c.
        self.native = native and _native is not None
        # The directories as opened once by the Sandbox, shared by all its instances. Without them (an
        # instance built on its own) they are opened here, for this instance only: instances that must
        # share one identity are built through a Sandbox.
        self._grants = grants if grants is not None else GrantSet(capabilities.dirs, plugin=plugin,
                                                                    auditor=auditor)
        self.info = info
        self.limits = limits
        self.poisoned = False
        self._auditor = auditor
        self._ticks = ticks_for(limits.timeout_s)
        self._state = _CallState()
        logger = logging.getLogger(f"sandbus.plugin.{plugin}")
        self.ctx = ComponentCallContext(plugin, capabilities, limits, auditor, logger)
        if context_factory is not None:
            self.ctx.extra.update(context_factory())

        store = wasmtime.Store(handle.engine)
        store.set_limits(memory_size=limits.memory_bytes, table_elements=limits.table_elements,
                         instances=COMPONENT_MAX_CORE_INSTANCES, tables=COMPONENT_MAX_CORE_INSTANCES,
                         memories=1)
        if limits.fuel is not None:
            store.set_fuel(limits.fuel)
        store.set_epoch_deadline(self._ticks)
        store.set_wasi(self._wasi_config())
        self._store = store
        linker = wc.Linker(handle.engine)
        linker.add_wasip2()
        linker.allow_shadowing = True
        with linker.root() as root:
            self._shadow_wasi(root)
            with root.add_instance(HOST_INTERFACE) as host:
                adapters = _host_adapters(self.ctx, host_functions, auditor)
                for name in info.host_functions:
                    if name == "log" and self.native:
                        self._add_native_log(host, adapters["log"])
                    else:
                        host.add_func(name, _guard(adapters[name], self._state))
        self._linker = linker
        try:
            try:
                instance = linker.instantiate(store, component)
            finally:
                self._drain_output()
        except Exception as e:  # as in `_run`: a linked function's error, or wasmtime's own
            host_error, self._state.host_error = self._state.host_error, None
            if host_error is not None:
                if not isinstance(host_error, Exception):
                    raise host_error from e
                raise self._translate(host_error, "instantiation") from e
            if not isinstance(e, wasmtime.WasmtimeError):
                raise self._translate(_own_error(e, plugin, "instantiation"), "instantiation") from e
            text = str(e)
            if "exceeds memory limits" in text:
                raise MemoryLimitError(
                    f"the component's initial memory exceeds the {limits.memory_bytes}-byte limit: "
                    f"{_first_line(e)}", plugin=plugin, limit=limits.memory_bytes) from e
            if "resource limit exceeded" in text or "matching implementation was not found" in text:
                raise InvalidModuleError(f"cannot instantiate: {_first_line(e)}", plugin=plugin) from e
            raise self._translate(e, "instantiation") from e
        self._handle = self._export(instance, HANDLE_REQUEST)
        # Addresses for the native call: the store's context and the export's wasmtime_component_func_t,
        # which live as long as the store and `self._handle`.
        ctx_addr = ctypes.cast(store._context(), ctypes.c_void_p).value
        assert ctx_addr is not None
        self._ctx_addr: int = ctx_addr
        self._handle_addr = ctypes.addressof(self._handle._func)
        self._out_fds = (self._outputs[0][0].fileno(), self._outputs[1][0].fileno())
        self._init = self._export(instance, INIT) if info.has_init else None
        self._health = self._export(instance, HEALTH) if info.has_health else None

    def _add_native_log(self, host: wc.LinkerInstance, log: Callable[..., Any]) -> None:
        """Link the host interface's ``log`` through _component.c's trampoline: the guest's message
        arrives as UTF-8 bytes, with no wasmtime-py conversion on the way. Failures are recorded as
        :func:`_guard` records them."""
        assert _native is not None
        state = self._state

        def entry(level: int, message: bytes) -> bool:
            try:
                log(level, message)
            except BaseException as e:  # KeyboardInterrupt too: it must not unwind through wasmtime
                state.host_error = e
                return False
            return True

        addr = ctypes.cast(host.ptr(), ctypes.c_void_p).value
        assert addr is not None
        err = _native.add_log(addr, b"log", entry)
        if err:
            from wasmtime import _ffi as ffi

            raise wasmtime.WasmtimeError._from_ptr(ctypes.cast(err, ctypes.POINTER(ffi.wasmtime_error_t)))

    def _export(self, instance: wc.Instance, name: str) -> wc.Func:
        func = instance.get_func(self._store, name)
        if func is None:  # checked at load; a component's exports do not change
            raise AbiViolationError(f"component instance lacks the export {name!r}", plugin=self.plugin)
        return func

    # -- linking ---------------------------------------------------------------------------------

    def _wasi_config(self) -> wasmtime.WasiConfig:
        caps = self.ctx.capabilities
        cfg = wasmtime.WasiConfig()
        cfg.argv = [self.plugin]
        cfg.env = list(caps.env.items())
        self._grants.preopen(cfg)  # by identity (/proc/self/fd/N), never by the granted path's name
        # Pipes, not Python callbacks: wasmtime writes a guest's output from its own threads (see
        # guest_output.py); the host reads it on the calling thread after each call (`_drain_output`).
        room = self.limits.log_bytes + 1  # one byte over the cap shows that the cap was exceeded
        self._outputs = (
            (GuestOutput(cfg, "stdout", room), _output_sink(self.ctx, self._state, "stdout", logging.INFO)),
            (GuestOutput(cfg, "stderr", room), _output_sink(self.ctx, self._state, "stderr", logging.WARNING)),
        )
        return cfg

    def _drain_output(self) -> None:
        """Log what the guest wrote to stdout / stderr (under the log cap) and keep stderr's tail.

        A pipe found full means a guest write failed, and WASI closes a stream for good after a failed
        write: the instance is poisoned, so that the next call gets a fresh one with working output."""
        for pipe, sink in self._outputs:
            data = pipe.drain()
            if data:
                sink(data)
            if len(data) >= pipe.capacity:
                self.poisoned = True

    def _shadow_wasi(self, root: wc.LinkerInstance) -> None:
        """Replace the WASI functions a plugin may not use with deniers (see the module docstring)."""
        caps = self.ctx.capabilities
        auditor, plugin, state = self._auditor, self.plugin, self._state  # no `self` in linked closures
        clock = caps.allows("clock")

        def denier(kind: str, message: str, **details: Any) -> Callable[..., Any]:
            def denied(_store: Any, *_args: Any) -> Any:
                raise deny(auditor, plugin, kind, message, **details)

            return _guard(denied, state, with_store=True)

        no_clock = denier("security.capability_denied", "reading the clock needs the 'clock' capability",
                          capability="clock")
        no_sleep = denier("security.sleep_denied", "waiting on a timer (sleep) is not available to plugins: "
                          "it would block outside wasm, where the call timeout cannot stop it")
        no_net = denier("security.network_denied", "sockets are not available to plugins (network access "
                        "goes through the http-request host function)")
        for name, funcs in self.info.guarded_wasi:
            iface = name.split("@", 1)[0]
            if iface == "wasi:clocks/monotonic-clock":
                # Always shadowed, to take the timers away; now/resolution stay when the clock is granted.
                with root.add_instance(name) as inst:
                    for f in funcs:
                        if f == "now":
                            inst.add_func(f, no_clock if not clock else
                                          _guard(lambda _s: time.monotonic_ns(), state, with_store=True))
                        elif f == "resolution":
                            inst.add_func(f, no_clock if not clock else _guard(lambda _s: 1, state, with_store=True))
                        else:
                            inst.add_func(f, no_sleep)
            elif iface.startswith("wasi:clocks/") and not clock:
                with root.add_instance(name) as inst:
                    for f in funcs:
                        inst.add_func(f, no_clock)
            elif iface in ("wasi:sockets/instance-network", "wasi:sockets/tcp-create-socket",
                           "wasi:sockets/udp-create-socket"):
                with root.add_instance(name) as inst:
                    for f in funcs:
                        inst.add_func(f, no_net)

    # -- calls -----------------------------------------------------------------------------------

    def _run(self, func: wc.Func, what: str, *args: Any, budget_s: float | None = None) -> Any:
        """Call an export under a fresh budget; errors are typed and poison the instance.

        Every export (``init`` and ``health`` too) starts its own deadline for the host functions it
        reaches, as core modules do: a stale one from the previous call would refuse them at once."""
        store, state, limits = self._store, self._state, self.limits
        if limits.fuel is not None:
            store.set_fuel(limits.fuel)
        start_deadline(self.ctx, budget_s)  # host functions share the call's deadline, the caller's if sooner
        deadline = self._ticks if budget_s is None else min(self._ticks, ticks_for(budget_s))
        store.set_epoch_deadline(deadline)
        state.host_error = None
        state.stderr_tail = b""
        try:
            try:
                result = func(store, *args)
                func.post_return(store)
            finally:
                self._drain_output()
        except Exception as e:  # wasmtime errors, our errors, and whatever a linked function raised
            self._fail(e, what, deadline)
        finally:
            self.ctx.stats.fuel_used = self._fuel_used()
        return result

    def _fail(self, e: Exception, what: str, deadline: int) -> NoReturn:
        """Poison the instance and raise the typed error of a failed call: the error a linked host function
        recorded if there is one (it caused the failure), else the engine's."""
        state = self._state
        self.poisoned = True
        exc: BaseException = state.host_error or _own_error(e, self.plugin, what)
        state.host_error = None
        if not isinstance(exc, Exception):  # KeyboardInterrupt / SystemExit in a host function
            raise exc from e
        if (deadline < self._ticks and not isinstance(exc, SandbusError)
                and _trap_code(exc) == wasmtime.TrapCode.INTERRUPT):
            raise BudgetExceeded(what) from e
        raise self._translate(exc, what) from e

    def call(self, function: str, payload: bytes, *, budget_s: float | None = None) -> bytes:
        """Run ``handle-request(function, payload)``; return the reply bytes.

        An ``err`` result is a plugin-level failure: the reply is the envelope
        ``{"success": false, "result": null, "error": <message>}``. ``budget_s``: as for core modules.
        """
        limits = self.limits
        if len(payload) > limits.max_input_bytes:
            raise size_limit_error(self._auditor, self.plugin, limits, "input", len(payload))
        if not function:
            raise AbiViolationError("empty function name", plugin=self.plugin, function=function)
        try:
            name = function.encode()
        except UnicodeEncodeError as e:  # lone surrogates: no UTF-8 spelling, and wasmtime takes only UTF-8
            raise AbiViolationError(f"function name is not valid UTF-8: {e}", plugin=self.plugin,
                                    function=function.encode(errors="backslashreplace").decode()) from e
        stats = self.ctx.stats
        stats.log_bytes = stats.log_dropped = 0
        stats.memory_bytes = 0
        self.ctx.log_overflow = False
        if self.native:
            ok, data = self._call_native(function, name, payload, budget_s)
            reply = data if ok else orjson.dumps({"success": False, "result": None, "error": data.decode()})
        else:
            try:
                text = payload.decode()
            except UnicodeDecodeError as e:
                raise AbiViolationError(f"request is not valid UTF-8: {e}", plugin=self.plugin,
                                        function=function) from e
            result = self._run(self._handle, function, function, text, budget_s=budget_s)
            ok, value = _unwrap(result)
            reply = value.encode() if ok else orjson.dumps({"success": False, "result": None, "error": value})
        if len(reply) > limits.max_output_bytes:
            self.poisoned = True
            raise size_limit_error(self._auditor, self.plugin, limits, "output", len(reply))
        if self.ctx.log_overflow:
            raise size_limit_error(self._auditor, self.plugin, limits, "log", stats.log_dropped)
        return reply

    def _call_native(self, function: str, name: bytes, payload: bytes, budget_s: float | None
                     ) -> tuple[bool, bytes]:
        """``handle-request`` through host/sandbox/_component.c: (ok, the reply's or the error's UTF-8).

        The same steps as :meth:`_run` and the same errors; the values are not lifted in Python."""
        assert _native is not None
        limits, state = self.limits, self._state
        if type(payload) is not bytes:  # a bytearray or memoryview from a caller: the C side takes bytes
            payload = bytes(payload)
        start_deadline(self.ctx, budget_s)
        deadline = self._ticks if budget_s is None else min(self._ticks, ticks_for(budget_s))
        state.host_error = None
        state.stderr_tail = b""
        fuel = limits.fuel
        try:
            out: tuple[int, int, bytes | None, int, int] = _native.call(
                self._ctx_addr, self._handle_addr, name, payload, limits.max_output_bytes,
                -1 if fuel is None else fuel, deadline, self._out_fds[0], self._out_fds[1])
        except BaseException:
            self._drain_output()
            raise
        code, ok, reply, a, b = out
        if code == _CC_OK:
            if b:  # the guest wrote something (the common call writes nothing: no read, no syscall per pipe)
                self._drain_output()
            assert reply is not None
            self.ctx.stats.fuel_used = 0 if fuel is None else fuel - a
            return bool(ok), reply
        self._drain_output()
        if code == _CC_NOT_UTF8:  # refused before anything ran: the instance is as it was
            if a == 0:  # cannot happen: `name` came from str.encode
                raise AbiViolationError(f"function name is not valid UTF-8 (byte {b})", plugin=self.plugin)
            try:
                payload.decode()
            except UnicodeDecodeError as e:
                raise AbiViolationError(f"request is not valid UTF-8: {e}", plugin=self.plugin,
                                        function=function) from e
            raise AbiViolationError(f"request is not valid UTF-8 (byte {b})", plugin=self.plugin, function=function)
        self.ctx.stats.fuel_used = self._fuel_used()
        if code == _CC_WASM_ERROR:
            from wasmtime import _ffi as ffi

            error = wasmtime.WasmtimeError._from_ptr(ctypes.cast(a, ctypes.POINTER(ffi.wasmtime_error_t)))
            self._fail(error, function, deadline)
        self.poisoned = True
        if code == _CC_REPLY_TOO_LARGE:
            raise size_limit_error(self._auditor, self.plugin, limits, "output", a)
        # Cannot happen for the signature checked at load; refused rather than read.
        raise self._translate(AbiViolationError(f"handle-request returned a value of kind {a}, not a string "
                                                "or a result of strings", function=function), function)

    def init(self, config: bytes) -> None:
        """Call ``init(config)`` if the component exports it; ``err`` fails start-up."""
        if self._init is None:
            return
        ok, message = _unwrap(self._run(self._init, INIT, config.decode()))
        if not ok:
            self.poisoned = True
            raise PluginInitError(f"init failed: {message}", plugin=self.plugin)

    def health(self) -> bool:
        """``health()`` if exported; otherwise healthy while not poisoned."""
        if self.poisoned:
            return False
        if self._health is None:
            return True
        try:
            return bool(self._run(self._health, HEALTH))
        except SandbusError:
            return False

    def shutdown(self) -> None:
        """Nothing to call: the world has no shutdown export. The instance is simply dropped."""

    # -- errors ----------------------------------------------------------------------------------

    def _translate(self, exc: BaseException, where: str) -> SandbusError:
        tail = self._state.stderr_tail.decode(errors="replace")
        err = translate_error(exc, where, plugin=self.plugin, limits=self.limits, auditor=self._auditor,
                              code=_trap_code(exc), frames=_frames(exc),
                              memory_exhausted=lambda: "MemoryError" in tail)
        if isinstance(err, TrapError) and tail.strip():
            # A Python guest prints its traceback before it aborts: its last line says what happened.
            last = tail.strip().splitlines()[-1]
            lines = [ln for ln in tail.strip().splitlines() if ln.strip() and not ln.startswith(("  ", "\t"))]
            reason = next((ln for ln in reversed(lines) if re.match(r"^[A-Za-z_][\w.]*(Error|Exception)", ln)),
                          last)
            err.message = f"{err.message} ({reason.strip()})"
            err.details["stderr"] = tail[-1024:]
            err.args = (str(err),)
        return err

    def _fuel_used(self) -> int:
        if self.limits.fuel is None:
            return 0
        try:
            return self.limits.fuel - int(self._store.get_fuel())
        except wasmtime.WasmtimeError:
            return 0


def _guard(fn: Callable[..., Any], state: _CallState, *, with_store: bool = False) -> Callable[..., Any]:
    """A linked host function whose failure stays with its own instance.

    wasmtime-py keeps a Python exception raised by a linked function in one process-wide slot
    (``wasmtime.component._enter.LAST_EXCEPTION``) and re-raises whatever that slot holds when *any*
    thread's component call fails: under two threads, one plugin's caller got the other plugin's error.
    So no exception leaves here: it is recorded on the instance's own state, and wasmtime gets a
    ``WasmtimeError``, which it carries back to this call alone (it never touches the slot). ``_run``
    then reports the recorded error."""

    def run(store: Any, *args: Any) -> Any:
        try:
            return fn(store, *args) if with_store else fn(*args)
        except BaseException as e:  # KeyboardInterrupt too: it must not pass through a ctypes callback
            state.host_error = e
            raise wasmtime.WasmtimeError(f"host function failed: {type(e).__name__}") from None

    return run


def _own_error(exc: Exception, plugin: str, what: str) -> BaseException:
    """The error of a failed call when no linked function of this instance raised.

    wasmtime-py raises whatever its process-wide slot holds in place of wasmtime's own error. Our linked
    functions never put anything there (see :func:`_guard`), so anything but a ``WasmtimeError`` is
    someone else's exception (another component user in the process): it is not reported to this
    caller, whose own error it replaced."""
    if isinstance(exc, wasmtime.WasmtimeError):
        return exc
    return TrapError(f"{what} failed in wasm (wasmtime replaced its error with an unrelated "
                     f"{type(exc).__name__})", plugin=plugin, function=what)


def _output_sink(ctx: CallContext, state: _CallState, stream: str, level: int) -> Callable[[bytes], int]:
    """What ``_drain_output`` does with one stream's bytes: keep stderr's tail and log them under the cap.

    Returns the bytes taken, or -5 (EIO) when they were dropped over the cap; ``_drain_output`` ignores it
    (an overrun is counted by ``ctx.log`` and reported when the call returns)."""

    def sink(data: bytes) -> int:
        if stream == "stderr":
            state.stderr_tail = (state.stderr_tail + data)[-_STDERR_TAIL:]
        if not ctx.log(level, data.decode(errors="replace"), stream):
            return -5
        return len(data)

    return sink


def _unwrap(result: Any) -> tuple[bool, str]:
    """(ok, text) of a ``result<string, string>`` / ``result<_, string>`` / plain ``string``."""
    if isinstance(result, wc.Variant):
        payload = result.payload
        return result.tag == "ok", "" if payload is None else str(payload)
    if result is None:
        return True, ""
    return True, str(result)


def _trap_code(exc: BaseException) -> wasmtime.TrapCode | None:
    """The trap code a component call's error stands for: the component API reports traps as text."""
    if isinstance(exc, wasmtime.Trap):
        return exc.trap_code
    if not isinstance(exc, wasmtime.WasmtimeError):
        return None
    return _TRAP_TEXT.get(_first_line(exc))


def _frames(exc: BaseException) -> list[str]:
    if not isinstance(exc, wasmtime.WasmtimeError):
        return []
    frames = []
    for line in str(exc).splitlines():
        m = _FRAME.match(line)
        if m:  # names come from the guest: escaped and cut, like core modules' (instance._frames)
            frames.append(escape_controls(m.group(1)[:MAX_FRAME_NAME]))
        if len(frames) >= MAX_FRAMES:
            break
    return frames

