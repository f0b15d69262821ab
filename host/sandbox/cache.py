"""Compiled-module cache: in memory per engine, and on disk keyed by content hash and engine fingerprint.

Deserializing is ~30x faster than compiling (ARCHITECTURE.md, part B), and an
18 MB componentize-py guest takes seconds to compile, so every load goes
through here. The disk cache holds native code that wasmtime loads without
verification: whoever can write an entry runs code in the host. So the cache
trusts a directory only when nobody but this user (and root) can change it:

* the directory is owned by this user and not writable by group or others
  (it is created with mode 0700);
* every directory above it is owned by this user or root and not writable by
  group or others, unless it has the sticky bit (``/tmp``), where others cannot
  rename or remove what is ours;
* every entry, before it is deserialized, is opened without following symlinks
  and must be a regular file owned by this user, not writable by group or
  others; it is deserialized from that open file, not from its path again.

A directory that fails is refused: :class:`~sandbus.sdk.errors.SecurityViolationError`
(a ``PermissionError``) naming the path and what is wrong, with a critical audit
event ``security.cache_untrusted``; nothing in it is used and nothing is written
to it. An entry that fails is not loaded (audited the same way), removed, and
the module is compiled again. No per-host key authenticates entries: a key file
would sit under the same permissions as the entries, so anyone who could forge an
entry could read the key.

Before anything is looked up or compiled, the binary is checked against the
plugin's load bounds (host/sandbox/compiler.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import TypeVar

import wasmtime
from wasmtime.component import Component

from sandbus.host.sandbox.audit import AuditLevel, Auditor
from sandbus.host.sandbox.compiler import check_bounds, compile_bounded
from sandbus.host.sandbox.config import MIB, Limits
from sandbus.host.sandbox.engine import EngineHandle
from sandbus.sdk.errors import InvalidModuleError, SecurityViolationError

__all__ = ["MAX_ENTRY_BYTES", "ModuleCache", "check_private_dir", "default_cache_dir", "is_component",
           "wasm_digest"]

log = logging.getLogger("sandbus.sandbox")

#: A compiled artifact the cache holds: a core module or a component.
Compiled = TypeVar("Compiled", wasmtime.Module, Component)

_MAGIC = b"\0asm"
#: The 4 bytes after the magic: version 1 for core modules, (version 0x0d, layer 1) for components.
_COMPONENT_LAYER = b"\x0d\x00\x01\x00"
#: Compiled code larger than this is kept in memory only (a componentize-py guest is ~40 MB).
MAX_ENTRY_BYTES = 256 * MIB
_UNSAFE_BITS = stat.S_IWGRP | stat.S_IWOTH


def default_cache_dir() -> Path:
    env = os.environ.get("SANDBUS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sandbus" / "modules"


def wasm_digest(wasm: bytes) -> str:
    return hashlib.sha256(wasm).hexdigest()


def is_component(wasm: bytes) -> bool:
    """Whether ``wasm`` is a component-model binary (``\\0asm 0d 00 01 00``) rather than a core module
    (``\\0asm 01 00 00 00``)."""
    return wasm[:4] == _MAGIC and wasm[4:8] == _COMPONENT_LAYER


def _problem(st: os.stat_result, *, euid: int, ancestor: bool) -> str | None:
    """Why a directory with this ``lstat`` may be changed by someone else, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    owners = (euid, 0) if ancestor else (euid,)
    if st.st_uid not in owners:
        return f"is owned by uid {st.st_uid}, not by this user (uid {euid})" + (" or root" if ancestor else "")
    if st.st_mode & _UNSAFE_BITS and not (ancestor and st.st_mode & stat.S_ISVTX):
        who = "group" if st.st_mode & stat.S_IWGRP else "other users"
        return f"is writable by {who} (mode {st.st_mode & 0o7777:04o})"
    return None


def check_private_dir(directory: Path) -> str | None:
    """Why ``directory`` (resolved) is not private to this user, or None when it is.

    The directory itself must be ours; its ancestors ours or root's; none writable by group or others
    except sticky ancestors.
    """
    euid = os.geteuid()
    path = directory
    ancestor = False
    while True:
        try:
            st = os.lstat(path)
        except OSError as e:
            return f"{path}: cannot be checked ({e.strerror})"
        why = _problem(st, euid=euid, ancestor=ancestor)
        if why is not None:
            return f"{path} {why}"
        if path.parent == path:
            return None
        path, ancestor = path.parent, True


class ModuleCache:
    """Compile once, reuse everywhere: core modules and components alike.

    Parameters:
        directory: where serialized modules live; ``None`` disables the disk layer. It must be private to
            this user (see the module docstring), else :class:`SecurityViolationError`.
        auditor: where a refused directory or entry is reported (default: the ``sandbus.audit`` log).
    """

    def __init__(self, directory: Path | None = None, *, auditor: Auditor | None = None) -> None:
        self._auditor = auditor or Auditor()
        self._memory: dict[tuple[int, str], wasmtime.Module | Component] = {}
        self._lock = threading.Lock()
        self.hits_memory = 0
        self.hits_disk = 0
        self.compiles = 0
        self.directory: Path | None = None
        if directory is not None:
            # Everything below goes through the resolved path: a symlink in it cannot be re-pointed later.
            directory = directory.expanduser().resolve()
            self._make_private(directory)
            self._require_private(directory)
            self.directory = directory

    @staticmethod
    def _make_private(directory: Path) -> None:
        """Create missing components with mode 0700 (``mkdir -p`` gives parents the umask's mode).

        A component that cannot be created (``/proc/self/x``, below a file, no permission) is left to
        the check that follows, which refuses the directory as one that "cannot be checked".
        """
        missing = []
        path = directory
        while not os.path.lexists(path) and path.parent != path:
            missing.append(path)
            path = path.parent
        for path in reversed(missing):
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                continue
            except OSError:
                return

    def _refuse(self, message: str, **details: str) -> SecurityViolationError:
        self._auditor.emit(AuditLevel.CRITICAL, "security.cache_untrusted", "-", message, **details)
        return SecurityViolationError(message, **details)

    def _require_private(self, directory: Path) -> None:
        why = check_private_dir(directory)
        if why is not None:
            raise self._refuse(
                f"module cache {directory} refused: {why}. It holds native code that the host runs, so "
                "only this user may be able to change it (chown it to this user and chmod 700, or set "
                "SANDBUS_CACHE_DIR to a private directory)", path=str(directory))

    def _path(self, handle: EngineHandle, digest: str, kind: type[wasmtime.Module | Component]) -> Path:
        assert self.directory is not None
        # Components get their own suffix: a file must never be deserialized as the other kind.
        suffix = "component.cwasm" if kind is Component else "cwasm"
        return self.directory / f"{digest}-{handle.fingerprint}.{suffix}"

    def load(self, handle: EngineHandle, wasm: bytes, *, name: str | None = None,
             limits: Limits | None = None) -> wasmtime.Module:
        """The module for ``wasm``, from memory, disk, or a fresh compile (stored for next time).

        ``limits`` bound the binary before anything else happens (default ``Limits()``):
        :class:`InvalidModuleError` naming the bound when it is over one.
        """
        return self._load(wasmtime.Module, handle, wasm, name, limits or Limits())

    def load_component(self, handle: EngineHandle, wasm: bytes, *, name: str | None = None,
                       limits: Limits | None = None) -> Component:
        """The component for ``wasm``, like :meth:`load`. A componentize-py guest takes seconds to compile
        and a fraction of a second to deserialize, which is why components go through the cache too."""
        return self._load(Component, handle, wasm, name, limits or Limits())

    def _load(self, kind: type[Compiled], handle: EngineHandle, wasm: bytes, name: str | None,
              limits: Limits) -> Compiled:
        if kind is wasmtime.Module and is_component(wasm):
            raise InvalidModuleError(f"this is a WebAssembly component ({len(wasm)} bytes), not a core module "
                                     "(ModuleCache.load_component loads components)", plugin=name)
        facts = check_bounds(wasm, limits, name)
        digest = wasm_digest(wasm)
        key = (id(handle.engine), digest)
        with self._lock:
            cached = self._memory.get(key)
        if isinstance(cached, kind):
            self.hits_memory += 1
            return cached
        compiled = self._load_disk(kind, handle, digest)
        if compiled is None:
            self.compiles += 1
            compiled = compile_bounded(kind, handle, wasm, limits, name, facts)
            self._store_disk(handle, digest, compiled)
        with self._lock:
            self._memory[key] = compiled
        return compiled

    def forget(self, wasm: bytes) -> None:
        """Drop in-memory entries for this content (the disk copy stays valid)."""
        digest = wasm_digest(wasm)
        with self._lock:
            for key in [k for k in self._memory if k[1] == digest]:
                del self._memory[key]

    def _load_disk(self, kind: type[Compiled], handle: EngineHandle, digest: str) -> Compiled | None:
        if self.directory is None:
            return None
        path = self._path(handle, digest, kind)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:  # ELOOP: a symlink planted as an entry
            self._drop_entry(path, f"cannot be opened safely ({e.strerror})")
            return None
        try:
            # Checked on the open file, and the directory again: what we read is what we checked.
            st = os.fstat(fd)
            why = None
            if not stat.S_ISREG(st.st_mode):
                why = "is not a regular file"
            elif st.st_uid != os.geteuid():
                why = f"is owned by uid {st.st_uid}, not by this user"
            elif st.st_mode & _UNSAFE_BITS:
                why = f"is writable by group or other users (mode {st.st_mode & 0o7777:04o})"
            if why is not None:
                self._drop_entry(path, why)
                return None
            self._require_private(self.directory)
            try:
                # Through /proc, wasmtime maps this very file (no second lookup of the name).
                compiled = kind.deserialize_file(handle.engine, f"/proc/self/fd/{fd}")
            except wasmtime.WasmtimeError:
                # Stale or damaged entry (e.g. written by another wasmtime build): recompile over it.
                path.unlink(missing_ok=True)
                return None
        finally:
            os.close(fd)
        self.hits_disk += 1
        return compiled

    def _drop_entry(self, path: Path, why: str) -> None:
        message = f"module cache entry {path} refused: it {why}; compiling instead"
        self._auditor.emit(AuditLevel.CRITICAL, "security.cache_untrusted", "-", message, path=str(path))
        try:
            path.unlink()
        except OSError as e:
            log.warning("could not remove the refused cache entry %s: %s", path, e.strerror)

    def _store_disk(self, handle: EngineHandle, digest: str, compiled: wasmtime.Module | Component) -> None:
        if self.directory is None:
            return
        data = compiled.serialize()
        if len(data) > MAX_ENTRY_BYTES:
            log.warning("compiled code of %d bytes is not written to the module cache (limit %d)",
                        len(data), MAX_ENTRY_BYTES)
            return
        self._require_private(self.directory)
        # Write then rename, so a concurrent reader never sees half a file (mkstemp: mode 0600). A cache
        # that cannot be written (read-only, full) costs a compile next time, never the load.
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        except OSError as e:
            log.warning("the module cache %s cannot be written: %s", self.directory, e.strerror)
            return
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(handle, digest, type(compiled)))
        except OSError as e:
            log.warning("the module cache %s cannot be written: %s", self.directory, e.strerror)
            Path(tmp).unlink(missing_ok=True)
