"""The plugin registry on the command line: ``keygen``, ``push``, ``search``, ``pull``, ``install``.

The registry lives in JetStream on the bus (:mod:`sandbus.host.cluster.registry`); these commands connect
like every client command (``-s``/``NATS_URL``/contexts...). They validate manifests and write plugin files,
so they need the host extra. Everything typed on the command line is checked before anything connects: a
plugin reference that is not ``name`` or ``name@range`` (``../x``, ``a.*``) is a usage error.

Exit codes: a bad argument, an unknown plugin or version, a version that exists, a malformed entry: 2; an
artifact whose signature, digest or publisher does not pass: 4; NATS or JetStream unreachable: 5.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from sandbus.host.cli.connect import Connection, run_on_nats, with_connection
from sandbus.host.cli.extras import require_host
from sandbus.host.cli.main import EXIT_USAGE, exit_code_for, fail
from sandbus.host.cli.output import terminal_text
from sandbus.host.cli.trust import PolicyOpt, TrustOpt, note_unchecked, trusted_publishers
from sandbus.sdk.errors import DependencyError, RegistryError, SandbusError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from rich.table import Table

    from sandbus.host.cluster.registry import PluginSummary, Registry

__all__ = ["install", "keygen", "pull", "push", "register", "search"]

T = TypeVar("T")

RefArg = Annotated[str, typer.Argument(help="name, or name@range (e.g. greeter@^1.2, greeter@1.2.0).",
                                       show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON on stdout).")]


def exit_code(err: SandbusError) -> int:
    """The registry's errors are the caller's input (usage); the rest map as everywhere."""
    if isinstance(err, RegistryError | DependencyError):
        return EXIT_USAGE
    return exit_code_for(err)


def _run(call: Callable[[Registry], Awaitable[T]], conn: Connection) -> T:
    """Open the registry on a connected client and run ``call`` (:func:`run_on_nats`)."""

    async def with_registry(nc: Any) -> T:
        from sandbus.host.cluster.registry import Registry

        return await call(await Registry.open(nc))

    return run_on_nats(with_registry, conn, exit_code)


def _checked(action: Callable[[], T]) -> T:
    """``action()``; a sandbus error it raises is one line and its exit code."""
    try:
        return action()
    except SandbusError as e:
        fail(str(e), exit_code(e))


def _ref(text: str) -> Any:
    from sandbus.host.cluster.names import parse_ref

    return _checked(lambda: parse_ref(text))


def _short_key(key: str) -> str:
    return f"{key[:6]}…{key[-4:]}" if len(key) > 12 else key


def _size(n: int) -> str:
    if n < 10 * 1024:
        return f"{n} B"
    return f"{n / 1024:.0f} KiB" if n < 10 * 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


# -- commands ------------------------------------------------------------------------------------------------

def keygen(
    output: Annotated[Path, typer.Option("-o", "--output", help="Seed file to write (the public key goes to "
                                         "FILE.pub).", show_default=False)],
) -> None:
    """Make a publisher key: an nkeys account seed (mode 0600; keep it secret) and FILE.pub (share it).

    Never overwrites a file.
    """
    require_host("keygen")
    from sandbus.host.cluster.keys import keygen as make_key

    key = _checked(lambda: make_key(output))
    typer.echo(f"wrote {output} (the seed: keep it secret) and {output}.pub")
    typer.echo(key.public_key)


def _warn_if_shared(seed: Path) -> None:
    """A seed others may read is a key others may sign with: say so (as ssh does of a private key)."""
    import os
    import stat

    try:
        mode = stat.S_IMODE(os.stat(seed).st_mode)
    except OSError:
        return
    if mode & 0o077:
        typer.echo(f"sandbus: warning: the seed file {terminal_text(str(seed)[:200])} may be read by others "
                   f"(mode {mode:o}): anyone who reads it can publish as you; chmod 600 it", err=True)


def _plugin_files(path: Path) -> tuple[Path, str]:
    """(directory, plugin name) of ``DIR`` (holding one plugin) or ``FILE.wasm``."""
    if path.is_dir():
        stems = sorted(p.stem for p in path.iterdir() if p.suffix == ".wasm" and not p.name.startswith(".")
                       and (path / f"{p.stem}.toml").exists())
        if len(stems) != 1:
            found = ", ".join(stems[:10]) if stems else "none"
            fail(f"{path} must hold exactly one plugin (<name>.wasm beside <name>.toml), found: {found}; "
                 "give its .wasm file instead", EXIT_USAGE)
        return path, stems[0]
    if path.suffix != ".wasm":
        fail(f"{path}: expected a directory or a .wasm file", EXIT_USAGE)
    return path.parent, path.stem


@with_connection
def push(
    path: Annotated[Path, typer.Argument(help="A directory with <name>.wasm and <name>.toml, or the .wasm file.",
                                         show_default=False)],
    key: Annotated[Path, typer.Option("--key", help="Publisher seed file (from `sandbus keygen`).",
                                      show_default=False)],
    *,
    conn: Connection,
) -> None:
    """Publish a plugin (module + manifest) to the registry as name@version, signed with KEY.

    A version is published once: pushing it again is refused.
    """
    require_host("push")
    from sandbus.host.cluster.keys import load_seed
    from sandbus.host.lifecycle.loader import parse_files, read_plugin_files

    publisher = _checked(lambda: load_seed(key))
    _warn_if_shared(key)
    directory, name = _plugin_files(path)
    files = _checked(lambda: read_plugin_files(directory, name))
    _checked(lambda: parse_files(files))  # the lifecycle's own checks: name matches the file, runtime version
    wasm, manifest = files.wasm, files.manifest
    if wasm is None or manifest is None:  # parse_files refuses a missing file; kept for the type checker
        fail(f"{directory}/{name}: module or manifest missing", EXIT_USAGE)
    entry = _run(lambda r: r.push(wasm, manifest, publisher, source=str(files.manifest_path)), conn)
    typer.echo(f"pushed {entry.ref} (sha256 {entry.sha256}, {entry.size} bytes) as {entry.publisher}")


@with_connection
def search(
    text: Annotated[str | None, typer.Argument(help="Text to look for in names, descriptions and tags.")] = None,
    as_json: JsonOpt = False,
    *,
    conn: Connection,
) -> None:
    """Plugins in the registry whose name, description or tags contain TEXT (all of them without TEXT)."""
    require_host("search")
    if text is not None and len(text) > 256:
        fail("TEXT is longer than 256 characters", EXIT_USAGE)
    found: list[PluginSummary] = _run(lambda r: r.search(text), conn)
    if as_json:
        import orjson

        from sandbus.host.cli.output import terminal_json

        body = orjson.dumps([s.to_dict() for s in found], option=orjson.OPT_INDENT_2)
        sys.stdout.buffer.write(terminal_json(body) + b"\n")
        return
    if not found:
        typer.echo("no plugin matches" if text else "the registry is empty")
        return
    from rich.console import Console

    Console().print(_table(found))


def _table(found: list[PluginSummary]) -> Table:
    from rich import box
    from rich.table import Table

    from sandbus.host.cli.output import cell

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for title in ("name", "versions", "description", "publisher", "size"):
        table.add_column(title, overflow="fold", justify="right" if title == "size" else "left")
    for s in found:
        versions = ", ".join(s.versions[-5:]) + (f" (+{len(s.versions) - 5})" if len(s.versions) > 5 else "")
        # Entries are whatever someone wrote into the bucket: plain, escaped, bounded cells.
        table.add_row(cell(s.name), cell(versions), cell(s.latest.description, 200),
                      cell(_short_key(s.latest.publisher)), cell(_size(s.latest.size)))
    return table


@with_connection
def pull(
    ref: RefArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory to write <name>.wasm and <name>.toml "
                                         "into (created if missing).", show_default=False)],
    trust: TrustOpt = None,
    policy: PolicyOpt = None,
    *,
    conn: Connection,
) -> None:
    """Download a plugin, verified (digest and signature; with --trust/--policy, its publisher too).

    With --trust/--policy, only those publishers' versions are considered: another publisher's higher version
    is not chosen.
    """
    require_host("pull")
    parsed = _ref(ref)
    trusted = _checked(partial(trusted_publishers, trust, policy))

    async def go(r: Registry) -> Any:
        from sandbus.host.cluster.plugin_files import write_plugin

        entry, wasm = await r.pull(parsed, trusted)
        write_plugin(output, entry, wasm)
        return entry

    entry = _run(go, conn)
    note_unchecked(trusted, "taken")
    typer.echo(f"pulled {entry.ref} (sha256 {entry.sha256}, {entry.size} bytes, signed by {entry.publisher}) "
               f"into {output}/{entry.name}.wasm")


@with_connection
def install(
    ref: RefArg,
    plugins: Annotated[Path, typer.Option("--plugins", help="The plugin directory (created if missing).",
                                          show_default=False)],
    trust: TrustOpt = None,
    policy: PolicyOpt = None,
    *,
    conn: Connection,
) -> None:
    """Install a plugin and its dependencies from the registry into a plugin directory, verified.

    A dependency already in the directory at a version its range allows is kept. With --trust/--policy, only
    those publishers' versions are considered, for the plugin and its dependencies.
    """
    require_host("install")
    parsed = _ref(ref)
    trusted = _checked(partial(trusted_publishers, trust, policy))
    report = _run(lambda r: r.install(parsed, plugins, trusted), conn)
    note_unchecked(trusted, "taken")
    for entry in report.installed:
        typer.echo(f"installed {entry.ref} (signed by {entry.publisher}) into {plugins}")
    for name, version in sorted(report.kept.items()):
        typer.echo(f"kept {name}@{version} (already in {plugins})")
    for name, why in sorted(report.skipped_optional.items()):
        typer.echo(f"skipped optional dependency {name}: {why}")


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add the registry commands to ``app``, or only the one named ``only``."""
    for command in (keygen, push, search, pull, install):
        if only is None or command.__name__ == only:
            app.command()(command)
