"""Client commands on the bus: ``request``, ``pub``, ``ls``.

They only talk to NATS: they need only what ``pip install sandbus`` brings, and they start fast. Nothing
here imports rich unless ``ls`` prints its table. Their failures map onto the exit codes of
:mod:`sandbus.host.cli.main` as errors of a call over the bus: no node serving the plugin is
``EXIT_NO_NODE``, no reply in time ``EXIT_TIMEOUT``, a request the node refused as the caller's ``EXIT_USAGE``.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from sandbus.host.cli.connect import Connection, client_run, with_connection
from sandbus.host.cli.main import (
    EXIT_NO_NODE,
    EXIT_PLUGIN,
    EXIT_USAGE,
    exit_code_for,
    fail,
    finite_positive,
    read_json_arg,
)
from sandbus.host.cli.output import terminal_json
from sandbus.sdk.errors import SandbusError
from sandbus.sdk.subjects import check_token, check_topic

if TYPE_CHECKING:
    from rich.table import Table

    from sandbus.sdk.client import Client

__all__ = ["FunctionArg", "PluginArg", "RequestArg", "TimeoutOpt", "bus_call", "check_target", "decode_reply",
           "ls", "pub", "register", "request"]

PluginArg = Annotated[str, typer.Argument(help="Plugin name.", show_default=False)]
FunctionArg = Annotated[str, typer.Argument(help="Function to call.")]
RequestArg = Annotated[str, typer.Argument(help="Request JSON, or - for stdin.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the reply.", callback=finite_positive)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON on stdout).")]

T = TypeVar("T")


def check_target(plugin: str, function: str, command: str = "request") -> None:
    """Plugin and function must be subject tokens: anything else is a usage error, not a bus error. JSON
    where the function goes is the payload given without a function: said so, with the command to type."""
    try:
        check_token(plugin, "plugin")
    except ValueError as e:
        fail(str(e), EXIT_USAGE)
    if function.lstrip()[:1] in ("{", "[", '"'):
        shown = shlex.quote(function) if len(function) <= 60 else "'{...}'"
        fail(f"FUNCTION looks like JSON: did you mean `sandbus {command} {plugin} handle_request {shown}`?",
             EXIT_USAGE)
    try:
        check_token(function, "function")
    except ValueError as e:
        fail(str(e), EXIT_USAGE)


@dataclass(frozen=True)
class _Failed:
    """An error the call itself raised, carried out of :func:`client_run` to be mapped as a bus call's."""

    error: SandbusError


def bus_call(call: Callable[[Client], Awaitable[T]], conn: Connection) -> T:
    """Run ``call`` on a connected client; its errors exit with the code of an error over the bus (no node
    serving the plugin: ``EXIT_NO_NODE``, no reply in time: ``EXIT_TIMEOUT``...), each as one line.
    Connecting is :func:`client_run`'s: NATS unreachable is ``EXIT_BUS``."""

    async def guarded(client: Client) -> T | _Failed:
        try:
            return await call(client)
        except SandbusError as e:
            return _Failed(e)

    result: T | _Failed = client_run(guarded, conn)
    if isinstance(result, _Failed):
        fail(str(result.error), exit_code_for(result.error, over_bus=True))
    return result


def decode_reply(reply: bytes) -> Any:
    """The reply's JSON value; whatever answered on the bus may have sent anything else."""
    import orjson

    try:
        return orjson.loads(reply)
    except orjson.JSONDecodeError as e:
        fail(f"the reply is not JSON ({len(reply)} bytes): {e}", EXIT_PLUGIN)


@with_connection
def request(
    plugin: PluginArg,
    function: FunctionArg = "handle_request",
    payload: RequestArg = "{}",
    timeout: TimeoutOpt = 5.0,
    *,
    conn: Connection,
) -> None:
    """Call PLUGIN's FUNCTION on whichever node serves it; print the reply JSON.

    Exit 1 when the plugin answers an error, or a reply with "success": false.
    """
    check_target(plugin, function)
    data = read_json_arg(payload, "payload")
    reply = bus_call(lambda c: c.request_bytes(plugin, function, data, timeout=timeout), conn)
    decoded = decode_reply(reply)
    sys.stdout.buffer.write(terminal_json(reply) + b"\n")
    if isinstance(decoded, dict) and decoded.get("success") is False:
        raise typer.Exit(EXIT_PLUGIN)


@with_connection
def pub(
    topic: Annotated[str, typer.Argument(help="Topic, e.g. orders.created (no wildcards).", show_default=False)],
    payload: Annotated[str, typer.Argument(help="Payload JSON, or - for stdin.")] = "null",
    core: Annotated[bool, typer.Option(help="Core NATS publish (at most once) even if JetStream is on.")] = False,
    as_json: JsonOpt = False,
    *,
    conn: Connection,
) -> None:
    """Publish onto TOPIC: every plugin subscribed to it gets one copy. Prints the message id."""
    import orjson

    try:
        check_topic(topic)
    except ValueError as e:
        fail(str(e), EXIT_USAGE)
    data = orjson.loads(read_json_arg(payload, "payload"))
    msg_id = bus_call(lambda c: c.publish(topic, data, durable=not core), conn)
    if as_json:
        sys.stdout.buffer.write(terminal_json(orjson.dumps({"id": msg_id})) + b"\n")
    else:
        typer.echo(terminal_json(msg_id.encode()).decode())  # a node of ours made it; checked all the same


@with_connection
def ls(
    timeout: Annotated[float, typer.Option(help="Seconds to gather node answers.", callback=finite_positive)] = 0.5,
    wide: Annotated[bool, typer.Option("--wide", "-w", help="Every column (counters, instances, last error).")]
    = False,
    as_json: JsonOpt = False,
    *,
    conn: Connection,
) -> None:
    """Nodes, their plugins, versions and counts, across the cluster.

    Exit 6 when no node answers (with --json, after printing []).
    """
    nodes: list[dict[str, Any]] = bus_call(lambda c: c.nodes(timeout=timeout), conn)
    if as_json:
        import orjson

        sys.stdout.buffer.write(terminal_json(orjson.dumps(nodes, option=orjson.OPT_INDENT_2)) + b"\n")
    if not nodes:
        fail(f"no sandbus node answered on {conn.url} within {timeout:g} s "
             "(start one with `sandbus node`, or point -s/--server or NATS_URL at the right bus)", EXIT_NO_NODE)
    if as_json:
        return
    from rich.console import Console

    # The narrow table fits the terminal (or COLUMNS), folding long names; --wide keeps one line per row
    # however long, as `kubectl get -o wide` does (the terminal wraps it, `less -S` scrolls it).
    Console(width=WIDE_WIDTH if wide else None).print(_table(nodes, wide))


#: Line width of ``ls --wide``: enough for every column at its natural width.
WIDE_WIDTH = 1000

#: ``ls`` columns: (title, stats key, how the value is shown, right-aligned)
_Column = tuple[str, str, Callable[[object], str], bool]


def _count(v: object) -> str:
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else "-"


def _ms(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, int | float) and not isinstance(v, bool) else "-"


def _bytes(v: object) -> str:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return "-"
    return f"{v / 1024:.0f} KiB" if v < 1024 * 1024 * 10 else f"{v / 1024 / 1024:.0f} MiB"


def _text(v: object) -> str:
    return "-" if v is None or v == "" else str(v)


#: What an operator reads first, in 80 columns.
NARROW_COLUMNS: tuple[_Column, ...] = (
    ("plugin", "name", _text, False),
    ("version", "version", _text, False),
    ("status", "status", _text, False),
    ("calls", "executions", _count, True),
    ("errors", "errors", _count, True),
    ("p50 ms", "p50_ms", _ms, True),
    ("p99 ms", "p99_ms", _ms, True),
)
#: ``--wide`` adds these.
WIDE_COLUMNS: tuple[_Column, ...] = (
    ("rejected", "rejected", _count, True),
    ("host errors", "host_errors", _count, True),
    ("instances", "instances", _count, True),
    ("in flight", "in_flight", _count, True),
    ("queued", "queue_depth", _count, True),
    ("fuel", "fuel_used", _count, True),
    ("memory", "memory_bytes", _bytes, True),
    ("last error", "last_error", lambda v: "" if v is None else str(v)[:200], False),
)


def _table(nodes: list[dict[str, Any]], wide: bool) -> Table:
    from rich import box
    from rich.table import Table

    from sandbus.host.cli.output import cell

    columns = NARROW_COLUMNS + (WIDE_COLUMNS if wide else ())
    plugin_count = sum(len(v["plugins"]) for v in nodes if isinstance(v.get("plugins"), list))
    table = Table(title=f"{len(nodes)} node(s), {plugin_count} plugin(s)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("node", overflow="fold", no_wrap=wide)
    for title, _, _, right in columns:
        table.add_column(title, justify="right" if right else "left", overflow="fold", no_wrap=wide)
    for view in nodes:
        # Whatever answered on the bus wrote these values: each cell is plain, escaped, bounded text, and a
        # value of the wrong shape shows as "-" rather than ending the listing.
        plugins = view.get("plugins")
        rows = [p if isinstance(p, dict) else {} for p in plugins] if isinstance(plugins, list) else []
        node = view.get("node_id", "-")
        if not rows:
            table.add_row(cell(node), cell("(no plugins)"), *("" for _ in columns[1:]))
        for i, p in enumerate(rows):
            table.add_row(cell(node if i == 0 else ""), *(cell(show(p.get(key))) for _, key, show, _ in columns))
    return table


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add ``request``, ``pub`` and ``ls`` to ``app``, or only the one named ``only``."""
    for command in (request, pub, ls):
        if only is None or command.__name__ == only:
            app.command()(command)
