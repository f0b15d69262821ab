"""Compiled-module cache: in memory per engine, and on disk keyed by content hash and engine fingerprint.

Deserializing is ~30x faster than compiling (ARCHITECTURE.md, part B), and an
18 MB componentize-py guest takes seconds to compile, so every load goes
through here. The disk cache holds native code that wasmtime loads without
verification: it must live in a directory only this user can write, which is
why we create it with mode 0700 and refuse a directory writable by others.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
from pathlib import Path
from typing import TypeVar

import wasmtime
from wasmtime.component import Component

from sdk.errors import InvalidModuleError

from .engine import EngineHandle

__all__ = ["ModuleCache", "default_cache_dir", "is_component", "wasm_digest"]

#: A compiled artifact the cache holds: a core module or a component.
Compiled = TypeVar("Compiled", wasmtime.Module, Component)

_MAGIC = b"\0asm"
#: The 4 bytes after the magic: version 1 for core modules, (version 0x0d, layer 1) for components.
_COMPONENT_LAYER = b"\x0d\x00\x01\x00"


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


class ModuleCache:
    """Compile once, reuse everywhere: core modules and components alike.

    Parameters:
        directory: where serialized modules live; ``None`` disables the disk layer.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._memory: dict[tuple[int, str], wasmtime.Module | Component] = {}
        self._lock = threading.Lock()
        self.hits_memory = 0
        self.hits_disk = 0
        self.compiles = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            mode = directory.stat().st_mode
            if mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise PermissionError(
                    f"module cache {directory} is writable by other users; "
                    "it holds native code, so it must be private (chmod 700)"
                )

    def _path(self, handle: EngineHandle, digest: str, kind: type[wasmtime.Module | Component]) -> Path:
        assert self.directory is not None
        # Components get their own suffix: a file must never be deserialized as the other kind.
        suffix = "component.cwasm" if kind is Component else "cwasm"
        return self.directory / f"{digest}-{handle.fingerprint}.{suffix}"

    def load(self, handle: EngineHandle, wasm: bytes, *, name: str | None = None) -> wasmtime.Module:
        """The module for ``wasm``, from memory, disk, or a fresh compile (stored for next time)."""
        return self._load(wasmtime.Module, handle, wasm, name)

    def load_component(self, handle: EngineHandle, wasm: bytes, *, name: str | None = None) -> Component:
        """The component for ``wasm``, like :meth:`load`. A componentize-py guest takes seconds to compile
        and a fraction of a second to deserialize, which is why components go through the cache too."""
        return self._load(Component, handle, wasm, name)

    def _load(self, kind: type[Compiled], handle: EngineHandle, wasm: bytes, name: str | None) -> Compiled:
        digest = wasm_digest(wasm)
        key = (id(handle.engine), digest)
        with self._lock:
            cached = self._memory.get(key)
        if isinstance(cached, kind):
            self.hits_memory += 1
            return cached
        compiled = self._load_disk(kind, handle, digest)
        if compiled is None:
            compiled = self._compile(kind, handle, wasm, name)
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

    def _compile(self, kind: type[Compiled], handle: EngineHandle, wasm: bytes, name: str | None) -> Compiled:
        if kind is wasmtime.Module and is_component(wasm):
            raise InvalidModuleError(f"this is a WebAssembly component ({len(wasm)} bytes), not a core module "
                                     "(ModuleCache.load_component loads components)", plugin=name)
        self.compiles += 1
        try:
            return kind(handle.engine, wasm)
        except wasmtime.WasmtimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unknown error"
            what = "component" if kind is Component else "module"
            raise InvalidModuleError(
                f"not a valid WebAssembly {what} ({len(wasm)} bytes): {first}", plugin=name
            ) from e

    def _load_disk(self, kind: type[Compiled], handle: EngineHandle, digest: str) -> Compiled | None:
        if self.directory is None:
            return None
        path = self._path(handle, digest, kind)
        if not path.exists():
            return None
        try:
            compiled = kind.deserialize_file(handle.engine, str(path))
        except wasmtime.WasmtimeError:
            # Stale or damaged entry (e.g. written by another wasmtime build): recompile over it.
            path.unlink(missing_ok=True)
            return None
        self.hits_disk += 1
        return compiled

    def _store_disk(self, handle: EngineHandle, digest: str, compiled: wasmtime.Module | Component) -> None:
        if self.directory is None:
            return
        data = compiled.serialize()
        # Write then rename, so a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(handle, digest, type(compiled)))
        except OSError:
            Path(tmp).unlink(missing_ok=True)
