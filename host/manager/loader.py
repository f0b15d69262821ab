"""Turning the files of one plugin into a ready-to-serve version, or into an error that says why not.

A plugin is ``<name>.wasm`` plus ``<name>.toml`` in the plugin directory. Both files are read
*once* into memory; the manifest is validated, the sha256 checked, the policy applied and the
module compiled from those same bytes, so a file that changes halfway through a load can never
give a version whose manifest and module disagree. The fingerprint of the bytes tells the
manager later whether anything on disk changed.

Nothing here touches the manager's tables: :func:`build_version` either returns a complete,
initialised :class:`PluginVersion` or raises, which is what lets a reload build the new version
entirely before it replaces the old one.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from host.manifest import Manifest, load_manifest, parse_manifest
from host.policy import Grant
from host.sandbox import Auditor, HostFunctions, ModuleCache, Sandbox
from sdk.errors import ManifestError, PluginInitError, PluginNotFoundError, SandboxError, SandbusError

__all__ = [
    "RUNTIME_VERSION",
    "Fingerprint",
    "PluginFiles",
    "PluginVersion",
    "build_version",
    "check_plugin_name",
    "parse_files",
    "read_plugin_files",
    "scan_directory",
]

log = logging.getLogger("sandbus.manager")


def _runtime_version() -> str:
    try:
        return importlib.metadata.version("sandbus")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0.1.0"


#: The version of this runtime, checked against ``[plugin] min_runtime_version``.
RUNTIME_VERSION = _runtime_version()

WASM_SUFFIX = ".wasm"
MANIFEST_SUFFIX = ".toml"


def check_plugin_name(name: str) -> str:
    """Refuse names that are not a plain file stem (``../x``, ``a/b``, ``.hidden``, NUL...).

    Only the shape of a *file name* is checked here; whether it is a valid plugin name is the
    manifest's job (it must match the stem), so a badly named file is still reported with a reason.

    Raises:
        PluginNotFoundError: the name could not be a plugin in the directory.
    """
    if not name or name.startswith(".") or any(c in name for c in "/\\\x00"):
        raise PluginNotFoundError(f"{name!r} is not a plugin name (a file stem in the plugin directory)",
                                  plugin=name)
    return name


def scan_directory(directory: Path) -> list[str]:
    """Plugin names present in ``directory``: stems of ``*.wasm`` and ``*.toml`` files, sorted.

    A manifest without a module (or the reverse) is listed too, so it can be reported as broken
    rather than silently ignored. Hidden files (editor and copy temporaries) are skipped.
    """
    names: set[str] = set()
    with os.scandir(directory) as entries:
        for entry in entries:
            stem, dot, suffix = entry.name.rpartition(".")
            if not dot or not stem or stem.startswith(".") or f".{suffix}" not in (WASM_SUFFIX, MANIFEST_SUFFIX):
                continue
            if entry.is_file():
                names.add(stem)
    return sorted(names)


class Fingerprint(NamedTuple):
    """sha256 of the module and of the manifest bytes (``None`` for a missing file)."""

    wasm: str | None
    manifest: str | None


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class PluginFiles:
    """The bytes of one plugin's two files, read once (``None``: the file is absent)."""

    name: str
    wasm_path: Path
    manifest_path: Path
    wasm: bytes | None
    manifest: bytes | None

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(_sha256(self.wasm), _sha256(self.manifest))

    @property
    def absent(self) -> bool:
        return self.wasm is None and self.manifest is None


def read_plugin_files(directory: Path, name: str) -> PluginFiles:
    """Read ``<name>.wasm`` and ``<name>.toml`` from ``directory``.

    Raises:
        PluginNotFoundError: ``name`` is not a plain file stem.
        SandboxError: a file exists but cannot be read (permissions, a directory in its place).
    """
    check_plugin_name(name)
    wasm_path, manifest_path = directory / f"{name}{WASM_SUFFIX}", directory / f"{name}{MANIFEST_SUFFIX}"
    try:
        return PluginFiles(name, wasm_path, manifest_path, _read(wasm_path), _read(manifest_path))
    except OSError as e:
        raise SandboxError(f"cannot read {e.filename}: {e.strerror}", plugin=name, path=e.filename) from e


def parse_files(files: PluginFiles, runtime_version: str = RUNTIME_VERSION) -> Manifest:
    """Validate the manifest of ``files`` (the bytes already read) and that there is a module.

    Raises:
        ManifestError: missing, unparsable or invalid manifest, a name that disagrees with the file,
            or a ``min_runtime_version`` above ``runtime_version``.
        PluginNotFoundError: the manifest is there but the module is not.
    """
    source = str(files.manifest_path)
    if files.manifest is None:
        return load_manifest(files.manifest_path, expected_name=files.name)  # raises "manifest missing"
    try:
        text = files.manifest.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ManifestError(f"not valid TOML: the file is not UTF-8 ({e.reason} at byte {e.start})",
                            path=source, plugin=files.name) from e
    manifest = parse_manifest(text, source=source, expected_name=files.name)
    if not manifest.runtime_compatible(runtime_version):
        raise ManifestError(
            f"requires sandbus runtime >= {manifest.plugin.min_runtime_version}, this runtime is {runtime_version}",
            path=source, key="plugin.min_runtime_version", plugin=manifest.name,
            required=manifest.plugin.min_runtime_version, available=runtime_version,
        )
    if files.wasm is None:
        raise PluginNotFoundError(
            f"module missing: expected {files.name}{WASM_SUFFIX} beside {files.name}{MANIFEST_SUFFIX}",
            plugin=files.name, path=str(files.wasm_path),
        )
    return manifest


@dataclass(eq=False)
class PluginVersion:
    """One loaded version of a plugin: its sandbox and what it was built from.

    The manager counts the calls running on it (``in_flight``) and, once it is replaced or
    unloaded (``retired``), closes the sandbox when the last of them ends: in-flight calls finish
    on the version they started on, and every instance gets its ``sandbus_shutdown``.
    """

    name: str
    manifest: Manifest
    grant: Grant
    sandbox: Sandbox
    wasm: bytes
    fingerprint: Fingerprint
    path: Path
    skipped_optional: tuple[str, ...] = ()
    initial_memory_bytes: int = 0
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    in_flight: int = 0
    retired: bool = False
    closed: threading.Event = field(default_factory=threading.Event)

    @property
    def version(self) -> str:
        return self.manifest.plugin.version

    @property
    def sha256(self) -> str:
        return self.sandbox.digest


def build_version(
    files: PluginFiles,
    manifest: Manifest,
    grant: Grant,
    *,
    auditor: Auditor,
    cache: ModuleCache,
    host_functions: HostFunctions | None = None,
    skipped_optional: tuple[str, ...] = (),
) -> PluginVersion:
    """Compile (through ``cache``), instantiate, ``init`` and health-check one version.

    The plugin's ``sandbus_init`` receives the manifest's ``[config]`` table; its environment is
    what the grant allows. A plugin whose ``sandbus_health`` fails right after init is refused:
    it would only fail its first calls.

    Raises:
        SecurityViolationError: the module does not match the manifest's ``sha256``.
        InvalidModuleError / AbiViolationError: not valid wasm (e.g. truncated) or not our ABI.
        PluginInitError: ``sandbus_init`` or the first ``sandbus_health`` failed.
        ResourceLimitError: a limit held during start-up.
    """
    assert files.wasm is not None
    manifest.verify_wasm(files.wasm)
    try:
        sandbox = Sandbox(files.wasm, name=manifest.name, limits=grant.limits, capabilities=grant.capabilities,
                          host_functions=host_functions, auditor=auditor, config=manifest.config, cache=cache)
    except SandbusError:
        raise
    except Exception as e:  # a bug below us must not take the node down with this one plugin
        log.exception("unexpected error loading plugin %s", manifest.name)
        raise SandboxError(f"unexpected error while loading: {type(e).__name__}: {e}", plugin=manifest.name) from e
    try:
        healthy = sandbox.health()
    except SandbusError:
        sandbox.close()
        raise
    if not healthy:
        sandbox.close()
        raise PluginInitError("sandbus_health reported failure right after init", plugin=manifest.name)
    return PluginVersion(name=manifest.name, manifest=manifest, grant=grant, sandbox=sandbox, wasm=files.wasm,
                         fingerprint=files.fingerprint, path=files.wasm_path, skipped_optional=skipped_optional,
                         initial_memory_bytes=sandbox.initial_memory_bytes)
