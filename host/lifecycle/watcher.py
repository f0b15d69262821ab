"""Hot reload: watch the plugin directory and :meth:`PluginManager.sync` each plugin that changed.

What the file system says, and what it means (watchdog 7.1, facts in ARCHITECTURE.md part B):

* ``modified``: someone is writing a file through an open descriptor. It may be half-written: we
  wait until the writer *closes* it (``closed``, inotify's IN_CLOSE_WRITE, Linux only) and the directory has
  been quiet for ``debounce_s``. Where no close events exist, the quiet period alone decides.
  Should a writer keep a file open past ``max_wait_s``, we try anyway: a truncated module does
  not compile, so it is refused and the old version keeps serving until the writer finishes
  (its close brings the next attempt).
* ``created``: a new file (or one moved in from another directory, which inotify reports as
  ``created`` and never closes here): synced after the quiet period.
* ``moved`` onto ``x.wasm`` / ``x.toml``: an atomic replace (``os.replace``, editors' saves). The
  file is complete; it is an update of ``x``. A ``moved`` away from a plugin file is a deletion.
* ``deleted``: the plugin is unloaded once running calls finish.

Events are keyed by plugin name (file stem), so a ``.wasm`` and its ``.toml`` landing together
give one reload. We filter by suffix ourselves instead of using pattern handlers: watchdog's
patterns full-match absolute paths, and its ignore policy can drop the ``moved`` of an atomic save.
Our own reads of the files raise ``opened`` / ``closed_no_write`` events, which are ignored.
"""

from __future__ import annotations

import logging
import os
import threading
import time
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

from sandbus.host.lifecycle.loader import plugin_stem

if TYPE_CHECKING:
    from sandbus.host.lifecycle.manager import PluginManager

__all__ = ["PluginWatcher"]

log = logging.getLogger("sandbus.manager.watcher")


def _emits_close_events(observer: BaseObserver) -> bool:
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux
        return False
    return isinstance(observer, InotifyObserver)


@dataclass
class _Pending:
    """A plugin with changes not yet acted on."""

    due: float
    first: float
    writing: set[str] = field(default_factory=set)


class PluginWatcher:
    """Watches a manager's directory and syncs changed plugins, debounced. Start/stop, or use ``with``.

    Parameters:
        manager: whose directory to watch and whose :meth:`~PluginManager.sync` to call.
        debounce_s: quiet period after the last event of a plugin before it is synced.
        max_wait_s: longest a change waits for a writer to close its file.
    """

    def __init__(self, manager: PluginManager, *, debounce_s: float = 0.1, max_wait_s: float = 2.0) -> None:
        if debounce_s < 0 or max_wait_s <= 0:
            raise ValueError("debounce_s must be >= 0 and max_wait_s > 0")
        self.manager = manager
        self.directory = Path(os.path.realpath(manager.directory))
        self.debounce_s = debounce_s
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._stopping = False
        self._observer: BaseObserver | None = None
        self._worker: threading.Thread | None = None
        self._track_writes = False
        #: How many syncs ran, and how many times a due plugin was held back by a file still open.
        self.syncs = 0
        self.deferred = 0

    # -- life --------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._observer is not None:
            return
        observer = Observer()
        self._track_writes = _emits_close_events(observer)
        observer.schedule(_Handler(self), str(self.directory), recursive=False)
        self._worker = threading.Thread(target=self._run, name=f"sandbus-watch:{self.directory.name}", daemon=True)
        self._worker.start()
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        """Stop observing and wait for a sync in progress to finish."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join()
            self._worker = None

    @property
    def running(self) -> bool:
        return self._observer is not None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pending(self) -> list[str]:
        """Plugins with changes waiting for their quiet period (or for a writer to close)."""
        with self._cond:
            return sorted(self._pending)

    # -- events ------------------------------------------------------------------------------------

    def _plugin_of(self, path: str | bytes) -> str | None:
        p = Path(os.fsdecode(path))
        if p.parent != self.directory:  # the watch is not recursive; this is belt and braces
            return None
        return plugin_stem(p.name)  # the rule scan_directory applies: the same files are plugins

    def note(self, event: FileSystemEvent) -> None:
        """Record one file-system event (called on the observer's thread)."""
        if event.is_directory:
            return
        kind = event.event_type
        now = time.monotonic()
        touched: list[tuple[str, str, bool | None]] = []  # (plugin, path, writing?) None: no change
        if kind == EVENT_TYPE_MOVED:
            src, dest = self._plugin_of(event.src_path), self._plugin_of(event.dest_path)
            if src is not None:
                touched.append((src, os.fsdecode(event.src_path), False))
            if dest is not None:
                touched.append((dest, os.fsdecode(event.dest_path), False))
        elif kind == EVENT_TYPE_MODIFIED:
            # Data was written through an open descriptor: its close will follow.
            name = self._plugin_of(event.src_path)
            if name is not None:
                touched.append((name, os.fsdecode(event.src_path), self._track_writes))
        elif kind in (EVENT_TYPE_CREATED, EVENT_TYPE_CLOSED, EVENT_TYPE_DELETED):
            # ``created`` alone does not mean "being written": a file moved in from another
            # directory arrives as ``created`` and is never closed here.
            name = self._plugin_of(event.src_path)
            if name is not None:
                touched.append((name, os.fsdecode(event.src_path), False))
        else:
            return  # opened, closed_no_write, attrib: nothing changed
        if not touched:
            return
        with self._cond:
            for name, path, writing in touched:
                pending = self._pending.get(name)
                if pending is None:
                    pending = self._pending[name] = _Pending(due=now, first=now)
                pending.due = now + self.debounce_s
                if writing:
                    pending.writing.add(path)
                else:
                    pending.writing.discard(path)
            self._cond.notify_all()

    # -- the worker --------------------------------------------------------------------------------

    def _next_ready(self) -> list[str] | None:
        """Wait for plugins whose change has settled; ``None`` when stopping."""
        with self._cond:
            while not self._stopping:
                now = time.monotonic()
                ready: list[str] = []
                wake = now + 3600.0
                for name, p in self._pending.items():
                    if p.due <= now and (not p.writing or now - p.first >= self.max_wait_s):
                        ready.append(name)
                        continue
                    if p.due <= now:  # quiet, but a writer still holds a file open
                        self.deferred += 1
                        wake = min(wake, p.first + self.max_wait_s)
                    else:
                        wake = min(wake, p.due)
                if ready:
                    for name in ready:
                        del self._pending[name]
                    return sorted(ready)
                # Woken by new events too; a deferred plugin is re-examined after every event.
                self._cond.wait(max(0.0, wake - now))
            return None

    def _run(self) -> None:
        while True:
            ready = self._next_ready()
            if ready is None:
                return
            for name in ready:
                try:
                    self.manager.sync(name)
                except Exception:  # a watcher that dies silently would be worse than any one error
                    log.exception("hot reload of plugin %s failed", name)
                finally:
                    with self._cond:
                        self.syncs += 1
                        self._cond.notify_all()


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: PluginWatcher) -> None:
        super().__init__()
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._watcher.note(event)
