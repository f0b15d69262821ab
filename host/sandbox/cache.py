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

import wasmtime

from sdk.errors import InvalidModuleError

from .engine import EngineHandle

__all__ = ["ModuleCache", "default_cache_dir", "wasm_digest"]


def default_cache_dir() -> Path:
    env = os.environ.get("SANDBUS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sandbus" / "modules"


def wasm_digest(wasm: bytes) -> str:
    return hashlib.sha256(wasm).hexdigest()


class ModuleCache:
    """Compile once, reuse everywhere.

    Parameters:
        directory: where serialized modules live; ``None`` disables the disk layer.
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory
        self._memory: dict[tuple[int, str], wasmtime.Module] = {}
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

    def _path(self, handle: EngineHandle, digest: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{digest}-{handle.fingerprint}.cwasm"

    def load(self, handle: EngineHandle, wasm: bytes, *, name: str | None = None) -> wasmtime.Module:
        """The module for ``wasm``, from memory, disk, or a fresh compile (stored for next time)."""
        digest = wasm_digest(wasm)
        key = (id(handle.engine), digest)
        with self._lock:
            cached = self._memory.get(key)
        if cached is not None:
            self.hits_memory += 1
            return cached
        module = self._load_disk(handle, digest)
        if module is None:
            module = self._compile(handle, wasm, name)
            self._store_disk(handle, digest, module)
        with self._lock:
            self._memory[key] = module
        return module

    def forget(self, wasm: bytes) -> None:
        """Drop in-memory entries for this content (the disk copy stays valid)."""
        digest = wasm_digest(wasm)
        with self._lock:
            for key in [k for k in self._memory if k[1] == digest]:
                del self._memory[key]

    def _compile(self, handle: EngineHandle, wasm: bytes, name: str | None) -> wasmtime.Module:
        self.compiles += 1
        try:
            return wasmtime.Module(handle.engine, wasm)
        except wasmtime.WasmtimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else "unknown error"
            raise InvalidModuleError(
                f"not a valid WebAssembly module ({len(wasm)} bytes): {first}", plugin=name
            ) from e

    def _load_disk(self, handle: EngineHandle, digest: str) -> wasmtime.Module | None:
        if self.directory is None:
            return None
        path = self._path(handle, digest)
        if not path.exists():
            return None
        try:
            module = wasmtime.Module.deserialize_file(handle.engine, str(path))
        except wasmtime.WasmtimeError:
            # Stale or damaged entry (e.g. written by another wasmtime build): recompile over it.
            path.unlink(missing_ok=True)
            return None
        self.hits_disk += 1
        return module

    def _store_disk(self, handle: EngineHandle, digest: str, module: wasmtime.Module) -> None:
        if self.directory is None:
            return
        data = module.serialize()
        # Write then rename, so a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._path(handle, digest))
        except OSError:
            Path(tmp).unlink(missing_ok=True)
