"""``sandbus plugins ...``: commands about plugin directories.

``sandbus plugins check DIR`` loads the directory exactly as a node would -- manifests, sha256,
dependencies, the operator policy, compile, instantiate, ``sandbus_init``, ``sandbus_health`` --
prints one row per plugin, and exits 1 when any plugin is invalid, so it can gate a deploy.
Exit codes follow ``sandbus.host.cli.main``: 0 all valid, 1 some plugin invalid, 2 bad usage (no such
directory, invalid policy file).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sandbus.host.cli.extras import require_host
from sandbus.host.cli.output import cell, markup_safe, setup_logging, terminal_json, terminal_text
from sandbus.sdk.errors import PolicyError

if TYPE_CHECKING:
    from rich.table import Table

    from sandbus.host.lifecycle import PluginInfo

__all__ = ["plugins_app"]

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
#: Longest reason shown in the table (a manifest with many errors lists them all, one per line).
MAX_REASON_CHARS = 20_000

plugins_app = typer.Typer(
    name="plugins",
    help="Inspect directories of plugins (<name>.wasm + <name>.toml).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    add_completion=False,
)


def _usage(message: str) -> typer.Exit:
    typer.echo(f"sandbus: {terminal_text(message)}", err=True)
    return typer.Exit(EXIT_USAGE)


def _table(directory: Path, infos: list[PluginInfo]) -> Table:
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"plugins in {markup_safe(directory)}", title_justify="left")
    for column in ("plugin", "version", "status", "functions", "reason"):
        table.add_column(column, overflow="fold")
    for info in infos:
        valid = info.status.serving and info.last_error is None
        status = Text("valid", style="green") if valid else Text("invalid", style="bold red")
        # Every cell is plain text: a reason quotes the manifest ("[subscriptions.topics]") and the
        # plugin's own words, which rich would otherwise read as markup and a terminal as escapes. A
        # manifest's errors are one per line: every line is kept.
        table.add_row(cell(info.name), cell(info.version or "-"), status, cell(", ".join(info.functions) or "-"),
                      cell(info.last_error or "", MAX_REASON_CHARS, multiline=True))
    return table


@plugins_app.command()
def check(
    directory: Annotated[Path, typer.Argument(help="The plugin directory.")],
    policy: Annotated[Path | None, typer.Option(help="Operator policy file (default: deny all but compute).")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Parent of the plugins' data directories.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the plugin list as JSON instead.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="Show lifecycle events.")] = 0,
) -> None:
    """Validate every manifest and module in DIRECTORY; exit 1 if any plugin is invalid.

    A reason names the file and the key at fault, e.g. "echo.toml: [resources.memory_mb]: ...", and lists
    every error of a manifest, one per line.
    """
    require_host("plugins check")
    from rich.console import Console

    from sandbus.host.lifecycle import DEFAULT_MAX_PLUGINS, PluginManager, scan_directory
    from sandbus.host.lifecycle.policy import Policy, load_policy

    setup_logging(verbose, quiet_level=logging.ERROR)
    if not directory.is_dir():
        raise _usage(f"{directory} is not a directory")
    try:
        resolved_policy = load_policy(policy) if policy is not None else Policy.default()
    except PolicyError as e:
        raise _usage(str(e)) from e
    names = scan_directory(directory)
    with PluginManager(directory, policy=resolved_policy, data_root=data_root,
                       max_plugins=max(DEFAULT_MAX_PLUGINS, len(names))) as manager:
        report = manager.discover_and_load()
        infos = manager.list_plugins()
    invalid = [i for i in infos if not (i.status.serving and i.last_error is None)]
    if json_output:
        typer.echo(terminal_json(("[" + ",".join(i.model_dump_json() for i in infos) + "]").encode()).decode())
    elif not infos:
        Console().print(f"no plugins in {markup_safe(directory)} (expected <name>.wasm + <name>.toml pairs)")
    else:
        console = Console()
        console.print(_table(directory, infos))
        console.print(f"{len(infos) - len(invalid)} valid, {len(invalid)} invalid")
    if invalid or not report.ok:
        raise typer.Exit(EXIT_INVALID)
