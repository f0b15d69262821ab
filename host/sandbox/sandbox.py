"""The public face of the sandbox: ``run_plugin`` (one line), ``SandboxBuilder`` (all options), ``Sandbox`` (pooled).

    reply = run_plugin("echo.wasm", {"hello": "world"})

    sandbox = (SandboxBuilder("plugins/build/text_processor.wasm")
               .memory_mb(16).timeout(2).allow_read("/srv/data").on_audit(print).build())
    with sandbox:
        sandbox.call("handle_request", {"action": "get_status"})
"""

from __future__ import annotations

import base64
import threading
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from time import monotonic, perf_counter
from typing import Any, Literal, NamedTuple, Self, cast

import orjson
import wasmtime
from orjson import loads

from sandbus.host.sandbox import abi
from sandbus.host.sandbox.audit import AuditLevel, Auditor, AuditSink
from sandbus.host.sandbox.cache import ModuleCache, ModuleSource, default_cache_dir
from sandbus.host.sandbox.compiler import read_wasm
from sandbus.host.sandbox.component import ComponentInfo, ComponentInstance
from sandbus.host.sandbox.config import MIB, Capabilities, DirGrant, Limits
from sandbus.host.sandbox.engine import engine_for
from sandbus.host.sandbox.extism import EXTISM_ENV, EXTISM_USER, ExtismInstance, inspect_extism, is_extism
from sandbus.host.sandbox.grants import GrantSet
from sandbus.host.sandbox.hostfuncs import ABI_NAMESPACE, HostFunctions, builtin_host_functions
from sandbus.host.sandbox.instance import BudgetExceeded, PluginInstance
from sandbus.host.sandbox.percall import PerCallPlugin
from sandbus.host.sandbox.pool import InstancePool, NotInline
from sandbus.host.sandbox.record import (
    MAX_RECORD_BYTES,
    CallRecord,
    ReplayDivergenceError,
    Tape,
    TrapRecorder,
    recordable,
)
from sandbus.sdk.errors import (
    AbiViolationError,
    ExecutionTimeoutError,
    InstanceLimitError,
    InvalidModuleError,
    PluginNotFoundError,
    SandboxError,
    SandbusError,
    SecurityViolationError,
)

__all__ = ["PURE_HOST_FUNCTIONS", "CallResult", "Sandbox", "SandboxBuilder", "debug_cache", "rerun_safe",
           "run_plugin", "shared_cache"]

#: Host functions whose calls leave nothing behind outside the call (``log`` output aside): a call
#: that can have used only these may be interrupted and run again from the start.
PURE_HOST_FUNCTIONS = frozenset({"log", "time_now_ms", "env_get", "take_result"})

_cache_lock = threading.Lock()
_shared_cache: ModuleCache | None = None
_debug_cache: ModuleCache | None = None


def shared_cache() -> ModuleCache:
    """The process-wide module cache (``$SANDBUS_CACHE_DIR`` or ``~/.cache/sandbus/modules``)."""
    global _shared_cache
    with _cache_lock:
        if _shared_cache is None:
            _shared_cache = ModuleCache(default_cache_dir())
        return _shared_cache


def debug_cache() -> ModuleCache:
    """The process-wide cache of code compiled with debug info: in memory only, never on disk.

    A native debugger patches breakpoints into the code wasmtime registers with it, and serializing a
    module copies its code as it is in memory: an entry written during a debugging session held the
    debugger's breakpoint instructions, and the next session that loaded it crashed at the first step.
    So code with debug info is compiled in each process that debugs (what it costs: docs/guide.md).
    """
    global _debug_cache
    with _cache_lock:
        if _debug_cache is None:
            _debug_cache = ModuleCache(None, memo=False)
        return _debug_cache


#: Sandboxes alive per digest whose debug code is in :func:`debug_cache` (under ``_cache_lock``).
_debug_users: dict[str, int] = {}


def _hold_debug(sandbox: object, digest: str) -> weakref.finalize[Any, Any]:
    """Count ``sandbox`` as a user of its module's debug code; the finalizer returned (called at close,
    or when the sandbox is collected, whichever comes first) lets go, and the last to let go drops the
    code from :func:`debug_cache`. Without it the process-wide cache kept every version a debugging
    session reloaded: code with debug info is ~3.5 times the size, and a reloaded component's hundreds
    of MB stayed in memory for the node's life."""
    with _cache_lock:
        _debug_users[digest] = _debug_users.get(digest, 0) + 1
    return weakref.finalize(sandbox, _release_debug, digest)


def _release_debug(digest: str) -> None:
    with _cache_lock:
        left = _debug_users.get(digest, 1) - 1
        if left > 0:
            _debug_users[digest] = left
            return
        _debug_users.pop(digest, None)
    debug_cache().forget_digest(digest)


def rerun_safe(info: abi.ModuleInfo, capabilities: Capabilities, host_functions: HostFunctions | None = None) -> bool:
    """Whether a call of this plugin may run twice: the one rule for "this call has no side effect".

    A node runs calls inline on its event loop under a short budget, and re-runs one that overruns it
    from the start in a worker thread (host/node/node.py). Running twice is only correct when the first,
    interrupted run cannot have changed anything outside its instance, so a plugin qualifies only if
    nothing it was granted lets a call leave a trace:

    - no writable directory (an appended line would be appended twice);
    - no imported host function besides :data:`PURE_HOST_FUNCTIONS`: ``publish``, ``request``,
      ``kv_put``, ``kv_delete`` and ``http_request`` act on the bus or the network (and they, like
      ``kv_get``, wait on the event loop, so they cannot run on it at all); host functions an embedder
      adds are unknown, so they count as effects too.

    With ``host_functions`` (what the instance will be linked with), an import that cannot act is no
    effect: one whose capability the plugin was not granted is bound to a denial, and one the host does
    not provide fails the call (a component's world imports every host function, used or not).

    Decided from the grant and the imports, not from what a call did: an interrupted call cannot tell.
    """
    if any(d.writable for d in capabilities.dirs):
        return False
    # An Extism plugin: http_request acts on the network (unless denied), and functions an embedder adds
    # under extism:host/user are unknown. Its variables live in the instance, which a re-run does not reuse.
    if "http_request" in info.imports_of(EXTISM_ENV) and capabilities.allows("network"):
        return False
    if info.imports_of(EXTISM_USER):
        return False
    for name in info.imports_of(ABI_NAMESPACE) - PURE_HOST_FUNCTIONS:
        if host_functions is None:
            return False
        fn = host_functions.get(ABI_NAMESPACE, name)
        if fn is not None and (fn.capability is None or capabilities.allows(fn.capability)):
            return False
    return True


class CallResult(NamedTuple):
    """A reply with the facts of its call (a tuple: it is built on every call, and cheaply)."""

    reply: bytes
    fuel_used: int
    memory_bytes: int
    duration_s: float

    def json(self) -> Any:
        return orjson.loads(self.reply)


class Sandbox:
    """A plugin loaded once and served from a pool of warm instances (or, with ``Limits.isolation =
    "per-call"``, from a fresh instance for every call: host/sandbox/percall.py). Thread-safe.

    The plugin is a core module (Guest ABI v1, docs/abi.md), an Extism plugin (a core module importing
    ``extism:host/env``, built with any Extism PDK: docs/extism.md) or a component (the WIT world in
    sdk/guest/python/wit, e.g. a componentize-py guest); the binary says which, and ``kind`` tells.
    ``body`` tells what a call takes and returns: "json" (checked to be JSON) or, for Extism plugins,
    "bytes" (passed through as they are). All run under the same limits and capabilities;
    host/sandbox/component.py lists the few differences in what is enforced for components.

    Parameters:
        wasm: module or component bytes, a path to a .wasm file, or a :class:`ModuleSource` (bytes
            whose digest is known, or a plugin file the module cache's digest memo knows).
        name: plugin name for errors and events (default: the file stem).
        limits / capabilities: what is enforced (defaults: ``Limits()``, nothing granted).
        host_functions: extra host functions, on top of the built-in log/time/env.
        on_audit: callback receiving every :class:`AuditEvent`.
        config: JSON-able settings handed to the plugin's ``sandbus_init`` on each new instance (an Extism
            plugin reads them with ``config_get``: strings as they are, other values as their JSON).
        cache: module cache (default: the shared on-disk cache).
        fast: use the fast call path when the installed wasmtime-py allows it.
        native: on the fast path, use the compiled round trip when it is built (else ctypes).
        warm_instances: instances created up front (the first is always created, to fail early).
        acquire_timeout_s: how long a call waits for a free instance (default: the call timeout).
        record_calls: record every call's host calls (host/sandbox/record.py); :attr:`last_record` then
            holds the record of the last call (for one caller at a time: ``sandbus run --record``).
        recorder: record every call, and write the record of each call that fails in the guest
            (:func:`~sandbus.host.sandbox.record.recordable`) through it: a node's ``[record]`` policy.
        replay: run calls from this record: every host call is answered from it (:func:`replay`).
        Recording and replaying are for pooled core modules (not components, Extism plugins or
        ``isolation = "per-call"``): anything else is refused with a :class:`SandboxError`.
    """

    def __init__(
        self,
        wasm: bytes | str | Path | ModuleSource,
        *,
        name: str | None = None,
        limits: Limits | None = None,
        capabilities: Capabilities | None = None,
        host_functions: HostFunctions | None = None,
        on_audit: AuditSink | None = None,
        auditor: Auditor | None = None,
        config: Mapping[str, Any] | None = None,
        cache: ModuleCache | None = None,
        fast: bool = True,
        native: bool = True,
        warm_instances: int = 1,
        acquire_timeout_s: float | None = None,
        context_factory: Callable[[], dict[str, Any]] | None = None,
        record_calls: bool = False,
        recorder: TrapRecorder | None = None,
        replay: CallRecord | None = None,
    ) -> None:
        if isinstance(wasm, str | Path):
            path = Path(wasm)
            name = name or path.stem
            try:
                wasm = read_wasm(path, limits or Limits())  # at most the size bound + 1 byte
            except FileNotFoundError as e:
                raise PluginNotFoundError(f"no plugin file at {path}", plugin=name, path=str(path)) from e
            except OSError as e:
                raise InvalidModuleError(f"cannot read {path}: {e.strerror}", plugin=name, path=str(path)) from e
        self.name = name or "plugin"
        self.limits = limits or Limits()
        self.capabilities = capabilities or Capabilities()
        # Hashed once per load (a 19 MB component takes ~12 ms), or not at all for a file the memo knows.
        source = wasm if isinstance(wasm, ModuleSource) else ModuleSource.of(wasm)
        self.digest = source.digest
        self.auditor = auditor or Auditor()
        if on_audit is not None:
            self.auditor.add_sink(on_audit)
        self._config = orjson.dumps(dict(config or {}))
        self._host_functions = builtin_host_functions().merged(host_functions)
        self._handle = engine_for(self.limits)
        cache = debug_cache() if self.limits.debug_info else cache or shared_cache()
        self.kind: Literal["module", "component", "extism"]
        self.body: Literal["json", "bytes"] = "json"
        if self.limits.debug_info and self.limits.isolation == "per-call":
            # A per-call plugin's code is copied to the pooling engine by serializing it, and with it the
            # breakpoints a debugger patched in (see debug_cache): the copy would crash at the first step.
            err = InvalidModuleError(
                "debug info is for plugins with isolation = \"pooled\": a per-call plugin's code is copied "
                "for its fresh instances with the debugger's breakpoints in it; debug it pooled "
                "(sandbus run --debug runs it pooled)", plugin=self.name, isolation="per-call", debug_info=True)
            self.auditor.emit(AuditLevel.WARNING, "module.refused", self.name, err.message, isolation="per-call",
                              debug_info=True)
            raise err
        if source.component and self.limits.isolation == "per-call":
            # Refused before it compiles: a component compiles for seconds and could never run per call.
            err = InvalidModuleError(
                "isolation = \"per-call\" is for core modules: a component (a Python guest) takes milliseconds "
                "to instantiate; load it with isolation = \"pooled\"", plugin=self.name, isolation="per-call")
            self.auditor.emit(AuditLevel.WARNING, "module.refused", self.name, err.message, isolation="per-call")
            raise err
        try:  # bounded before it compiles (host/sandbox/compiler.py); a refusal is audited
            if source.component:
                self.kind = "component"
                self._component = cache.load_component(self._handle, source, name=self.name, limits=self.limits)
            else:
                self.kind = "module"
                self._module = cache.load(self._handle, source, name=self.name, limits=self.limits)
        except InvalidModuleError as e:
            self.auditor.emit(AuditLevel.WARNING, "module.refused", self.name, e.message, **e.details)
            raise
        #: Lets go of this module's debug code in :func:`debug_cache` at close (or when a failed
        #: construction is collected): see :func:`_hold_debug`.
        self._debug_hold: weakref.finalize[Any, Any] | None = (
            _hold_debug(self, self.digest) if self.limits.debug_info else None)
        if self.kind == "module" and is_extism(self._module):
            self.kind, self.body = "extism", "bytes"
        if self.kind == "component":
            # Kept beside the compiled code: a warm load does not walk the component's types again.
            self.component_info: ComponentInfo | None = cache.component_info(self._handle, source.digest,
                                                                             self._component, self.name)
            self.info = self.component_info.module_info()
        else:
            self.component_info = None
            try:
                self.info = (inspect_extism(self._module, self.name) if self.kind == "extism"
                             else abi.inspect_module(self._module, self.name))
            except InvalidModuleError as e:
                self.auditor.emit(AuditLevel.WARNING, "module.refused", self.name, e.message, **e.details)
                raise
        #: Whether a call may be interrupted and run again (see :func:`rerun_safe`): a call with a
        #: ``budget_s`` is refused (``NotInline``) when it may not.
        self.rerun_safe = rerun_safe(self.info, self.capabilities, self._host_functions)
        self._recorder = recorder
        self._replay = replay
        self._taped = record_calls or recorder is not None or replay is not None
        #: With ``record_calls``: the record of the last call (None before the first).
        self.last_record: CallRecord | None = None
        if self._taped:
            self._check_recordable()
        self._fast = fast
        self._native = native
        self._context_factory = context_factory
        #: Linear memory an instance holds before its first call (the declared minimum; 0 for
        #: components, whose memories the component API does not expose).
        self.initial_memory_bytes = 0
        if self.kind == "module":
            for export in self._module.exports:
                if export.name == "memory" and isinstance(export.type, wasmtime.MemoryType):
                    self.initial_memory_bytes = int(export.type.limits.min) * 65536
        # The pool is typed for PluginInstance; ComponentInstance offers the same surface (call, init,
        # health, shutdown, poisoned, ctx.stats), which is all the pool and this class use.
        factory = cast(Callable[[], PluginInstance], self._new_instance)
        #: The granted directories, opened once: every instance gets these, never their names again.
        self._grants = GrantSet(self.capabilities.dirs, plugin=self.name, auditor=self.auditor)
        #: With isolation = "per-call": what each call's fresh instance is built from (percall.py).
        self.percall: PerCallPlugin | None = None
        # An Extism plugin per call: a whole fresh instance (kernel and plugin) for each call, dropped after it
        # (ExtismInstance.single_use), through the ordinary pool; not the compiled fresh-instance path.
        if self.limits.isolation == "per-call" and self.kind != "extism":
            try:
                self.percall = self._per_call(fast, native, context_factory)
            except BaseException:
                self._grants.close()
                raise
            # The pool holds slots, not instances: cheap, and all of them ready, so that an event loop
            # finds one idle whenever fewer than max_instances calls run.
            factory = cast(Callable[[], PluginInstance], self.percall.slot)
            warm_instances = self.limits.max_instances
        self._pool = InstancePool(self.name, factory, self.limits.max_instances,
                                  acquire_timeout_s if acquire_timeout_s is not None else self.limits.timeout_s)
        try:
            self._pool.warm(max(1, warm_instances))
        except BaseException:
            self._pool.close()
            self._grants.close()
            raise

    def _check_recordable(self) -> None:
        what = ("a component" if self.kind == "component" else "an Extism plugin" if self.kind == "extism"
                else "a plugin with isolation = \"per-call\"" if self.limits.isolation == "per-call" else None)
        if what is not None:
            raise SandboxError(f"recording and replaying calls is for pooled core modules, not {what}",
                               plugin=self.name, kind=self.kind, isolation=self.limits.isolation)
        if self._replay is not None and self._replay.sha256 != self.digest:
            raise SecurityViolationError(
                f"the record is of module sha256 {self._replay.sha256}, this module is {self.digest}: a replay "
                "runs the recorded module only", plugin=self.name, expected=self._replay.sha256, found=self.digest)

    def _new_tape(self) -> Tape | None:
        if not self._taped:
            return None
        if self._replay is not None:
            return Tape(replay=self._replay)
        return Tape(max_bytes=self._recorder.settings.max_bytes if self._recorder is not None else MAX_RECORD_BYTES)

    def record_of(self, tape: Tape, function: str, payload: bytes, reply: bytes | None,
                  error: SandbusError | None) -> CallRecord:
        """The record of the call that ``tape`` just saw."""
        caps = self.capabilities
        outcome: dict[str, Any] = ({"error": error.to_dict()} if error is not None
                                   else {"reply": base64.b64encode(reply or b"").decode()})
        return CallRecord(
            plugin=self.name, sha256=self.digest, function=function, input=payload, config=orjson.loads(self._config),
            limits=self.limits.model_dump(mode="json", exclude={"debug_info"}),
            capabilities={"clock": caps.clock, "random": caps.random, "env": dict(caps.env),
                          "env_unset": sorted(caps.env_unset), "extra": sorted(caps.extra),
                          "dirs": [d.guest_path() for d in caps.dirs]},
            init=list(tape.init), call=list(tape.call), outcome=outcome, truncated=tape.truncated,
            earlier_calls=tape.earlier_calls,
            module=str(self._recorder.module_path) if self._recorder is not None and self._recorder.module_path
            else None)

    def _taped_call(self, inst: PluginInstance, function: str, payload: bytes, run: Callable[[], bytes]) -> bytes:
        """``run()`` (the call on ``inst``) with its tape: begun, checked at the end when replaying, and
        written down when recording (the last call, or a failed one through the recorder)."""
        tape = inst.ctx.tape
        if tape is None:
            return run()
        tape.begin_call()
        try:
            reply = run()
            tape.end_call()
        except SandbusError as e:
            if tape.replaying and not isinstance(e, ReplayDivergenceError):
                try:
                    tape.end_call()  # stopped before its recorded end: a divergence, whatever the error
                except ReplayDivergenceError as diverged:
                    # Named with the error that stopped it: that is what to look at, not the tape.
                    cause = {"code": e.code, "message": e.message}
                    raise ReplayDivergenceError(f"{diverged.message}, after the call failed with {e.code}: "
                                                f"{e.message}", **diverged.details, error=cause) from e
            if self._recorder is not None and recordable(e):
                self._recorder.submit(self.record_of(tape, function, payload, None, e))
            if self._keep_last:
                self.last_record = self.record_of(tape, function, payload, None, e)
            raise
        if self._keep_last:
            self.last_record = self.record_of(tape, function, payload, reply, None)
        return reply

    @property
    def _keep_last(self) -> bool:
        return self._taped and self._replay is None and self._recorder is None

    def _per_call(self, fast: bool, native: bool, context_factory: Callable[[], dict[str, Any]] | None
                  ) -> PerCallPlugin:
        """Set up isolation = "per-call", checked once with a whole instance (ABI version, ``_initialize``,
        ``sandbus_init``) that is then dropped. Components never get here: they are refused before they
        compile (see host/sandbox/percall.py for why)."""
        percall = PerCallPlugin(self.name, self._handle, self._module, self.info, self.limits, self.capabilities,
                                self._host_functions, self.auditor, self._config, fast=fast, native=native,
                                context_factory=context_factory, grants=self._grants)
        percall.build()
        return percall

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Sandbox:
        return cls(Path(path), **kwargs)

    def _new_instance(self) -> PluginInstance | ComponentInstance:
        inst: PluginInstance | ComponentInstance
        if self.component_info is not None:
            inst = ComponentInstance(self.name, self._handle, self._component, self.component_info, self.limits,
                                     self.capabilities, self._host_functions, self.auditor, native=self._native,
                                     context_factory=self._context_factory, grants=self._grants)
        else:
            cls = ExtismInstance if self.kind == "extism" else PluginInstance
            tape = self._new_tape()
            inst = cls(self.name, self._handle, self._module, self.info, self.limits, self.capabilities,
                       self._host_functions, self.auditor, fast=self._fast, native=self._native,
                       context_factory=self._context_factory, grants=self._grants, tape=tape)
            if isinstance(inst, ExtismInstance):
                inst.single_use = self.limits.isolation == "per-call"
            inst.init(self._config)
            if tape is not None:
                tape.end_init()
            return inst
        inst.init(self._config)
        return inst

    @property
    def functions(self) -> tuple[str, ...]:
        """The callable functions. A component receives every function name through its one entry point
        (``handle-request``); only ``handle_request`` is listed for it."""
        return self.info.functions

    @property
    def pool(self) -> InstancePool:
        return self._pool

    def call_detailed(self, function: str, payload: bytes, *, validate: bool = True,
                      budget_s: float | None = None, wait: bool = True,
                      deadline: float | None = None) -> CallResult:
        """Call with raw JSON bytes; the reply is checked to be JSON unless ``validate`` is False.

        ``budget_s``: see :meth:`PluginInstance.call` (raises ``BudgetExceeded`` past it, after which
        the caller runs the call again; so a plugin that is not :attr:`rerun_safe` raises
        :class:`~sandbus.host.sandbox.pool.NotInline` instead, before running anything).
        ``wait=False``: take an idle instance or raise :class:`~sandbus.host.sandbox.pool.NotInline` at
        once, never building one (for callers on an event loop).
        ``deadline`` (a ``time.monotonic()`` value): when the call's caller stops waiting. Waiting for
        an instance ends there with an :class:`InstanceLimitError`, and the call itself is stopped
        there with an :class:`ExecutionTimeoutError` (and never runs longer than the plugin's timeout).
        """
        pool = self._pool
        if deadline is not None:
            return self._call_by(function, payload, deadline, validate)
        if budget_s is not None and not self.rerun_safe:
            raise NotInline(self.name)  # interrupted at the budget, it would have to run twice
        if wait:
            inst = pool.acquire()
        elif (idle := pool.try_acquire()) is not None:
            inst = idle
        else:
            raise NotInline(self.name)
        start = perf_counter()
        try:
            if self._taped:
                reply = self._taped_call(inst, function, payload,
                                         lambda: inst.call(function, payload, budget_s=budget_s))
            else:
                reply = inst.call(function, payload, budget_s=budget_s)
            # Read before the instance goes back: another thread may take it at once.
            stats = inst.ctx.stats
            fuel, memory = stats.fuel_used, stats.memory_bytes
        finally:
            elapsed = perf_counter() - start
            pool.release(inst)
        if validate:
            self.check_reply(function, reply)
        return CallResult(reply, fuel, memory, elapsed)

    def _call_by(self, function: str, payload: bytes, deadline: float, validate: bool) -> CallResult:
        """:meth:`call_detailed` for a caller who waits until ``deadline`` and no longer."""
        pool = self._pool
        timeout_s = self.limits.timeout_s
        try:
            inst = pool.acquire(timeout_s=min(timeout_s, deadline - monotonic()))
        except InstanceLimitError as e:
            if not pool.closed:  # a closed pool is a retired version: the caller retries on the new one
                self.auditor.emit(AuditLevel.WARNING, e.code, self.name, e.message, **e.details)
            raise
        start = perf_counter()
        try:
            remaining = deadline - monotonic()
            if remaining <= 0:  # acquiring built a new instance, and that took the rest of the time
                raise self._deadline_error(InstanceLimitError, f"no instance was ready before the call's deadline "
                                           f"({timeout_s:g} s after it arrived)", limit=self.limits.max_instances)
            try:
                # A budget as long as the timeout (or longer) is the timeout itself, with its own error.
                budget = remaining if remaining < timeout_s else None
                if self._taped:
                    reply = self._taped_call(inst, function, payload,
                                             lambda: inst.call(function, payload, budget_s=budget))
                else:
                    reply = inst.call(function, payload, budget_s=budget)
            except BudgetExceeded:
                raise self._deadline_error(ExecutionTimeoutError, f"{function} exceeded its {timeout_s:g} s timeout, "
                                           "counted from the call's arrival (waiting for an instance included)",
                                           limit=timeout_s) from None
            stats = inst.ctx.stats
            fuel, memory = stats.fuel_used, stats.memory_bytes
        finally:
            elapsed = perf_counter() - start
            pool.release(inst)
        if validate:
            self.check_reply(function, reply)
        return CallResult(reply, fuel, memory, elapsed)

    def _deadline_error(self, cls: type[SandbusError], message: str, **details: object) -> SandbusError:
        """An audited limit error for a call whose caller's deadline passed."""
        err = cls(message, plugin=self.name, **details)
        self.auditor.emit(AuditLevel.WARNING, err.code, self.name, message, **details)
        return err

    def check_reply(self, function: str, reply: bytes) -> None:
        """A plugin's reply must be JSON: an AbiViolationError (and an audit event) otherwise. An Extism
        plugin's reply is bytes (``body == "bytes"``): not checked."""
        if self.body == "bytes":
            return
        try:
            loads(reply)
        except orjson.JSONDecodeError as e:
            self.auditor.emit(AuditLevel.WARNING, "abi.bad_reply", self.name,
                              f"{function} replied with invalid JSON: {e}", function=function)
            raise AbiViolationError(f"{function} replied with invalid JSON ({len(reply)} bytes): {e}",
                                    plugin=self.name, function=function) from e

    def call_bytes(self, function: str, payload: bytes, *, validate: bool = True) -> bytes:
        """Call with raw bytes: JSON for our own plugins (the reply checked unless ``validate`` is False),
        any bytes for an Extism plugin."""
        return self.call_detailed(function, payload, validate=validate).reply

    def call(self, function: str = abi.DEFAULT_FUNCTION, request: Any = None) -> Any:
        """Call with a JSON-able value; returns the decoded reply."""
        try:
            payload = orjson.dumps(request)
        except TypeError as e:
            raise SandbusError(f"request is not JSON-serialisable: {e}", plugin=self.name) from e
        return orjson.loads(self.call_bytes(function, payload))

    def health(self) -> bool:
        """``sandbus_health`` on a pooled instance. May wait for or build one: not for an event loop."""
        inst = self._pool.acquire()
        try:
            return inst.health()
        finally:
            self._pool.release(inst)

    def close(self) -> None:
        self._pool.close()
        self._grants.close()
        if self._debug_hold is not None:
            self._debug_hold()  # once: a finalizer runs at most once
        if self._recorder is not None:
            self._recorder.flush(timeout=5.0)  # the records of its last failed calls, if any wait

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SandboxBuilder:
    """Fluent configuration for a :class:`Sandbox`; every setter returns the builder."""

    def __init__(self, wasm: bytes | str | Path, *, name: str | None = None) -> None:
        self._wasm = wasm
        self._name = name
        self._limits: dict[str, Any] = {}
        self._dirs: list[DirGrant] = []
        self._env: dict[str, str] = {}
        self._env_unset: set[str] = set()
        self._clock = False
        self._random = False
        self._extra: set[str] = set()
        self._host = HostFunctions()
        self._audit: AuditSink | None = None
        self._config: dict[str, Any] = {}

    def memory_mb(self, mb: float) -> Self:
        self._limits["memory_bytes"] = int(mb * MIB)
        return self

    def fuel(self, units: int | None) -> Self:
        """Fuel per call; None turns metering off (the timeout still holds)."""
        self._limits["fuel"] = units
        return self

    def timeout(self, seconds: float) -> Self:
        self._limits["timeout_s"] = seconds
        return self

    def max_input(self, size: int) -> Self:
        self._limits["max_input_bytes"] = size
        return self

    def max_output(self, size: int) -> Self:
        self._limits["max_output_bytes"] = size
        return self

    def stack(self, size: int) -> Self:
        self._limits["stack_bytes"] = size
        return self

    def instances(self, count: int) -> Self:
        self._limits["max_instances"] = count
        return self

    def isolation(self, mode: Literal["pooled", "per-call"]) -> Self:
        """"per-call": a fresh instance for every call, nothing kept between calls (see ``Limits.isolation``)."""
        self._limits["isolation"] = mode
        return self

    def log_cap(self, size: int) -> Self:
        self._limits["log_bytes"] = size
        return self

    def allow_read(self, host_dir: str | Path, guest: str = "") -> Self:
        self._dirs.append(DirGrant(host=Path(host_dir), guest=guest, writable=False))
        return self

    def allow_write(self, host_dir: str | Path, guest: str = "") -> Self:
        self._dirs.append(DirGrant(host=Path(host_dir), guest=guest, writable=True))
        return self

    def allow_env(self, name: str, value: str | None = None) -> Self:
        """Grant one variable: ``value``, or the host's current value if None (unset there: reads as unset)."""
        if value is None:
            found = Capabilities.env_from_host([name])
            self._env.update(found)
            if not found:
                self._env_unset.add(name)
        else:
            self._env[name] = value
        return self

    def allow_clock(self) -> Self:
        self._clock = True
        return self

    def allow_random(self) -> Self:
        self._random = True
        return self

    def grant(self, capability: str) -> Self:
        self._extra.add(capability)
        return self

    def host_functions(self, funcs: HostFunctions) -> Self:
        self._host = self._host.merged(funcs)
        return self

    def on_audit(self, sink: AuditSink) -> Self:
        self._audit = sink
        return self

    def config(self, **settings: Any) -> Self:
        self._config.update(settings)
        return self

    def build(self, **kwargs: Any) -> Sandbox:
        caps = Capabilities(dirs=tuple(self._dirs), env=self._env, env_unset=frozenset(self._env_unset),
                            clock=self._clock, random=self._random, extra=frozenset(self._extra))
        return Sandbox(self._wasm, name=self._name, limits=Limits(**self._limits), capabilities=caps,
                       host_functions=self._host, on_audit=self._audit, config=self._config, **kwargs)


def run_plugin(wasm: bytes | str | Path, request: Any = None, *, function: str = abi.DEFAULT_FUNCTION,
               **kwargs: Any) -> Any:
    """Load, call once, close: the simplest way to run a plugin."""
    with Sandbox(wasm, **kwargs) as sandbox:
        return sandbox.call(function, request)
