"""``sandbus inspect FILE.wasm``: what a module is, what it exports and imports, whether it speaks our ABI.

A core module importing from ``extism:host/env`` is an Extism plugin (``kind`` ``"extism"``): its callable
functions are its ``() -> i32`` exports, its contract Extism's host ABI, and its input and output bytes.
``sandbus inspect --manifest`` writes a starting manifest beside any module (:func:`manifest_for`): a node
loads no plugin without one.

The verdicts come from the host's own code, not a re-implementation: the ABI check is
:func:`sandbus.host.sandbox.inspect_module`, the ABI version is what ``sandbus_abi_version`` returns inside a
real :class:`~sandbus.host.sandbox.Sandbox`, and the manifest check is
:func:`sandbus.host.lifecycle.manifest.load_manifest`.
So "inspect says fine" means "a node will accept it" as far as the module and manifest go (the
operator's policy is the one thing it cannot know; ``sandbus plugins check`` resolves that).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import wasmtime

from sandbus.host.authoring.errors import AuthoringError
from sandbus.sdk.errors import InvalidModuleError, SandbusError

__all__ = ["EXTISM_NAMESPACE", "ExportInfo", "ImportInfo", "ManifestCheck", "WasmReport", "inspect_wasm",
           "manifest_for"]

_CORE_VERSION = b"\x01\x00\x00\x00"
_COMPONENT_VERSION = b"\x0d\x00\x01\x00"
#: Import namespaces a core plugin may use (docs/abi.md, "Imports").
_ALLOWED_IMPORT_MODULES = ("sandbus_v1", "wasi_snapshot_preview1")
#: The import namespace that makes a core module an Extism plugin.
EXTISM_NAMESPACE = "extism:host/env"
#: Import namespaces an Extism plugin may use here (no ``extism:host/user``: an embedder's own host
#: functions do not exist on a node).
_EXTISM_IMPORT_MODULES = (EXTISM_NAMESPACE, "wasi_snapshot_preview1")
#: How ``sandbus inspect`` names each kind.
KIND_LABELS = {"core module": "core module (sandbus ABI v1)", "component": "component (WIT world sandbus:plugin)",
               "extism": f"Extism plugin ({EXTISM_NAMESPACE})"}


@dataclass(frozen=True)
class ExportInfo:
    """One export: ``kind`` is func / memory / table / global (core) or func / instance (component)."""

    name: str
    kind: str
    signature: str


@dataclass(frozen=True)
class ImportInfo:
    """One import; ``module`` is empty for a component's top-level imports."""

    module: str
    name: str
    kind: str
    signature: str


@dataclass(frozen=True)
class ManifestCheck:
    """The manifest beside the module (``<stem>.toml``), checked with the node's loader.

    ``details``: every section of a valid manifest but ``[config]`` (handed to the plugin's ``init``, and
    its own business), as plain data: identity and links, capabilities, permissions, resources,
    dependencies, subscriptions, build and metadata.
    """

    path: str
    valid: bool
    error: str | None = None
    name: str | None = None
    version: str | None = None
    sha256_pinned: bool = False
    details: dict[str, Any] = field(default_factory=dict)

    def facts(self) -> list[tuple[str, str]]:
        """``details`` as (label, text) rows for a terminal: one per key that has a value."""
        rows: list[tuple[str, str]] = []
        for section, values in self.details.items():
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                if section == "plugin" and key in ("name", "version", "sha256"):
                    continue  # on the manifest's own row
                if section == "dependencies":
                    text = f"{value['version']}{' (optional)' if value.get('optional') else ''}"
                elif isinstance(value, list | tuple):
                    text = ", ".join(str(v) for v in value)
                elif isinstance(value, bool):
                    text = "true" if value else "false"
                else:
                    text = "" if value is None else str(value)
                if text:
                    rows.append((f"{section}.{key}", text))
        return rows


@dataclass(frozen=True)
class WasmReport:
    """Everything ``sandbus inspect`` shows.

    Parameters:
        kind: ``core module``, ``component`` or ``extism`` (a core module importing ``extism:host/env``).
        abi_ok / abi_error: the host's ABI v1 check (None for a component: its contract is the WIT
            world, checked by the component linker when it loads).
        abi_version: what ``sandbus_abi_version`` returned (None when it could not be called).
        functions: the callable functions (``(i32, i32) -> i64`` exports of a core module; exported
            functions of a component; the ``() -> i32`` exports of an Extism plugin).
        load_error: why a sandbox could not be created with default limits and no capability.
    """

    path: str
    kind: str
    size: int
    sha256: str
    exports: tuple[ExportInfo, ...]
    imports: tuple[ImportInfo, ...]
    functions: tuple[str, ...] = ()
    optional_exports: tuple[str, ...] = ()
    abi_ok: bool | None = None
    abi_error: str | None = None
    abi_version: int | None = None
    load_error: str | None = None
    #: Reasons a node refuses the module's imports or (components) its world.
    import_problems: tuple[str, ...] = ()
    manifest: ManifestCheck | None = None
    memory_pages: int | None = field(default=None)

    @property
    def ok(self) -> bool:
        """Whether a node would accept the module and its manifest (policy aside)."""
        manifest_ok = self.manifest is None or self.manifest.valid
        if self.kind in ("component", "extism"):
            return manifest_ok and self.load_error is None and not self.import_problems
        return (self.abi_ok is True and self.abi_version == 1 and self.load_error is None and not self.import_problems
                and manifest_ok)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def _core_signature(ty: Any) -> tuple[str, str]:
    if isinstance(ty, wasmtime.FuncType):
        params = ", ".join(str(p) for p in ty.params)
        results = [str(r) for r in ty.results]
        result = results[0] if len(results) == 1 else "(" + ", ".join(results) + ")"
        return "func", f"({params}) -> {result}"
    if isinstance(ty, wasmtime.MemoryType):
        limits = ty.limits
        upper = "" if limits.max is None else f"..{limits.max}"
        return "memory", f"{limits.min}{upper} pages{' (64-bit)' if ty.is_64 else ''}"
    if isinstance(ty, wasmtime.TableType):
        return "table", f"{ty.element} [{ty.limits.min}{'' if ty.limits.max is None else '..' + str(ty.limits.max)}]"
    if isinstance(ty, wasmtime.GlobalType):
        return "global", f"{'mut ' if ty.mutable else ''}{ty.content}"
    return type(ty).__name__, ""


def _wit_type(ty: Any) -> str:
    """A component value type in WIT spelling (``u32``, ``list<u8>``, ``result<string, string>``)."""
    from wasmtime import component as c

    if isinstance(ty, c.ListType):
        return f"list<{_wit_type(ty.element)}>"
    if isinstance(ty, c.OptionType):
        return f"option<{_wit_type(ty.payload)}>"
    if isinstance(ty, c.ResultType):
        ok = "_" if ty.ok is None else _wit_type(ty.ok)
        err = "_" if ty.err is None else _wit_type(ty.err)
        return f"result<{ok}, {err}>"
    if isinstance(ty, c.TupleType):
        return f"tuple<{', '.join(_wit_type(t) for t in ty.elements)}>"
    name = type(ty).__name__
    return {"OwnType": "own<resource>", "BorrowType": "borrow<resource>"}.get(
        name, name.removesuffix("Type").lower() if name.endswith("Type") else name.lower())


def _component_signature(ty: Any) -> tuple[str, str]:
    from wasmtime import component

    if isinstance(ty, component.FuncType):
        params = ", ".join(f"{n}: {_wit_type(t)}" for n, t in ty.params)
        result = "" if ty.result is None else f" -> {_wit_type(ty.result)}"
        return "func", f"func({params}){result}"
    if isinstance(ty, component.ComponentInstanceType):
        return "instance", ""
    return "type", _wit_type(ty)


def inspect_wasm(path: str | Path) -> WasmReport:
    """Inspect the module at ``path``; a ``<stem>.toml`` beside it is checked as its manifest.

    Raises:
        AuthoringError: the file cannot be read or is not a WebAssembly binary at all.
    """
    from sandbus.host.sandbox import Limits
    from sandbus.host.sandbox.compiler import read_wasm

    path = Path(path)
    try:
        wasm = read_wasm(path, Limits())  # never more than the load bound + 1 byte
    except OSError as e:
        raise AuthoringError(f"cannot read {path}: {e.strerror or e}", path=str(path)) from e
    if wasm[:4] != b"\0asm" or len(wasm) < 8:
        raise AuthoringError(f"{path} is not a WebAssembly binary (no \\0asm header)", path=str(path))
    manifest, config = _manifest_check(path, wasm)
    common: dict[str, Any] = {"path": str(path), "size": len(wasm), "sha256": hashlib.sha256(wasm).hexdigest(),
                              "manifest": manifest}
    if wasm[4:8] == _COMPONENT_VERSION:
        return _inspect_component(wasm, common, config)
    if wasm[4:8] != _CORE_VERSION:
        raise AuthoringError(f"{path}: unknown WebAssembly binary version {wasm[4:8].hex()}", path=str(path))
    return _inspect_core(path, wasm, config, common)


def _manifest_check(path: Path, wasm: bytes) -> tuple[ManifestCheck | None, dict[str, Any]]:
    """The node's verdict on the manifest beside ``path``: valid, the wasm's sha256 matches its pin, and its
    ``min_runtime_version`` is this runtime's or older (what the loader checks before anything else)."""
    from sandbus.host.lifecycle.loader import RUNTIME_VERSION
    from sandbus.host.lifecycle.manifest import load_manifest

    toml = path.with_suffix(".toml")
    if not toml.exists():
        return None, {}
    try:
        m = load_manifest(toml)
        m.verify_wasm(wasm)
    except SandbusError as e:
        return ManifestCheck(str(toml), False, str(e)), {}
    details = m.model_dump(mode="json", exclude={"config"})
    if not m.runtime_compatible(RUNTIME_VERSION):
        return ManifestCheck(str(toml), False, f"[plugin.min_runtime_version]: requires sandbus runtime >= "
                             f"{m.plugin.min_runtime_version}, this runtime is {RUNTIME_VERSION}", m.name,
                             m.plugin.version, m.plugin.sha256 is not None, details), dict(m.config)
    return (ManifestCheck(str(toml), True, None, m.name, m.plugin.version, m.plugin.sha256 is not None, details),
            dict(m.config))


def _inspect_core(path: Path, wasm: bytes, config: dict[str, Any], common: dict[str, Any]) -> WasmReport:
    from sandbus.host.node.hostfuncs import BusBridge
    from sandbus.host.sandbox import Capabilities, Limits, Sandbox, inspect_module, shared_cache
    from sandbus.host.sandbox.abi import DEALLOC, HEALTH, INIT, INITIALIZE, SHUTDOWN
    from sandbus.host.sandbox.engine import get_engine

    name = path.stem
    try:
        module = shared_cache().load(get_engine(Limits().stack_bytes), wasm, name=name, limits=Limits())
    except InvalidModuleError as e:
        refused = _refused_by_host(e, "core module", common)
        if refused is None:
            raise AuthoringError(f"{path} is not a valid WebAssembly module: {e.message}", path=str(path)) from e
        return refused
    except SandbusError as e:
        raise AuthoringError(f"{path} is not a valid WebAssembly module: {e.message}", path=str(path)) from e
    exports = tuple(ExportInfo(e.name, *_core_signature(e.type)) for e in module.exports)
    imports = tuple(ImportInfo(i.module, i.name or "", *_core_signature(i.type)) for i in module.imports)
    memory = next((e.type for e in module.exports if e.name == "memory" and isinstance(e.type, wasmtime.MemoryType)),
                  None)
    if any(i.module == EXTISM_NAMESPACE for i in imports):
        return _inspect_extism(module, wasm, config, common, exports, imports)
    problems = tuple(f"import {i.module}.{i.name}: only {' and '.join(_ALLOWED_IMPORT_MODULES)} may be imported"
                     for i in imports if i.module not in _ALLOWED_IMPORT_MODULES)
    report: dict[str, Any] = {**common, "kind": "core module", "exports": exports, "imports": imports,
                              "import_problems": problems,
                              "memory_pages": int(memory.limits.min) if memory is not None else None}
    try:
        info = inspect_module(module, name)
    except SandbusError as e:
        return WasmReport(**report, abi_ok=False, abi_error=e.message)
    report.update(abi_ok=True, functions=info.functions,
                  optional_exports=tuple(n for n in (DEALLOC, INIT, HEALTH, SHUTDOWN, INITIALIZE) if info.has(n)))
    # The version is what the guest says inside a real sandbox: the Sandbox calls
    # sandbus_abi_version on its first instance and refuses anything but 1, with the value.
    try:
        with Sandbox(wasm, name=name, limits=Limits(), capabilities=Capabilities(), config=config,
                     host_functions=BusBridge().host_functions(), warm_instances=1):
            version: int | None = 1
        load_error = None
    except InvalidModuleError as e:
        version = e.details.get("abi_version")
        load_error = None if version is not None else e.message
    except SandbusError as e:
        version, load_error = None, f"{type(e).__name__}: {e.message}"
    return WasmReport(**report, abi_version=version, load_error=load_error)


def _inspect_extism(module: wasmtime.Module, wasm: bytes, config: dict[str, Any], common: dict[str, Any],
                    exports: tuple[ExportInfo, ...], imports: tuple[ImportInfo, ...]) -> WasmReport:
    """An Extism plugin: its functions as the host's Extism loader sees them, its imports checked against
    the namespaces a node provides, and a real sandbox's verdict."""
    problems = tuple(f"import {i.module}.{i.name}: an Extism plugin may import only "
                     f"{' and '.join(_EXTISM_IMPORT_MODULES)} here (a node has no embedder's host functions)"
                     for i in imports if i.module not in _EXTISM_IMPORT_MODULES)
    functions = tuple(sorted(e.name for e in exports if e.kind == "func" and e.signature == "() -> i32"
                             and e.name not in ("_start", "_initialize")
                             and not e.name.startswith(("extism_", "sandbus_", "__"))))
    abi_error: str | None = None
    try:
        from sandbus.host.sandbox.extism.abi import inspect_extism
    except ImportError:  # a host without the Extism loader: the static reading above stands
        pass
    else:
        try:
            functions = inspect_extism(module, Path(common["path"]).stem).functions
        except SandbusError as e:
            abi_error = e.message
    memory = next((e.type for e in module.exports if e.name == "memory" and isinstance(e.type, wasmtime.MemoryType)),
                  None)
    load_error = abi_error or (None if problems else _load_error(wasm, common, config))
    return WasmReport(**common, kind="extism", exports=exports, imports=imports, functions=functions,
                      abi_ok=abi_error is None, abi_error=abi_error, import_problems=problems, load_error=load_error,
                      memory_pages=int(memory.limits.min) if memory is not None else None)


def manifest_for(report: WasmReport) -> str:
    """A starting manifest (TOML) for the inspected module: its name (the file stem), version 0.1.0, and,
    for an Extism plugin, how Extism's manifest notions map onto sandbus's keys.

    Raises:
        AuthoringError: the file stem is not a valid plugin name (the manifest must be named after it).
    """
    from sandbus.host.lifecycle.manifest import parse_manifest
    from sandbus.sdk.envelope import OCTET_STREAM

    path = Path(report.path)
    name = path.stem
    functions = ", ".join(report.functions) or "none found"
    lines = ["[plugin]", f'name = "{name}"', 'version = "0.1.0"',
             f'description = "{KIND_LABELS.get(report.kind, report.kind)}"']
    if report.kind == "extism":
        lines += [f"# the media type of its output (every reply of a successful call); {OCTET_STREAM} when unsaid,",
                  '# e.g. "application/json" for a plugin that writes JSON',
                  f'content_type = "{OCTET_STREAM}"', "",
                  f"# callable functions: {functions}",
                  "# Extism's manifest notions, as sandbus keys (the node's policy still decides what is granted):",
                  "#   config            -> [config] (read with config_get; strings as they are, others as JSON)",
                  '#   allowed_hosts     -> [permissions] network_hosts = ["api.example.com:443"], with',
                  '#                        [capabilities] required = ["compute", "network"]',
                  '#   allowed_paths     -> [permissions] read_files = ["data"] / write_files = ["out"]',
                  "#   memory.max_pages  -> [resources] memory_mb (16 pages = 1 MiB)",
                  "#   timeout_ms        -> [resources] timeout_seconds",
                  "#   memory.max_var_bytes -> [resources] max_var_bytes", "",
                  *_capabilities_for(report), "",
                  "[resources]", "max_var_bytes = 1048576", "",
                  *_messages_for(report), "", "[config]", ""]
    else:
        lines += ["", f"# callable functions: {functions}", "", "[resources]", "# memory_mb = 64", "", "[config]", ""]
    text = "\n".join(lines)
    try:
        parse_manifest(text, source=str(path.with_suffix(".toml")), expected_name=name)
    except SandbusError as e:
        # The name comes from the file: say what to rename rather than leave a regex to decipher.
        fix = (f" (the plugin's name is the file's: rename {path.name} to a valid name, e.g. "
               f"{_suggested_name(name)}.wasm)" if e.details.get("key") == "plugin.name" else "")
        raise AuthoringError(f"cannot write a manifest for {path.name}: {e}{fix}", path=str(path)) from e
    return text


def _capabilities_for(report: WasmReport) -> list[str]:
    """The manifest's ``[capabilities]``: compute, and for a module importing Extism's ``http_request`` the
    network as a comment -- a call of it is denied without ``network`` and a host list, and which hosts
    only its author knows."""
    lines = ["[capabilities]", 'required = ["compute"]']
    if any(i.module == EXTISM_NAMESPACE and i.name == "http_request" for i in report.imports):
        lines += ["# it imports http_request, and every HTTP call is denied without the network: to grant it,",
                  "# replace the line above with these (and name the hosts it calls)",
                  '# required = ["compute", "network"]', "# [permissions]",
                  '# network_hosts = ["api.example.com:443"]']
    return lines


def _messages_for(report: WasmReport) -> list[str]:
    """How the plugin takes messages: through ``handle_message`` when it exports one; without it, a
    manifest that subscribes to topics does not load, so it is not suggested."""
    if "handle_message" in report.functions:
        return ["# direct and topic messages go to its handle_message export (input: the envelope as JSON)",
                "# [subscriptions]", '# topics = ["orders.*"]']
    return ["# no handle_message export: it takes requests only (no direct messages, no topic subscriptions)"]


def _suggested_name(stem: str) -> str:
    """A valid plugin name close to ``stem``: lowercase, other characters as ``_``, a letter first."""
    name = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in stem.lower())
    if not name[:1].isalpha():
        name = "plugin_" + name
    return name[:63]


def _refused_by_host(e: InvalidModuleError, kind: str, common: dict[str, Any]) -> WasmReport | None:
    """The report for a binary the node refuses before compiling it: over a load bound, or using a wasm
    feature the engine has turned off (memory64, GC, threads...). None for plain malformed input."""
    if "bound" not in e.details and "feature" not in e.details:
        return None
    abi: dict[str, Any] = {"abi_ok": False, "abi_error": "not checked: the host refuses the binary itself"}
    return WasmReport(**common, kind=kind, exports=(), imports=(), load_error=e.message,
                      **(abi if kind == "core module" else {}))


#: The entry point of the sandbus component world (sdk/guest/python/wit/sandbus.wit).
COMPONENT_ENTRY = "handle-request"


def _inspect_component(wasm: bytes, common: dict[str, Any], config: dict[str, Any]) -> WasmReport:
    """Exports and imports of a component, functions only (types and resources are noise here).

    A component's callable functions are dispatched by name inside its ``handle-request`` export,
    so they cannot be listed without running it; what can be checked statically is that it targets
    our world (exports ``handle-request``)."""
    from wasmtime import component

    from sandbus.host.sandbox import Limits, shared_cache
    from sandbus.host.sandbox.engine import get_engine

    # The node's own engine (its wasm features, its bounds) through the node's cache: a verdict from any
    # other engine would not be the node's, and a componentize-py guest compiles for seconds.
    handle = get_engine(Limits().stack_bytes)
    engine = handle.engine
    try:
        comp = shared_cache().load_component(handle, wasm, name=Path(common["path"]).stem, limits=Limits())
    except InvalidModuleError as e:
        refused = _refused_by_host(e, "component", common)
        if refused is None:
            raise AuthoringError(f"{common['path']} is not a valid component: {e.message}",
                                 path=common["path"]) from e
        return refused
    ctype = comp.type
    exports: list[ExportInfo] = []
    for name, ext in ctype.exports(engine).items():
        if isinstance(ext.ty, component.ComponentInstanceType):
            for inner, iext in ext.ty.exports(engine).items():
                kind, sig = _component_signature(iext.ty)
                if kind == "func":
                    exports.append(ExportInfo(f"{name}#{inner}", kind, sig))
        else:
            exports.append(ExportInfo(name, *_component_signature(ext.ty)))
    imports: list[ImportInfo] = []
    for name, ext in ctype.imports(engine).items():
        if isinstance(ext.ty, component.ComponentInstanceType):
            for inner, iext in ext.ty.exports(engine).items():
                kind, sig = _component_signature(iext.ty)
                if kind == "func":
                    imports.append(ImportInfo(name, inner, kind, sig))
        else:
            imports.append(ImportInfo("", name, *_component_signature(ext.ty)))
    top = {e.name for e in exports if e.kind == "func" and "#" not in e.name}
    problems = () if COMPONENT_ENTRY in top else (
        f"no {COMPONENT_ENTRY!r} export: not built against the sandbus world (sdk/guest/python/wit)",)
    load_error = None if problems else _load_error(wasm, common, config)
    return WasmReport(**common, kind="component", exports=tuple(exports), imports=tuple(imports),
                      functions=tuple(sorted(top)), import_problems=problems, load_error=load_error)


def _load_error(wasm: bytes, common: dict[str, Any], config: dict[str, Any]) -> str | None:
    """Whether a real sandbox (default limits, nothing granted) starts the plugin: the last word on
    whether this host can run it at all."""
    from sandbus.host.node.hostfuncs import BusBridge
    from sandbus.host.sandbox import Capabilities, Limits, Sandbox

    try:
        with Sandbox(wasm, name=Path(common["path"]).stem, limits=Limits(), capabilities=Capabilities(),
                     config=config, host_functions=BusBridge().host_functions()):
            return None
    except SandbusError as e:
        return f"{type(e).__name__}: {e.message}"
