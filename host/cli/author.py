"""CLI commands for plugin authors: ``new``, ``build``, ``inspect``.

From nothing to a plugin served by two nodes::

    sandbus new greeter --lang c         # a project that builds and passes its test as generated
    sandbus build greeter                # -> greeter/build/greeter.wasm + greeter.toml
    sandbus node --plugins greeter/build # (twice, for two nodes on one NATS)

Exit codes follow :mod:`sandbus.host.cli.main`: 0 success; 1 the build failed (compiler errors) or the inspected
module would be refused by a node; 2 bad usage or input (invalid name, existing directory, not a
project, invalid manifest, not a wasm file) and a missing toolchain, whose message names the tool
and the command that installs it. All three need the host extra (they load the manifest and the module as
a node would); they import :mod:`sandbus.host.authoring` only after checking it is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import orjson
import typer

from sandbus.host.cli.extras import require_host
from sandbus.host.cli.main import EXIT_OK, EXIT_PLUGIN, EXIT_USAGE, fail
from sandbus.host.cli.output import cell, markup_safe, terminal_json, terminal_text
from sandbus.host.sandbox.guest_text import escape_controls
from sandbus.sdk.errors import ManifestError

if TYPE_CHECKING:
    from rich.text import Text

    from sandbus.host.authoring import WasmReport

__all__ = ["LanguageName", "build", "inspect", "new", "register"]

#: The values of :class:`sandbus.host.authoring.Language`, spelled here so that registering ``new`` imports
#: nothing of the host side (tests/host/test_cli.py checks the two agree).
LanguageName = Literal["c", "assemblyscript", "python", "wat", "extism-as"]


def new(
    name: Annotated[str, typer.Argument(help="Plugin name: lowercase letters, digits and _ (a NATS token).")],
    lang: Annotated[LanguageName, typer.Option("--lang", "-l", help="Guest language.", case_sensitive=False)]
    = "c",
    directory: Annotated[Path, typer.Option("--dir", "-d", help="Parent directory of the new project.")]
    = Path("."),
    description: Annotated[str | None, typer.Option(help="One line for the manifest.")] = None,
) -> None:
    """Create NAME/ with a working plugin: source, manifest, Makefile and a pytest test."""
    require_host("new")
    from rich.console import Console

    from sandbus.host.authoring import AuthoringError, Language, scaffold

    language = Language(lang)
    try:
        project = scaffold(name, language, directory, description=description)
    except AuthoringError as e:
        fail(str(e), EXIT_USAGE)
    console = Console(soft_wrap=True)  # lines are commands to copy: never wrapped
    console.print(f"created [bold]{markup_safe(project.root)}[/bold] ({language.value}):")
    for path in sorted(p for p in project.root.rglob("*") if p.is_file()):
        console.print(f"  {markup_safe(path.relative_to(project.root))}")
    shown = _shown(project.root)
    console.print("next:")
    console.print(f"  sandbus build {shown}              # -> {shown}/build/{name}.wasm", markup=False)
    console.print(f"  python -m pytest {shown}           # runs test_{name}.py", markup=False)
    console.print(f"  sandbus run {shown}/build/{name}.wasm --input '{{\"hello\": \"world\"}}'", markup=False)


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it (shorter commands to copy)."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def build(
    directory: Annotated[Path, typer.Argument(help="The plugin project (default: here).")] = Path("."),
    force: Annotated[bool, typer.Option("--force", "-f", help="Rebuild even when up to date.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only errors and the result line.")] = False,
) -> None:
    """Compile the project with its language's toolchain into DIR/build/ (NAME.wasm + NAME.toml)."""
    require_host("build")
    from rich.console import Console
    from rich.text import Text

    from sandbus.host.authoring import AuthoringError, BuildError, ToolchainMissingError, build_project

    err = Console(stderr=True, soft_wrap=True)
    out = Console(soft_wrap=True)
    try:
        with err.status("building", spinner="dots") as status:
            def progress(line: str) -> None:
                status.update(markup_safe(line))
                if not quiet:
                    err.print(f"[dim]•[/dim] {markup_safe(line)}", highlight=False)

            result = build_project(directory, force=force, progress=progress)
    except ToolchainMissingError as e:
        fail(f"{e.message}\n  install it with: {e.install}", EXIT_USAGE)
    except BuildError as e:
        fail(str(e), EXIT_PLUGIN)
    except (AuthoringError, ManifestError) as e:
        fail(str(e), EXIT_USAGE)
    if result.output and not quiet:  # the compiler's output quotes the sources: shown, never interpreted
        err.print(Text(escape_controls(result.output, keep_newlines=True), style="yellow"))
    wasm = _shown(result.wasm)
    verb = "built" if result.built else "up to date:"
    out.print(f"{verb} {markup_safe(wasm)} ({_size(result.size)}, {result.tool}, sha256 {result.sha256[:12]}…) "
              f"in {result.duration_s:.2f} s", highlight=False)


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


def inspect(
    wasm: Annotated[Path, typer.Argument(help="The .wasm file (a NAME.toml beside it is checked too).")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    manifest: Annotated[bool, typer.Option(
        "--manifest", help="Write a starting manifest NAME.toml beside the module (never over an existing one)."
    )] = False,
) -> None:
    """Kind, size, exports, imports, ABI version and manifest of a module; exit 1 if a node would refuse it.

    An Extism plugin (a module importing extism:host/env) is recognised as one: its functions are its
    () -> i32 exports. --manifest writes NAME.toml for any module, with Extism's manifest notions mapped
    onto sandbus's keys for an Extism plugin.
    """
    require_host("inspect")
    from sandbus.host.authoring import AuthoringError, inspect_wasm

    try:
        report = inspect_wasm(wasm)
        if manifest:
            report = _write_manifest(wasm, report)
    except AuthoringError as e:
        fail(str(e), EXIT_USAGE)
    if as_json:
        sys.stdout.buffer.write(terminal_json(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2)) + b"\n")
    else:
        _print_report(report)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_PLUGIN)


def _write_manifest(wasm: Path, report: WasmReport) -> WasmReport:
    """Write the starting manifest beside ``wasm`` (created, never replaced) and inspect again with it."""
    from sandbus.host.authoring import AuthoringError, inspect_wasm
    from sandbus.host.authoring.inspector import manifest_for

    target = wasm.with_suffix(".toml")
    text = manifest_for(report)
    try:
        with open(target, "x", encoding="utf-8") as f:  # "x": an existing manifest (or a symlink there) stays
            f.write(text)
    except FileExistsError:
        raise AuthoringError(f"{target} exists: a manifest is not overwritten (remove it first)",
                             path=str(target)) from None
    except OSError as e:
        raise AuthoringError(f"cannot write {target}: {e.strerror or e}", path=str(target)) from e
    typer.echo(f"wrote {terminal_text(str(target))}", err=True)
    return inspect_wasm(wasm)


def _verdict(ok: bool | None, text: str, *, multiline: bool = False) -> Text:
    from rich.text import Text

    text = escape_controls(text, keep_newlines=multiline)  # it quotes names from the module: any UTF-8
    if ok is None:
        return Text(text)
    return Text(text, style="green" if ok else "bold red")


def _print_report(r: WasmReport) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    # Names in a module (exports, imports) and in its manifest are the author's: plain text cells.
    facts = Table(show_header=False, title=markup_safe(r.path), title_justify="left", box=None, pad_edge=False)
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")
    from sandbus.host.authoring.inspector import KIND_LABELS

    facts.add_row("kind", cell(KIND_LABELS.get(r.kind, r.kind)))
    facts.add_row("size", f"{_size(r.size)} ({r.size} bytes)")
    facts.add_row("sha256", r.sha256)
    if r.kind == "core module":
        facts.add_row("ABI v1 exports", _verdict(r.abi_ok, "ok" if r.abi_ok else f"refused: {r.abi_error}"))
        version = "-" if r.abi_version is None else str(r.abi_version)
        facts.add_row("ABI version", _verdict(r.abi_version == 1 if r.abi_version is not None else None, version))
        if r.memory_pages is not None:
            facts.add_row("initial memory", f"{r.memory_pages} pages ({_size(r.memory_pages * 65536)})")
        if r.optional_exports:
            facts.add_row("optional exports", cell(", ".join(r.optional_exports)))
    elif r.kind == "extism":
        facts.add_row("ABI", _verdict(r.abi_ok, "Extism host ABI: () -> i32 exports, bytes in, bytes out"
                                      if r.abi_ok else f"refused: {r.abi_error}"))
        if r.memory_pages is not None:
            facts.add_row("initial memory", f"{r.memory_pages} pages ({_size(r.memory_pages * 65536)})")
        imported = sorted({i.name for i in r.imports if i.module == "extism:host/env"})
        facts.add_row("extism imports", cell(", ".join(imported) or "-"))
    else:
        facts.add_row("ABI", "component model: world sandbus:plugin (functions dispatched by handle-request)")
    facts.add_row("callable functions", cell(", ".join(r.functions) or "-"))
    if r.load_error:
        facts.add_row("loads in a sandbox", _verdict(False, r.load_error))
    elif r.kind in ("core module", "extism") and r.abi_ok:
        facts.add_row("loads in a sandbox", _verdict(True, "yes (default limits, nothing granted)"))
    for problem in r.import_problems:
        facts.add_row("import", _verdict(False, problem))
    if r.manifest is None:
        facts.add_row("manifest", Text(escape_controls(f"none ({Path(r.path).with_suffix('.toml').name} is not "
                                                       "beside it; a node needs one)"), style="yellow"))
    elif r.manifest.valid:
        pinned = ", sha256 pinned and matching" if r.manifest.sha256_pinned else ""
        facts.add_row("manifest", _verdict(True, f"valid: {r.manifest.name} {r.manifest.version}{pinned}"))
    else:
        facts.add_row("manifest", _verdict(False, f"invalid: {r.manifest.error}", multiline=True))
    for label, value in r.manifest.facts() if r.manifest is not None else ():
        facts.add_row(label, cell(value))
    console.print(facts)

    exports = Table(title="exports", title_justify="left")
    for col in ("name", "kind", "signature"):
        exports.add_column(col, overflow="fold")
    for e in r.exports:
        exports.add_row(cell(e.name), cell(e.kind), cell(e.signature))
    console.print(exports)
    imports = Table(title="imports", title_justify="left")
    for col in ("module", "name", "kind", "signature"):
        imports.add_column(col, overflow="fold")
    wasi_packages: set[str] = set()
    wasi_functions = 0
    for i in r.imports:
        if i.module.startswith("wasi:"):  # a component's WASI 0.2 imports run to ~100: summarised
            wasi_packages.add(i.module.split("/")[0])
            wasi_functions += 1
            continue
        imports.add_row(cell(i.module or "-"), cell(i.name), cell(i.kind), cell(i.signature))
    if wasi_packages:
        imports.add_row(", ".join(sorted(wasi_packages)), f"({wasi_functions} functions)", "func",
                        "WASI 0.2: files, clocks, randomness denied unless granted")
    if r.imports:
        console.print(imports)
    else:
        console.print("imports: none")
    console.print(_verdict(r.ok, "a node accepts this module" if r.ok else "a node would refuse this module"))


def register(app: typer.Typer) -> None:
    """Add ``new``, ``build`` and ``inspect`` to the ``sandbus`` command."""
    app.command()(new)
    app.command()(build)
    app.command()(inspect)
