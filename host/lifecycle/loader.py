"""Turning the files of one plugin into a ready-to-serve version, or into an error that says why not.

A plugin is ``<name>.wasm`` plus ``<name>.toml`` in the plugin directory. Both files are read
*once* into memory; the manifest is validated, the sha256 checked, the policy applied and the
module compiled from those same bytes, so a file that changes halfway through a load can never
give a version whose manifest and module disagree. The fingerprint of the bytes tells the
manager later whether anything on disk changed.

One exception keeps a warm load of a large module fast: when the module cache's digest memo
(host/sandbox/filememo.py) knows the file's identity, the module is not read at all -- its digest and
headers are the memo's, and its compiled code comes from the cache. Only if the code must be compiled
is the file read, and then its bytes must hash to that digest, or the load fails (the file changed).

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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, NamedTuple

from sandbus.host.lifecycle.manifest import (
    MAX_TOML_BYTES,
    Manifest,
    load_manifest,
    open_regular,
    parse_manifest,
    read_capped,
    read_fd_capped,
)
from sandbus.host.lifecycle.policy import Grant
from sandbus.host.sandbox import AuditLevel, Auditor, HostFunctions, Limits, ModuleCache, Sandbox
from sandbus.host.sandbox.cache import ModuleSource
from sandbus.host.sandbox.compiler import MAX_SECTIONS
from sandbus.host.sandbox.filememo import FileIdentity, FileMemo, MemoEntry
from sandbus.host.sandbox.record import TrapRecorder
from sandbus.host.sandbox.wasmscan import MalformedWasm, scan_wasm
from sandbus.sdk.envelope import is_json_type
from sandbus.sdk.errors import (
    InvalidModuleError,
    ManifestError,
    PluginInitError,
    PluginNotFoundError,
    SandboxError,
    SandbusError,
    SecurityViolationError,
)

__all__ = [
    "EXTISM_MESSAGE_FUNCTION",
    "MAX_MODULE_FILE_BYTES",
    "RUNTIME_VERSION",
    "Fingerprint",
    "PluginFiles",
    "PluginVersion",
    "body_of",
    "build_version",
    "check_body",
    "check_plugin_name",
    "parse_files",
    "plugin_stem",
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
    if not name or name.startswith(".") or any(c in name for c in "/\\\x00") or not _utf8(name):
        raise PluginNotFoundError(f"{name!r} is not a plugin name (a file stem in the plugin directory)",
                                  plugin=name)
    return name


def _utf8(name: str) -> bool:
    """Whether ``name`` is text: a file name that is not UTF-8 arrives with lone surrogates, which no
    log line, listing or JSON reply can carry (each of them would fail on it, for every plugin)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def plugin_stem(file_name: str) -> str | None:
    """The plugin a file of the directory belongs to (its stem), or ``None`` for any other file.

    Other files are hidden ones (editor and copy temporaries), other suffixes, and names that are not
    UTF-8: those are logged (escaped) and skipped, since nothing could report them.
    """
    stem, dot, suffix = file_name.rpartition(".")
    if not dot or not stem or stem.startswith(".") or f".{suffix}" not in (WASM_SUFFIX, MANIFEST_SUFFIX):
        return None
    if not _utf8(stem):
        log.warning("skipping %s: a plugin file name must be UTF-8",
                    os.fsencode(file_name).decode("ascii", "backslashreplace"))
        return None
    return stem


def scan_directory(directory: Path) -> list[str]:
    """Plugin names present in ``directory``: stems of ``*.wasm`` and ``*.toml`` files, sorted.

    A manifest without a module (or the reverse) is listed too, so it can be reported as broken
    rather than silently ignored. Hidden files (editor and copy temporaries) and names that are not
    UTF-8 are skipped (:func:`plugin_stem`).
    """
    names: set[str] = set()
    with os.scandir(directory) as entries:
        for entry in entries:
            stem = plugin_stem(entry.name)
            if stem is not None and entry.is_file():
                names.add(stem)
    return sorted(names)


class Fingerprint(NamedTuple):
    """sha256 of the module and of the manifest bytes (``None`` for a missing file)."""

    wasm: str | None
    manifest: str | None


def _sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


def _read(path: Path, cap: int, directory: Path, plugin: str) -> bytes | None:
    """The file's bytes (``None`` when absent), at most ``cap + 1`` of them: an oversized file is known to
    be too large without ever being read whole.

    Only a regular file inside ``directory`` is read (:func:`~sandbus.host.lifecycle.manifest.read_capped`): a
    symlink is followed (Kubernetes volumes, for one, are links into a ``..data`` folder beside the files) but
    must end inside the plugin directory; checked on the descriptor that was read, so swapping the link
    between the check and the read changes nothing.

    Raises:
        SecurityViolationError: the file is a link to a file outside ``directory``.
        OSError: not a regular file, or unreadable.
    """
    try:
        data, real = read_capped(path, cap)
    except FileNotFoundError:
        return None
    _inside(directory, real, path, plugin)
    return data


def _inside(directory: Path, real: str, path: Path, plugin: str) -> None:
    root = os.path.realpath(directory)
    if os.path.commonpath([root, real]) != root:
        raise SecurityViolationError(
            f"{path.name} is a link to a file outside the plugin directory; only files in it are loaded",
            plugin=plugin, path=str(path), target=real)


def _read_module(path: Path, cap: int, directory: Path, plugin: str, memo: FileMemo,
                 known: FileIdentity | None = None) -> ModuleSource | None:
    """The module at ``path`` as a :class:`ModuleSource` (``None`` when absent), under :func:`_read`'s rules.

    When the memo knows the file's identity, nothing is read: the source carries the memo's digest and
    header facts, and a reader for the day the bytes are needed. Otherwise the file is read and hashed once,
    and its digest memoised when the file was not changing (the identity before and after the read agree).
    ``known``: re-reading for such a reader: the identity must still be this one, and nothing is memoised.
    """
    try:
        fd, st, real = open_regular(path)
    except FileNotFoundError:
        return None
    try:
        _inside(directory, real, path, plugin)
        before = FileIdentity.of(st)
        if known is not None and before != known:
            raise SandboxError(f"{path.name} changed while it was loading; the next change event loads it again",
                               plugin=plugin, path=str(path))
        if known is None and before.size <= cap:
            entry = memo.get(before)
            if entry is not None:
                return ModuleSource(entry.digest, facts=entry.facts,
                                    reader=lambda: _reread(path, cap, directory, plugin, memo, before,
                                                           entry.digest))
        data = read_fd_capped(fd, cap)
        after = FileIdentity.of(os.fstat(fd))
    finally:
        os.close(fd)
    source = ModuleSource.of(data)
    if len(data) > cap or known is not None:
        return source
    try:
        facts = scan_wasm(data, max_sections=MAX_SECTIONS)
    except MalformedWasm:
        return source  # refused by the load, which says why; nothing worth remembering
    memo.put(before, after, MemoEntry(source.digest, facts))
    return ModuleSource(source.digest, data, facts)


def _reread(path: Path, cap: int, directory: Path, plugin: str, memo: FileMemo, known: FileIdentity,
            digest: str) -> bytes:
    source = _read_module(path, cap, directory, plugin, memo, known)
    if source is None or source.data is None:
        raise SandboxError(f"{path.name} disappeared while it was loading", plugin=plugin, path=str(path))
    if source.digest != digest:
        # Same identity, other bytes (a write that did not move ctime): the entry lies. The caller refuses
        # these bytes (they are not the digest's); the next load hashes the file again.
        memo.forget(known)
    return source.data


@dataclass(frozen=True)
class PluginFiles:
    """The bytes of one plugin's two files, read once (``None``: the file is absent).

    ``module`` is the module as the loader has it: its bytes with their digest, or (a file whose digest the
    module cache's memo knows) its digest and a way to read it; ``wasm`` its bytes when they were read.
    Built with ``wasm`` only, ``module`` is made from it.
    """

    name: str
    wasm_path: Path
    manifest_path: Path
    wasm: bytes | None
    manifest: bytes | None
    module: ModuleSource | None = None

    def __post_init__(self) -> None:
        if self.module is None and self.wasm is not None:
            object.__setattr__(self, "module", ModuleSource.of(self.wasm))

    @cached_property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(None if self.module is None else self.module.digest, _sha256(self.manifest))

    @property
    def has_module(self) -> bool:
        return self.module is not None

    @property
    def absent(self) -> bool:
        return self.module is None and self.manifest is None


#: The largest module read from a plugin directory (the compiler's own default bound).
MAX_MODULE_FILE_BYTES = Limits().max_module_bytes


def read_plugin_files(directory: Path, name: str, *, max_module_bytes: int = MAX_MODULE_FILE_BYTES,
                      memo: FileMemo | None = None) -> PluginFiles:
    """Read ``<name>.wasm`` and ``<name>.toml`` from ``directory``, never more than their caps.

    With ``memo`` (the module cache's), a module file the memo knows is not read: see the module docstring.

    Raises:
        PluginNotFoundError: ``name`` is not a plain file stem.
        InvalidModuleError: the module is larger than ``max_module_bytes`` (it is not read whole).
        SecurityViolationError: a file is a symlink to a file outside ``directory``.
        SandboxError: a file exists but cannot be read (permissions; a directory, FIFO or device in its
            place: never opened for reading, so a FIFO cannot block the node).
    """
    check_plugin_name(name)
    wasm_path, manifest_path = directory / f"{name}{WASM_SUFFIX}", directory / f"{name}{MANIFEST_SUFFIX}"
    module: ModuleSource | None = None
    wasm: bytes | None = None
    try:
        if memo is None:
            wasm = _read(wasm_path, max_module_bytes, directory, name)
        else:
            module = _read_module(wasm_path, max_module_bytes, directory, name, memo)
            wasm = None if module is None else module.data
        manifest = _read(manifest_path, MAX_TOML_BYTES, directory, name)  # oversized: refused by parse_files
    except SecurityViolationError:  # a PermissionError, so an OSError: not to be taken for one
        raise
    except OSError as e:
        raise SandboxError(f"cannot read {e.filename}: {e.strerror}", plugin=name, path=e.filename) from e
    size = len(wasm) if wasm is not None else module.size if module is not None else 0
    if size > max_module_bytes:
        raise InvalidModuleError(f"{wasm_path.name} is larger than {max_module_bytes} bytes (max_module_bytes)",
                                 plugin=name, path=str(wasm_path), bound="max_module_bytes", limit=max_module_bytes)
    return PluginFiles(name, wasm_path, manifest_path, wasm, manifest, module)


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
    if len(files.manifest) > MAX_TOML_BYTES:
        raise ManifestError(f"file is larger than {MAX_TOML_BYTES} bytes; a manifest is a few KiB",
                            path=source, plugin=files.name)
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
    if not files.has_module:
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


#: the export an Extism plugin's direct and topic messages go to (its PluginMessage envelope, as JSON, is the input)
EXTISM_MESSAGE_FUNCTION = "handle_message"


def body_of(sandbox: Sandbox) -> Literal["json", "bytes"]:
    """What a plugin's requests and replies are: ``"json"`` (our ABI, components) or ``"bytes"`` (Extism)."""
    body = getattr(sandbox, "body", "json")
    return "bytes" if body == "bytes" else "json"


def check_body(manifest: Manifest, sandbox: Sandbox) -> None:
    """What the manifest says about the plugin's input and output fits what the module is.

    Raises:
        ManifestError: a JSON plugin declares a non-JSON ``content_type``; an Extism plugin subscribes
            to topics but exports no ``handle_message`` (its messages would have nowhere to go: every
            one would be dead-lettered), naming the fix.
    """
    declared = manifest.plugin.content_type
    if body_of(sandbox) == "json":
        if declared is not None and not is_json_type(declared):
            raise ManifestError(f"content_type = {declared!r} is for plugins whose output is bytes (Extism): this "
                                f"plugin's replies are JSON; remove the key", path=manifest.source,
                                key="plugin.content_type", plugin=manifest.name)
        return
    if manifest.subscriptions.topics and EXTISM_MESSAGE_FUNCTION not in sandbox.functions:
        raise ManifestError(f"subscribes to topics, but this Extism plugin exports no {EXTISM_MESSAGE_FUNCTION!r}, "
                            f"the function its messages go to: export {EXTISM_MESSAGE_FUNCTION} (input: the "
                            f"PluginMessage envelope as JSON) or remove [subscriptions] topics",
                            path=manifest.source, key="subscriptions.topics", plugin=manifest.name)


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
    what the grant allows. A version the policy compiles with debug info (``[debug] plugins``) is
    audited as such (``plugin.debug_info``); one whose failed calls it records (``[record]``) writes
    them through a :class:`TrapRecorder` (audited ``record.written``). A plugin whose
    ``sandbus_health`` fails right after init is refused: it would only fail its first calls.

    Raises:
        SecurityViolationError: the module does not match the manifest's ``sha256``.
        InvalidModuleError / AbiViolationError: not valid wasm (e.g. truncated) or not our ABI.
        PluginInitError: ``sandbus_init`` or the first ``sandbus_health`` failed.
        ResourceLimitError: a limit held during start-up.
    """
    module = files.module
    assert module is not None
    manifest.verify_digest(module.digest)
    recorder = None
    if grant.record is not None:
        name = manifest.name

        def on_record(kind: str, message: str, details: Mapping[str, Any]) -> None:
            level = AuditLevel.INFO if kind == "record.written" else AuditLevel.WARNING
            auditor.emit(level, kind, name, message, **details)

        recorder = TrapRecorder(name, grant.record, on_event=on_record, module_path=files.wasm_path)
    try:
        sandbox = Sandbox(module, name=manifest.name, limits=grant.limits, capabilities=grant.capabilities,
                          host_functions=host_functions, auditor=auditor, config=manifest.config, cache=cache,
                          recorder=recorder)
    except SandbusError:
        raise
    except Exception as e:  # a bug below us must not take the node down with this one plugin
        log.exception("unexpected error loading plugin %s", manifest.name)
        raise SandboxError(f"unexpected error while loading: {type(e).__name__}: {e}", plugin=manifest.name) from e
    try:
        check_body(manifest, sandbox)
        healthy = sandbox.health()
    except SandbusError:
        sandbox.close()
        raise
    if not healthy:
        sandbox.close()
        raise PluginInitError("sandbus_health reported failure right after init", plugin=manifest.name)
    if grant.limits.debug_info:
        # Said once a version, where the operator looks: its calls are slower, its code is unoptimised.
        auditor.emit(AuditLevel.WARNING, "plugin.debug_info", manifest.name,
                     f"version {manifest.plugin.version} runs with debug info for a native debugger "
                     "(policy [debug] plugins): unoptimised code, compiled at every load",
                     version=manifest.plugin.version, sha256=sandbox.digest)
    return PluginVersion(name=manifest.name, manifest=manifest, grant=grant, sandbox=sandbox,
                         fingerprint=files.fingerprint, path=files.wasm_path, skipped_optional=skipped_optional,
                         initial_memory_bytes=sandbox.initial_memory_bytes)
