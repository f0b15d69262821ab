"""Client commands on the bus: ``request``, ``pub``, ``ls``.

They only talk to NATS: they need only what ``pip install sandbus`` brings, and they start fast. Nothing
here imports rich unless ``ls`` prints its table. Their failures map onto the exit codes of
:mod:`sandbus.host.cli.main` as errors of a call over the bus: no node serving the plugin is
``EXIT_NO_NODE``, no reply in time ``EXIT_TIMEOUT``, a request the node refused as the caller's ``EXIT_USAGE``.

Bytes, not JSON: ``--data-file FILE`` (``-``: stdin) or ``--raw`` sends a body as it is, with ``--content-type``
(default ``application/octet-stream``), for plugins whose input is bytes (Extism). A reply whose Content-Type
is not JSON is written to stdout as it is when stdout is a pipe or a file, and with its control bytes
escaped on a terminal (what a plugin returns never drives the operator's terminal); ``--json`` prints it
as ``{"content_type", "size", "base64"}``.
"""

from __future__ import annotations

import base64
import os
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
    MAX_JSON_ARG_BYTES,
    exit_code_for,
    fail,
    finite_positive,
    read_json_arg,
)
from sandbus.host.cli.output import terminal_json, terminal_text
from sandbus.sdk.envelope import CONTENT_TYPE, OCTET_STREAM, is_envelope, is_json_type, valid_media_type
from sandbus.sdk.errors import SandbusError
from sandbus.sdk.subjects import check_token, check_topic

if TYPE_CHECKING:
    from rich.table import Table

    from sandbus.sdk.client import Client

__all__ = ["FunctionArg", "PluginArg", "RequestArg", "TimeoutOpt", "body_arg", "bus_call", "check_target",
           "decode_reply", "ls", "pub", "read_bytes_arg", "register", "request", "write_reply"]

PluginArg = Annotated[str, typer.Argument(help="Plugin name.", show_default=False)]
FunctionArg = Annotated[str, typer.Argument(help="Function to call.")]
RequestArg = Annotated[str, typer.Argument(help="Request JSON, or - for stdin.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the reply.", callback=finite_positive)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON on stdout).")]
DataFileOpt = Annotated[str | None, typer.Option(
    "--data-file", "-d", metavar="FILE", show_default=False,
    help="Send FILE's bytes as they are (- for stdin), not JSON: for plugins whose input is bytes (Extism).")]
#: ``pub``'s: a topic's subscribers get bytes base64 in their envelope, whatever kind of plugin they are.
PubDataFileOpt = Annotated[str | None, typer.Option(
    "--data-file", "-d", metavar="FILE", show_default=False,
    help="Publish FILE's bytes as they are (- for stdin), not JSON: subscribers get them base64 in the "
         "envelope's payload.")]
RawOpt = Annotated[bool, typer.Option(
    "--raw", help="Send the payload argument's bytes as they are (- for stdin's), not checked as JSON.")]
ContentTypeOpt = Annotated[str, typer.Option(
    "--content-type", "-t", help="Content-Type of a --data-file or --raw body.")]

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


def read_bytes_arg(text: str, what: str, cap: int = MAX_JSON_ARG_BYTES) -> bytes:
    """The bytes of a file (``-``: stdin), read whole but never more than ``cap + 1`` bytes: a larger
    input is refused as bad input (exit 2) before it fills memory. Only a regular file or stdin: a FIFO
    or a device named by mistake would block or never end."""
    if text == "-":
        raw = sys.stdin.buffer.read(cap + 1)
    else:
        try:
            fd = os.open(text, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            fail(f"{what}: cannot open {text!r}: {e.strerror}", EXIT_USAGE)
        with os.fdopen(fd, "rb") as f:
            import stat

            if not stat.S_ISREG(os.fstat(fd).st_mode):
                fail(f"{what}: {text!r} is not a regular file", EXIT_USAGE)
            raw = f.read(cap + 1)
    if len(raw) > cap:
        fail(f"{what} is larger than the {cap}-byte input cap", EXIT_USAGE)
    return raw


def body_arg(payload: str, data_file: str | None, raw: bool, content_type: str) -> tuple[bytes, str]:
    """The body to send and its Content-Type: the JSON ``payload`` (checked), or raw bytes (``--data-file``,
    ``--raw``) with ``content_type`` (a media type: it goes into a header as it is)."""
    if valid_media_type(content_type) is None:
        fail(f"--content-type must be a media type such as application/octet-stream or text/plain; charset=utf-8, "
             f"found {content_type[:64]!r}", EXIT_USAGE)
    if data_file is not None:
        if raw:
            fail("--data-file and --raw are two ways to give the body: use one", EXIT_USAGE)
        return read_bytes_arg(data_file, "--data-file"), content_type
    if raw:
        if payload == "-":
            return read_bytes_arg("-", "payload"), content_type
        return payload.encode(errors="surrogateescape"), content_type
    return read_json_arg(payload, "payload", hint=" (--raw sends it as bytes, to a plugin whose input is bytes: "
                                                   "Extism)"), CONTENT_TYPE


def write_reply(data: bytes, content_type: str, as_json: bool) -> Any:
    """Print a reply: JSON (checked, made terminal-safe) when its Content-Type says JSON, and return its
    value; any other body as it is to a pipe or file, escaped on a terminal, or as base64 in ``--json``."""
    if is_json_type(content_type):
        decoded = decode_reply(data)
        sys.stdout.buffer.write(terminal_json(data) + b"\n")
        return decoded
    if as_json:
        import orjson

        doc = {"content_type": content_type, "size": len(data), "base64": base64.b64encode(data).decode()}
        sys.stdout.buffer.write(terminal_json(orjson.dumps(doc)) + b"\n")
    elif sys.stdout.isatty():
        # What a plugin returned is data: its escape sequences never reach the terminal as control.
        sys.stdout.write(terminal_text(data.decode("utf-8", errors="backslashreplace")) + "\n")
    else:
        sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return None


@with_connection
def request(
    plugin: PluginArg,
    function: FunctionArg = "handle_request",
    payload: RequestArg = "{}",
    timeout: TimeoutOpt = 5.0,
    data_file: DataFileOpt = None,
    raw: RawOpt = False,
    content_type: ContentTypeOpt = OCTET_STREAM,
    as_json: JsonOpt = False,
    *,
    conn: Connection,
) -> None:
    """Call PLUGIN's FUNCTION on whichever node serves it; print the reply.

    A JSON reply is printed as JSON; a reply of another Content-Type (a bytes plugin's output) is written
    to stdout as it is (escaped on a terminal; with --json as {"content_type", "size", "base64"}).
    Exit 1 when the plugin answers an error, or a JSON reply with "success": false.
    """
    check_target(plugin, function)
    data, media_type = body_arg(payload, data_file, raw, content_type)
    reply = bus_call(lambda c: c.request_detailed(plugin, function, data, timeout=timeout,
                                                  content_type=media_type), conn)
    decoded = write_reply(reply.data, reply.content_type, as_json)
    if isinstance(decoded, dict) and decoded.get("success") is False:
        raise typer.Exit(EXIT_PLUGIN)


@with_connection
def pub(
    topic: Annotated[str, typer.Argument(help="Topic, e.g. orders.created (no wildcards).", show_default=False)],
    payload: Annotated[str, typer.Argument(help="Payload JSON, or - for stdin.")] = "null",
    core: Annotated[bool, typer.Option(help="Core NATS publish (at most once) even if JetStream is on.")] = False,
    data_file: PubDataFileOpt = None,
    raw: RawOpt = False,
    content_type: ContentTypeOpt = OCTET_STREAM,
    as_json: JsonOpt = False,
    *,
    conn: Connection,
) -> None:
    """Publish onto TOPIC: every plugin subscribed to it gets one copy. Prints the message id.

    With --data-file or --raw the body is bytes of --content-type (not JSON): a subscribing plugin gets them
    base64 in its envelope's payload.
    """
    import orjson

    try:
        check_topic(topic)
    except ValueError as e:
        fail(str(e), EXIT_USAGE)
    body, media_type = body_arg(payload, data_file, raw, content_type)
    if media_type is CONTENT_TYPE or is_json_type(media_type) or is_envelope({"Content-Type": media_type}):
        if media_type is not CONTENT_TYPE:  # raw bytes said to be JSON: checked and sent as JSON
            body = read_json_arg(body.decode(errors="surrogateescape"), "payload", stdin=False)
        data = orjson.loads(body)
        msg_id = bus_call(lambda c: c.publish(topic, data, durable=not core), conn)
    else:
        msg_id = bus_call(lambda c: c.publish_raw(topic, body, content_type=media_type, durable=not core), conn)
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
    ("kind", "kind", _text, False),
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
