"""The machinery of ``sandbus dev``: watch a project's sources, rebuild, and hot-reload the result.

Three parts, used by :mod:`sandbus.host.cli.dev` (which only prints and runs the processes):

* :func:`is_source` / :class:`SourceWatcher`: which file events mean "the plugin changed" (the
  language's sources and the manifest; never ``build/``, editor temporaries or tests), debounced the
  way :mod:`sandbus.host.lifecycle.watcher` debounces a plugin directory: an editor's atomic save
  arrives as a ``moved`` onto the file, an in-place write as ``modified`` followed by ``closed``
  (Linux); a change is acted on once its directory has been quiet for ``debounce_s`` and no file of it
  is still open for writing (at most ``max_wait_s``).
* :func:`dev_policy` / :func:`describe_grants`: the policy a dev loop serves the author's plugin under
  when none is given, and what it grants, in one line.
* :class:`DevLoop`: one rebuild: :func:`~sandbus.host.authoring.build.build_project` (the code path of
  ``sandbus build``), then :meth:`PluginManager.sync` of the plugin, the node's own hot reload: a
  build that fails writes nothing to ``build/``, and a module or manifest the manager refuses is
  recorded as a failure while the previous version keeps serving. Its :class:`Rebuild` says what
  happened, for one line of output.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Self

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from sandbus.host.authoring.build import BuildResult, Progress, build_project
from sandbus.host.authoring.errors import AuthoringError, ToolchainMissingError
from sandbus.host.authoring.project import BUILD_DIR, Language, Project
from sandbus.host.lifecycle.manifest import Manifest, load_manifest, split_file_pattern
from sandbus.host.lifecycle.models import PluginStatus
from sandbus.host.lifecycle.policy import RESOURCE_KEYS, Policy
from sandbus.host.sandbox import AuditEvent
from sandbus.sdk.errors import ManifestError, SandbusError

if TYPE_CHECKING:
    from sandbus.host.lifecycle.manager import PluginManager

__all__ = ["DevLoop", "Rebuild", "SourceWatcher", "describe_grants", "dev_policy", "is_source"]

#: Directories never holding a guest source (build products, dependencies, caches).
_SKIPPED_DIRS = frozenset({BUILD_DIR, ".venv", "node_modules", "__pycache__", ".git", ".pytest_cache"})


def is_source(project: Project, path: Path) -> bool:
    """Whether a change of ``path`` (existing or not) changes what ``sandbus build`` produces.

    The rule of :meth:`Project.sources` (plus the manifest), by name, so that a deleted or a newly
    created source counts too; hidden files (editor swap and backup files) and tests never do.
    """
    try:
        rel = path.relative_to(project.root)
    except ValueError:
        return False
    parts = rel.parts
    if not parts or any(p.startswith(".") or p in _SKIPPED_DIRS for p in parts):
        return False
    name = parts[-1]
    top = len(parts) == 1
    if top and name == project.manifest.name:
        return True
    language = project.language
    if language is Language.WAT:
        return top and name == f"{project.name}.wat"
    if language is Language.C:
        return top and path.suffix in (".c", ".h")
    if language.is_assemblyscript:
        if top:
            return path.suffix == ".ts" or name in ("package.json", "package-lock.json", "asconfig.json")
        return parts[0] == "assembly" and path.suffix == ".ts"
    return path.suffix == ".py" and not name.startswith("test_") and name != "conftest.py"


def _watched_dirs(project: Project) -> list[tuple[Path, bool]]:
    """Where sources can be, as (directory, recursive): the project directory itself, and below it only
    the directories that hold sources (``assembly/``; a Python project's packages), never the whole tree:
    a ``node_modules`` or ``.venv`` inside would cost an inotify watch per directory."""
    root = Path(os.path.realpath(project.root))
    dirs = [(root, False)]
    if project.language.is_assemblyscript and (root / "assembly").is_dir():
        dirs.append((root / "assembly", True))
    elif project.language is Language.PYTHON:
        dirs += [(d, True) for d in sorted(root.iterdir())
                 if d.is_dir() and not d.is_symlink() and (d / "__init__.py").is_file()
                 and not d.name.startswith(".") and d.name not in _SKIPPED_DIRS]
    return dirs


def _emits_close_events(observer: BaseObserver) -> bool:
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux
        return False
    return isinstance(observer, InotifyObserver)


class SourceWatcher:
    """Calls ``on_change`` (on its own thread) once the project's sources have changed and settled.

    Changes made while ``on_change`` runs are collected and bring one more call after it returns, so a
    save during a build is never lost and never builds twice.

    Parameters:
        project: whose sources to watch.
        on_change: what to run; an exception it raises is passed to ``on_error`` and watching goes on.
        on_error: receives such an exception (default: ignored).
        debounce_s: quiet period after the last event before ``on_change`` runs.
        max_wait_s: longest a change waits for a writer to close its file.
    """

    def __init__(self, project: Project, on_change: Callable[[], None], *,
                 on_error: Callable[[BaseException], None] | None = None,
                 debounce_s: float = 0.15, max_wait_s: float = 2.0) -> None:
        if debounce_s < 0 or max_wait_s <= 0:
            raise ValueError("debounce_s must be >= 0 and max_wait_s > 0")
        self.project = project
        self.on_change = on_change
        self.on_error = on_error
        self.debounce_s = debounce_s
        self.max_wait_s = max_wait_s
        self._root = Path(os.path.realpath(project.root))
        self._cond = threading.Condition()
        self._due: float | None = None  # when the pending change has settled; None: nothing pending
        self._first = 0.0
        self._writing: set[str] = set()
        self._stopping = False
        self._track_writes = False
        self._observer: BaseObserver | None = None
        self._worker: threading.Thread | None = None
        #: How many times ``on_change`` ran.
        self.runs = 0

    def start(self) -> None:
        if self._observer is not None:
            return
        observer = Observer()
        self._track_writes = _emits_close_events(observer)
        handler = _Handler(self)
        for directory, recursive in _watched_dirs(self.project):
            observer.schedule(handler, str(directory), recursive=recursive)
        self._worker = threading.Thread(target=self._run, name=f"sandbus-dev:{self.project.name}", daemon=True)
        self._worker.start()
        observer.start()
        self._observer = observer

    def stop(self, timeout: float | None = None) -> bool:
        """Stop watching; wait up to ``timeout`` seconds for a running ``on_change``. Returns whether it
        finished (False: it is still running on its daemon thread)."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        worker = self._worker
        if worker is None:
            return True
        worker.join(timeout)
        return not worker.is_alive()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def note(self, event: FileSystemEvent) -> None:
        """Record one file-system event (called on the observer's thread)."""
        if event.is_directory:
            return
        kind = event.event_type
        paths: list[tuple[str, bool]] = []  # (path, still being written?)
        if kind == EVENT_TYPE_MOVED:  # an atomic save lands on dest; a rename away removes src
            paths = [(os.fsdecode(event.src_path), False), (os.fsdecode(event.dest_path), False)]
        elif kind == EVENT_TYPE_MODIFIED:
            paths = [(os.fsdecode(event.src_path), self._track_writes)]  # its close will follow
        elif kind in (EVENT_TYPE_CREATED, EVENT_TYPE_CLOSED, EVENT_TYPE_DELETED):
            paths = [(os.fsdecode(event.src_path), False)]
        relevant = [(p, w) for p, w in paths if is_source(self.project, self._in_project(p))]
        if not relevant:
            return  # opened, closed_no_write, our own reads, build/, editor temporaries
        now = time.monotonic()
        with self._cond:
            if self._due is None:
                self._first = now
            self._due = now + self.debounce_s
            for path, writing in relevant:
                if writing:
                    self._writing.add(path)
                else:
                    self._writing.discard(path)
            self._cond.notify_all()

    def _in_project(self, path: str) -> Path:
        """``path`` (under the real path of the root) as a path under ``project.root``."""
        p = Path(path)
        with contextlib.suppress(ValueError):
            return self.project.root / p.relative_to(self._root)
        return p

    def _next(self) -> bool:
        """Wait until a change has settled (True) or the watcher stops (False)."""
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                if self._due is not None:
                    settled = self._due <= now
                    if settled and (not self._writing or now - self._first >= self.max_wait_s):
                        self._due = None
                        self._writing.clear()
                        return True
                    wake = self._due if not settled else self._first + self.max_wait_s
                    self._cond.wait(max(0.0, wake - now))
                else:
                    self._cond.wait()
            return False

    def _run(self) -> None:
        while self._next():
            try:
                self.on_change()
            except Exception as e:  # the loop outlives any one rebuild's failure
                if self.on_error is not None:
                    self.on_error(e)
            finally:
                self.runs += 1


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: SourceWatcher) -> None:
        super().__init__()
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._watcher.note(event)


def dev_policy(manifest: Manifest, data_dir: Path, pass_env: Iterable[str] = ()) -> Policy:
    """A policy granting what ``manifest`` asks for, for serving one's own plugin while writing it.

    Every capability it names (required or optional) and every entry under them: its directories
    (under ``data_dir``, the plugin's data root), network hosts, topics and request targets; resource
    ceilings raised to what it asks. Environment variables are the exception: they hold the author's
    secrets (cloud keys, tokens), and a project cloned from someone else names what it likes, so only
    the variables named in ``pass_env`` (``sandbus dev --pass-env NAME``) are granted; a manifest asking
    for another is refused at load, with a message naming it. Still refused, as on any node: addresses
    that are not public (loopback, private ranges) for a network host, and anything the manifest does
    not name. A plugin that loads under it can still be refused by an operator's stricter policy.
    """
    passed = set(pass_env)
    perms = manifest.permissions
    root = data_dir.resolve()
    readable = sorted({str(root / split_file_pattern(e)[0]) for e in perms.read_files})
    writable = sorted({str(root / split_file_pattern(e)[0]) for e in perms.write_files})
    builtin = Policy.default()
    limits = {}
    for key in RESOURCE_KEYS:
        asked, ceiling = getattr(manifest.resources, key), getattr(builtin.limits, key)
        limits[key] = ceiling if asked is None else max(asked, ceiling)
    return Policy.model_validate({
        "capabilities": {"allowed": sorted(manifest.capabilities.all | {"compute"})},
        "filesystem": {"readable": readable, "writable": writable},
        "network": {"allowed_hosts": list(perms.network_hosts)},
        "environment": {"allowed_vars": [v for v in perms.environment_vars if v in passed]},
        "messaging": {"publish_topics": list(perms.publish_topics), "request_plugins": list(perms.request_plugins),
                      "subscribe_topics": list(manifest.subscriptions.topics)},
        "limits": limits,
    })


def describe_grants(manifest: Manifest, pass_env: Iterable[str] = ()) -> str:
    """What :func:`dev_policy` grants ``manifest``, in one line (and the variables it asks for that are not passed)."""
    perms = manifest.permissions
    passed = set(pass_env)
    parts = []
    for capability in sorted(manifest.capabilities.all | {"compute"}):
        entries = {"filesystem": [*perms.read_files, *(f"{e} (write)" for e in perms.write_files)],
                   "network": list(perms.network_hosts),
                   "environment": [v for v in perms.environment_vars if v in passed],
                   "messaging": [*perms.publish_topics, *perms.request_plugins]}.get(capability, [])
        parts.append(f"{capability} ({', '.join(entries)})" if entries else capability)
    if manifest.subscriptions.topics:
        parts.append(f"subscriptions ({', '.join(manifest.subscriptions.topics)})")
    withheld = [v for v in perms.environment_vars if v not in passed]
    if withheld:
        parts.append(f"not the environment variables {', '.join(withheld)} "
                     f"({' '.join(f'--pass-env {v}' for v in withheld)} grants them)")
    return ", ".join(parts)


def _make_data_dirs(manifest: Manifest, data_dir: Path) -> None:
    """Create the directories the manifest's file entries name, so that a grant finds them (a node's
    operator creates them; in a dev loop nobody else would). Entries are validated relative paths
    without ``..``; one that resolves outside ``data_dir`` (a symlink) is left to the grant to refuse."""
    root = data_dir.resolve()
    for entry in (*manifest.permissions.read_files, *manifest.permissions.write_files):
        directory = root / split_file_pattern(entry)[0]
        if directory.resolve().is_relative_to(root):
            with contextlib.suppress(OSError):
                directory.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Rebuild:
    """What one rebuild did.

    Parameters:
        build_s: wall time of the build.
        result: the build's result, or ``None`` when it failed.
        error: why the build failed (the compiler's output, or the manifest's error).
        reload: ``loaded`` / ``reloaded`` (the new module serves), ``unchanged`` (the module is the one
            serving), ``refused`` (the manager refused it: ``message`` says why), ``skipped`` (the build
            failed, or the loop was closed: nothing was offered to the manager).
        message: what the manager said (load time, or the refusal).
        serving: the version serving now (``None``: nothing serves).
    """

    build_s: float
    result: BuildResult | None
    error: str | None
    reload: str
    message: str = ""
    serving: str | None = None


@dataclass
class DevLoop:
    """Rebuilds ``project`` and has ``manager`` (serving ``project.build_dir``) pick up the result.

    Parameters:
        project: the project.
        manager: the node's manager, serving the project's ``build/`` directory.
        policy: a fixed policy, or ``None`` for :func:`dev_policy` of the manifest of each build.
        progress: receives the build's step lines.
        pass_env: under the development policy, the host environment variables the plugin may be given.
    """

    project: Project
    manager: PluginManager
    policy: Policy | None = None
    progress: Progress | None = None
    pass_env: frozenset[str] = frozenset()
    _events: list[tuple[int, AuditEvent]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.manager.auditor.add_sink(self._on_audit)

    def _on_audit(self, event: AuditEvent) -> None:
        # Lifecycle events raised by our own sync (on this thread) say what the sync did.
        if event.plugin == self.project.name and (event.kind.startswith("lifecycle.") or event.kind in
                                                  ("policy.refused", "module.refused")):
            with self._lock:
                self._events.append((threading.get_ident(), event))

    def close(self) -> None:
        """Stop offering builds to the manager: a build still running when the loop stops ends unused,
        so stopping never waits for a reload."""
        self._closed.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def rebuild(self, *, force: bool = True) -> Rebuild:
        """Build, then sync the plugin into the manager.

        Raises:
            ToolchainMissingError: the compiler is not installed (the caller decides whether that ends
                the loop). Every other failure is in the returned :class:`Rebuild`.
        """
        started = time.perf_counter()
        try:
            result = build_project(self.project.root, force=force, progress=self.progress)
        except ToolchainMissingError:
            raise
        except (AuthoringError, ManifestError) as e:
            why = e.message if isinstance(e, AuthoringError) else str(e)  # a manifest's error names its file
            return Rebuild(time.perf_counter() - started, None, why, "skipped", serving=self.serving_version())
        build_s = time.perf_counter() - started
        if result.project.name != self.project.name:  # the manifest was renamed: another plugin now
            return Rebuild(build_s, None, f"the project now builds plugin {result.project.name!r}, not "
                           f"{self.project.name!r}: start the dev loop again", "skipped",
                           serving=self.serving_version())
        return self.sync(build_s, result)

    def sync(self, build_s: float, result: BuildResult) -> Rebuild:
        """Offer the built files to the manager and say what it did with them."""
        name = self.project.name
        if self.closed:
            return Rebuild(build_s, result, None, "skipped", "stopping", None)
        try:
            self._apply_policy()
        except ManifestError as e:  # the copy was validated by the build; only a race gets here
            return Rebuild(build_s, None, str(e), "skipped", serving=self.serving_version())
        me = threading.get_ident()
        with self._lock:
            self._events.clear()
        self.manager.sync(name)
        with self._lock:
            events = [e for t, e in self._events if t == me]
            self._events.clear()
        try:
            info = self.manager.info(name)
        except SandbusError as e:
            return Rebuild(build_s, result, None, "refused", e.message, None)
        serving = info.version if info.status.serving else None
        kinds = {e.kind: e for e in events}
        if info.status is PluginStatus.LOADED and info.sha256 == result.sha256:
            for kind, verb in (("lifecycle.reload", "reloaded"), ("lifecycle.load", "loaded")):
                if kind in kinds:
                    ms = kinds[kind].details.get("load_ms")
                    took = f"in {ms:.1f} ms" if isinstance(ms, int | float) else ""
                    return Rebuild(build_s, result, None, verb, took, serving)
            return Rebuild(build_s, result, None, "unchanged", "identical to the version serving", serving)
        why = (info.last_error or "refused by the node").removeprefix(f"plugin {name!r}: ")
        return Rebuild(build_s, result, None, "refused", why, serving)

    def serve_previous(self) -> str | None:
        """After a failed first build: serve what ``build/`` holds from an earlier one, if anything.
        Returns the version serving (``None``: nothing)."""
        if not self.project.wasm.is_file():
            return None
        with contextlib.suppress(ManifestError):
            self._apply_policy()
        self.manager.sync(self.project.name)
        return self.serving_version()

    def _apply_policy(self) -> None:
        """Under the dev policy, resolve it for the manifest in ``build/`` (what the manager will load)."""
        if self.policy is not None:
            self.manager.policy = self.policy
            return
        manifest = load_manifest(self.project.build_dir / self.project.manifest.name)
        data_dir = self.manager.data_root / self.project.name
        self.manager.policy = dev_policy(manifest, data_dir, self.pass_env)
        _make_data_dirs(manifest, data_dir)

    def serving_version(self) -> str | None:
        """The version of the plugin serving now (``None``: nothing serves)."""
        try:
            info = self.manager.info(self.project.name)
        except SandbusError:
            return None
        return info.version if info.status.serving else None
