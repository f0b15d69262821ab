"""The routing table: which version serves each plugin name, how many calls run on each version,
and when a retired version may close.

This is the concurrency-critical core of hot reload, kept apart so it can be read in one sitting.
One lock guards everything here and is held for a few dictionary operations only, so calls
(``checkout`` / ``checkin``, from many threads) never wait behind a compile.

The rule that makes reloads and unloads lossless: a version leaves service (``retire``) under
the lock, in the same step that stops handing it out, so once retired no new call can pick it up;
the call that brings its ``in_flight`` count to zero -- or the retirement itself, if none was
running -- closes it, exactly once. Closing shuts every instance down (``sandbus_shutdown``);
nothing is ever closed under a running call.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sandbus.host.lifecycle.loader import Fingerprint, PluginVersion
from sandbus.host.lifecycle.manifest import Manifest
from sandbus.host.lifecycle.models import PluginInfo, PluginStatus
from sandbus.host.lifecycle.stats import PluginStats
from sandbus.host.sandbox import ModuleCache
from sandbus.sdk.errors import PluginLoadingError, PluginNotFoundError, SandbusError

__all__ = ["RoutingTable", "Slot"]

log = logging.getLogger("sandbus.manager")


@dataclass(eq=False)
class Slot:
    """A plugin name in the table: the serving version (if any), the latest failure, the statistics.

    ``failure`` with a ``current`` version means *stale* (an older version serves); without one,
    *failed*. ``failed_fingerprint`` identifies the files that failed, so they are not retried on
    every file-system event. ``loading``: a first load runs in the background (a slow compile); the
    plugin is not serving yet, and calls get a retryable ``PluginLoadingError``.
    """

    name: str
    path: Path
    stats: PluginStats
    current: PluginVersion | None = None
    failure: SandbusError | None = None
    failed_fingerprint: Fingerprint | None = None
    declared_version: str | None = None
    description: str = ""
    reloads: int = 0
    loading: bool = False


@dataclass(eq=False)
class RoutingTable:
    """Slots by name, plus the retired versions still finishing calls (``draining``).

    Parameters:
        directory: where the plugins' files live (for the paths reported).
        cache: its in-memory entry for a module is dropped when the last version using it closes.
        stats_window: latency samples kept per plugin.
    """

    directory: Path
    cache: ModuleCache
    stats_window: int = 1024
    lock: threading.Lock = field(default_factory=threading.Lock)
    slots: dict[str, Slot] = field(default_factory=dict)
    draining: dict[PluginVersion, PluginStats] = field(default_factory=dict)

    # -- calls -------------------------------------------------------------------------------------

    def checkout(self, name: str) -> tuple[PluginVersion, PluginStats]:
        """The serving version of ``name``, counted as running one more call until :meth:`checkin`."""
        with self.lock:
            slot = self.slots.get(name)
            if slot is None or slot.current is None:
                raise not_serving(name, slot)
            version = slot.current
            version.in_flight += 1
            return version, slot.stats

    def checkin(self, version: PluginVersion) -> None:
        with self.lock:
            version.in_flight -= 1
            last = version.retired and version.in_flight == 0
        if last:
            self._close(version)

    # -- changes -----------------------------------------------------------------------------------

    def slot(self, name: str) -> Slot:
        """The slot of ``name``, created (empty) if new."""
        with self.lock:
            slot = self.slots.get(name)
            if slot is None:
                slot = self.slots[name] = Slot(name, self.directory / f"{name}.wasm", PluginStats(self.stats_window))
            return slot

    def put_in_service(self, slot: Slot, version: PluginVersion) -> PluginVersion | None:
        """Make ``version`` serve ``slot`` (clearing its failure); retire and return the previous one."""
        with self.lock:
            old, slot.current = slot.current, version
            slot.failure = slot.failed_fingerprint = None
            slot.loading = False
            slot.declared_version = version.version
            slot.description = version.manifest.plugin.description
            if old is not None:
                slot.reloads += 1
            close_old = old is not None and self._retire(old, slot.stats)
        if close_old:
            assert old is not None
            self._close(old)
        return old

    def remove(self, name: str, *, failure: SandbusError | None = None,
               fingerprint: Fingerprint | None = None) -> PluginVersion | None:
        """Take ``name`` out of service; retire and return its serving version (``None`` if none).

        Without ``failure`` the name is forgotten. With one, the slot stays, failed for that reason,
        in the same step: nobody ever sees the plugin vanish and come back (e.g. a deleted module
        whose manifest is still there).
        """
        with self.lock:
            slot = self.slots.get(name)
            if slot is None:
                return None
            if failure is None:
                del self.slots[name]
            else:
                slot.failure, slot.failed_fingerprint = failure, fingerprint
            version, slot.current = slot.current, None
            close_now = version is not None and self._retire(version, slot.stats)
        if close_now:
            assert version is not None
            self._close(version)
        return version

    def record_failure(self, slot: Slot, error: SandbusError, fingerprint: Fingerprint | None,
                       manifest: Manifest | None) -> PluginVersion | None:
        """Keep ``error`` as the slot's reason; returns the version that keeps serving, if any."""
        slot.stats.note_error(error)  # first: the listing never shows the status without its reason
        with self.lock:
            slot.failure, slot.failed_fingerprint = error, fingerprint
            slot.loading = False
            if slot.current is None and manifest is not None:
                slot.declared_version = manifest.plugin.version
                slot.description = manifest.plugin.description
            return slot.current

    def mark_loading(self, slot: Slot, manifest: Manifest | None) -> None:
        """Show ``slot`` as loading in the background (until it is put in service or fails)."""
        with self.lock:
            slot.loading = True
            slot.failure = slot.failed_fingerprint = None
            if slot.current is None and manifest is not None:
                slot.declared_version = manifest.plugin.version
                slot.description = manifest.plugin.description

    def clear_failure(self, slot: Slot) -> None:
        with self.lock:
            slot.failure = slot.failed_fingerprint = None

    def _retire(self, version: PluginVersion, stats: PluginStats) -> bool:
        """Mark ``version`` retired (lock held); True if no call runs on it, so it closes now."""
        version.retired = True
        if version.in_flight == 0:
            return True
        self.draining[version] = stats
        return False

    def _close(self, version: PluginVersion) -> None:
        try:
            version.sandbox.close()
        except Exception:
            log.exception("plugin %s: error while closing version %s", version.name, version.version)
        with self.lock:
            self.draining.pop(version, None)
            still_used = any(s.current is not None and s.current.sha256 == version.sha256
                             for s in self.slots.values())
        if not still_used:
            self.cache.forget_digest(version.sha256)  # the disk copy stays for the next load
        version.closed.set()

    # -- reading -----------------------------------------------------------------------------------

    def get(self, name: str) -> Slot | None:
        with self.lock:
            return self.slots.get(name)

    def serving(self, name: str) -> bool:
        with self.lock:
            slot = self.slots.get(name)
            return slot is not None and slot.current is not None

    def serving_names(self) -> list[str]:
        with self.lock:
            return sorted(n for n, s in self.slots.items() if s.current is not None)

    def serving_manifests(self) -> dict[str, Manifest]:
        with self.lock:
            return {n: s.current.manifest for n, s in self.slots.items() if s.current is not None}

    def loading(self) -> list[str]:
        """Plugins whose first load runs in the background, sorted."""
        with self.lock:
            return sorted(n for n, s in self.slots.items() if s.loading and s.current is None)

    def failures(self) -> dict[str, SandbusError]:
        """Why each plugin that is not serving failed."""
        with self.lock:
            return {n: s.failure for n, s in self.slots.items() if s.failure is not None and s.current is None}

    def describe(self) -> list[PluginInfo]:
        """Every slot, plus draining versions whose name has left the table (status ``unloading``)."""
        with self.lock:
            slots = list(self.slots.values())
            draining = list(self.draining.items())
        infos = {slot.name: _slot_info(slot) for slot in slots}
        for version, stats in draining:
            if version.name not in infos:
                infos[version.name] = _version_info(version, stats, PluginStatus.UNLOADING)
        return [infos[n] for n in sorted(infos)]


def not_serving(name: str, slot: Slot | None) -> PluginNotFoundError:
    """The error for a call to a plugin that is not serving: with its failure when it has one."""
    if slot is not None and slot.loading:
        return PluginLoadingError(f"plugin {name!r} is still loading (compiling); try again shortly",
                                  plugin=name)
    if slot is not None and slot.failure is not None:
        return PluginNotFoundError(f"not loaded: it failed to load: {slot.failure}", plugin=name,
                                   reason=slot.failure.code)
    return PluginNotFoundError(f"no plugin {name!r} is loaded", plugin=name)


def _slot_info(slot: Slot) -> PluginInfo:
    current, failure = slot.current, slot.failure  # read once: the slot may change meanwhile
    if current is not None:
        status = PluginStatus.STALE if failure is not None else PluginStatus.LOADED
        return _version_info(current, slot.stats, status, slot.reloads)
    snap = slot.stats.snapshot()
    status = PluginStatus.LOADING if slot.loading and failure is None else PluginStatus.FAILED
    return PluginInfo(
        name=slot.name, version=slot.declared_version, status=status, path=str(slot.path),
        description=slot.description, executions=snap.executions, errors=snap.errors, p50_ms=snap.p50_ms,
        p99_ms=snap.p99_ms, fuel_used=snap.fuel_used, last_fuel_used=snap.last_fuel_used, reloads=slot.reloads,
        host_errors=snap.host_errors, rejected=snap.rejected,
        last_error=snap.last_error, last_error_code=snap.last_error_code, last_error_at=snap.last_error_at,
    )


def _version_info(version: PluginVersion, stats: PluginStats, status: PluginStatus, reloads: int = 0) -> PluginInfo:
    snap = stats.snapshot()
    pool = version.sandbox.pool
    per_instance = max(snap.memory_bytes_per_instance, version.initial_memory_bytes)
    plugin, metadata = version.manifest.plugin, version.manifest.metadata
    return PluginInfo(
        name=version.name, version=version.version, status=status, path=str(version.path), sha256=version.sha256,
        description=plugin.description, author=plugin.author, license=plugin.license, repository=plugin.repository,
        documentation=plugin.documentation, category=metadata.category, tags=metadata.tags,
        max_open_files=version.grant.limits.max_open_files, functions=version.sandbox.functions,
        executions=snap.executions, errors=snap.errors, p50_ms=snap.p50_ms, p99_ms=snap.p99_ms,
        host_errors=snap.host_errors, rejected=snap.rejected,
        fuel_used=snap.fuel_used, last_fuel_used=snap.last_fuel_used, memory_bytes=per_instance * pool.size,
        instances=pool.size, in_flight=version.in_flight, reloads=reloads, last_loaded=version.loaded_at,
        last_error=snap.last_error, last_error_code=snap.last_error_code, last_error_at=snap.last_error_at,
        skipped_optional=version.skipped_optional,
    )
