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

What the host checks of a component's exports and imports at load (``inspect_component``, a few
milliseconds for a componentize-py guest) is kept beside its compiled code too (``.info.json``), valid
for that compiled code and the exact host source that checked it (host/sandbox/component.py, hashed).

A module is hashed once per load: callers that already know its digest hand a
:class:`ModuleSource` instead of bytes. A plugin directory's loader also knows it
without hashing, from the :class:`~sandbus.host.sandbox.filememo.FileMemo` kept in
the same directory (``memo``), and then reads the file only when its compiled code
is not in the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
import wasmtime
from wasmtime.component import Component

from sandbus.host.sandbox.audit import AuditLevel, Auditor
from sandbus.host.sandbox.cachefile import UNSAFE_BITS, open_private, read_private, write_then_rename
from sandbus.host.sandbox.compiler import (
    IN_PROCESS_BELOW,
    IN_PROCESS_FUNCTIONS,
    check_bounds,
    check_facts,
    compile_bounded,
)
from sandbus.host.sandbox.config import MIB, Limits
from sandbus.host.sandbox.engine import EngineHandle
from sandbus.host.sandbox.filememo import FileMemo
from sandbus.host.sandbox.wasmscan import WasmFacts
from sandbus.sdk.errors import InvalidModuleError, SandboxError, SecurityViolationError

if TYPE_CHECKING:
    from sandbus.host.sandbox.component import ComponentInfo

__all__ = ["MAX_ENTRY_BYTES", "ModuleCache", "ModuleSource", "check_private_dir", "default_cache_dir",
           "is_component", "wasm_digest"]

log = logging.getLogger("sandbus.sandbox")

#: A compiled artifact the cache holds: a core module or a component.
Compiled = TypeVar("Compiled", wasmtime.Module, Component)

_MAGIC = b"\0asm"
#: The 4 bytes after the magic: version 1 for core modules, (version 0x0d, layer 1) for components.
_COMPONENT_LAYER = b"\x0d\x00\x01\x00"
#: Compiled code larger than this is kept in memory only (a componentize-py guest is ~40 MB).
MAX_ENTRY_BYTES = 256 * MIB


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


@dataclass(frozen=True, eq=False)
class ModuleSource:
    """A module whose sha256 is known: its bytes, or (a file whose digest the memo knows) how to read them.

    Parameters:
        digest: sha256 of the bytes, hex.
        data: the bytes, when they were read (or came from memory).
        facts: what the headers say (:func:`~sandbus.host.sandbox.wasmscan.scan_wasm`), when known: a
            source without ``data`` must have them, since bounds are checked on them.
        reader: reads the bytes again, when ``data`` is not held; what it returns is hashed and must
            match ``digest`` (else :class:`SandboxError`: the file changed under the load).
    """

    digest: str
    data: bytes | None = None
    facts: WasmFacts | None = None
    reader: Callable[[], bytes] | None = None

    def __post_init__(self) -> None:
        if self.data is None and (self.reader is None or self.facts is None):
            raise ValueError("a ModuleSource without data needs a reader and the header facts")

    @classmethod
    def of(cls, wasm: bytes) -> ModuleSource:
        """The source of bytes in hand: hashed here, once."""
        return cls(wasm_digest(wasm), wasm)

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.facts.size if self.facts is not None else 0

    @property
    def component(self) -> bool:
        if self.data is not None:
            return is_component(self.data)
        assert self.facts is not None
        return self.facts.component

    def read(self) -> bytes:
        """The bytes: held, or read again and checked against the digest."""
        if self.data is not None:
            return self.data
        assert self.reader is not None
        data = self.reader()
        if wasm_digest(data) != self.digest:
            raise SandboxError("the module file changed while it was loading; the next change event loads it "
                               "again", digest=self.digest)
        return data


def _problem(st: os.stat_result, *, euid: int, ancestor: bool) -> str | None:
    """Why a directory with this ``lstat`` may be changed by someone else, or None."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    owners = (euid, 0) if ancestor else (euid,)
    if st.st_uid not in owners:
        return f"is owned by uid {st.st_uid}, not by this user (uid {euid})" + (" or root" if ancestor else "")
    if st.st_mode & UNSAFE_BITS and not (ancestor and st.st_mode & stat.S_ISVTX):
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
        memo: keep module files' digests by file identity (:attr:`memo`, host/sandbox/filememo.py says
            why that is sound and where it is not); default on unless ``SANDBUS_FILE_MEMO=0``.
    """

    def __init__(self, directory: Path | None = None, *, auditor: Auditor | None = None,
                 memo: bool | None = None) -> None:
        self._auditor = auditor or Auditor()
        self._memory: dict[tuple[int, str], wasmtime.Module | Component] = {}
        self._infos: dict[tuple[int, str], ComponentInfo] = {}
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
        if memo is None:
            memo = os.environ.get("SANDBUS_FILE_MEMO", "1") != "0"
        #: digests of plugin files by identity (None: off), beside the compiled code
        self.memo: FileMemo | None = FileMemo(self.directory) if memo else None

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

    def load(self, handle: EngineHandle, wasm: bytes | ModuleSource, *, name: str | None = None,
             limits: Limits | None = None) -> wasmtime.Module:
        """The module for ``wasm``, from memory, disk, or a fresh compile (stored for next time).

        ``limits`` bound the binary before anything else happens (default ``Limits()``):
        :class:`InvalidModuleError` naming the bound when it is over one.
        """
        return self._load(wasmtime.Module, handle, wasm, name, limits or Limits())

    def load_component(self, handle: EngineHandle, wasm: bytes | ModuleSource, *, name: str | None = None,
                       limits: Limits | None = None) -> Component:
        """The component for ``wasm``, like :meth:`load`. A componentize-py guest takes seconds to compile
        and a fraction of a second to deserialize, which is why components go through the cache too."""
        return self._load(Component, handle, wasm, name, limits or Limits())

    def _load(self, kind: type[Compiled], handle: EngineHandle, wasm: bytes | ModuleSource, name: str | None,
              limits: Limits) -> Compiled:
        source = wasm if isinstance(wasm, ModuleSource) else ModuleSource.of(wasm)
        if kind is wasmtime.Module and source.component:
            raise InvalidModuleError(f"this is a WebAssembly component ({source.size} bytes), not a core module "
                                     "(ModuleCache.load_component loads components)", plugin=name)
        if source.facts is not None:
            facts = check_facts(source.facts, limits, name)
        else:
            facts = check_bounds(source.read(), limits, name)
        digest = source.digest
        key = (id(handle.engine), digest)
        with self._lock:
            cached = self._memory.get(key)
        if isinstance(cached, kind):
            self.hits_memory += 1
            return cached
        compiled = self._load_disk(kind, handle, digest)
        if compiled is None:
            self.compiles += 1
            compiled = compile_bounded(kind, handle, source.read(), limits, name, facts)
            self._store_disk(handle, digest, compiled)
        with self._lock:
            self._memory[key] = compiled
        return compiled

    def needs_slow_compile(self, handle: EngineHandle, source: ModuleSource, limits: Limits) -> bool:
        """Whether loading ``source`` would compile it in the compile worker (seconds for a large module):
        it is over the in-process thresholds and its compiled code is neither in memory nor on disk.
        A binary over its bounds is not slow: it is refused at once."""
        try:
            facts = source.facts or check_bounds(source.read(), limits, None)
            check_facts(facts, limits, None)
        except InvalidModuleError:
            return False
        if facts.size < IN_PROCESS_BELOW and facts.functions <= IN_PROCESS_FUNCTIONS:
            return False
        kind: type[wasmtime.Module | Component] = Component if source.component else wasmtime.Module
        with self._lock:
            if isinstance(self._memory.get((id(handle.engine), source.digest)), kind):
                return False
        return self.directory is None or not self._path(handle, source.digest, kind).exists()

    def component_info(self, handle: EngineHandle, digest: str, component: Component, name: str) -> ComponentInfo:
        """What :func:`~sandbus.host.sandbox.component.inspect_component` says of this component: kept in
        memory and on disk beside its compiled code, so a warm load does not inspect it again. A refusal
        is never kept (it is raised, as ``inspect_component`` raises it)."""
        from sandbus.host.sandbox.component import inspect_component

        key = (id(handle.engine), digest)
        with self._lock:
            info = self._infos.get(key)
        if info is None:
            info = self._load_info(handle, digest)
            if info is None:
                info = inspect_component(component, handle, name)
                self._store_info(handle, digest, info)
            with self._lock:
                self._infos[key] = info
        return info

    def _info_path(self, handle: EngineHandle, digest: str) -> Path:
        return self._path(handle, digest, Component).with_suffix(".info.json")

    def _load_info(self, handle: EngineHandle, digest: str) -> ComponentInfo | None:
        if self.directory is None:
            return None
        path = self._info_path(handle, digest)
        raw, why = read_private(path, _MAX_INFO_BYTES)
        if why is not None:
            self._drop_entry(path, why)
        return None if raw is None else _parse_info(raw)

    def _store_info(self, handle: EngineHandle, digest: str, info: ComponentInfo) -> None:
        if self.directory is None:
            return
        from dataclasses import asdict

        data = orjson.dumps({"checker": _checker_digest(), "info": asdict(info)})
        write_then_rename(self.directory, self._info_path(handle, digest), data, f"the module cache {self.directory}")

    def forget(self, wasm: bytes) -> None:
        """Drop in-memory entries for this content (the disk copy stays valid)."""
        self.forget_digest(wasm_digest(wasm))

    def forget_digest(self, digest: str) -> None:
        """Drop in-memory entries for the content of this sha256 (the disk copy stays valid)."""
        with self._lock:
            for key in [k for k in self._memory if k[1] == digest]:
                del self._memory[key]
            for key in [k for k in self._infos if k[1] == digest]:
                del self._infos[key]

    def _load_disk(self, kind: type[Compiled], handle: EngineHandle, digest: str) -> Compiled | None:
        if self.directory is None:
            return None
        path = self._path(handle, digest, kind)
        # Checked on the open file, and the directory again: what we read is what we checked.
        fd, why = open_private(path)
        if fd is None:
            if why is not None:
                self._drop_entry(path, why)
            return None
        try:
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
        # A cache that cannot be written (read-only, full) costs a compile next time, never the load.
        write_then_rename(self.directory, self._path(handle, digest, type(compiled)), data,
                          f"the module cache {self.directory}")


_MAX_INFO_BYTES = 256 * 1024
_checker: str | None = None


def _checker_digest() -> str:
    """sha256 of the source that inspects components: a stored result is valid only for the code that made it."""
    global _checker
    if _checker is None:
        from sandbus.host.sandbox import component

        _checker = hashlib.sha256(Path(component.__file__).read_bytes()).hexdigest()
    return _checker


def _strings(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return None
    return tuple(value)


def _parse_info(raw: bytes) -> ComponentInfo | None:
    """A stored :class:`ComponentInfo`, or None when it is not one (damaged, or made by other code)."""
    from sandbus.host.sandbox.component import ComponentInfo

    if len(raw) > _MAX_INFO_BYTES:
        return None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("checker") != _checker_digest() or not isinstance(data.get("info"), dict):
        return None
    info = data["info"]
    host, wasi = _strings(info.get("host_functions")), _strings(info.get("wasi_imports"))
    guarded_raw = info.get("guarded_wasi")
    flags = [info.get(k) for k in ("has_init", "has_health", "returns_result")]
    if host is None or wasi is None or not isinstance(guarded_raw, list) or not all(type(f) is bool for f in flags):
        return None
    guarded = []
    for item in guarded_raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
            return None
        funcs = _strings(item[1])
        if funcs is None:
            return None
        guarded.append((item[0], funcs))
    if set(info) != {"host_functions", "wasi_imports", "guarded_wasi", "has_init", "has_health", "returns_result"}:
        return None  # ComponentInfo changed shape; the checker digest normally says so first
    return ComponentInfo(host, wasi, tuple(guarded), bool(flags[0]), bool(flags[1]), bool(flags[2]))
