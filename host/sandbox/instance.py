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
import select
import time
import weakref
from collections.abc import Callable
from typing import Any

import wasmtime

from sandbus.host.sandbox import abi
from sandbus.host.sandbox.audit import AuditLevel, Auditor
from sandbus.host.sandbox.config import Capabilities, Limits
from sandbus.host.sandbox.deadline import start as start_deadline
from sandbus.host.sandbox.engine import EngineHandle, ticks_for
from sandbus.host.sandbox.fsguard import FS_FUNCTIONS, PATH_FUNCTIONS, WASI_SIGNATURES, DirFd, FsGuard, check_signature
from sandbus.host.sandbox.grants import GrantSet, decoy_root
from sandbus.host.sandbox.guest_output import GuestOutput
from sandbus.host.sandbox.guest_text import escape_controls, guest_lines
from sandbus.host.sandbox.hostcall import (
    LostTrapReport,
    RecordingLinker,
    install_last_exception_filter,
    take_failure,
    wasi_guest_error,
)
from sandbus.host.sandbox.hostfuncs import HostFunction, HostFunctions, check_span
from sandbus.host.sandbox.invoke import GuestAllocFailed, Invoker, ReplyTooLarge, make_invoker
from sandbus.host.sandbox.record import HostEvent, Tape, apply_writes
from sandbus.sdk.errors import (
    AbiViolationError,
    ExecutionTimeoutError,
    GuestError,
    HostError,
    InvalidModuleError,
    MemoryLimitError,
    OutOfFuelError,
    PayloadTooLargeError,
    PluginInitError,
    ResourceLimitError,
    SandbusError,
    SecurityViolationError,
    StackLimitError,
    TrapError,
)

__all__ = [
    "BudgetExceeded",
    "CallContext",
    "CallStats",
    "PluginInstance",
    "bind_host_function",
    "deny",
    "link_host_functions",
    "size_limit_error",
    "translate_error",
]

WASM_PAGE = 65536
_WASI = abi.WASI_MODULE
install_last_exception_filter()


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
        self._invoker: weakref.ReferenceType[Invoker] | None = None
        self.stats = CallStats()
        self.log_overflow = False
        #: The exception a host function raised in the current call (see host/sandbox/hostcall.py):
        #: what the call raises, instead of wasmtime-py's process-wide LAST_EXCEPTION.
        self.host_error: BaseException | None = None
        #: Free-form slot for the embedding layer (the bus puts its per-call state here).
        self.extra: dict[str, Any] = {}
        #: When the current call must end (time.monotonic()); host functions that wait get what is left
        #: of it (host/sandbox/deadline.py). None until the first call (init included); then the last
        #: call's, which also tells one call from the next (host/node/sendlimit.py).
        self.deadline: float | None = None
        #: Records or replays the host calls of this instance (host/sandbox/record.py); None: neither.
        self.tape: Tape | None = None

    @property
    def invoker(self) -> Invoker | None:
        """The instance's call path; held weakly (see below), so ``None`` once the instance is gone.

        Every function linked into a store is kept by wasmtime-py in a process-wide table until the store
        is deleted, and those functions hold this context: a strong reference from here to the invoker,
        which holds the store, would be a cycle through native code that Python never collects -- every
        instance ever built, with its memory and its open directories, would stay alive for ever.
        """
        return None if self._invoker is None else self._invoker()

    @invoker.setter
    def invoker(self, invoker: Invoker | None) -> None:
        self._invoker = None if invoker is None else weakref.ref(invoker)

    def _inv(self) -> Invoker:
        ref = self._invoker  # not the property: every guest-memory access of a host function comes here
        inv = None if ref is None else ref()
        if inv is None:
            raise AbiViolationError("host function called outside a call of a live instance", plugin=self.plugin)
        return inv

    def read(self, ptr: int, length: int) -> bytes:
        return self._inv().read(ptr, length)

    def read_str(self, ptr: int, length: int, what: str) -> str:
        try:
            return self.read(ptr, length).decode()
        except UnicodeDecodeError as e:
            raise AbiViolationError(f"{what} is not valid UTF-8: {e}", plugin=self.plugin) from e

    def write(self, ptr: int, data: bytes) -> None:
        self._inv().write(ptr, data)
        tape = self.tape
        if tape is not None and tape.current is not None:
            tape.on_write(ptr, data)

    def memory_size(self) -> int:
        return self._inv().memory_size()

    def log(self, level: int, text: str, stream: str | None = None) -> bool:
        """Log guest text for the plugin; False once the per-call log cap is exhausted.

        Every path of guest output (``log()``, stdout, stderr; core modules and components) comes
        through here, so this is where it is made safe (:mod:`.guest_text`): one record per line, each
        control character escaped, ``[stream]`` in front of every line when given.
        """
        size = len(text.encode())
        if self.stats.log_bytes + size > self.limits.log_bytes:
            self.stats.log_dropped += size
            self.log_overflow = True
            return False
        self.stats.log_bytes += size
        prefix = f"[{stream}] " if stream else ""
        for line in guest_lines(text):
            self.logger.log(level, "%s%s", prefix, line)
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
        grants: the sandbox's granted directories, opened once (host/sandbox/grants.py), so that every
            instance reaches the same directories whatever the guest did to their names; without
            them the instance opens ``capabilities.dirs`` itself.
        tape: records every host call (sandbus host functions, WASI clock and random) or answers each
            from a record (host/sandbox/record.py).
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
        grants: GrantSet | None = None,
        tape: Tape | None = None,
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
        self.ctx.tape = tape

        store = wasmtime.Store(handle.engine)
        store.set_limits(memory_size=limits.memory_bytes, table_elements=limits.table_elements,
                         instances=self.STORE_INSTANCES, tables=4, memories=self.STORE_MEMORIES)
        # Instantiation (start function, data segments) runs under the same budget as a call.
        if limits.fuel is not None:
            store.set_fuel(limits.fuel)
        store.set_epoch_deadline(self._ticks)
        self._store = store
        linker = RecordingLinker(handle.engine, self.ctx)  # host-function failures stay per call
        # What the store's functions hold must not lead back to the store (see CallContext.invoker):
        # the context, and a deny that knows only the auditor and the plugin's name.
        self._deny = functools.partial(deny, auditor, plugin)
        self._fs = FsGuard(self.ctx, self._deny, plugin, max_open_files=limits.max_open_files)
        self._outputs: tuple[tuple[GuestOutput, str, int], ...] = ()
        if info.uses_wasi:
            store.set_wasi(self._wasi_config(grants))
            linker.define_wasi()
            linker.allow_shadowing = True
            self._shadow_wasi(linker, module)
        self._link_host_functions(linker, module, host_functions)
        try:
            instance = linker.instantiate(store, module)
        except (wasmtime.Trap, SandbusError) as e:
            raise self._translate(take_failure(self.ctx, e), "instantiation") from e
        except wasmtime.WasmtimeError as e:
            if "exceeds memory limits" in str(e):
                raise MemoryLimitError(
                    f"the module's initial memory exceeds the {limits.memory_bytes}-byte limit: {_first_line(e)}",
                    plugin=plugin, limit=limits.memory_bytes) from e
            if wasi_guest_error(e, None) is not None:  # the start function handed WASI a bad pointer
                raise self._translate(e, "instantiation") from e
            raise InvalidModuleError(f"cannot instantiate: {_first_line(e)}", plugin=plugin) from e
        self._start(handle, instance, fast=fast, native=native)

    #: What one store holds: the guest, its WASI trampoline (instances), the guest's memory. An Extism
    #: plugin's store adds its kernel (host/sandbox/extism/instance.py).
    STORE_INSTANCES = 2
    STORE_MEMORIES = 1

    def _start(self, handle: EngineHandle, instance: wasmtime.Instance, *, fast: bool, native: bool) -> None:
        """Make the instantiated guest callable: its invoker, ``_initialize``, and the ABI version check."""
        store, info, plugin = self._store, self.info, self.plugin
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

    def _wasi_config(self, grants: GrantSet | None) -> wasmtime.WasiConfig:
        """WASI with the decoy "/" and the granted directories, preopened by identity (grants.py).

        ``grants`` are the sandbox's directories, opened once for every instance it builds. Without
        them (a PluginInstance built on its own) they are opened here, for this instance only.
        """
        caps = self.ctx.capabilities
        cfg = wasmtime.WasiConfig()
        cfg.argv = [self.plugin]
        cfg.env = list(caps.env.items())
        fds = self._fs.fds
        fd = 3  # WASI numbers the preopens from 3, in order
        if self.info.imports_of(_WASI) & set(PATH_FUNCTIONS):
            cfg.preopen_dir(decoy_root(), "/", fs_mutable=False)
            fds[fd] = DirFd(None, "/", False)
            fd += 1
        opened = grants if grants is not None else GrantSet(caps.dirs, plugin=self.plugin, auditor=self._auditor)
        try:
            for g in opened.preopen(cfg, checked=True):  # FsGuard checks each path, file-name patterns included
                fds[fd] = DirFd(g.guest_path, g.guest_path, g.writable, g.grant)
                fd += 1
        finally:
            if grants is None:
                opened.close()  # wasmtime holds its own descriptors, opened in preopen_dir
        # Pipes, not Python callbacks: wasmtime runs an output stream's callbacks on its own threads, at
        # any time up to the store's end -- also during interpreter shutdown, where a Python callback
        # aborts the process (guest_output.py). What the guest wrote is logged after each call.
        room = self.limits.log_bytes + 1  # one byte over the cap shows that the cap was exceeded
        self._outputs = ((GuestOutput(cfg, "stdout", room), "stdout", logging.INFO),
                         (GuestOutput(cfg, "stderr", room), "stderr", logging.WARNING))
        # Most calls write nothing: one poll of both pipes (~0.3 us) tells, where reading each until it
        # would block costs ~2 us a call (an exception per pipe).
        self._output_poll = select.poll()
        for pipe, _, _ in self._outputs:
            self._output_poll.register(pipe.fileno(), select.POLLIN)
        return cfg

    def _drain_output(self) -> None:
        """Log what the guest wrote to stdout / stderr since the last call (under the log cap).

        A pipe found full means a guest write failed, and WASI closes a stream for good after a failed
        write: the instance is poisoned, so that the next call gets a fresh one with working output."""
        if not self._outputs or not self._output_poll.poll(0):
            return
        for pipe, stream, level in self._outputs:
            data = pipe.drain()
            if data:
                self.ctx.log(level, data.decode(errors="replace"), stream)
            if len(data) >= pipe.capacity:
                self.poisoned = True

    def _shadow_wasi(self, linker: wasmtime.Linker, module: wasmtime.Module) -> None:
        caps = self.ctx.capabilities
        imported = {i.name: i.type for i in module.imports
                    if i.module == _WASI and isinstance(i.type, wasmtime.FuncType)}
        for name, ty in imported.items():
            if name in WASI_SIGNATURES:  # the host links its own code for these, under this type
                check_signature(name, ty, self.plugin)

        refuse = self._deny  # not self: the store keeps these functions (see CallContext.invoker)

        def denier(cap: str, what: str) -> Callable[..., int]:
            def deny(*_args: Any) -> int:
                raise refuse("security.capability_denied", f"{what} needs the {cap!r} capability",
                             capability=cap)

            return deny

        tape = self.ctx.tape
        for name, cap, what in (
            ("clock_time_get", "clock", "reading the clock"),
            ("clock_res_get", "clock", "reading the clock"),
            ("random_get", "random", "reading random bytes"),
        ):
            if name in imported and not caps.allows(cap):
                linker.define_func(_WASI, name, imported[name], denier(cap, what))
            elif name in imported and tape is not None:
                # Recorded or replayed: the host's own implementation, so that its results pass the tape.
                live = None if tape.replaying else functools.partial(_WASI_NONDETERMINISTIC[name], self.ctx)
                linker.define_func(_WASI, name, imported[name], taped(tape, self.ctx, _WASI, name, 1, live))
        if "poll_oneoff" in imported:
            # A blocking sleep happens outside wasm, where the epoch deadline cannot interrupt it.
            linker.define_func(_WASI, "poll_oneoff", imported["poll_oneoff"],
                               lambda *_a: 58)  # ENOTSUP
        self._fs_wrapped = {n: imported[n] for n in FS_FUNCTIONS if n in imported}
        for name, ty in self._fs_wrapped.items():
            linker.define_func(_WASI, name, ty, self._fs.wrap(name), access_caller=True)

    def _link_passthrough(self, handle: EngineHandle, memory: wasmtime.Memory) -> None:
        """Reach wasmtime's own WASI file functions after our checks.

        A host function cannot simply call the original WASI function: WASI reads
        its arguments from the *calling instance's* exported memory, and a host
        caller has none. So a tiny trampoline module imports the guest's memory,
        re-exports it as "memory", and forwards each call to the real WASI import.
        """
        if not self._fs_wrapped:
            return
        names = sorted(set(self._fs_wrapped) | FsGuard.helpers_for(self._fs_wrapped))
        # The guest's types were checked against these when it was linked (_shadow_wasi).
        wasm = _trampoline_wasm(tuple((n, WASI_SIGNATURES[n]) for n in names))
        compiled = _trampoline_modules.setdefault(handle.engine, {})
        module = compiled.get(wasm)
        if module is None:
            module = compiled[wasm] = wasmtime.Module(handle.engine, wasm)
        linker = wasmtime.Linker(handle.engine)
        linker.define_wasi()
        linker.define(self._store, "guest", "memory", memory)
        exports = linker.instantiate(self._store, module).exports(self._store)
        for name in names:
            func = exports[name]
            assert isinstance(func, wasmtime.Func)
            self._fs.passthrough[name] = func

    def _link_host_functions(self, linker: wasmtime.Linker, module: wasmtime.Module,
                             host_functions: HostFunctions) -> None:
        if self.ctx.tape is not None:
            _link_taped(linker, module, host_functions, self.ctx, self._auditor, self.ctx.tape)
            return
        link_host_functions(linker, module, host_functions, self.ctx, self._auditor)

    # -- calls -----------------------------------------------------------------

    def _guarded(self, thunk: Callable[[], int | None], what: str) -> int | None:
        inv = self._invoker
        self.ctx.host_error = None
        inv.set_budget(self.limits.fuel, self._ticks)
        start_deadline(self.ctx)  # init, health and shutdown: one deadline for their host functions too
        try:
            result = thunk()
        except BaseException as e:
            err = take_failure(self.ctx, e)
            # Whatever ended it (a KeyboardInterrupt in a host function too), the guest stopped midway.
            self.poisoned = True
            if not isinstance(err, (wasmtime.Trap, wasmtime.WasmtimeError, SandbusError, LostTrapReport)):
                if err is e:
                    raise
                raise err from e
            raise self._translate(err, what) from e
        finally:
            self._drain_output()
            self.ctx.stats.fuel_used = _fuel_used(inv, self.limits.fuel)
        return result

    def call(self, function: str, payload: bytes, *, budget_s: float | None = None) -> bytes:
        """Run ``function`` with ``payload`` (JSON bytes); return the guest's reply bytes.

        ``budget_s`` (shorter than the plugin's timeout) interrupts the call early with
        :class:`BudgetExceeded` instead of a timeout error: the node uses it to run calls on its event
        loop without letting one stall the loop (see host/node/node.py).
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
        ctx = self.ctx
        stats = ctx.stats
        stats.log_bytes = stats.log_dropped = 0
        ctx.log_overflow = False
        ctx.host_error = None
        start_deadline(ctx, budget_s)  # host functions share the call's deadline, the caller's if sooner
        inv = self._invoker
        try:
            reply = inv.round_trip(function, payload, limits.max_output_bytes, limits.fuel, ticks)
        except BaseException as caught:
            self._drain_output()
            # What this call raised: a host function's exception from this call's own context, never
            # one another thread's call left in a process-wide slot.
            e = take_failure(ctx, caught)
            stats.fuel_used = _fuel_used(inv, limits.fuel)
            stats.memory_bytes = inv.memory_size()
            # Whatever ended it (a KeyboardInterrupt in a host function too), the guest stopped midway --
            # unless the guest itself returned a failure (an Extism plugin's non-zero return): it finished.
            self.poisoned = not isinstance(e, GuestError)
            if isinstance(e, GuestAllocFailed):
                raise self._translate(MemoryLimitError(
                    f"sandbus_alloc({e.args[0]}) returned 0: the guest is out of memory",
                    plugin=self.plugin, limit=limits.memory_bytes), function) from e
            if isinstance(e, ReplyTooLarge):
                raise size_limit_error(self._auditor, self.plugin, limits, "output", e.args[0]) from e
            if not isinstance(e, (wasmtime.Trap, wasmtime.WasmtimeError, SandbusError, LostTrapReport)):
                if e is caught:
                    raise
                raise e from caught
            if (ticks < self._ticks and isinstance(e, wasmtime.Trap)
                    and e.trap_code == wasmtime.TrapCode.INTERRUPT):
                raise BudgetExceeded(function) from e
            raise self._translate(e, function) from e
        # The round trip read both on its way out: no further calls into the store.
        stats.fuel_used = 0 if limits.fuel is None else limits.fuel - inv.fuel_left_after
        stats.memory_bytes = inv.memory_after
        self._drain_output()
        if ctx.log_overflow:
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


# -- shared with host/sandbox/component.py and host/sandbox/percall.py -------------------------------


def link_host_functions(linker: wasmtime.Linker, module: wasmtime.Module, host_functions: HostFunctions,
                        ctx: CallContext, auditor: Auditor) -> None:
    """Define every non-WASI import of ``module`` in ``linker``, bound to ``ctx``; an import the host does
    not provide, or provides under another type, refuses the module (InvalidModuleError)."""
    for imp in module.imports:
        if imp.module == _WASI:
            continue
        name = imp.name or ""
        fn = host_functions.get(imp.module, name)
        if fn is None:
            raise InvalidModuleError(
                f"imports {imp.module}.{name}, which this host does not provide", plugin=ctx.plugin,
                missing_import=f"{imp.module}.{name}",
            )
        ty = imp.type
        if not isinstance(ty, wasmtime.FuncType) or (
            tuple(str(p) for p in ty.params) != fn.params or tuple(str(r) for r in ty.results) != fn.results
        ):
            raise InvalidModuleError(
                f"import {imp.module}.{name} has type {ty}, the host provides "
                f"({', '.join(fn.params)}) -> ({', '.join(fn.results)})",
                plugin=ctx.plugin,
            )
        linker.define_func(imp.module, name, ty, bind_host_function(fn, ctx, auditor))


def _link_taped(linker: wasmtime.Linker, module: wasmtime.Module, host_functions: HostFunctions,
                ctx: CallContext, auditor: Auditor, tape: Tape) -> None:
    """:func:`link_host_functions` through a tape: recording, every host function's results (and what it
    wrote into guest memory) are kept; replaying, every import is answered from the record, whether or
    not this host provides it (a replay runs offline: no bus, no network)."""
    if not tape.replaying:
        link_host_functions(linker, module, host_functions, ctx, auditor)
    for imp in module.imports:
        ty = imp.type
        if imp.module == _WASI or not isinstance(ty, wasmtime.FuncType):
            continue
        name = imp.name or ""
        fn = host_functions.get(imp.module, name)
        live = bind_host_function(fn, ctx, auditor) if fn is not None else None
        if tape.replaying:
            # Only the log runs again on a replay (its output is the point of watching one).
            linker.define_func(imp.module, name, ty, taped(tape, ctx, imp.module, name, len(ty.results),
                                                           live if name == "log" else None))
        elif live is not None:
            linker.allow_shadowing = True
            linker.define_func(imp.module, name, ty, taped(tape, ctx, imp.module, name, len(ty.results), live))


def taped(tape: Tape, ctx: CallContext, module: str, name: str, results: int,
          live: Callable[..., Any] | None) -> Callable[..., Any]:
    """A host function that passes through ``tape``: recording, ``live`` runs and its results are kept;
    replaying, the next recorded event answers (``live``, when given, runs too, its results ignored)."""
    if tape.replaying:
        def replayed(*args: Any) -> Any:
            event = tape.next_event(module, name)
            apply_writes(event, args, ctx.write)
            if event.error is not None:
                from sandbus.sdk.errors import error_from_dict

                raise error_from_dict(event.error)
            if live is not None:
                live(*args)
            if len(event.results) != results:
                raise tape.mismatch(f"{module}.{name} returned {len(event.results)} values in the record; "
                                    f"its import returns {results}")
            return None if results == 0 else event.results[0] if results == 1 else tuple(event.results)

        return replayed
    assert live is not None

    def recorded(*args: Any) -> Any:
        event = HostEvent(module, name, [int(a) for a in args])
        tape.current = event
        try:
            result = live(*args)
        except SandbusError as e:
            event.error = e.to_dict()
            raise
        finally:
            tape.current = None
            if event.error is not None:
                tape.record(event)
        values = () if result is None else result if isinstance(result, tuple) else (result,)
        event.results = [int(r) for r in values]
        tape.record(event)
        return result

    return recorded


def _clock_time_get(ctx: CallContext, clock_id: int, _precision: int, ptr: int) -> int:
    """WASI ``clock_time_get``, as the host answers it while recording (then replayed from the record)."""
    clock = _CLOCKS.get(clock_id)
    if clock is None:
        return _EINVAL
    check_span(ctx, ptr, 8, "clock_time_get timestamp")
    ctx.write(ptr, clock().to_bytes(8, "little"))
    return 0


def _clock_res_get(ctx: CallContext, clock_id: int, ptr: int) -> int:
    if clock_id not in _CLOCKS:
        return _EINVAL
    check_span(ctx, ptr, 8, "clock_res_get resolution")
    ctx.write(ptr, (1).to_bytes(8, "little"))
    return 0


def _random_get(ctx: CallContext, ptr: int, length: int) -> int:
    check_span(ctx, ptr, length, "random_get buffer")
    ctx.write(ptr, os.urandom(length))
    return 0


_EINVAL = 28
_CLOCKS: dict[int, Callable[[], int]] = {0: time.time_ns, 1: time.monotonic_ns, 2: time.process_time_ns,
                                         3: time.thread_time_ns}
_WASI_NONDETERMINISTIC: dict[str, Callable[..., int]] = {
    "clock_time_get": _clock_time_get, "clock_res_get": _clock_res_get, "random_get": _random_get}


def deny(auditor: Auditor, plugin: str, kind: str, message: str, **details: Any) -> SecurityViolationError:
    """Audit a denial (critical) and return the error to raise."""
    auditor.emit(AuditLevel.CRITICAL, kind, plugin, message, **details)
    return SecurityViolationError(message, plugin=plugin, **details)


def bind_host_function(fn: HostFunction, ctx: CallContext, auditor: Auditor) -> Callable[..., Any]:
    """``fn.impl`` bound to ``ctx``: denied outright without ``fn.capability``, any non-sandbus failure typed.

    The capability is checked once, here, not per call: an instance's capabilities never change. A core
    instance links it through a :class:`~.hostcall.RecordingLinker`, which records every failure in
    ``ctx.host_error`` for the call to take (never wasmtime-py's process-wide last exception); a component
    keeps its own per-call record (component.py).
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
            # A bug in a host function is the host's: a typed error that does not blame the plugin.
            logging.getLogger("sandbus.sandbox").exception("host function %s.%s failed", fn.module, fn.name)
            raise HostError(f"host function {fn.module}.{fn.name} failed: {type(e).__name__}: {e}",
                            plugin=plugin, function=fn.name) from e

    return bound


def translate_error(exc: BaseException, where: str, *, plugin: str, limits: Limits, auditor: Auditor,
                    code: wasmtime.TrapCode | None, frames: list[str],
                    memory_exhausted: Callable[[], bool]) -> SandbusError:
    """Turn whatever a call raised into our error, auditing limit hits.

    ``code`` is the trap code when the engine reported one (core modules: ``wasmtime.Trap.trap_code``;
    components report traps as text, see component.py), ``frames`` the wasm backtrace, and
    ``memory_exhausted`` tells whether the guest's memory is at its limit (a trap there is a memory limit).
    A ``KeyboardInterrupt`` or ``SystemExit`` (from a host function, say) is not the guest's doing: it is
    raised again, never turned into a guest error.
    """
    if not isinstance(exc, Exception):
        raise exc
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
    elif (refused := wasi_guest_error(exc, code)) is not None:
        # wasmtime's WASI refused a pointer or value from the guest: an ABI violation, as from our own.
        what, wasi_func = refused
        details: dict[str, Any] = {"wasi_function": wasi_func.rsplit("::", 1)[-1]} if wasi_func else {}
        abi_err = AbiViolationError(f"{where} passed WASI an unusable argument: {what}", plugin=plugin, **details)
        auditor.emit(AuditLevel.WARNING, "abi.violation", plugin, abi_err.message, **details)
        return abi_err
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
    err = PayloadTooLargeError(f"{what} of {size} bytes exceeds the {limit}-byte {direction} limit",
                               plugin=plugin, size=size, limit=limit, direction=direction)
    if direction == "input":
        err.retryable = False  # the same message is as large on its next delivery
    return err


#: Compiled trampolines, per engine (a module must never meet another engine's store) and per
#: set of functions.
_trampoline_modules: weakref.WeakKeyDictionary[wasmtime.Engine, dict[bytes, wasmtime.Module]] = (
    weakref.WeakKeyDictionary())


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
        # The last one: the backtrace before it holds function names that the guest chose.
        text = text.rsplit("Caused by:", 1)[1].strip()
        text = text.removeprefix("wasm trap: ")
    return text.splitlines()[0].strip() if text else type(exc).__name__


#: Frames of a trap's backtrace kept in its error (the innermost ones), and characters of each name.
MAX_FRAMES, MAX_FRAME_NAME = 32, 128


def _frames(exc: BaseException) -> list[str]:
    """The wasm backtrace of a trap, bounded and escaped: the names come from the guest's name section,
    so they may hold anything (newlines, escape sequences, megabytes) and end up in replies and logs."""
    if not isinstance(exc, wasmtime.Trap):
        return []
    out = []
    for f in exc.frames[:MAX_FRAMES]:
        module = escape_controls((f.module_name or "?")[:MAX_FRAME_NAME])
        func = escape_controls((f.func_name or f"func[{f.func_index}]")[:MAX_FRAME_NAME])
        out.append(f"{module}!{func}+{f.module_offset:#x}")
    return out
