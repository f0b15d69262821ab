"""One live instance of a plugin: its store, its links to the host, and the guarded call.

Everything that can go wrong inside a call ends here as a typed sandbus error,
with an audit event for each limit hit and denial. An instance whose call
failed inside the guest is marked ``poisoned``; the pool replaces it, so a
trapped guest never serves another request from a half-updated state.
"""

from __future__ import annotations

import functools
import logging
import os
import posixpath
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import wasmtime

from sdk.errors import (
    AbiViolationError,
    ExecutionTimeoutError,
    InvalidModuleError,
    MemoryLimitError,
    OutOfFuelError,
    PayloadTooLargeError,
    PluginInitError,
    ResourceLimitError,
    SandboxError,
    SandbusError,
    SecurityViolationError,
    StackLimitError,
    TrapError,
)

from . import abi
from .audit import AuditLevel, Auditor
from .config import Capabilities, Limits
from .engine import EngineHandle, ticks_for
from .hostfuncs import HostFunction, HostFunctions
from .invoke import GuestAllocFailed, Invoker, ReplyTooLarge, make_invoker

__all__ = [
    "BudgetExceeded",
    "CallContext",
    "CallStats",
    "PluginInstance",
    "bind_host_function",
    "deny",
    "size_limit_error",
    "translate_error",
]

WASM_PAGE = 65536
_WASI = abi.WASI_MODULE
# WASI open flags and rights that mean "this open may write".
_O_CREAT, _O_TRUNC = 1, 8
_RIGHT_FD_WRITE = 1 << 6
_FDFLAG_APPEND = 1
_MUTATING_PATH_OPS = (
    "path_create_directory", "path_remove_directory", "path_unlink_file", "path_rename",
    "path_symlink", "path_link", "path_filestat_set_times",
)
_decoy_lock = threading.Lock()
_decoy_dir: str | None = None


def _decoy_root() -> str:
    """An empty read-only directory preopened as "/" so that every ungranted path reaches the host.

    Without it, wasi-libc refuses paths outside the preopens by itself and the host
    never learns of the attempt: no audit event, no typed error.
    """
    global _decoy_dir
    with _decoy_lock:
        if _decoy_dir is None or not os.path.isdir(_decoy_dir):
            _decoy_dir = tempfile.mkdtemp(prefix="sandbus-deny-")
            os.chmod(_decoy_dir, 0o500)
        return _decoy_dir


class BudgetExceeded(Exception):
    """A call given a short ``budget_s`` ran past it; nothing was returned and the instance is discarded.

    Not a :class:`SandbusError`: the caller is expected to run the call again with the full limits.
    """


class CallStats:
    """Facts about the last call, for metrics and tracing."""

    __slots__ = ("fuel_used", "log_bytes", "log_dropped", "memory_bytes")

    def __init__(self) -> None:
        self.fuel_used = 0
        self.memory_bytes = 0
        self.log_bytes = 0
        self.log_dropped = 0


class CallContext:
    """What a host function sees of its caller: plugin, capabilities, memory, log, auditor."""

    def __init__(self, plugin: str, capabilities: Capabilities, limits: Limits, auditor: Auditor,
                 logger: logging.Logger) -> None:
        self.plugin = plugin
        self.capabilities = capabilities
        self.limits = limits
        self.auditor = auditor
        self.logger = logger
        self.invoker: Invoker | None = None
        self.stats = CallStats()
        self.log_overflow = False
        #: Free-form slot for the embedding layer (the bus puts its per-call state here).
        self.extra: dict[str, Any] = {}

    def _inv(self) -> Invoker:
        if self.invoker is None:
            raise AbiViolationError("host function called during instantiation", plugin=self.plugin)
        return self.invoker

    def read(self, ptr: int, length: int) -> bytes:
        return self._inv().read(ptr, length)

    def read_str(self, ptr: int, length: int, what: str) -> str:
        try:
            return self.read(ptr, length).decode()
        except UnicodeDecodeError as e:
            raise AbiViolationError(f"{what} is not valid UTF-8: {e}", plugin=self.plugin) from e

    def write(self, ptr: int, data: bytes) -> None:
        self._inv().write(ptr, data)

    def log(self, level: int, text: str) -> bool:
        """Log a line for the plugin; False once the per-call log cap is exhausted."""
        size = len(text.encode())
        if self.stats.log_bytes + size > self.limits.log_bytes:
            self.stats.log_dropped += size
            self.log_overflow = True
            return False
        self.stats.log_bytes += size
        self.logger.log(level, "%s", text.rstrip("\n"))
        return True


class PluginInstance:
    """A single instantiated plugin. Not thread-safe: the pool hands it to one caller at a time.

    Parameters:
        plugin: the plugin's name (used in every error and event).
        handle: the engine the module was compiled for.
        module / info: the compiled module and its checked ABI facts.
        limits / capabilities: what is enforced.
        host_functions: the host functions linkable by this instance.
        auditor: where limit and security events go.
        fast: use the fast call path when available.
        native: on the fast path, the compiled round trip when it is built.
    """

    def __init__(
        self,
        plugin: str,
        handle: EngineHandle,
        module: wasmtime.Module,
        info: abi.ModuleInfo,
        limits: Limits,
        capabilities: Capabilities,
        host_functions: HostFunctions,
        auditor: Auditor,
        *,
        fast: bool = True,
        native: bool = True,
        context_factory: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.plugin = plugin
        self.info = info
        self.limits = limits
        self.poisoned = False
        self._auditor = auditor
        self._ticks = ticks_for(limits.timeout_s)
        logger = logging.getLogger(f"sandbus.plugin.{plugin}")
        self.ctx = CallContext(plugin, capabilities, limits, auditor, logger)
        if context_factory is not None:
            self.ctx.extra.update(context_factory())

        store = wasmtime.Store(handle.engine)
        store.set_limits(memory_size=limits.memory_bytes, table_elements=limits.table_elements,
                         instances=2, tables=4, memories=1)  # 2: the guest and its WASI trampoline
        # Instantiation (start function, data segments) runs under the same budget as a call.
        if limits.fuel is not None:
            store.set_fuel(limits.fuel)
        store.set_epoch_deadline(self._ticks)
        self._store = store
        linker = wasmtime.Linker(handle.engine)
        self._dir_grants: dict[int, tuple[str, bool]] = {}
        if info.uses_wasi:
            store.set_wasi(self._wasi_config())
            linker.define_wasi()
            linker.allow_shadowing = True
            self._shadow_wasi(linker, module)
        self._link_host_functions(linker, module, host_functions)
        try:
            instance = linker.instantiate(store, module)
        except wasmtime.Trap as e:
            raise self._translate(e, "instantiation") from e
        except wasmtime.WasmtimeError as e:
            if "exceeds memory limits" in str(e):
                raise MemoryLimitError(
                    f"the module's initial memory exceeds the {limits.memory_bytes}-byte limit: {_first_line(e)}",
                    plugin=plugin, limit=limits.memory_bytes) from e
            raise InvalidModuleError(f"cannot instantiate: {_first_line(e)}", plugin=plugin) from e
        memory = instance.exports(store)["memory"]
        assert isinstance(memory, wasmtime.Memory)
        if info.uses_wasi:
            self._link_passthrough(handle, memory)
        self._invoker = make_invoker(store, instance, memory, info.signatures, fast=fast, native=native)
        self.ctx.invoker = self._invoker
        if info.has(abi.INITIALIZE):
            self._guarded(lambda: self._invoker.call(abi.INITIALIZE), "_initialize")
        version = self._guarded(lambda: self._invoker.call(abi.VERSION_EXPORT), abi.VERSION_EXPORT)
        if version != abi.ABI_VERSION:
            raise InvalidModuleError(
                f"plugin implements ABI version {version}, this host speaks version {abi.ABI_VERSION}",
                plugin=plugin, abi_version=version,
            )

    # -- linking ---------------------------------------------------------------

    def _wasi_config(self) -> wasmtime.WasiConfig:
        caps = self.ctx.capabilities
        cfg = wasmtime.WasiConfig()
        cfg.argv = [self.plugin]
        cfg.env = list(caps.env.items())
        fd = 3
        if _WASI in {m for m, _ in self.info.imports} and "path_open" in self.info.imports_of(_WASI):
            cfg.preopen_dir(_decoy_root(), "/", fs_mutable=False)
            self._decoy_fd: int | None = fd
            fd += 1
        else:
            self._decoy_fd = None
        for grant in caps.dirs:
            cfg.preopen_dir(str(grant.host), grant.guest_path(), fs_mutable=grant.writable)
            self._dir_grants[fd] = (grant.guest_path(), grant.writable)
            fd += 1
        cfg.stdout_custom = self._output_sink("stdout", logging.INFO)
        cfg.stderr_custom = self._output_sink("stderr", logging.WARNING)
        return cfg

    def _output_sink(self, stream: str, level: int) -> Callable[[bytes], int]:
        def sink(data: bytes) -> int:
            if not self.ctx.log(level, f"[{stream}] {data.decode(errors='replace')}"):
                return -5  # -EIO: tell a well-behaved guest to stop writing
            return len(data)

        return sink

    def _deny(self, kind: str, message: str, **details: Any) -> SecurityViolationError:
        return deny(self._auditor, self.plugin, kind, message, **details)

    def _shadow_wasi(self, linker: wasmtime.Linker, module: wasmtime.Module) -> None:
        caps = self.ctx.capabilities
        imported = {i.name: i.type for i in module.imports
                    if i.module == _WASI and isinstance(i.type, wasmtime.FuncType)}

        def denier(cap: str, what: str) -> Callable[..., int]:
            def deny(*_args: Any) -> int:
                raise self._deny("security.capability_denied", f"{what} needs the {cap!r} capability",
                                 capability=cap)

            return deny

        for name, cap, what in (
            ("clock_time_get", "clock", "reading the clock"),
            ("clock_res_get", "clock", "reading the clock"),
            ("random_get", "random", "reading random bytes"),
        ):
            if name in imported and not caps.allows(cap):
                linker.define_func(_WASI, name, imported[name], denier(cap, what))
        if "poll_oneoff" in imported:
            # A blocking sleep happens outside wasm, where the epoch deadline cannot interrupt it.
            linker.define_func(_WASI, "poll_oneoff", imported["poll_oneoff"],
                               lambda *_a: 58)  # ENOTSUP
        self._fs_wrapped = {n: imported[n] for n in ("path_open", *_MUTATING_PATH_OPS) if n in imported}
        self._passthrough: dict[str, wasmtime.Func] = {}
        for name, ty in self._fs_wrapped.items():
            impl = self._path_open if name == "path_open" else self._mutating_op(name)
            linker.define_func(_WASI, name, ty, impl, access_caller=True)

    def _link_passthrough(self, handle: EngineHandle, memory: wasmtime.Memory) -> None:
        """Reach wasmtime's own WASI file functions after our checks.

        A host function cannot simply call the original WASI function: WASI reads
        its arguments from the *calling instance's* exported memory, and a host
        caller has none. So a tiny trampoline module imports the guest's memory,
        re-exports it as "memory", and forwards each call to the real WASI import.
        """
        if not self._fs_wrapped:
            return
        wasm = _trampoline_wasm(tuple((n, _sig_text(t)) for n, t in sorted(self._fs_wrapped.items())))
        module = _trampoline_modules.setdefault((id(handle.engine), wasm), wasmtime.Module(handle.engine, wasm))
        linker = wasmtime.Linker(handle.engine)
        linker.define_wasi()
        linker.define(self._store, "guest", "memory", memory)
        exports = linker.instantiate(self._store, module).exports(self._store)
        for name in self._fs_wrapped:
            func = exports[name]
            assert isinstance(func, wasmtime.Func)
            self._passthrough[name] = func

    def _grant_for(self, fd: int, path: str, write: bool, op: str) -> None:
        """Raise a security violation unless ``path`` under dir ``fd`` is granted for this access."""
        if fd == self._decoy_fd:
            raise self._deny("security.fs_denied", f"{op} of /{path}: no directory containing it was granted",
                             path="/" + path, write=write)
        grant = self._dir_grants.get(fd)
        if grant is None:
            return  # a descriptor the guest opened inside a grant; wasmtime confines it to that grant
        root, writable = grant
        full = posixpath.normpath(posixpath.join(root, path))
        if full != root and not full.startswith(root.rstrip("/") + "/"):
            raise self._deny("security.fs_denied", f"{op} of {full}: outside the granted directory {root}",
                             path=full, write=write)
        if write and not writable:
            raise self._deny("security.fs_denied", f"{op} of {full}: {root} was granted read-only",
                             path=full, write=True)

    def _path_open(self, caller: wasmtime.Caller, fd: int, dirflags: int, path_ptr: int, path_len: int,
                   oflags: int, rights: int, rights_inh: int, fdflags: int, out: int) -> int:
        path = self.ctx.read_str(path_ptr, path_len, "path")
        write = bool(oflags & (_O_CREAT | _O_TRUNC) or rights & _RIGHT_FD_WRITE or fdflags & _FDFLAG_APPEND)
        self._grant_for(fd, path, write, "open")
        orig = self._passthrough["path_open"]
        return int(orig(caller, fd, dirflags, path_ptr, path_len, oflags, rights, rights_inh, fdflags, out))

    def _mutating_op(self, name: str) -> Callable[..., int]:
        # Only the first (fd, path, len) triple is checked; the others are confined by wasmtime.
        def op(caller: wasmtime.Caller, *args: int) -> int:
            if name == "path_symlink":
                fd, ptr, length = args[2], args[3], args[4]
            elif name in ("path_link", "path_filestat_set_times"):
                fd, ptr, length = args[0], args[2], args[3]
            else:
                fd, ptr, length = args[0], args[1], args[2]
            self._grant_for(fd, self.ctx.read_str(ptr, length, "path"), True, name.removeprefix("path_"))
            return int(self._passthrough[name](caller, *args))

        return op

    def _link_host_functions(self, linker: wasmtime.Linker, module: wasmtime.Module,
                             host_functions: HostFunctions) -> None:
        for imp in module.imports:
            if imp.module == _WASI:
                continue
            name = imp.name or ""
            fn = host_functions.get(imp.module, name)
            if fn is None:
                raise InvalidModuleError(
                    f"imports {imp.module}.{name}, which this host does not provide", plugin=self.plugin,
                    missing_import=f"{imp.module}.{name}",
                )
            ty = imp.type
            if not isinstance(ty, wasmtime.FuncType) or (
                tuple(str(p) for p in ty.params) != fn.params or tuple(str(r) for r in ty.results) != fn.results
            ):
                raise InvalidModuleError(
                    f"import {imp.module}.{name} has type {ty}, the host provides "
                    f"({', '.join(fn.params)}) -> ({', '.join(fn.results)})",
                    plugin=self.plugin,
                )
            linker.define_func(imp.module, name, ty, self._bind(fn))

    def _bind(self, fn: HostFunction) -> Callable[..., Any]:
        return bind_host_function(fn, self.ctx, self._auditor)

    # -- calls -----------------------------------------------------------------

    def _guarded(self, thunk: Callable[[], int | None], what: str) -> int | None:
        inv = self._invoker
        inv.set_budget(self.limits.fuel, self._ticks)
        try:
            result = thunk()
        except (wasmtime.Trap, wasmtime.WasmtimeError, SandbusError) as e:
            self.poisoned = True
            raise self._translate(e, what) from e
        finally:
            self.ctx.stats.fuel_used = _fuel_used(inv, self.limits.fuel)
        return result

    def call(self, function: str, payload: bytes, *, budget_s: float | None = None) -> bytes:
        """Run ``function`` with ``payload`` (JSON bytes); return the guest's reply bytes.

        ``budget_s`` (shorter than the plugin's timeout) interrupts the call early with
        :class:`BudgetExceeded` instead of a timeout error: the node uses it to run calls on its event
        loop without letting one stall the loop (see host/node.py).
        """
        limits = self.limits
        ticks = self._ticks if budget_s is None else min(self._ticks, ticks_for(budget_s))
        if len(payload) > limits.max_input_bytes:
            raise size_limit_error(self._auditor, self.plugin, limits, "input", len(payload))
        if function not in self.info.functions:
            raise AbiViolationError(
                f"no function {function!r}; exported functions: {', '.join(self.info.functions)}",
                plugin=self.plugin, function=function,
            )
        stats = self.ctx.stats
        stats.log_bytes = stats.log_dropped = 0
        self.ctx.log_overflow = False
        inv = self._invoker
        try:
            reply = inv.round_trip(function, payload, limits.max_output_bytes, limits.fuel, ticks)
        except BaseException as e:
            stats.fuel_used = _fuel_used(inv, limits.fuel)
            stats.memory_bytes = inv.memory_size()
            if isinstance(e, GuestAllocFailed):
                self.poisoned = True
                raise self._translate(MemoryLimitError(
                    f"sandbus_alloc({e.args[0]}) returned 0: the guest is out of memory",
                    plugin=self.plugin, limit=limits.memory_bytes), function) from e
            if isinstance(e, ReplyTooLarge):
                self.poisoned = True
                raise size_limit_error(self._auditor, self.plugin, limits, "output", e.args[0]) from e
            if not isinstance(e, (wasmtime.Trap, wasmtime.WasmtimeError, SandbusError)):
                raise
            self.poisoned = True
            if (ticks < self._ticks and isinstance(e, wasmtime.Trap)
                    and e.trap_code == wasmtime.TrapCode.INTERRUPT):
                raise BudgetExceeded(function) from e
            raise self._translate(e, function) from e
        # The round trip read both on its way out: no further calls into the store.
        stats.fuel_used = 0 if limits.fuel is None else limits.fuel - inv.fuel_left_after
        stats.memory_bytes = inv.memory_after
        if self.ctx.log_overflow:
            raise size_limit_error(self._auditor, self.plugin, limits, "log", stats.log_dropped)
        return reply

    def init(self, config: bytes) -> None:
        """Call ``sandbus_init(config)`` if the plugin exports it."""
        if not self.info.has(abi.INIT):
            return
        inv = self._invoker

        def run() -> int | None:
            ptr = inv.call(abi.ALLOC, len(config)) or 0
            if ptr == 0 and config:
                raise MemoryLimitError("sandbus_alloc returned 0 for the init config", plugin=self.plugin)
            inv.write(ptr, config)
            status = inv.call(abi.INIT, ptr, len(config))
            if self.info.has(abi.DEALLOC) and ptr:
                inv.call(abi.DEALLOC, ptr, len(config))
            return status

        status = self._guarded(run, abi.INIT)
        if status != 0:
            self.poisoned = True
            raise PluginInitError(f"sandbus_init returned {status} (non-zero means failure)",
                                  plugin=self.plugin, status=status)

    def health(self) -> bool:
        """``sandbus_health() == 0``; plugins without the export are healthy while not poisoned."""
        if self.poisoned:
            return False
        if not self.info.has(abi.HEALTH):
            return True
        try:
            return self._guarded(lambda: self._invoker.call(abi.HEALTH), abi.HEALTH) == 0
        except SandbusError:
            return False

    def shutdown(self) -> None:
        if self.info.has(abi.SHUTDOWN) and not self.poisoned:
            try:
                self._guarded(lambda: self._invoker.call(abi.SHUTDOWN), abi.SHUTDOWN)
            except SandbusError as e:
                logging.getLogger("sandbus.sandbox").warning("%s", e)

    # -- errors ----------------------------------------------------------------

    def _translate(self, exc: BaseException, where: str) -> SandbusError:
        """Turn whatever a call raised into our error, auditing limit hits."""
        return translate_error(exc, where, plugin=self.plugin, limits=self.limits, auditor=self._auditor,
                               code=exc.trap_code if isinstance(exc, wasmtime.Trap) else None,
                               frames=_frames(exc), memory_exhausted=self._memory_exhausted)

    def _memory_exhausted(self) -> bool:
        """Whether a trap is best explained by the memory limit.

        wasmtime's C API gives no callback when ``memory.grow`` is refused, so we judge by how close
        memory got: within a page, or an eighth of the limit -- allocators grow by several pages at a
        time, and a refused multi-page grow leaves memory short of the limit by that much.
        """
        try:
            headroom = max(WASM_PAGE, self.limits.memory_bytes // 8)
            return self._invoker.memory_size() + headroom > self.limits.memory_bytes
        except AttributeError:  # failed before the invoker existed
            return False


# -- shared with host/sandbox/component.py -------------------------------------------------------


def deny(auditor: Auditor, plugin: str, kind: str, message: str, **details: Any) -> SecurityViolationError:
    """Audit a denial (critical) and return the error to raise."""
    auditor.emit(AuditLevel.CRITICAL, kind, plugin, message, **details)
    return SecurityViolationError(message, plugin=plugin, **details)


def bind_host_function(fn: HostFunction, ctx: CallContext, auditor: Auditor) -> Callable[..., Any]:
    """``fn.impl`` bound to ``ctx``: denied outright without ``fn.capability``, any non-sandbus failure typed.

    The capability is checked once, here, not per call: an instance's capabilities never change.
    """
    plugin = ctx.plugin
    if fn.capability is not None and not ctx.capabilities.allows(fn.capability):
        cap = fn.capability

        def denied(*_args: Any) -> Any:
            raise deny(auditor, plugin, "security.capability_denied",
                       f"host function {fn.module}.{fn.name} needs the {cap!r} capability",
                       capability=cap, function=fn.name)

        return denied
    impl = fn.impl

    def bound(*args: Any) -> Any:
        try:
            return impl(ctx, *args)
        except SandbusError:
            raise
        except Exception as e:
            # A bug in a host function is the host's, but it must still end as a typed error.
            raise SandboxError(f"host function {fn.module}.{fn.name} failed: {type(e).__name__}: {e}",
                               plugin=plugin, function=fn.name) from e

    return bound


def translate_error(exc: BaseException, where: str, *, plugin: str, limits: Limits, auditor: Auditor,
                    code: wasmtime.TrapCode | None, frames: list[str],
                    memory_exhausted: Callable[[], bool]) -> SandbusError:
    """Turn whatever a call raised into our error, auditing limit hits.

    ``code`` is the trap code when the engine reported one (core modules: ``wasmtime.Trap.trap_code``;
    components report traps as text, see component.py), ``frames`` the wasm backtrace, and
    ``memory_exhausted`` tells whether the guest's memory is at its limit (a trap there is a memory limit).
    """
    if isinstance(exc, SandbusError):
        if exc.plugin is None:
            exc.plugin = plugin
            exc.args = (str(exc),)
        if isinstance(exc, AbiViolationError):
            auditor.emit(AuditLevel.WARNING, "abi.violation", plugin, f"{where}: {exc.message}", **exc.details)
        elif isinstance(exc, ResourceLimitError):
            auditor.emit(AuditLevel.WARNING, exc.code, plugin, exc.message, **exc.details)
        return exc
    if code == wasmtime.TrapCode.OUT_OF_FUEL:
        err: SandbusError = OutOfFuelError(
            f"{where} ran out of fuel ({limits.fuel} units per call)", plugin=plugin, limit=limits.fuel)
        kind = "limit.fuel"
    elif code == wasmtime.TrapCode.INTERRUPT:
        err = ExecutionTimeoutError(f"{where} exceeded its {limits.timeout_s:g} s timeout",
                                    plugin=plugin, limit=limits.timeout_s)
        kind = "limit.timeout"
    elif code == wasmtime.TrapCode.STACK_OVERFLOW:
        err = StackLimitError(f"{where} exhausted its {limits.stack_bytes}-byte wasm stack",
                              plugin=plugin, limit=limits.stack_bytes)
        kind = "limit.stack"
    elif memory_exhausted():
        err = MemoryLimitError(
            f"{where} failed at the {limits.memory_bytes}-byte memory limit: {_first_line(exc)}",
            plugin=plugin, limit=limits.memory_bytes)
        kind = "limit.memory"
    elif isinstance(exc, wasmtime.ExitTrap):
        return TrapError(f"{where} called exit({exc.code})", plugin=plugin, backtrace=frames,
                         exit_code=exc.code)
    else:
        return TrapError(f"{where} trapped: {_first_line(exc)}", plugin=plugin, backtrace=frames)
    auditor.emit(AuditLevel.WARNING, kind, plugin, err.message, **err.details)
    return err


def size_limit_error(auditor: Auditor, plugin: str, limits: Limits, direction: str, size: int) -> PayloadTooLargeError:
    """The audited error for a payload over its cap: ``direction`` is "input", "output" or "log"
    (for "log", ``size`` is the number of bytes dropped)."""
    if direction == "log":
        auditor.emit(AuditLevel.WARNING, "limit.log", plugin,
                     f"output beyond the {limits.log_bytes}-byte log cap was dropped", dropped=size,
                     limit=limits.log_bytes)
        return PayloadTooLargeError(
            f"stdout/stderr/log output exceeded the {limits.log_bytes}-byte cap ({size} bytes dropped)",
            plugin=plugin, limit=limits.log_bytes, dropped=size, direction="log")
    limit = limits.max_input_bytes if direction == "input" else limits.max_output_bytes
    what = "input" if direction == "input" else "reply"
    auditor.emit(AuditLevel.WARNING, f"limit.{direction}_size", plugin,
                 f"{what} of {size} bytes refused (limit {limit})", size=size, limit=limit)
    return PayloadTooLargeError(f"{what} of {size} bytes exceeds the {limit}-byte {direction} limit",
                                plugin=plugin, size=size, limit=limit, direction=direction)


_trampoline_modules: dict[tuple[int, bytes], wasmtime.Module] = {}


def _sig_text(ty: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results)


@functools.cache
def _trampoline_wasm(funcs: tuple[tuple[str, tuple[tuple[str, ...], tuple[str, ...]]], ...]) -> bytes:
    lines = ["(module"]
    for i, (name, (params, results)) in enumerate(funcs):
        sig = f"(param {' '.join(params)}) (result {' '.join(results)})"
        lines.append(f'  (import "{_WASI}" "{name}" (func $f{i} {sig}))')
    lines.append('  (import "guest" "memory" (memory 0))')
    lines.append('  (export "memory" (memory 0))')
    for i, (name, (params, results)) in enumerate(funcs):
        sig = f"(param {' '.join(params)}) (result {' '.join(results)})"
        gets = " ".join(f"(local.get {j})" for j in range(len(params)))
        lines.append(f'  (func (export "{name}") {sig} (call $f{i} {gets}))')
    lines.append(')')
    return bytes(wasmtime.wat2wasm("\n".join(lines)))


def _fuel_used(inv: Invoker, budget: int | None) -> int:
    if budget is None:
        return 0
    try:
        return budget - inv.fuel_left()
    except wasmtime.WasmtimeError:
        return 0


def _first_line(exc: BaseException) -> str:
    """The cause of a wasmtime error, without the backtrace it starts with."""
    text = str(exc).strip()
    if "Caused by:" in text:
        text = text.split("Caused by:", 1)[1].strip()
        text = text.removeprefix("wasm trap: ")
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _frames(exc: BaseException) -> list[str]:
    if not isinstance(exc, wasmtime.Trap):
        return []
    out = []
    for f in exc.frames:
        out.append(f"{f.module_name or '?'}!{f.func_name or f'func[{f.func_index}]'}+{f.module_offset:#x}")
    return out
