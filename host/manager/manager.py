"""The plugin manager: a directory of plugins, each loaded, reloaded and unloaded without a failed request.

    manager = PluginManager("plugins/build", policy=load_policy(Path("policy.toml")))
    manager.discover_and_load()          # every valid plugin loads; broken ones are listed with the reason
    manager.watch()                      # hot reload: create / modify / replace / delete
    manager.execute("echo", "handle_request", b'{"hi": 1}')

Two locks, two jobs. ``_lock`` guards the routing table and the in-flight counts; it is held for
a few dictionary operations, so ``execute`` (called from many threads at once) never waits behind
a compile. ``_lifecycle`` serialises loads, reloads and unloads, which are slow (they compile and
initialise) and must not interleave with each other.

A reload builds the new version completely -- manifest, sha256, dependencies, policy, compile,
instantiate, ``sandbus_init``, ``sandbus_health`` -- and only then swaps it in, under ``_lock``. The
old version is *retired*: it takes no new calls, the calls already running on it finish there, and
the last of them closes it (which calls ``sandbus_shutdown`` on each of its instances). A failed
reload changes nothing but the plugin's ``last_error``: the old version keeps serving.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import orjson

from host.deps import check_unload, load_order
from host.manifest import Manifest
from host.policy import Grant, Policy, resolve
from host.sandbox import AuditLevel, Auditor, AuditSink, CallResult, HostFunctions, ModuleCache, shared_cache
from sdk.errors import (
    DependencyError,
    InstanceLimitError,
    PluginNotFoundError,
    ResourceLimitError,
    SandbusError,
    SecurityViolationError,
)

from .depcheck import check_dependencies, explain_refusal
from .loader import (
    RUNTIME_VERSION,
    Fingerprint,
    PluginFiles,
    PluginVersion,
    build_version,
    check_plugin_name,
    parse_files,
    read_plugin_files,
    scan_directory,
)
from .models import DiscoveryReport, PluginInfo, PluginStatus
from .stats import PluginStats

if TYPE_CHECKING:
    from .watcher import PluginWatcher

__all__ = ["DEFAULT_MAX_PLUGINS", "PluginManager"]

log = logging.getLogger("sandbus.manager")

DEFAULT_MAX_PLUGINS = 1000


@dataclass(eq=False)
class _Slot:
    """A plugin name in the table: the serving version (if any), the latest failure, the statistics."""

    name: str
    path: Path
    stats: PluginStats
    current: PluginVersion | None = None
    failure: SandbusError | None = None
    failed_fingerprint: Fingerprint | None = None
    declared_version: str | None = None
    reloads: int = 0
    description: str = field(default="")


class PluginManager:
    """Loads every plugin of a directory into sandboxes and serves calls to them. Thread-safe.

    Parameters:
        directory: the plugin directory (``<name>.wasm`` + ``<name>.toml`` pairs; nothing else
            should live there, since every ``.wasm``/``.toml`` stem is taken for a plugin).
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
        directory: str | Path,
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
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise PluginNotFoundError(f"plugin directory {self.directory} does not exist or is not a directory",
                                      path=str(self.directory))
        if max_plugins <= 0:
            raise ValueError(f"max_plugins must be positive, found {max_plugins}")
        self.policy = policy or Policy.default()
        self.data_root = Path(data_root) if data_root is not None else self.directory / "data"
        self.max_plugins = max_plugins
        self.cache = cache or shared_cache()
        self.auditor = auditor or Auditor()
        if on_audit is not None:
            self.auditor.add_sink(on_audit)
        self.host_functions = host_functions
        self.runtime_version = runtime_version
        self._host_env: Mapping[str, str] = host_env if host_env is not None else os.environ
        self._stats_window = stats_window
        self._lock = threading.Lock()
        self._lifecycle = threading.RLock()
        self._slots: dict[str, _Slot] = {}
        self._draining: dict[PluginVersion, PluginStats] = {}
        self._watcher: PluginWatcher | None = None
        self._closed = False

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

    def execute_detailed(self, name: str, function: str, payload: bytes) -> CallResult:
        """:meth:`execute`, returning the reply with its fuel, memory and duration."""
        for attempt in (1, 2):
            version, stats = self._checkout(name)
            start = time.perf_counter()
            try:
                result = version.sandbox.call_detailed(function, payload)
            except InstanceLimitError as e:
                # A retired version's pool may have been closed under a call that raced the swap:
                # the current version answers instead.
                if attempt == 1 and version.retired:
                    continue
                stats.record_error(time.perf_counter() - start, e)
                raise
            except SandbusError as e:
                stats.record_error(time.perf_counter() - start, e)
                raise
            finally:
                self._checkin(version)
            stats.record_call(time.perf_counter() - start, result.fuel_used, result.memory_bytes)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _checkout(self, name: str) -> tuple[PluginVersion, PluginStats]:
        with self._lock:
            slot = self._slots.get(name)
            if slot is None or slot.current is None:
                raise self._not_serving(name, slot)
            version = slot.current
            version.in_flight += 1
            return version, slot.stats

    def _checkin(self, version: PluginVersion) -> None:
        with self._lock:
            version.in_flight -= 1
            last = version.retired and version.in_flight == 0
        if last:
            self._close_version(version)

    @staticmethod
    def _not_serving(name: str, slot: _Slot | None) -> PluginNotFoundError:
        if slot is not None and slot.failure is not None:
            return PluginNotFoundError(f"not loaded: it failed to load: {slot.failure}", plugin=name,
                                       reason=slot.failure.code)
        return PluginNotFoundError(f"no plugin {name!r} is loaded", plugin=name)

    # -- lifecycle: public -------------------------------------------------------------------------

    def discover_and_load(self) -> DiscoveryReport:
        """Load every plugin of the directory, dependencies first; report the ones that cannot load.

        Never raises for a broken plugin: each is listed with status ``failed`` (or ``stale`` when an
        older version keeps serving) and its reason, and the rest load. Calling it again picks up
        what changed on disk, like :meth:`sync` on every plugin.
        """
        self._check_open()
        with self._lifecycle:
            names = scan_directory(self.directory)
            for gone in sorted(set(self._slots) - set(names)):
                self.sync(gone)
            files = {n: read_plugin_files(self.directory, n) for n in names}
            manifests: dict[str, Manifest] = {}
            changed: set[str] = set()
            for name, f in files.items():
                slot = self._slots.get(name)
                if slot is not None and slot.current is not None and slot.current.fingerprint == f.fingerprint:
                    manifests[name] = slot.current.manifest
                    continue
                if slot is not None and slot.failed_fingerprint == f.fingerprint:
                    continue  # unchanged since it last failed
                changed.add(name)
                try:
                    manifests[name] = parse_files(f, self.runtime_version)
                except SandbusError as e:
                    self._record_failure(f, e, None)
            plan = load_order(manifests)
            for name, refusal in sorted(plan.refused.items()):
                if name in changed:
                    self._record_failure(files[name], explain_refusal(refusal, self._failures()), manifests[name])
            loaded: list[str] = []
            for name in plan.order:
                if name in changed:
                    try:
                        self._install(files[name], manifests[name])
                    except SandbusError:
                        continue
                if self._serving(name):
                    loaded.append(name)
            with self._lock:
                failed = {n: str(s.failure) for n, s in sorted(self._slots.items()) if s.failure is not None}
            return DiscoveryReport(loaded=tuple(loaded), failed=failed)

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
            files = read_plugin_files(self.directory, name)
            if files.absent:
                raise PluginNotFoundError(f"no plugin {name!r} in {self.directory} "
                                          f"(expected {files.wasm_path.name} and {files.manifest_path.name})",
                                          plugin=name, path=str(files.wasm_path))
            slot = self._slots.get(name)
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
            files = read_plugin_files(self.directory, name)
            if files.wasm is None and name not in self._slots:
                raise PluginNotFoundError(f"no plugin {name!r} in {self.directory}", plugin=name)
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

    def sync(self, name: str) -> None:
        """Bring plugin ``name`` in line with its files: load, reload, unload, or nothing.

        What the watcher calls after a change. Never raises for a plugin problem (it is recorded);
        files identical to the serving version, or to the last failed attempt, do nothing.
        """
        if self._closed:
            return
        with self._lifecycle:
            files = read_plugin_files(self.directory, name)
            slot = self._slots.get(name)
            if files.wasm is None and slot is not None and slot.current is not None:
                self._unload(name, force=True, reason="module deleted")
                slot = None
            if files.absent:
                with self._lock:
                    self._slots.pop(name, None)
                return
            if slot is not None:
                if slot.current is not None and slot.current.fingerprint == files.fingerprint:
                    self._clear_failure(slot)
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
            for name in sorted(set(scan_directory(self.directory)) | set(self._slots)):
                self.sync(name)

    def watch(self, *, debounce_s: float = 0.1, max_wait_s: float = 2.0) -> PluginWatcher:
        """Start hot reload (see :class:`~host.manager.watcher.PluginWatcher`); stopped by :meth:`close`.

        After the watcher starts, every plugin is synced once, so nothing that changed between the
        initial load and the start of watching is missed.
        """
        from .watcher import PluginWatcher

        self._check_open()
        if self._watcher is None:
            watcher = PluginWatcher(self, debounce_s=debounce_s, max_wait_s=max_wait_s)
            watcher.start()
            self._watcher = watcher
            self.sync_all()
        return self._watcher

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop watching, unload every plugin (dependents first) and wait up to ``timeout`` seconds
        for running calls to finish."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        with self._lifecycle:
            self._closed = True
            serving = self._serving_manifests()
            for name in reversed(load_order(serving).order):
                self._unload(name, force=True, reason="manager closed")
            for name in list(self._slots):
                self._unload(name, force=True, reason="manager closed")
        deadline = None if timeout is None else time.monotonic() + timeout
        for version in list(self._draining):
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
        with self._lock:
            return sorted(n for n, s in self._slots.items() if s.current is not None)

    def __contains__(self, name: object) -> bool:
        with self._lock:
            slot = self._slots.get(name) if isinstance(name, str) else None
            return slot is not None and slot.current is not None

    def __len__(self) -> int:
        return len(self.names())

    def manifest(self, name: str) -> Manifest:
        """The manifest of the serving version of ``name``."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is None or slot.current is None:
                raise self._not_serving(name, slot)
            return slot.current.manifest

    def info(self, name: str) -> PluginInfo:
        """One plugin's :class:`PluginInfo` (serving, failed or unloading)."""
        for item in self.list_plugins():
            if item.name == name:
                return item
        raise PluginNotFoundError(f"no plugin {name!r} is known", plugin=name)

    def list_plugins(self) -> list[PluginInfo]:
        """Every plugin the manager knows: serving, failed (with the reason) and unloading, by name."""
        with self._lock:
            slots = list(self._slots.values())
            draining = list(self._draining.items())
        infos = {slot.name: self._slot_info(slot) for slot in slots}
        for version, stats in draining:
            if version.name not in infos:
                infos[version.name] = self._version_info(version, stats, PluginStatus.UNLOADING)
        return [infos[n] for n in sorted(infos)]

    def health_check(self) -> dict[str, bool]:
        """Call each serving plugin's ``sandbus_health`` (on a pooled instance); failed plugins are
        ``False``. An unhealthy plugin is audited (``lifecycle.unhealthy``) and keeps serving: what
        to do about it is the operator's decision."""
        with self._lock:
            names = sorted(self._slots)
        report: dict[str, bool] = {}
        for name in names:
            try:
                version, _ = self._checkout(name)
            except PluginNotFoundError:
                if name in self._slots:
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

    def _serving(self, name: str) -> bool:
        slot = self._slots.get(name)
        return slot is not None and slot.current is not None

    def _serving_manifests(self) -> dict[str, Manifest]:
        with self._lock:
            return {n: s.current.manifest for n, s in self._slots.items() if s.current is not None}

    def _failures(self) -> dict[str, SandbusError]:
        with self._lock:
            return {n: s.failure for n, s in self._slots.items() if s.failure is not None and s.current is None}

    def _slot(self, name: str) -> _Slot:
        """The slot of ``name``, created if new. Call with ``_lifecycle`` held."""
        slot = self._slots.get(name)
        if slot is None:
            slot = _Slot(name, self.directory / f"{name}.wasm", PluginStats(self._stats_window))
            with self._lock:
                self._slots[name] = slot
        return slot

    def _resolve(self, manifest: Manifest) -> Grant:
        try:
            return resolve(manifest, self.policy, data_root=self.data_root / manifest.name, host_env=self._host_env)
        except SecurityViolationError as e:
            self.auditor.emit(AuditLevel.WARNING, "policy.refused", manifest.name, e.message, **e.details)
            raise

    def _install(self, files: PluginFiles, manifest: Manifest | None = None) -> PluginVersion:
        """Build a version from ``files`` and put it in service (replacing any serving version).

        On failure nothing changes except the slot's failure record, and the error is raised.
        """
        name = files.name
        with self._lifecycle:
            existing = self._slots.get(name)
            old = existing.current if existing is not None else None
            started = time.perf_counter()
            try:
                if manifest is None:
                    manifest = parse_files(files, self.runtime_version)
                if old is None and len(self._serving_manifests()) >= self.max_plugins:
                    raise ResourceLimitError(
                        f"cannot load: {self.max_plugins} plugins are serving, the max_plugins limit",
                        plugin=name, limit=self.max_plugins)
                skipped = check_dependencies(manifest, self._serving_manifests(), self._failures())
                grant = self._resolve(manifest)
                version = build_version(files, manifest, grant, auditor=self.auditor, cache=self.cache,
                                        host_functions=self.host_functions, skipped_optional=skipped)
            except SandbusError as e:
                self._record_failure(files, e, manifest)
                raise
            slot = self._slot(name)
            with self._lock:
                slot.current = version
                slot.failure = slot.failed_fingerprint = None
                slot.declared_version = version.version
                slot.description = manifest.plugin.description
                if old is not None:
                    slot.reloads += 1
                    old.retired = True
                    close_old = old.in_flight == 0
                    if not close_old:
                        self._draining[old] = slot.stats
            elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
            if old is None:
                self.auditor.emit(AuditLevel.INFO, "lifecycle.load", name,
                                  f"loaded version {version.version} in {elapsed_ms} ms",
                                  version=version.version, sha256=version.sha256, load_ms=elapsed_ms,
                                  skipped_optional=list(skipped))
            else:
                self.auditor.emit(AuditLevel.INFO, "lifecycle.reload", name,
                                  f"reloaded {old.version} -> {version.version} in {elapsed_ms} ms "
                                  f"({old.in_flight} calls finishing on the old version)",
                                  version=version.version, previous_version=old.version, sha256=version.sha256,
                                  previous_sha256=old.sha256, load_ms=elapsed_ms)
                if close_old:
                    self._close_version(old)
            return version

    def _record_failure(self, files: PluginFiles, error: SandbusError, manifest: Manifest | None) -> None:
        slot = self._slot(files.name)
        with self._lock:
            slot.failure = error
            slot.failed_fingerprint = files.fingerprint
            serving = slot.current
            if serving is None and manifest is not None:
                slot.declared_version = manifest.plugin.version
                slot.description = manifest.plugin.description
        slot.stats.note_error(error)
        if serving is not None:
            self.auditor.emit(AuditLevel.WARNING, "lifecycle.reload_failed", files.name,
                              f"new files refused, version {serving.version} keeps serving: {error}",
                              error=error.code, reason=str(error), serving_version=serving.version)
        else:
            self.auditor.emit(AuditLevel.WARNING, "lifecycle.load_failed", files.name, f"cannot load: {error}",
                              error=error.code, reason=str(error))

    def _clear_failure(self, slot: _Slot) -> None:
        """The files went back to what is serving: the failure no longer describes the plugin."""
        with self._lock:
            slot.failure = slot.failed_fingerprint = None

    def _retry_waiting(self, loaded: str) -> None:
        """Plugins refused because ``loaded`` was absent or of another version may load now."""
        queue = [loaded]
        while queue:
            dep = queue.pop(0)
            with self._lock:
                waiting = sorted(n for n, s in self._slots.items()
                                 if isinstance(s.failure, DependencyError)
                                 and s.failure.details.get("dependency") == dep)
            for name in waiting:
                try:
                    self._install(read_plugin_files(self.directory, name))
                except SandbusError:
                    continue
                queue.append(name)

    def _unload(self, name: str, *, force: bool, reason: str) -> None:
        with self._lifecycle:
            slot = self._slots.get(name)
            if slot is None:
                raise PluginNotFoundError(f"no plugin {name!r} is loaded", plugin=name)
            needed_by: list[str] = []
            if slot.current is not None:
                needed_by = check_unload(name, self._serving_manifests(), force=force)
            with self._lock:
                self._slots.pop(name, None)
                version, slot.current = slot.current, None
                close_now = False
                if version is not None:
                    version.retired = True
                    close_now = version.in_flight == 0
                    if not close_now:
                        self._draining[version] = slot.stats
            if version is None:
                return
            extra = f"; {', '.join(map(repr, needed_by))} depended on it" if needed_by else ""
            self.auditor.emit(AuditLevel.WARNING if needed_by else AuditLevel.INFO, "lifecycle.unload", name,
                              f"unloaded version {version.version} ({reason}); "
                              f"{version.in_flight} calls finishing{extra}",
                              version=version.version, reason=reason, forced=force, dependents=needed_by,
                              in_flight=version.in_flight)
            if close_now:
                self._close_version(version)

    def _close_version(self, version: PluginVersion) -> None:
        """Shut a retired version's instances down (``sandbus_shutdown``) once no call runs on it."""
        try:
            version.sandbox.close()
        except Exception:
            log.exception("plugin %s: error while closing version %s", version.name, version.version)
        with self._lock:
            self._draining.pop(version, None)
            still_used = any(s.current is not None and s.current.sha256 == version.sha256
                             for s in self._slots.values())
        if not still_used:
            self.cache.forget(version.wasm)  # the disk copy stays for the next load
        version.closed.set()

    # -- reporting ---------------------------------------------------------------------------------

    def _slot_info(self, slot: _Slot) -> PluginInfo:
        version = slot.current
        if version is not None:
            status = PluginStatus.STALE if slot.failure is not None else PluginStatus.LOADED
            return self._version_info(version, slot.stats, status, slot)
        snap = slot.stats.snapshot()
        return PluginInfo(
            name=slot.name, version=slot.declared_version, status=PluginStatus.FAILED, path=str(slot.path),
            description=slot.description, executions=snap.executions, errors=snap.errors, p50_ms=snap.p50_ms,
            p99_ms=snap.p99_ms, fuel_used=snap.fuel_used, last_fuel_used=snap.last_fuel_used,
            reloads=slot.reloads, last_error=snap.last_error, last_error_code=snap.last_error_code,
            last_error_at=snap.last_error_at,
        )

    @staticmethod
    def _version_info(version: PluginVersion, stats: PluginStats, status: PluginStatus,
                      slot: _Slot | None = None) -> PluginInfo:
        snap = stats.snapshot()
        pool = version.sandbox.pool
        return PluginInfo(
            name=version.name, version=version.version, status=status, path=str(version.path),
            sha256=version.sha256, description=version.manifest.plugin.description,
            functions=version.sandbox.functions, executions=snap.executions, errors=snap.errors,
            p50_ms=snap.p50_ms, p99_ms=snap.p99_ms, fuel_used=snap.fuel_used, last_fuel_used=snap.last_fuel_used,
            memory_bytes=max(snap.memory_bytes_per_instance, version.initial_memory_bytes) * pool.size,
            instances=pool.size,
            in_flight=version.in_flight, reloads=slot.reloads if slot is not None else 0,
            last_loaded=version.loaded_at, last_error=snap.last_error, last_error_code=snap.last_error_code,
            last_error_at=snap.last_error_at, skipped_optional=version.skipped_optional,
        )
