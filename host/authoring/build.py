"""``sandbus build DIR``: compile a plugin project with its language's toolchain into ``DIR/build/``.

The output is a plugin directory a node can serve as it is: ``build/NAME.wasm`` and a copy of the
manifest ``build/NAME.toml``. The module is written beside its final name and renamed over it, so a
node watching ``build/`` (hot reload) never sees half a file.

Before compiling, the manifest is validated with the node's own loader; after compiling, a core
module is checked against Guest ABI v1 with the host's own checker. An author therefore learns
about a bad manifest or a missing export at build time, not when a node refuses the plugin.

A missing toolchain is a :class:`ToolchainMissingError` naming the tool and the command that
installs it (the CLI exits 2 with that message). A build is incremental: nothing is compiled when
the module is newer than every source, the language's SDK files and the manifest.

Toolchains (ARCHITECTURE.md, part B):

* WAT: ``wasmtime.wat2wasm``, always available (wasmtime comes with the host extra, which building needs).
* C: ``clang --target=wasm32-wasi`` with wasi-libc; Debian/Ubuntu:
  ``apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32``. ``CLANG`` and ``WASI_SYSROOT``
  override the compiler and sysroot, as for ``plugins/build.sh``.
* AssemblyScript: ``asc`` from ``npm install assemblyscript`` (the project's ``node_modules``, the
  SDK's, or ``PATH``); when the project declares the dependency and only ``npm`` is there, the
  builder runs ``npm install`` for it.
* Python: ``componentize-py`` (``pip install componentize-py``) against the SDK's WIT world.
* Extism (``extism-as``): ``asc`` with Extism's PDK ``@extism/as-pdk``, both the project's own npm
  dependencies (``npm install`` runs when they are missing). The module is checked against the Extism
  host ABI sandbus implements instead of Guest ABI v1.

The manifest's ``[build]`` section chooses among the toolchain's flags; it names no command, so a build
runs only the language's own compiler, in the project directory, on the project's own manifest:

* ``optimize`` (default true): C ``-O2`` (stripped), AssemblyScript ``-O3``; false: a debug build (C
  ``-O0 -g``, not stripped; AssemblyScript ``-O0 --debug``). WAT and Python have no such choice.
* ``target``: ``wasm32-wasi`` / ``wasm32-wasip1`` (the same: a core module) for C, AssemblyScript and
  WAT, ``wasm32-wasip2`` (a component) for Python; another is refused, since the project would not
  build what it names.
* ``features``: WebAssembly proposals the compiler may use: C ``-m<feature>`` (``simd`` is
  ``-msimd128``); AssemblyScript ``--enable`` for those it leaves off by default (``simd``,
  ``reference-types``; it cannot emit ``multivalue``); WAT states its own in the text; a Python
  component takes none. A feature the toolchain cannot honour is a :class:`BuildError`, never ignored.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import wasmtime

from sandbus.host.authoring.errors import AuthoringError, BuildError, ToolchainMissingError
from sandbus.host.authoring.project import EXTISM_AS_PDK, Language, Project, detect_project, guest_sdk_dir
from sandbus.host.lifecycle.manifest import BuildSection, load_manifest

__all__ = [
    "APT_C_TOOLCHAIN",
    "BuildResult",
    "Progress",
    "build_project",
    "find_tool",
    "is_stale",
]

#: Debian/Ubuntu packages of the wasm32-wasi C toolchain.
APT_C_TOOLCHAIN = "apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32"
_INSTALL_ASC = "npm install assemblyscript   (in the project directory; Node.js: apt-get install nodejs npm)"
_INSTALL_NODE = "apt-get install nodejs npm, then: npm install assemblyscript"
_INSTALL_COMPONENTIZE = "pip install componentize-py"
_INSTALL_EXTISM_AS = ("npm install   (in the project directory: Extism's PDK and the compiler its package.json names; "
                      "Node.js: apt-get install nodejs npm)")
#: How long one compiler run may take (a componentize-py build takes a few seconds; npm install longer).
_TOOL_TIMEOUT_S = 600.0

#: Receives a short line when a build step starts ("compiling echo.wat with wat2wasm").
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildResult:
    """What a build produced.

    Parameters:
        project: the project built.
        wasm: the module (``build/NAME.wasm``).
        manifest: the manifest copy beside it.
        built: False when the module was already up to date and nothing ran.
        tool: the toolchain used (``clang``, ``wat2wasm``, ``asc``, ``componentize-py``).
        size / sha256: of the module.
        duration_s: wall time of the build.
        output: what the compiler printed (warnings), if anything.
    """

    project: Project
    wasm: Path
    manifest: Path
    built: bool
    tool: str
    size: int
    sha256: str
    duration_s: float
    output: str = ""
    steps: tuple[str, ...] = field(default=())


def find_tool(name: str, *extra_dirs: Path) -> str | None:
    """``name`` in ``extra_dirs`` first, then beside this interpreter (a venv's ``bin``), then on PATH."""
    for d in (*extra_dirs, Path(sys.executable).parent):
        candidate = d / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def _sdk_files(language: Language) -> list[Path]:
    if language is Language.EXTISM_AS:  # the PDK is the project's own dependency: its lock file is a source
        return []
    sdk = guest_sdk_dir(language)
    if language is Language.C:
        return sorted(sdk.glob("*.h"))
    if language is Language.ASSEMBLYSCRIPT:  # not rglob: the SDK's node_modules holds thousands of files
        return sorted((sdk / "assembly").rglob("*.ts")) + sorted(sdk.glob("*.ts")) + sorted(sdk.glob("package.json"))
    if language is Language.PYTHON:
        return sorted(sdk.rglob("*.wit")) + [p for p in sorted(sdk.rglob("*.py")) if "__pycache__" not in p.parts]
    return []


def is_stale(project: Project) -> bool:
    """Whether the module is missing or older than a source, an SDK file or the manifest."""
    try:
        built = project.wasm.stat().st_mtime_ns
    except FileNotFoundError:
        return True
    inputs: Iterable[Path] = [*project.sources(), *_sdk_files(project.language), project.manifest]
    for path in inputs:
        with contextlib.suppress(FileNotFoundError):
            if path.stat().st_mtime_ns > built:
                return True
    copy = project.build_dir / project.manifest.name
    return not copy.exists() or copy.read_bytes() != project.manifest.read_bytes()


def build_project(directory: str | Path, *, force: bool = False, progress: Progress | None = None) -> BuildResult:
    """Build the project in ``directory`` into ``directory/build``.

    Parameters:
        directory: the project (see :mod:`sandbus.host.authoring.project` for how it is recognised).
        force: compile even when the module is up to date.
        progress: called with a line as each step starts.

    Raises:
        AuthoringError: not a project. ManifestError: the manifest is invalid.
        ToolchainMissingError: the compiler is not installed (the message says how to install it).
        BuildError: the compiler failed (its output is in the message), or the module breaks the ABI.
    """
    say = progress or (lambda _line: None)
    started = time.perf_counter()
    project = detect_project(directory)
    steps: list[str] = []

    def step(line: str) -> None:
        steps.append(line)
        say(line)

    step(f"checking manifest {project.manifest.name}")
    build = load_manifest(project.manifest).build  # ManifestError names the file and the key
    _check_build_section(project, build)
    tool = _TOOLS[project.language]
    if not force and not is_stale(project):
        step(f"{project.wasm.relative_to(project.root)} is up to date")
        return _result(project, False, tool, started, "", steps)
    project.build_dir.mkdir(exist_ok=True)
    tmp = project.wasm.with_name(project.wasm.name + ".tmp")
    try:
        output = _COMPILERS[project.language](project, tmp, step, build)
        if project.language is Language.EXTISM_AS:
            step("checking the module against the Extism host ABI")
            _check_extism(project, tmp.read_bytes())
        elif project.language is not Language.PYTHON:
            step("checking the module against Guest ABI v1")
            _check_abi(project, tmp.read_bytes())
        os.replace(tmp, project.wasm)
    finally:
        tmp.unlink(missing_ok=True)
    step(f"copying the manifest to {project.build_dir.name}/{project.manifest.name}")
    shutil.copyfile(project.manifest, project.build_dir / project.manifest.name)
    return _result(project, True, tool, started, output, steps)


#: Each ``[build] features`` entry as a clang flag, and as an asc ``--enable`` value (``""``: on by
#: default in asc 0.28, nothing to pass; ``None``: asc cannot emit it).
_CLANG_FEATURES: dict[str, str] = {
    "simd": "-msimd128", "bulk-memory": "-mbulk-memory", "sign-ext": "-msign-ext",
    "nontrapping-fptoint": "-mnontrapping-fptoint", "mutable-globals": "-mmutable-globals",
    "multivalue": "-mmultivalue", "reference-types": "-mreference-types",
}
_ASC_FEATURES: dict[str, str | None] = {
    "simd": "simd", "reference-types": "reference-types", "bulk-memory": "", "sign-ext": "",
    "nontrapping-fptoint": "", "mutable-globals": "", "multivalue": None,
}
_CORE_TARGETS = ("wasm32-wasi", "wasm32-wasip1")


def _check_build_section(project: Project, build: BuildSection) -> None:
    """Refuse a ``[build]`` this project's toolchain cannot honour, before anything runs.

    Raises:
        BuildError: the target is of the other kind (core module / component), or a feature cannot be
            passed to the compiler.
    """
    component = project.language is Language.PYTHON
    if build.target is not None and (build.target in _CORE_TARGETS) == component:
        made = "a component (wasm32-wasip2)" if component else "a core module (wasm32-wasi)"
        raise BuildError(f"[build] target {build.target!r} cannot be built: a {project.language} project builds "
                         f"{made}", plugin=project.name, key="build.target")
    if component and build.features:
        raise BuildError(f"[build] features {', '.join(build.features)}: componentize-py takes none (a Python "
                         "component's code is the interpreter's)", plugin=project.name, key="build.features")
    if project.language.is_assemblyscript:
        missing = [f for f in build.features if _ASC_FEATURES[f] is None]
        if missing:
            raise BuildError(f"[build] features {', '.join(missing)}: the AssemblyScript compiler cannot emit it",
                             plugin=project.name, key="build.features")


def _result(project: Project, built: bool, tool: str, started: float, output: str,
            steps: list[str]) -> BuildResult:
    data = project.wasm.read_bytes()
    return BuildResult(project=project, wasm=project.wasm, manifest=project.build_dir / project.manifest.name,
                       built=built, tool=tool, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                       duration_s=time.perf_counter() - started, output=output, steps=tuple(steps))


def _check_abi(project: Project, wasm: bytes) -> None:
    """Compile with the host's engine and run the host's ABI check: the same verdict a node gives."""
    from sandbus.host.sandbox import Limits, inspect_module, shared_cache
    from sandbus.host.sandbox.engine import get_engine
    from sandbus.sdk.errors import SandbusError

    try:
        module = shared_cache().load(get_engine(Limits().stack_bytes), wasm, name=project.name)
        inspect_module(module, project.name)
    except SandbusError as e:
        raise BuildError(f"{project.name} compiled, but the module is not a valid sandbus plugin: {e.message}",
                         plugin=project.name, output=e.message) from e


def _check_extism(project: Project, wasm: bytes) -> None:
    """Compile with the host's engine and inspect it as a node would an Extism plugin: it must import from
    ``extism:host/env`` only what this host provides, and export at least one callable function."""
    from sandbus.host.sandbox import Limits, shared_cache
    from sandbus.host.sandbox.engine import get_engine
    from sandbus.host.sandbox.extism.abi import inspect_extism, is_extism
    from sandbus.sdk.errors import SandbusError

    try:
        module = shared_cache().load(get_engine(Limits().stack_bytes), wasm, name=project.name)
        extism = is_extism(module)
        info = inspect_extism(module, project.name) if extism else None
    except SandbusError as e:
        raise BuildError(f"{project.name} compiled, but the module is not a valid Extism plugin: {e.message}",
                         plugin=project.name, output=e.message) from e
    if info is None:
        raise BuildError(f"{project.name} compiled, but imports nothing from extism:host/env: it does not use "
                         f"Extism's PDK ({EXTISM_AS_PDK})", plugin=project.name)
    if not info.functions:
        raise BuildError(f"{project.name} compiled, but exports no function of type () -> i32 to call",
                         plugin=project.name)


def _run(project: Project, args: list[str], tool: str, *, cwd: Path | None = None,
         env: dict[str, str] | None = None) -> str:
    """Run a compiler; its combined output is returned (warnings) or put in the BuildError."""
    try:
        proc = subprocess.run(args, cwd=cwd or project.root, capture_output=True, text=True,
                              timeout=_TOOL_TIMEOUT_S, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise ToolchainMissingError(f"cannot build {project.name}: {tool} is not installed ({e.strerror})",
                                    tool=tool, install=_install_hint(project.language), plugin=project.name) from e
    except subprocess.TimeoutExpired as e:
        raise BuildError(f"{tool} did not finish within {_TOOL_TIMEOUT_S:g} s", plugin=project.name) from e
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise BuildError(f"{tool} failed (exit {proc.returncode}) building {project.name}:\n{output}",
                         plugin=project.name, output=output, exit_code=proc.returncode)
    return output


def _install_hint(language: Language) -> str:
    return {Language.C: APT_C_TOOLCHAIN, Language.ASSEMBLYSCRIPT: _INSTALL_ASC, Language.EXTISM_AS: _INSTALL_EXTISM_AS,
            Language.PYTHON: _INSTALL_COMPONENTIZE, Language.WAT: "pip install wasmtime"}[language]


# -- WAT ---------------------------------------------------------------------------------------------


def _build_wat(project: Project, out: Path, step: Progress, build: BuildSection) -> str:
    del build  # the text is the module: nothing to optimise, and it states the features it uses
    source = project.root / f"{project.name}.wat"
    step(f"assembling {source.name} with wasmtime.wat2wasm")
    try:
        wasm = wasmtime.wat2wasm(source.read_text(encoding="utf-8"))
    except wasmtime.WasmtimeError as e:
        raise BuildError(f"{source.name} does not assemble:\n{e}", plugin=project.name, output=str(e)) from e
    out.write_bytes(bytes(wasm))
    return ""


# -- C -----------------------------------------------------------------------------------------------


@functools.cache
def _probe_clang(clang: str, sysroot: str) -> str | None:
    """Build a tiny reactor that uses malloc: proves clang, lld, wasi-libc and the wasm32 builtins are all
    there. Returns the failure output, or None when the toolchain works. Cached per process."""
    with tempfile.TemporaryDirectory(prefix="sandbus-probe-") as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text('#include <stdlib.h>\n#include <string.h>\n__attribute__((export_name("probe"))) '
                       "int probe(int n) { char *p = malloc((size_t)n); if (!p) return 0; memset(p, 1, (size_t)n);"
                       " n = p[0]; free(p); return n; }\n")
        proc = subprocess.run([clang, "--target=wasm32-wasi", f"--sysroot={sysroot}", "-O2", "-mexec-model=reactor",
                               "-o", str(Path(tmp) / "probe.wasm"), str(src)],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        return None if proc.returncode == 0 else (proc.stdout + proc.stderr).strip()


def _build_c(project: Project, out: Path, step: Progress, build: BuildSection) -> str:
    clang = os.environ.get("CLANG") or "clang"
    sysroot = os.environ.get("WASI_SYSROOT") or "/usr"
    step(f"checking the C toolchain ({clang}, wasm32-wasi, sysroot {sysroot})")
    found = shutil.which(clang)
    if found is None:
        raise ToolchainMissingError(f"cannot build {project.name}: {clang} is not installed",
                                    tool="clang", install=APT_C_TOOLCHAIN, plugin=project.name)
    failure = _probe_clang(found, sysroot)
    if failure is not None:
        raise ToolchainMissingError(
            f"cannot build {project.name}: {clang} cannot build wasm32-wasi reactors with sysroot {sysroot} "
            f"(wasi-libc, lld or the wasm32 compiler-rt builtins are missing):\n{failure}",
            tool="clang (wasm32-wasi)", install=APT_C_TOOLCHAIN, plugin=project.name)
    sources = sorted(project.root.glob("*.c"))
    # [build]: optimised and stripped, or a debug build with its DWARF kept; the features as -m flags.
    mode = ["-O2", "-Wl,--strip-all"] if build.optimize else ["-O0", "-g"]
    features = [_CLANG_FEATURES[f] for f in build.features]
    step(f"compiling {', '.join(s.name for s in sources)} with clang --target=wasm32-wasi "
         f"{' '.join([mode[0], *features])}")
    # The flags of plugins/build.sh minus -Werror (an author's warnings are shown, not fatal).
    # --stack-first: overflowing the C stack traps instead of silently overwriting static data.
    args = [found, "--target=wasm32-wasi", f"--sysroot={sysroot}", *mode, *features, "-mexec-model=reactor",
            "-Wl,--stack-first", "-I", str(guest_sdk_dir(Language.C)), "-Wall", "-Wextra",
            *os.environ.get("EXTRA_CFLAGS", "").split(), "-o", str(out), *map(str, sources)]
    return _run(project, args, "clang")


# -- AssemblyScript ----------------------------------------------------------------------------------


def _find_asc(project: Project, step: Progress) -> str:
    sdk = guest_sdk_dir(Language.ASSEMBLYSCRIPT)
    bins = [project.root / "node_modules" / ".bin", sdk / "node_modules" / ".bin"]
    asc = find_tool("asc", *bins)
    if asc is not None:
        return asc
    if shutil.which("node") is None:
        raise ToolchainMissingError(f"cannot build {project.name}: Node.js (node) is not installed",
                                    tool="node", install=_INSTALL_NODE, plugin=project.name)
    npm = shutil.which("npm")
    package = project.root / "package.json"
    if npm is not None and package.is_file() and '"assemblyscript"' in package.read_text(encoding="utf-8"):
        step("installing the project's npm dependencies (assemblyscript) with npm install")
        _run(project, [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], "npm install")
        asc = find_tool("asc", *bins)
        if asc is not None:
            return asc
    raise ToolchainMissingError(f"cannot build {project.name}: the AssemblyScript compiler (asc) is not installed",
                                tool="asc", install=_INSTALL_ASC, plugin=project.name)


#: The SDK's package name, as plugins import it.
AS_SDK_PACKAGE = "@sandbus/guest"


def _build_assemblyscript(project: Project, out: Path, step: Progress, build: BuildSection) -> str:
    step("looking for the AssemblyScript compiler (asc)")
    asc = _find_asc(project, step)
    sdk = guest_sdk_dir(Language.ASSEMBLYSCRIPT)
    if not (sdk / "assembly" / "index.ts").is_file():
        raise BuildError(f"the AssemblyScript guest SDK is missing ({sdk}/assembly/index.ts)", plugin=project.name)
    entry = project.entry.relative_to(project.root).as_posix()
    mode = ["-O3"] if build.optimize else ["-O0", "--debug"]
    enable = [f"--enable={name}" for f in build.features if (name := _ASC_FEATURES[f])]
    step(f"compiling {entry} with asc --runtime minimal {' '.join([*mode, *enable])} (takes a few seconds)")
    with tempfile.TemporaryDirectory(prefix="sandbus-asc-") as packages:
        # `import ... from "@sandbus/guest"` resolves through --path to this installation's SDK, so a
        # project builds offline without `npm install` (which would link the same directory).
        scope = Path(packages) / AS_SDK_PACKAGE.split("/")[0]
        scope.mkdir()
        (scope / AS_SDK_PACKAGE.split("/")[1]).symlink_to(sdk, target_is_directory=True)
        # --runtime minimal: the SDK collects garbage in sandbus_alloc, between calls (it refuses
        # the stub runtime, which never frees).
        args = [asc, entry, "-o", str(out), *mode, *enable, "--runtime", "minimal", "--path", packages,
                f"--use=abort={_abort_handler(project)}"]
        return _run(project, args, "asc")


_SDK_IMPORT_RE = re.compile(r"""from\s+["']([^"']*sdk/guest/assemblyscript)/?["']""")


def _abort_handler(project: Project) -> str:
    """What ``abort`` becomes: the SDK's ``sandbusAbort`` (logs the message through sandbus_v1.log, then
    traps) under the name asc gives the SDK's file -- ``~lib/@sandbus/guest/...`` for the package import,
    the relative path for a relative import (the repository's own plugins) -- or, for a plugin that does
    not use the SDK, nothing (a bare trap). Never ``env.abort``: no host provides that import."""
    for source in project.sources():
        if source.suffix != ".ts":
            continue
        text = source.read_text(encoding="utf-8")
        if re.search(rf"""from\s+["']{re.escape(AS_SDK_PACKAGE)}["']""", text):
            return f"~lib/{AS_SDK_PACKAGE}/assembly/index/sandbusAbort"
        match = _SDK_IMPORT_RE.search(text)
        if match:
            sdk = os.path.normpath(os.path.relpath(source.parent / match[1], project.root))
            return f"{Path(sdk).as_posix()}/assembly/index/sandbusAbort"
    return ""


# -- Extism (AssemblyScript with Extism's PDK) -------------------------------------------------------


def _install_npm_dependencies(project: Project, step: Progress) -> None:
    """Extism's PDK must be in the project's node_modules (asc resolves ``@extism/as-pdk`` there): install the
    project's dependencies when it is missing, with ``npm ci`` when a lock file pins them."""
    if (project.root / "node_modules" / EXTISM_AS_PDK / "package.json").is_file():
        return
    if shutil.which("node") is None:
        raise ToolchainMissingError(f"cannot build {project.name}: Node.js (node) is not installed",
                                    tool="node", install=_INSTALL_EXTISM_AS, plugin=project.name)
    npm = shutil.which("npm")
    if npm is None:
        raise ToolchainMissingError(f"cannot build {project.name}: npm is not installed (it installs {EXTISM_AS_PDK})",
                                    tool="npm", install=_INSTALL_EXTISM_AS, plugin=project.name)
    how = "ci" if (project.root / "package-lock.json").is_file() else "install"
    step(f"installing the project's npm dependencies ({EXTISM_AS_PDK}, assemblyscript) with npm {how}")
    _run(project, [npm, how, "--no-audit", "--no-fund", "--loglevel=error"], f"npm {how}")
    if not (project.root / "node_modules" / EXTISM_AS_PDK / "package.json").is_file():
        raise ToolchainMissingError(f"cannot build {project.name}: npm {how} did not install {EXTISM_AS_PDK} (is it "
                                    "in package.json?)", tool=EXTISM_AS_PDK, install=_INSTALL_EXTISM_AS,
                                    plugin=project.name)


def _build_extism_as(project: Project, out: Path, step: Progress, build: BuildSection) -> str:
    _install_npm_dependencies(project, step)
    asc = find_tool("asc", project.root / "node_modules" / ".bin")
    if asc is None:
        raise ToolchainMissingError(f"cannot build {project.name}: the AssemblyScript compiler (asc) is not installed",
                                    tool="asc", install=_INSTALL_EXTISM_AS, plugin=project.name)
    entry = project.entry.relative_to(project.root).as_posix()
    mode = ["-O3"] if build.optimize else ["-O0", "--debug"]
    enable = [f"--enable={name}" for f in build.features if (name := _ASC_FEATURES[f])]
    step(f"compiling {entry} with asc and {EXTISM_AS_PDK} {' '.join([*mode, *enable])} (takes a few seconds)")
    # AssemblyScript's default (incremental) runtime: an Extism host calls no collector between calls, so the
    # plugin's own allocations must collect. `--use abort=`: an abort traps (no Extism host provides env.abort).
    return _run(project, [asc, entry, "-o", str(out), *mode, *enable, "--use", "abort="], "asc")


# -- Python (componentize-py) ------------------------------------------------------------------------

_WORLD_RE = re.compile(r"^\s*world\s+([A-Za-z0-9_-]+)\s*\{", re.MULTILINE)


def python_world() -> tuple[Path, str]:
    """The SDK's WIT directory and the world name componentize-py builds against."""
    wit = guest_sdk_dir(Language.PYTHON) / "wit"
    worlds = [m[1] for f in sorted(wit.glob("*.wit")) for m in _WORLD_RE.finditer(f.read_text(encoding="utf-8"))]
    if not worlds:
        raise AuthoringError(f"the Python guest SDK's WIT world is missing: no `world NAME {{` in {wit}/*.wit",
                             path=str(wit))
    return wit, worlds[0]


def _build_python(project: Project, out: Path, step: Progress, build: BuildSection) -> str:
    del build  # checked by _check_build_section: componentize-py has no flag it could set
    step("looking for componentize-py")
    tool = find_tool("componentize-py")
    if tool is None:
        raise ToolchainMissingError(f"cannot build {project.name}: componentize-py is not installed",
                                    tool="componentize-py", install=_INSTALL_COMPONENTIZE, plugin=project.name)
    wit, world = python_world()
    step(f"compiling app.py into a component with componentize-py (world {world}; takes a few seconds)")
    # -p: the project (app.py and its own modules) and the SDK's sandbus_guest helper module.
    args = [tool, "-d", str(wit), "-w", world, "componentize", "app", "-p", str(project.root),
            "-p", str(guest_sdk_dir(Language.PYTHON)), "-o", str(out)]
    return _run(project, args, "componentize-py")


_COMPILERS: dict[Language, Callable[[Project, Path, Progress, BuildSection], str]] = {
    Language.WAT: _build_wat,
    Language.C: _build_c,
    Language.ASSEMBLYSCRIPT: _build_assemblyscript,
    Language.PYTHON: _build_python,
    Language.EXTISM_AS: _build_extism_as,
}
_TOOLS: dict[Language, str] = {
    Language.WAT: "wat2wasm",
    Language.C: "clang",
    Language.ASSEMBLYSCRIPT: "asc",
    Language.PYTHON: "componentize-py",
    Language.EXTISM_AS: "asc",
}
