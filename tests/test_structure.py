"""The shape of the code, checked statically: one import namespace, no import circles, the layers.

* Everything imports as ``sandbus.*``. The folders ``host/``, ``bus/`` and ``sdk/`` sit at the top of the
  repository and ``sandbus/`` links to them; importing one of them as a top-level ``host``/``bus``/``sdk``
  would load the same file as a second module object, and ``isinstance`` across the two fails.
* No import circles between modules. The graph has an edge from module M to every module that importing M
  runs at once: its module-level imports (class bodies, ``try`` and ``if`` blocks included), not those under
  ``if TYPE_CHECKING:`` (never run) nor those inside functions (run later, when everything is loaded).
  Importing ``a.b.c`` runs ``a`` and ``a.b`` first, so the edges go to those packages too, except to M's own
  ancestors: Python has started them before M, so a package whose ``__init__`` imports its submodules, and a
  submodule importing a sibling, is not a circle by itself. Taking a *name* from a package
  (``from pkg import Name``, not a submodule) depends on the ``__init__`` having defined it, so that is an
  edge to ``pkg`` even from inside it, plus an edge to the module the ``__init__`` takes the name from (for
  the lazy facades of :mod:`sandbus._lazy`, that module is what ``__getattr__`` imports there and then).
  A strongly connected component of more than one module is a circle, reported with one cycle through it.
* ``sandbus.bus`` and ``sandbus.sdk`` are below the host: they import nothing from ``sandbus.host``, at any
  level (``sdk/testing``, the harness that drives the host for plugin authors, is the one exception).
* The client side loads neither wasmtime nor watchdog, and the host extra's table matches pyproject.toml.
"""

from __future__ import annotations

import ast
import functools
import itertools
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sandbus._extras import HOST_BINARIES, HOST_MODULES, is_host_module, missing_host_modules

ROOT = Path(__file__).resolve().parent.parent
#: Folders whose Python files must import sandbus only as ``sandbus.*``.
CHECKED_DIRS = ("host", "bus", "sdk", "tests", "bench", "plugins", "sandbus")
SKIPPED_PARTS = {"__pycache__", "node_modules", ".venv"}
#: The repository folders that install as ``sandbus.<name>``.
PACKAGE_DIRS = ("host", "bus", "sdk")
FORBIDDEN_ROOTS = {"host", "bus", "sdk"}


def _python_files(top: Path) -> Iterator[Path]:
    for path in sorted(top.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if SKIPPED_PARTS & set(rel.parts) or rel.parts[:2] == ("plugins", "build"):
            continue
        if rel.parts[0] == "sandbus" and len(rel.parts) > 2:  # sandbus/host etc. are links to host/ etc.
            continue
        yield path


def _module_name(path: Path) -> str | None:
    """``sandbus.x.y`` for a file of the installed package, None for a file outside it (a guest source)."""
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] in PACKAGE_DIRS:
        for depth in range(1, len(parts)):  # every folder on the way must be a package
            if not (ROOT.joinpath(*parts[:depth]) / "__init__.py").exists():
                return None
        parts.insert(0, "sandbus")
    elif parts[0] != "sandbus":
        return None
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@dataclass(frozen=True)
class Import:
    """One import statement's target: ``module`` (absolute), and the names taken from it (``from`` form)."""

    module: str
    names: tuple[str, ...]
    line: int
    runtime: bool  # runs when the importing module is imported (module level, not under TYPE_CHECKING)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module: str | None, is_package: bool) -> list[Import]:
    """Every import of ``tree``, relative ones resolved against ``module``."""
    found: list[Import] = []

    def visit(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, (), node.lineno, runtime) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = (module or "").split(".") if is_package else (module or "").split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            found.append(Import(base, tuple(a.name for a in node.names), node.lineno, runtime))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for child in ast.iter_child_nodes(node):
                visit(child, False)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, False)
            for child in node.orelse:
                visit(child, runtime)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
            if called in {"import_module", "__import__"} and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append(Import(node.args[0].value, (), node.lineno, False))
            for child in ast.iter_child_nodes(node):
                visit(child, runtime)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, runtime)

    for top in tree.body:
        visit(top, True)
    return found


@dataclass
class Source:
    path: Path
    module: str | None
    imports: list[Import]


@functools.cache  # parsed once per session: the files do not change under a test run
def _sources(dirs: tuple[str, ...]) -> list[Source]:
    sources = []
    for d in dirs:
        for path in _python_files(ROOT / d):
            module = _module_name(path)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            sources.append(Source(path, module, _imports(tree, module, path.name == "__init__.py")))
    return sources


def _package_sources() -> dict[str, Source]:
    return {s.module: s for s in _sources((*PACKAGE_DIRS, "sandbus")) if s.module is not None}


def _reexports(sources: dict[str, Source]) -> dict[str, dict[str, str]]:
    """For each package: name -> the module its ``__init__`` takes the name from (eager or lazy)."""
    table: dict[str, dict[str, str]] = {}
    for module, src in sources.items():
        if src.path.name != "__init__.py":
            continue
        names = table.setdefault(module, {})
        for imp in src.imports:
            for name in imp.names:
                names.setdefault(name, imp.module)
    return table


def _targets(imp: Import, modules: set[str], reexports: dict[str, dict[str, str]]) -> Iterator[str]:
    """The sandbus modules one import statement loads by name (see the module docstring)."""
    if not imp.names:
        yield imp.module
        return
    for name in imp.names:
        sub = f"{imp.module}.{name}"
        if sub in modules:
            yield sub
            continue
        yield imp.module
        origin = reexports.get(imp.module, {}).get(name)
        if origin is not None and origin != imp.module:
            yield origin


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph(sources: dict[str, Source]) -> dict[str, dict[str, int]]:
    """module -> {module it runs at import: line of the import}."""
    modules = set(sources)
    reexports = _reexports(sources)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, src in sources.items():
        own = {*_ancestors(module), module}
        for imp in src.imports:
            if not imp.runtime:
                continue
            for target in _targets(imp, modules, reexports):
                if target not in modules:
                    continue
                # the packages on the way run first, unless they already run around this module
                for dep in [*[a for a in _ancestors(target) if a not in own], target]:
                    if dep in modules and dep != module:
                        graph[module].setdefault(dep, imp.line)
    return graph


def _components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit to meet)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                found.append(sorted(component))
    return found


def _cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """One cycle through the component's first module (breadth first: a shortest one)."""
    members = set(component)
    start = component[0]
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if child not in came_from:
                    came_from[child] = node
                    nxt.append(child)
        frontier = nxt
    return [start, start]


def test_everything_imports_as_sandbus() -> None:
    offenders = []
    for src in _sources(CHECKED_DIRS):
        for imp in src.imports:
            if imp.module.split(".")[0] in FORBIDDEN_ROOTS:
                offenders.append(f"{src.path.relative_to(ROOT)}:{imp.line}: imports {imp.module!r}")
    assert not offenders, "import these as sandbus.<...>, never top-level:\n" + "\n".join(offenders)


def test_graph_sees_packages_and_their_edges() -> None:
    """The check below is only as good as the graph: it holds the modules and the edges it should."""
    sources = _package_sources()
    graph = _graph(sources)
    assert {"sandbus", "sandbus.sdk.client", "sandbus.host.cli.main", "sandbus.bus.server"} <= set(graph)
    assert "sandbus.sdk.envelope" in graph["sandbus.sdk.client"]  # from sandbus.sdk.envelope import ...
    assert "sandbus.sdk.errors" in graph["sandbus.sdk.envelope"]
    assert "sandbus.host.cli.output" in graph["sandbus.host.cli.main"]
    # the implicit package edge, and the one through a lazy facade to the module that defines the name
    assert "sandbus.host.sandbox" in graph["sandbus.host.cli.output"]
    assert "sandbus.host.sandbox.audit" in graph["sandbus.host.telemetry.otel"]
    # what runs later is no edge: host/cli/main.py imports the sandbox inside `run` only
    assert "sandbus.host.sandbox.sandbox" not in graph["sandbus.host.cli.main"]
    # a lazy facade's TYPE_CHECKING imports are no edges
    assert "sandbus.host.sandbox.sandbox" not in graph["sandbus.host.sandbox"]


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}, "e": {"e": 1}}
    components = [c for c in _components(graph) if len(c) > 1]
    assert components == [["a", "b", "c"]]
    assert _cycle(graph, components[0]) == ["a", "b", "c", "a"]


def test_no_import_circles() -> None:
    sources = _package_sources()
    graph = _graph(sources)
    circles = []
    for component in _components(graph):
        if len(component) < 2:
            continue
        cycle = _cycle(graph, component)
        path = " -> ".join(f"{a} (its line {graph[a][b]})" for a, b in itertools.pairwise(cycle))
        circles.append(f"{len(component)} modules: {', '.join(component)}\n  e.g. {path} -> {cycle[-1]}")
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_bus_and_sdk_import_nothing_from_the_host() -> None:
    sources = _package_sources()
    modules = set(sources)
    reexports = _reexports(sources)
    offenders = []
    for module, src in sources.items():
        below = module.startswith(("sandbus.bus", "sandbus.sdk")) and not module.startswith("sandbus.sdk.testing")
        if not below:
            continue
        for imp in src.imports:  # any import, however late it runs
            for target in [imp.module, *_targets(imp, modules, reexports)]:
                if target == "sandbus.host" or target.startswith("sandbus.host."):
                    offenders.append(f"{src.path.relative_to(ROOT)}:{imp.line}: {target}")
    assert not offenders, "sandbus.bus and sandbus.sdk must not reach into sandbus.host:\n" + "\n".join(offenders)


CLIENT_SIDE = """
import sys
import sandbus
from sandbus import Client, PluginMessage, SandbusError, errors
import sandbus.sdk.client
import sandbus.bus
import sandbus.host
from sandbus.host.cli.main import register_commands
register_commands([])  # every command, as `sandbus --help` registers them
import sandbus.host.telemetry.otel  # `sandbus trace` collects its own spans with it
host_side = ("opentelemetry.exporter", "sandbus.host.sandbox.sandbox", "sandbus.host.lifecycle", "sandbus.host.node",
             "sandbus.host.authoring")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {roots!r} or m.startswith(host_side))
print(",".join(loaded))
"""


def test_client_side_loads_no_host_dependency() -> None:
    """``import sandbus``, the client, and every CLI command's registration load none of the host extra, and
    none of the modules that run plugins (the sandbox, the lifecycle, the node, authoring)."""
    # nats-py itself imports aiohttp when it is installed (its websocket transport): not ours to keep out
    roots = {m.split(".")[0] for m in HOST_MODULES if not m.startswith(("opentelemetry", "aiohttp"))}
    assert roots == {"wasmtime", "watchdog", "semantic_version"}
    proc = subprocess.run([sys.executable, "-c", CLIENT_SIDE.format(roots=roots)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"the client side loaded: {proc.stdout.strip()}"


def test_host_extra_table_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}

    assert names(extras["host"]) == {*HOST_MODULES.values(), *HOST_BINARIES.values()}, \
        "the host extra of pyproject.toml and sandbus._extras.HOST_MODULES / HOST_BINARIES must name the same"
    assert "sandbus[host]" in extras["dev"]  # `make test` installs `.[dev]`: the host side with it
    assert not names(project["dependencies"]) & names(extras["host"])


def test_host_modules_are_told_apart_from_the_clients() -> None:
    """A missing module is blamed on the host extra only when the extra provides it."""
    for name in ("wasmtime", "wasmtime._bindings", "watchdog.observers", "semantic_version",
                 "opentelemetry.exporter", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        assert is_host_module(name), name
    for name in ("opentelemetry", "opentelemetry.sdk", "nats", "orjson", "wasmtimes", "sandbus"):
        assert not is_host_module(name), name
    assert missing_host_modules() == []  # this venv has the host extra (`make test` installs `.[dev]`)
