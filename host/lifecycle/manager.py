"""The plugin manager: a directory of plugins, each loaded, reloaded and unloaded without a failed request.

    manager = PluginManager("plugins/build", policy=load_policy(Path("policy.toml")))
    manager.discover_and_load()          # every valid plugin loads; broken ones are listed with the reason
    manager.watch()                      # hot reload: create / modify / replace / delete
    manager.execute("echo", "handle_request", b'{"hi": 1}')

Two locks, two jobs. The routing table's lock (:mod:`sandbus.host.lifecycle.table`) guards who serves each
name and the in-flight counts; it is held for a few dictionary operations, so ``execute`` (called
from many threads at once) never waits behind a compile. ``_lifecycle`` serialises loads, reloads
and unloads, which are slow (they compile and initialise) and must not interleave.

A reload builds the new version completely -- manifest, sha256, dependencies, policy, compile,
instantiate, ``sandbus_init``, ``sandbus_health`` -- and only then swaps it in. The old version is
*retired*: it takes no new calls, the calls already running on it finish there, and the last of
them closes it (which calls ``sandbus_shutdown`` on each of its instances). A failed reload changes
nothing but the plugin's ``last_error``: the old version keeps serving.

A node starts serving before every plugin has loaded: ``discover_and_load(background=True)`` loads at once
the plugins that load fast (nearly all: compiled code from the module cache, or a small module) and leaves
the rest -- a large module that is not in the cache, which compiles in the compile worker for seconds,
and whatever depends on one -- to a background thread. Until it is in service such a plugin is listed
``loading`` and a call gets a retryable ``PluginLoadingError``; the compile runs outside ``_lifecycle``, so
loads, reloads and unloads of other plugins go on meanwhile. :meth:`PluginManager.wait_loaded` waits for it.

Plugins also load from bytes in memory (:meth:`PluginManager.load_artifact`: a cluster node loads what it
fetched and verified from the registry, never re-reading it from disk). Those are the manager's own: the
directory's scans and the watcher leave them alone, and a name that a file of the directory uses is refused.
Without a directory (``directory=None``) the manager serves only such plugins.

Audit events (``lifecycle.load``, ``lifecycle.reload``, ``lifecycle.unload``, ``lifecycle.load_failed``,
``lifecycle.reload_failed``, ``lifecycle.unhealthy``, ``policy.refused``) are emitted *after* the change
they describe is visible, so a listener that reacts by querying the manager sees the new state.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from time import perf_counter
from typing import TYPE_CHECKING, Any, Literal, Self

import orjson

from sandbus.host.lifecycle.depcheck import check_dependencies, explain_refusal
from sandbus.host.lifecycle.deps import check_unload, load_order
from sandbus.host.lifecycle.loader import (
    MAX_MODULE_FILE_BYTES,
    RUNTIME_VERSION,
    Fingerprint,
    PluginFiles,
    PluginVersion,
    body_of,
    build_version,
    check_plugin_name,
    parse_files,
    read_plugin_files,
    scan_directory,
)
from sandbus.host.lifecycle.manifest import Manifest
from sandbus.host.lifecycle.models import DiscoveryReport, PluginInfo
from sandbus.host.lifecycle.policy import Grant, Policy, resolve
from sandbus.host.lifecycle.stats import PluginStats
from sandbus.host.lifecycle.table import RoutingTable
from sandbus.host.sandbox import (
    AuditLevel,
    Auditor,
    AuditSink,
    CallResult,
    HostFunctions,
    Limits,
    ModuleCache,
    ModuleInfo,
    Sandbox,
    shared_cache,
)
from sandbus.host.sandbox.compiler import stop_compile
from sandbus.host.sandbox.engine import EngineHandle, engine_for
from sandbus.host.sandbox.sandbox import debug_cache
from sandbus.sdk.errors import (
    DependencyError,
    DeployError,
    InstanceLimitError,
    InvalidModuleError,
    PluginNotFoundError,
    ResourceLimitError,
    SandbusError,
    SecurityViolationError,
    UnknownFunctionError,
)

if TYPE_CHECKING:
    from sandbus.host.lifecycle.watcher import PluginWatcher

__all__ = ["DEFAULT_MAX_PLUGINS", "PluginManager"]

log = logging.getLogger("sandbus.manager")

DEFAULT_MAX_PLUGINS = 1000


class PluginManager:
    """Loads every plugin of a directory into sandboxes and serves calls to them. Thread-safe.

    Parameters:
        directory: the plugin directory (``<name>.wasm`` + ``<name>.toml`` pairs; nothing else
            should live there, since every ``.wasm``/``.toml`` stem is taken for a plugin); ``None``: no
            directory, only plugins loaded from memory (:meth:`load_artifact`), and ``data_root`` is required.
        policy: the operator policy manifests are resolved against (default: :meth:`Policy.default`).
        data_root: parent of the plugins' data directories; plugin ``p``'s ``read_files`` /
            ``write_files`` resolve under ``data_root/p`` (default: ``<directory>/data``).
        max_plugins: how many plugins may serve at once; a load beyond it fails with a
            ``ResourceLimitError`` (reloads of serving plugins are not affected).
        cache: compiled-module cache (default: the shared on-disk cache, so reloads and restarts of
            an unchanged module skip compilation).
        on_audit / auditor: where lifecycle, policy, limit and security events go.
        host_functions: extra host functions offered to every plugin.
        runtime_version: checked against each manifest's ``min_runtime_version``.
        host_env: where granted environment variables take their values (default: ``os.environ``).
        stats_window: how many recent calls per plugin the latency percentiles cover.
    """

    def __init__(
        self,
        directory: str | Path | None,
        *,
        policy: Policy | None = None,
        data_root: str | Path | None = None,
        max_plugins: int = DEFAULT_MAX_PLUGINS,
        cache: ModuleCache | None = None,
        on_audit: AuditSink | None = None,
        auditor: Auditor | None = None,
        host_functions: HostFunctions | None = None,
        runtime_version: str = RUNTIME_VERSION,
        host_env: Mapping[str, str] | None = None,
        stats_window: int = 1024,
    ) -> None:
        #: the plugin directory; without one, a stand-in path that names no file (only ever shown)
        self.directory = Path(directory) if directory is not None else Path("<no plugin directory>")
        self.has_directory = directory is not None
        if self.has_directory and not self.directory.is_dir():
            raise PluginNotFoundError(f"plugin directory {self.directory} does not exist or is not a directory",
                                      path=str(self.directory))
        if max_plugins <= 0:
            raise ValueError(f"max_plugins must be positive, found {max_plugins}")
        self.policy = policy or Policy.default()
        if data_root is None and not self.has_directory:
            raise ValueError("data_root is required when the manager has no plugin directory")
        self.data_root = Path(data_root) if data_root is not None else self.directory / "data"
        self.max_plugins = max_plugins
        self.cache = cache or shared_cache()
        self.auditor = auditor or Auditor()
        if on_audit is not None:
            self.auditor.add_sink(on_audit)
        self.host_functions = host_functions
        self.runtime_version = runtime_version
        self._host_env: Mapping[str, str] = host_env if host_env is not None else os.environ
        self._table = RoutingTable(self.directory, self.cache, stats_window)
        #: plugins loaded from memory: the bytes of the version last put in service (or tried), by name
        self._memory: dict[str, PluginFiles] = {}
        self._lifecycle = threading.RLock()
        self._watcher: PluginWatcher | None = None
        self._closed = False
        #: the thread loading slow plugins in the background (None: none running)
        self._background: threading.Thread | None = None

    # -- calls -------------------------------------------------------------------------------------

    def execute(self, name: str, function: str, payload: bytes) -> bytes:
        """Call ``function`` of plugin ``name`` with JSON bytes; return the reply bytes.

        A reload never fails a call: a call that started on the old version finishes there, and
        one that raced the swap is retried once on the new version.

        Raises:
            PluginNotFoundError: no plugin ``name`` is serving (its reason, if it failed to load).
            SandbusError: whatever the call raised (limits, traps, security violations...).
        """
        return self.execute_detailed(name, function, payload).reply

    def execute_json(self, name: str, function: str, request: Any = None) -> Any:
        """:meth:`execute` with a JSON-able request; returns the decoded reply."""
        try:
            payload = orjson.dumps(request)
        except TypeError as e:
            raise SandbusError(f"request is not JSON-serialisable: {e}", plugin=name) from e
        return orjson.loads(self.execute(name, function, payload))

    def execute_detailed(self, name: str, function: str, payload: bytes, *, budget_s: float | None = None,
                         wait: bool = True, deadline: float | None = None) -> CallResult:
        """:meth:`execute`, returning the reply with its fuel, memory and duration.

        ``budget_s`` (shorter than the plugin's timeout) stops the call early with
        :class:`~sandbus.host.sandbox.BudgetExceeded`; ``wait=False`` raises
        :class:`~sandbus.host.sandbox.pool.NotInline` at once instead of waiting for or building an
        instance (both: not counted, nothing ran, the caller runs it elsewhere). ``deadline`` (a
        ``time.monotonic()`` value) bounds the wait for an instance and the call. See
        :meth:`Sandbox.call_detailed`.
        """
        table = self._table
        for attempt in (1, 2):
            version, stats = table.checkout(name)
            if function not in version.sandbox.functions and version.sandbox.kind != "component":
                table.checkin(version)
                raise self._no_function(version.sandbox, function, stats)
            start = perf_counter()
            try:
                result = version.sandbox.call_detailed(function, payload, budget_s=budget_s, wait=wait,
                                                       deadline=deadline)
            except InstanceLimitError as e:
                # The table never closes a version under a running call, but should a retired
                # version's pool be closed anyway (it is shutting down), the current one answers.
                if attempt == 1 and version.retired:
                    continue
                stats.record_error(perf_counter() - start, e, function)
                raise
            except SandbusError as e:
                stats.record_error(perf_counter() - start, e, function)
                raise
            finally:
                table.checkin(version)
            stats.record_call(result.duration_s, result.fuel_used, result.memory_bytes)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _no_function(self, sandbox: Sandbox, function: str, stats: PluginStats) -> UnknownFunctionError:
        """A call of a function the module does not export: the caller's mistake, not the plugin's
        (anyone on the bus can name any function): counted in ``rejected`` and audited as
        ``request.refused``, never in the plugin's ``errors`` or ``last_error``."""
        shown = orjson.dumps(function[:64]).decode()
        err = UnknownFunctionError(f"no function {shown}; exported functions: {', '.join(sandbox.functions)}",
                                   plugin=sandbox.name, function=function[:64])
        stats.record_rejected()
        self.auditor.emit(AuditLevel.WARNING, "request.refused", sandbox.name, err.message, code=err.code,
                          function=function[:64])
        return err

    def note_rejected(self, name: str) -> None:
        """Count a request or message to ``name`` that the bus refused as the caller's mistake (its
        ``rejected``); a name that is not known is ignored."""
        slot = self._table.get(name)
        if slot is not None:
            slot.stats.record_rejected()

    def _checkout(self, name: str) -> tuple[PluginVersion, PluginStats]:
        return self._table.checkout(name)

    def _checkin(self, version: PluginVersion) -> None:
        self._table.checkin(version)

    # -- lifecycle: public -------------------------------------------------------------------------

    def discover_and_load(self, *, background: bool = False) -> DiscoveryReport:
        """Load every plugin of the directory, dependencies first; report the ones that cannot load.

        Never raises for a broken plugin: each is listed with status ``failed`` (or ``stale`` when an
        older version keeps serving) and its reason, and the rest load. Calling it again picks up
        what changed on disk, like :meth:`sync` on every plugin.

        With ``background``, a plugin that would compile for seconds (a large module whose compiled code
        is not in the module cache) and the plugins that depend on it are left to a background thread
        and listed ``loading`` (the report's ``loading``); the others are serving when this returns.
        """
        self._check_open()
        with self._lifecycle:
            names = self._scan()
            for gone in sorted(set(self._table.slots) - set(names) - set(self._memory)):
                self.sync(gone)
            files: dict[str, PluginFiles] = {}
            for name in names:
                try:
                    files[name] = self._read_files(name)
                except SandbusError as e:  # unreadable file, or a stem that cannot be a plugin
                    self._record_failure(name, None, e, None)
            manifests: dict[str, Manifest] = {}
            changed: set[str] = set()
            for name, f in files.items():
                slot = self._table.get(name)
                if slot is not None and slot.loading and slot.current is None:
                    continue  # the background load reads its files again when it puts it in service
                if slot is not None and slot.current is not None and slot.current.fingerprint == f.fingerprint:
                    manifests[name] = slot.current.manifest
                    continue
                if slot is not None and slot.failed_fingerprint == f.fingerprint:
                    if slot.current is not None:  # stale: the serving version is what dependents see
                        manifests[name] = slot.current.manifest
                    continue  # unchanged since it last failed
                changed.add(name)
                try:
                    manifests[name] = parse_files(f, self.runtime_version)
                except SandbusError as e:
                    self._record_failure(name, f.fingerprint, e, None)
            plan = load_order(manifests)
            for name, refusal in sorted(plan.refused.items()):
                if name in changed:
                    self._record_failure(name, files[name].fingerprint,
                                         explain_refusal(refusal, self._table.failures()), manifests[name])
            loaded: list[str] = []
            deferred: list[str] = []
            for name in plan.order:
                if name in changed and background and self._defer(files[name], manifests[name], deferred):
                    deferred.append(name)
                    self._table.mark_loading(self._table.slot(name), manifests[name])
                    continue
                if name in changed:
                    try:
                        self._install(files[name], manifests[name])
                    except SandbusError:
                        continue
                if self._table.serving(name):
                    loaded.append(name)
            with self._table.lock:
                failed = {n: str(s.failure) for n, s in sorted(self._table.slots.items()) if s.failure is not None}
            if deferred:
                self._start_background(deferred)
            return DiscoveryReport(loaded=tuple(loaded), failed=failed, loading=tuple(deferred))

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Wait until no plugin loads in the background; False if ``timeout`` seconds passed first."""
        thread = self._background
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def loading(self) -> list[str]:
        """Plugins still loading in the background, sorted."""
        return self._table.loading()

    def _defer(self, files: PluginFiles, manifest: Manifest, deferred: list[str]) -> bool:
        """Whether a plugin's first load goes to the background: it would compile in the compile worker,
        or it depends on a plugin that does."""
        slot = self._table.get(files.name)
        if slot is not None and slot.current is not None:
            return False  # a reload: the serving version answers while it builds, as always
        if any(dep in deferred for dep in manifest.dependencies):
            return True
        source = files.module
        if source is None:
            return False
        try:
            limits, handle = self._engine_for(manifest)
        except SandbusError:
            return False  # refused at once by the load, which records why
        return self._cache_for(limits).needs_slow_compile(handle, source, limits)

    def _engine_for(self, manifest: Manifest) -> tuple[Limits, EngineHandle]:
        """The limits the policy gives ``manifest`` and the engine its sandbox compiles for."""
        limits = resolve(manifest, self.policy, data_root=self.data_root / manifest.name,
                         host_env=self._host_env).limits
        return limits, engine_for(limits)

    def _start_background(self, names: list[str]) -> None:
        previous = self._background
        thread = threading.Thread(target=self._load_background, args=(names, previous),
                                  name="sandbus-background-load", daemon=True)
        self._background = thread
        thread.start()

    def _load_background(self, names: list[str], previous: threading.Thread | None) -> None:
        """Compile each plugin's module into the cache without a lock (the slow part), then put it in
        service through the ordinary load, which finds the compiled code in the cache. Files are read
        again for that load: what serves is what is on disk then."""
        if previous is not None:
            previous.join()
        self._load_each(names)

    def _load_each(self, names: list[str]) -> None:
        for name in names:
            if self._closed:
                return
            slot = self._table.get(name)
            if slot is None or not slot.loading:
                continue  # loaded, unloaded or failed meanwhile
            started = time.perf_counter()
            try:
                self._precompile(name)
            except SandbusError:
                pass  # the load below fails the same way and records why
            except Exception:  # a bug below us must not end the loads that follow
                log.exception("plugin %s: unexpected error while compiling in the background", name)
            with self._lifecycle:
                slot = self._table.get(name)
                if self._closed or slot is None or not slot.loading:
                    continue
                try:
                    files = self._read_files(name)
                except SandbusError as e:
                    self._record_failure(name, None, e, None)
                    continue
                try:
                    self._install(files)  # records its failure itself
                except SandbusError:
                    continue
                log.info("plugin %s: loaded in the background in %.0f ms", name, (time.perf_counter() - started) * 1000)
                self._retry_waiting(name)

    def _precompile(self, name: str) -> None:
        files = self._read_files(name)
        source = files.module
        if source is None:
            return
        limits, handle = self._engine_for(parse_files(files, self.runtime_version))
        cache = self._cache_for(limits)
        if source.component:
            cache.load_component(handle, source, name=name, limits=limits)
        else:
            cache.load(handle, source, name=name, limits=limits)

    def _cache_for(self, limits: Limits) -> ModuleCache:
        """Where code for ``limits`` is compiled: never the disk cache for code with debug info (a debugger's
        breakpoints would be serialized with it; see :func:`~sandbus.host.sandbox.sandbox.debug_cache`)."""
        return debug_cache() if limits.debug_info else self.cache

    def load(self, name: str) -> PluginInfo:
        """Load plugin ``name`` from the directory (a no-op if it already serves these files).

        Raises:
            PluginNotFoundError: neither file exists, or the module is missing.
            ManifestError, DependencyError, SecurityViolationError, InvalidModuleError,
            PluginInitError, ResourceLimitError: why it cannot load (also kept in ``last_error``).
        """
        self._check_open()
        check_plugin_name(name)
        with self._lifecycle:
            if name in self._memory and self._table.serving(name):
                return self.info(name)
            files = self._read_files(name)
            if files.absent:
                raise PluginNotFoundError(f"no plugin {name!r} in {self._where} "
                                          f"(expected {files.wasm_path.name} and {files.manifest_path.name})",
                                          plugin=name, path=str(files.wasm_path))
            slot = self._table.get(name)
            if slot is None or slot.current is None or slot.current.fingerprint != files.fingerprint:
                self._install(files)
                self._retry_waiting(name)
            return self.info(name)

    def reload(self, name: str) -> PluginInfo:
        """Rebuild plugin ``name`` from its files and swap it in; the old version serves until then.

        The new version is compiled, initialised and health-checked first; if any step fails, the
        old version keeps serving and the error is raised (and kept in ``last_error``).

        Raises:
            PluginNotFoundError: the plugin is unknown and has no files.
            SandbusError: why the new version cannot load.
        """
        self._check_open()
        check_plugin_name(name)
        with self._lifecycle:
            files = self._memory.get(name) or self._read_files(name)
            if not files.has_module and self._table.get(name) is None:
                raise PluginNotFoundError(f"no plugin {name!r} in {self._where}", plugin=name)
            self._install(files)
            self._retry_waiting(name)
            return self.info(name)

    def unload(self, name: str, *, force: bool = False) -> None:
        """Stop routing calls to ``name``; calls already running finish, then its instances shut down.

        Raises:
            PluginNotFoundError: no such plugin.
            DependencyError: serving plugins depend on it and ``force`` is false.
        """
        self._unload(name, force=force, reason="requested")

    def load_artifact(self, name: str, wasm: bytes, manifest_text: str, *, origin: str) -> PluginInfo:
        """Load plugin ``name`` from bytes in memory: when it is new, a load; when it serves, a reload
        beside the old version (the old one keeps serving if the new one fails).

        The same steps, checks, policy and audit events as a plugin from the directory, on exactly these
        bytes (nothing is read from disk). ``origin`` says where they came from (``registry
        greeter@1.2.0``); it stands in for the file paths in errors and listings. Bytes identical to the
        serving version's are a no-op. The directory's scans and its watcher never touch such a plugin.

        Raises:
            DeployError: a plugin file of the directory uses ``name`` (the local plugin stays as it is).
            PluginNotFoundError: ``name`` is not a plain name.
            InvalidModuleError: the module is larger than a module file may be (:data:`MAX_MODULE_FILE_BYTES`).
            ManifestError, DependencyError, SecurityViolationError, InvalidModuleError,
            PluginInitError, ResourceLimitError: why it cannot load (also kept in ``last_error``).
        """
        self._check_open()
        check_plugin_name(name)
        if len(wasm) > MAX_MODULE_FILE_BYTES:
            raise InvalidModuleError(f"the module of {name} is {len(wasm)} bytes, more than {MAX_MODULE_FILE_BYTES} "
                                     "(max_module_bytes)", plugin=name, bound="max_module_bytes",
                                     limit=MAX_MODULE_FILE_BYTES)
        # text that is not UTF-8 (lone surrogates) stays so: the manifest's own check refuses it
        manifest = manifest_text.encode("utf-8", "surrogatepass")
        with self._lifecycle:
            self._refuse_local_name(name)
            where = Path(origin[:200])
            files = PluginFiles(name, where / f"{name}.wasm", where / f"{name}.toml", wasm, manifest)
            slot = self._table.get(name)
            if slot is not None and slot.current is not None and slot.current.fingerprint == files.fingerprint:
                return self.info(name)
            had = self._memory.get(name)
            self._memory[name] = files
            try:
                self._install(files)
            except SandbusError:
                if had is not None and self._table.serving(name):
                    self._memory[name] = had  # a reload (control verb) rebuilds what serves, not what failed
                raise
            self._retry_waiting(name)
            return self.info(name)

    def from_memory(self, name: str) -> bool:
        """Whether ``name`` was loaded (or tried) from memory by :meth:`load_artifact` and not unloaded since."""
        return name in self._memory

    def _refuse_local_name(self, name: str) -> None:
        if name in self._memory:
            return
        slot = self._table.get(name)
        local = slot is not None or name in self._scan()
        if local:
            raise DeployError(f"plugin {name!r} is served from the plugin directory {self._where} of this node: "
                              "a plugin of the same name is not loaded beside it", plugin=name)

    def sync(self, name: str) -> None:
        """Bring plugin ``name`` in line with its files: load, reload, unload, or nothing.

        What the watcher calls after a change. Never raises for a plugin problem (it is recorded);
        files identical to the serving version, or to the last failed attempt, do nothing.
        """
        if self._closed:
            return
        with self._lifecycle:
            if name in self._memory:  # not the directory's: its files (if any) are ignored
                log.warning("plugin %s: files named after a plugin loaded from %s are ignored", name,
                            self._memory[name].wasm_path.parent)
                return
            try:
                files = self._read_files(name)
            except SandbusError as e:
                self._record_failure(name, None, e, None)
                return
            slot = self._table.get(name)
            if slot is not None and slot.loading and slot.current is None and files.has_module:
                return  # the background load puts in service what is on disk when its compile ends
            if not files.has_module and slot is not None and slot.current is not None:
                failure: SandbusError | None = None
                if files.manifest is not None:  # listed as failed, with why, until the module returns
                    failure = PluginNotFoundError(
                        f"module missing: expected {files.wasm_path.name} beside {files.manifest_path.name}",
                        plugin=name, path=str(files.wasm_path))
                self._unload(name, force=True, reason="module deleted", failure=failure,
                             fingerprint=files.fingerprint)
                return
            if files.absent:
                self._table.remove(name)
                return
            if slot is not None:
                if slot.current is not None and slot.current.fingerprint == files.fingerprint:
                    self._table.clear_failure(slot)  # the files went back to what serves
                    return
                if slot.failed_fingerprint == files.fingerprint:
                    return
            try:
                self._install(files)
            except SandbusError:
                return
            self._retry_waiting(name)

    def sync_all(self) -> None:
        """:meth:`sync` every plugin on disk or in the table."""
        with self._lifecycle:
            for name in sorted((set(self._scan()) | set(self._table.slots)) - set(self._memory)):
                self.sync(name)

    def watch(self, *, debounce_s: float = 0.1, max_wait_s: float = 2.0) -> PluginWatcher:
        """Start hot reload (see :class:`~sandbus.host.lifecycle.watcher.PluginWatcher`); stopped by :meth:`close`.

        After the watcher starts, every plugin is synced once, so nothing that changed between the
        initial load and the start of watching is missed.
        """
        from sandbus.host.lifecycle.watcher import PluginWatcher

        self._check_open()
        if not self.has_directory:
            raise PluginNotFoundError("this plugin manager has no plugin directory to watch")
        if self._watcher is None:
            watcher = PluginWatcher(self, debounce_s=debounce_s, max_wait_s=max_wait_s)
            watcher.start()
            self._watcher = watcher
            self.sync_all()
        return self._watcher

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop watching, stop a background load (its compile worker killed), unload every plugin (dependents
        first) and wait up to ``timeout`` seconds for running calls to finish."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self._closed = True  # first: a background load stops before its next step
        background = self._background
        if background is not None and background.is_alive():
            stop_compile(background)  # a compile worker must not outlive its manager
        with self._lifecycle:
            for name in reversed(load_order(self._table.serving_manifests()).order):
                self._unload(name, force=True, reason="manager closed")
            for name in list(self._table.slots):
                self._unload(name, force=True, reason="manager closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._table.lock:
            draining = list(self._table.draining)
        for version in draining:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not version.closed.wait(remaining):
                log.warning("plugin %s: calls still running at close", version.name)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries -----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Plugins serving now, sorted."""
        return self._table.serving_names()

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._table.serving(name)

    def __len__(self) -> int:
        return len(self.names())

    def manifest(self, name: str) -> Manifest:
        """The manifest of the serving version of ``name``."""
        version, _ = self._checkout(name)
        self._checkin(version)
        return version.manifest

    def grant(self, name: str) -> Grant:
        """What the serving version of ``name`` was granted (limits, capabilities, topics, hosts)."""
        version, _ = self._checkout(name)
        self._checkin(version)
        return version.grant

    def module_info(self, name: str) -> ModuleInfo:
        """What the serving module of ``name`` exports and imports (checked at load)."""
        version, _ = self._checkout(name)
        self._checkin(version)
        return version.sandbox.info

    def kind(self, name: str) -> str:
        """What the serving module of ``name`` is: ``"module"`` (our ABI), ``"component"`` or ``"extism"``."""
        version, _ = self._checkout(name)
        self._checkin(version)
        return str(version.sandbox.kind)

    def body(self, name: str) -> Literal["json", "bytes"]:
        """What the serving version of ``name`` takes and returns: ``"json"``, or ``"bytes"`` (Extism)."""
        version, _ = self._checkout(name)
        self._checkin(version)
        return body_of(version.sandbox)

    def rerun_safe(self, name: str) -> bool:
        """Whether a call of the serving version of ``name`` may be interrupted and run again
        (see :func:`sandbus.host.sandbox.sandbox.rerun_safe`)."""
        version, _ = self._checkout(name)
        self._checkin(version)
        return version.sandbox.rerun_safe

    def limits(self, name: str) -> Limits:
        """The limits enforced on the serving version of ``name`` (``max_instances``: its concurrency)."""
        return self.grant(name).limits

    def info(self, name: str) -> PluginInfo:
        """One plugin's :class:`PluginInfo` (serving, failed or unloading)."""
        for item in self._table.describe():
            if item.name == name:
                return item
        raise PluginNotFoundError(f"no plugin {name!r} is known", plugin=name)

    def debug_facts(self, name: str) -> dict[str, Any]:
        """What the debug view adds to :meth:`info` for ``name``: its histograms (``latency_ms``,
        ``fuel``), ``recent_errors``, and its live ``instances`` (``[]`` when it is not serving).

        Raises:
            PluginNotFoundError: no plugin of that name is known.
        """
        slot = self._table.get(name)
        if slot is None:
            raise PluginNotFoundError(f"no plugin {name!r} is known", plugin=name)
        version = slot.current
        instances: list[dict[str, Any]] = []
        if version is not None:
            instances = version.sandbox.pool.inventory()
            for inst in instances:  # before its first call an instance holds its initial memory
                if not inst["memory_bytes"]:
                    inst["memory_bytes"] = version.initial_memory_bytes
        return {**slot.stats.histograms(), "recent_errors": slot.stats.recent_errors(), "instances": instances}

    def list_plugins(self) -> list[PluginInfo]:
        """Every plugin the manager knows, by name: serving (``loaded`` / ``stale``), ``failed`` with
        the reason, and ``unloading`` while deleted plugins finish their calls."""
        return self._table.describe()

    def health_check(self) -> dict[str, bool]:
        """Call each serving plugin's ``sandbus_health`` (on a pooled instance); failed plugins are
        ``False``. An unhealthy plugin is audited (``lifecycle.unhealthy``) and keeps serving: what
        to do about it is the operator's decision."""
        with self._table.lock:
            names = sorted(self._table.slots)
        report: dict[str, bool] = {}
        for name in names:
            try:
                version, _ = self._checkout(name)
            except PluginNotFoundError:
                if self._table.get(name) is not None:
                    report[name] = False
                continue
            try:
                healthy = version.sandbox.health()
            except SandbusError as e:
                log.warning("health check of %s failed: %s", name, e)
                healthy = False
            finally:
                self._checkin(version)
            if not healthy:
                self.auditor.emit(AuditLevel.WARNING, "lifecycle.unhealthy", name,
                                  "sandbus_health reported failure", version=version.version)
            report[name] = healthy
        return report

    # -- lifecycle: internals ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PluginNotFoundError("the plugin manager is closed")

    @property
    def _where(self) -> str:
        return str(self.directory) if self.has_directory else "memory (this manager has no plugin directory)"

    def _scan(self) -> list[str]:
        """The plugins of the directory (none without one)."""
        return scan_directory(self.directory) if self.has_directory else []

    def _read_files(self, name: str) -> PluginFiles:
        """A plugin's files from the directory (both absent without one)."""
        if not self.has_directory:
            check_plugin_name(name)
            return PluginFiles(name, self.directory / f"{name}.wasm", self.directory / f"{name}.toml", None, None)
        return read_plugin_files(self.directory, name, memo=self.cache.memo)

    def _resolve(self, manifest: Manifest) -> Grant:
        try:
            return resolve(manifest, self.policy, data_root=self.data_root / manifest.name, host_env=self._host_env)
        except SecurityViolationError as e:
            self.auditor.emit(AuditLevel.WARNING, "policy.refused", manifest.name, e.message, **e.details)
            raise

    def _install(self, files: PluginFiles, manifest: Manifest | None = None) -> PluginVersion:
        """Build a version from ``files`` completely, then put it in service (retiring any old one).

        On failure nothing changes but the plugin's failure record, and the error is raised.
        """
        name = files.name
        with self._lifecycle:
            existing = self._table.get(name)
            old = existing.current if existing is not None else None
            started = time.perf_counter()
            try:
                if manifest is None:
                    manifest = parse_files(files, self.runtime_version)
                serving = self._table.serving_manifests()
                if old is None and len(serving) >= self.max_plugins:
                    raise ResourceLimitError(
                        f"cannot load: {self.max_plugins} plugins are serving, the max_plugins limit",
                        plugin=name, limit=self.max_plugins)
                skipped = check_dependencies(manifest, serving, self._table.failures())
                grant = self._resolve(manifest)
                version = build_version(files, manifest, grant, auditor=self.auditor, cache=self.cache,
                                        host_functions=self.host_functions, skipped_optional=skipped)
            except SandbusError as e:
                self._record_failure(name, files.fingerprint, e, manifest)
                raise
            in_flight = old.in_flight if old is not None else 0
            self._table.put_in_service(self._table.slot(name), version)
            elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
            if old is None:
                self.auditor.emit(AuditLevel.INFO, "lifecycle.load", name,
                                  f"loaded version {version.version} in {elapsed_ms} ms",
                                  version=version.version, sha256=version.sha256, load_ms=elapsed_ms,
                                  skipped_optional=list(skipped))
            else:
                self.auditor.emit(AuditLevel.INFO, "lifecycle.reload", name,
                                  f"reloaded {old.version} -> {version.version} in {elapsed_ms} ms "
                                  f"({in_flight} calls finishing on the old version)",
                                  version=version.version, previous_version=old.version, sha256=version.sha256,
                                  previous_sha256=old.sha256, load_ms=elapsed_ms, in_flight=in_flight)
            return version

    def _record_failure(self, name: str, fingerprint: Fingerprint | None, error: SandbusError,
                        manifest: Manifest | None) -> None:
        """Keep ``error`` as the plugin's reason and audit it; ``fingerprint`` (of the files that failed)
        stops the same files from being retried on every event (``None``: unknown, retry next time)."""
        serving = self._table.record_failure(self._table.slot(name), error, fingerprint, manifest)
        if serving is not None:
            self.auditor.emit(AuditLevel.WARNING, "lifecycle.reload_failed", name,
                              f"new files refused, version {serving.version} keeps serving: {error}",
                              error=error.code, reason=str(error), serving_version=serving.version)
        else:
            self.auditor.emit(AuditLevel.WARNING, "lifecycle.load_failed", name, f"cannot load: {error}",
                              error=error.code, reason=str(error))

    def _retry_waiting(self, loaded: str) -> None:
        """Plugins refused because ``loaded`` was absent or of another version may load now."""
        queue = [loaded]
        while queue:
            dep = queue.pop(0)
            with self._table.lock:
                waiting = sorted(n for n, s in self._table.slots.items()
                                 if isinstance(s.failure, DependencyError)
                                 and s.failure.details.get("dependency") == dep)
            for name in waiting:
                try:
                    self._install(self._memory.get(name) or self._read_files(name))
                except SandbusError:
                    continue
                queue.append(name)

    def _unload(self, name: str, *, force: bool, reason: str, failure: SandbusError | None = None,
                fingerprint: Fingerprint | None = None) -> None:
        with self._lifecycle:
            slot = self._table.get(name)
            if slot is None:
                raise PluginNotFoundError(f"no plugin {name!r} is loaded", plugin=name)
            needed_by: list[str] = []
            in_flight = 0
            if slot.current is not None:
                needed_by = check_unload(name, self._table.serving_manifests(), force=force)
                in_flight = slot.current.in_flight
            if failure is not None:
                slot.stats.note_error(failure)  # first: the listing never shows the status without its reason
            version = self._table.remove(name, failure=failure, fingerprint=fingerprint)
            if failure is None:
                self._memory.pop(name, None)
            if version is None:
                return
            extra = f"; {', '.join(map(repr, needed_by))} depended on it" if needed_by else ""
            self.auditor.emit(AuditLevel.WARNING if needed_by else AuditLevel.INFO, "lifecycle.unload", name,
                              f"unloaded version {version.version} ({reason}); {in_flight} calls finishing{extra}",
                              version=version.version, reason=reason, forced=force, dependents=needed_by,
                              in_flight=in_flight)
