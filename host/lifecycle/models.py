"""What the manager tells the world about its plugins: pydantic models the bus can serialise as they are."""

from __future__ import annotations

import enum
from datetime import datetime

from pydantic import BaseModel, ConfigDict

__all__ = ["DiscoveryReport", "PluginInfo", "PluginStatus"]


class PluginStatus(enum.StrEnum):
    """Where a plugin stands.

    ``loaded``: serving its newest version.
    ``stale``: serving, but the newest files on disk failed to load (``last_error`` says why);
        the previous version keeps answering until the files are fixed.
    ``loading``: not serving yet: its first load runs in the background (a module compiling in the
        compile worker, which takes seconds); calls get a retryable ``PluginLoadingError`` until it
        turns ``loaded`` (or ``failed``, with why).
    ``failed``: not serving: it never loaded, or its module disappeared (``last_error`` says why).
    ``unloading``: unloaded (deleted or asked to), finishing the calls that were already running;
        new calls get ``PluginNotFoundError``. It leaves the listing when the last call ends.
    """

    LOADED = "loaded"
    STALE = "stale"
    LOADING = "loading"
    FAILED = "failed"
    UNLOADING = "unloading"

    @property
    def serving(self) -> bool:
        """Whether new calls are accepted."""
        return self in (PluginStatus.LOADED, PluginStatus.STALE)


class PluginInfo(BaseModel):
    """One plugin as :meth:`PluginManager.list_plugins` reports it.

    Parameters:
        name: the plugin name (its file stem).
        version: the serving version; for a plugin that is not serving, the version its manifest
            declares when that could be read.
        status: see :class:`PluginStatus`.
        path: the ``.wasm`` file.
        sha256: digest of the serving module.
        description: from the manifest.
        author / license / repository / documentation: the manifest's ``[plugin]`` keys of that name
            (``repository`` and ``documentation`` are http(s) URLs, or ``None``).
        category / tags: the manifest's ``[metadata]``.
        max_open_files: files one instance may have open at once (the manifest's value, else the node's
            default); ``None`` when not serving.
        functions: exported functions callable through ``execute``.
        executions / errors: calls served (failed ones included) and calls that failed through the
            plugin's fault, across reloads.
        host_errors: calls that failed because the bus or the network did (NATS down, a publish not
            acknowledged...) or a host function failed (``HostError``): not the plugin's fault, so
            neither in ``errors`` nor in ``last_error``.
        rejected: requests and messages refused as the caller's mistake (``request.*`` errors, an
            input above the plugin's input cap), across reloads: never in ``errors`` or ``last_error``.
        p50_ms / p99_ms: latency percentiles over the most recent calls (``None`` before the first).
        fuel_used: fuel burnt by all calls; ``last_fuel_used`` by the latest successful one.
        memory_bytes: linear memory held by the plugin's instances (largest memory a call has seen
            per instance, times the live instances: an estimate that errs high).
        instances / in_flight: live pooled instances, and calls running now.
        reloads: successful reloads since the plugin was first loaded.
        last_loaded: when the serving version was put in service (UTC).
        last_error / last_error_code / last_error_at: the latest failure, of a call, a load or a reload.
        skipped_optional: optional dependencies that were absent or incompatible at load.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    version: str | None = None
    status: PluginStatus
    path: str
    sha256: str | None = None
    description: str = ""
    author: str = ""
    license: str = ""
    repository: str | None = None
    documentation: str | None = None
    category: str = ""
    tags: tuple[str, ...] = ()
    max_open_files: int | None = None
    functions: tuple[str, ...] = ()
    executions: int = 0
    errors: int = 0
    host_errors: int = 0
    rejected: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    fuel_used: int = 0
    last_fuel_used: int = 0
    memory_bytes: int = 0
    instances: int = 0
    in_flight: int = 0
    reloads: int = 0
    last_loaded: datetime | None = None
    last_error: str | None = None
    last_error_code: str | None = None
    last_error_at: datetime | None = None
    skipped_optional: tuple[str, ...] = ()


class DiscoveryReport(BaseModel):
    """The outcome of :meth:`PluginManager.discover_and_load`.

    Parameters:
        loaded: plugins serving afterwards, in the order they were loaded (dependencies first).
        failed: plugins that could not load, with the reason (the rest keep working).
        loading: plugins still loading in the background (``background=True``): a slow compile, and the
            plugins that depend on one; :meth:`PluginManager.wait_loaded` waits for them.
    """

    model_config = ConfigDict(frozen=True)

    loaded: tuple[str, ...] = ()
    failed: dict[str, str] = {}
    loading: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failed
