"""Client commands on the bus: ``request``, ``pub``, ``ls``.

They only talk to NATS: they need only what ``pip install sandbus`` brings.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from sandbus.host.cli.connect import NatsOpt, client_run
from sandbus.host.cli.main import EXIT_USAGE, fail, finite_positive, read_json_arg
from sandbus.host.cli.output import cell, terminal_json
from sandbus.sdk.subjects import check_token, check_topic

__all__ = ["FunctionArg", "PluginArg", "RequestArg", "TimeoutOpt", "check_target", "decode_reply", "register"]

PluginArg = Annotated[str, typer.Argument(help="Plugin name.")]
FunctionArg = Annotated[str, typer.Argument(help="Function to call.")]
RequestArg = Annotated[str, typer.Argument(help="Request JSON, or - for stdin.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the reply.", callback=finite_positive)]


def check_target(plugin: str, function: str) -> None:
    """Plugin and function must be subject tokens: anything else is a usage error, not a bus error."""
    try:
        check_token(plugin, "plugin")
        check_token(function, "function")
    except ValueError as e:
        fail(str(e), EXIT_USAGE)


def request(
    plugin: PluginArg,
    function: FunctionArg = "handle_request",
    payload: RequestArg = "{}",
    nats_url: NatsOpt = None,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """Call PLUGIN's FUNCTION on whichever node serves it; print the reply."""
    check_target(plugin, function)
    data = read_json_arg(payload, "payload")
    reply: bytes = client_run(lambda c: c.request_bytes(plugin, function, data, timeout=timeout), nats_url)
    decoded = decode_reply(reply)
    sys.stdout.buffer.write(terminal_json(reply) + b"\n")
    if isinstance(decoded, dict) and decoded.get("success") is False:
        raise typer.Exit(1)


def decode_reply(reply: bytes) -> Any:
    """The reply's JSON value; whatever answered on the bus may have sent anything else."""
    try:
        return orjson.loads(reply)
    except orjson.JSONDecodeError as e:
        fail(f"the reply is not JSON ({len(reply)} bytes): {e}", 1)


def pub(
    topic: Annotated[str, typer.Argument(help="Topic, e.g. orders.created.")],
    payload: Annotated[str, typer.Argument(help="Payload JSON, or - for stdin.")] = "null",
    nats_url: NatsOpt = None,
    core: Annotated[bool, typer.Option(help="Core NATS publish (at most once) even if JetStream is on.")] = False,
) -> None:
    """Publish onto TOPIC: every plugin subscribed to it gets one copy. Prints the message id."""
    try:
        check_topic(topic)
    except ValueError as e:
        fail(str(e), EXIT_USAGE)
    data = orjson.loads(read_json_arg(payload, "payload"))
    msg_id = client_run(lambda c: c.publish(topic, data, durable=not core), nats_url)
    typer.echo(msg_id)


def ls(
    nats_url: NatsOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to gather node answers.", callback=finite_positive)] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Nodes, their plugins, versions and counts, across the cluster."""
    nodes: list[dict[str, Any]] = client_run(lambda c: c.nodes(timeout=timeout), nats_url)
    if as_json:
        sys.stdout.buffer.write(terminal_json(orjson.dumps(nodes, option=orjson.OPT_INDENT_2)) + b"\n")
        return
    table = Table(title=f"{len(nodes)} node(s)")
    for col in ("node", "plugin", "version", "status", "calls", "errors", "p50 ms", "p99 ms", "instances",
                "in flight", "queued", "fuel", "memory", "last error"):
        table.add_column(col)
    for view in nodes:
        # Whatever answered on the bus wrote these values: each cell is plain, escaped, bounded text, and a
        # value of the wrong shape shows as "-" or an empty cell rather than ending the listing.
        plugins = view.get("plugins")
        rows = [p if isinstance(p, dict) else {} for p in plugins] if isinstance(plugins, list) else []
        for p in rows or [{}]:
            table.add_row(*(cell(v) for v in (
                view.get("node_id", "-"), p.get("name", "-"), p.get("version") or "-", p.get("status", "-"),
                p.get("executions", ""), p.get("errors", ""), _ms(p.get("p50_ms")), _ms(p.get("p99_ms")),
                p.get("instances", ""), p.get("in_flight", ""), p.get("queue_depth", ""), p.get("fuel_used", ""),
                _bytes(p.get("memory_bytes")), str(p.get("last_error") or "")[:60])))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _bytes(v: object) -> str:
    return f"{v / 1024:.0f} KiB" if isinstance(v, int | float) else "-"


def _ms(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, int | float) else "-"


def register(app: typer.Typer) -> None:
    app.command()(request)
    app.command()(pub)
    app.command()(ls)
    logging.getLogger("nats").setLevel(logging.WARNING)
