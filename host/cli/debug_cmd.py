"""``sandbus logs`` and ``sandbus debug``: plugin log lines and debug state across the nodes.

``logs`` without ``-f`` asks every node (``debug``) for the lines its ring holds, merges them by time
and exits; with ``-f`` it subscribes to ``sandbus.log.<node>.<plugin>`` first, prints what the rings
hold, then every line as it is published (a line seen both ways is printed once). ``debug`` prints
one plugin's state on each node that has it.

Everything printed came over the bus, and a log line is a plugin's own text: it is shown as data --
control characters escaped, rich markup never interpreted (``[bold]`` prints as ``[bold]``), each value
bounded -- or, with ``--json``, as JSON made terminal-safe (:func:`~sandbus.host.cli.output.terminal_json`).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sandbus.host.cli.bus import _bytes, _ms, bus_call
from sandbus.host.cli.connect import Connection, with_connection
from sandbus.host.cli.main import EXIT_NO_NODE, EXIT_USAGE, fail, finite_positive
from sandbus.host.cli.output import terminal_json
from sandbus.sdk.subjects import check_token

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from sandbus.sdk.client import Client

__all__ = ["debug", "format_line", "logs", "register"]

LEVELS = ("debug", "info", "warning", "error")
_STYLES = {"debug": "dim", "info": "", "warning": "yellow", "error": "bold red"}
#: characters of one message printed (a node bounds them too; whatever answered may not have)
MAX_MESSAGE_CHARS = 8300
#: log lines and audit events ``debug`` shows per node (``--json`` has them all)
SHOWN_LOGS = 20
SHOWN_AUDIT = 10
#: Seconds between two attempts to reconnect while following
RECONNECT_WAIT_S = 1.0
#: Seconds before asking again a node that refused a debug request over its rate
RATE_RETRY_S = 0.1
#: ``debug`` requests in flight at once while ``logs`` gathers the rings of every plugin of every node
DEBUG_CONCURRENCY = 8

PluginOpt = Annotated[str | None, typer.Argument(help="Plugin name (default: every plugin).", show_default=False)]
NodeOpt = Annotated[str | None, typer.Option("--node", help="Only this node (its id).", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (one JSON object per line for "
                                                      "logs; a JSON array for debug).")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the nodes' answers.", callback=finite_positive)]


def _token(value: str | None, what: str) -> str | None:
    if value is None:
        return None
    try:
        return check_token(value, what)
    except ValueError as e:
        fail(str(e), EXIT_USAGE)


def _text(value: object, limit: int = 200) -> str:
    """``value`` as markup-safe, control-free text of at most ``limit`` characters."""
    from sandbus.host.cli.output import markup_safe

    shown = "-" if value is None else str(value)
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return markup_safe(shown)


def format_line(line: dict[str, Any]) -> str:
    """One log line as rich markup: ``ts node plugin@version [stream] LEVEL message (trace ...)``, every
    value escaped (a guest's ``[bold]`` or escape sequence prints as text). The stream comes before the
    level: the message is the guest's own text, so a line it logs as ``[stderr] ...`` cannot pass for
    its stderr output."""
    level = str(line.get("level"))
    style = _STYLES.get(level, "")
    version = line.get("version")
    who = _text(line.get("plugin"), 255) + (f"@{_text(version, 64)}" if version else "")
    stream = f" \\[{_text(line.get('stream'), 16)}]" if line.get("stream") else ""  # a literal [stdout]
    dropped = line.get("dropped")
    note = f" [dim]({dropped} dropped before)[/dim]" if isinstance(dropped, int) and dropped > 0 else ""
    trace = f" [dim]trace {_text(line.get('trace_id'), 32)}[/dim]" if line.get("trace_id") else ""
    level_text = f"[{style}]{_text(level.upper(), 8)}[/{style}]" if style else _text(level.upper(), 8)
    return (f"[dim]{_text(line.get('ts'), 40)}[/dim] {_text(line.get('node'), 255)} {who}{stream} {level_text}"
            f" {_text(line.get('message'), MAX_MESSAGE_CHARS)}{note}{trace}")


def _console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _print_line(console: Console | None, line: dict[str, Any]) -> None:
    if console is None:
        import orjson

        sys.stdout.buffer.write(terminal_json(orjson.dumps(line)) + b"\n")
        sys.stdout.flush()
    else:
        console.print(format_line(line))


async def _recent(client: Client, plugin: str | None, node: str | None, timeout: float, *,
                  follow: bool = False) -> list[dict[str, Any]]:
    """The lines the nodes' rings hold (of ``plugin``, on ``node``), merged by time.

    Each node gets ``timeout`` to answer: one that does not (or answers with an error) is named on stderr
    and its remaining plugins are not asked, so a hung node costs at most one timeout, not one a plugin.
    What a node sends is checked as a log line is on the bus (a line that is not one is skipped), and
    must name the node and plugin it was asked for. No node answering is a failure unless ``follow``:
    a follower waits for the nodes that start later."""
    from sandbus.bus.control import DEBUG_RATE
    from sandbus.sdk.client import valid_log_line
    from sandbus.sdk.errors import PluginNotFoundError, RateLimitError

    if node is not None and plugin is not None:
        pairs = [(node, plugin)]
    else:
        ids = await client.node_ids(timeout=min(timeout, 0.5))
        if node is not None:
            ids = [n for n in ids if n == node]
        if not ids and follow:
            typer.echo("sandbus: no sandbus node answered yet: following the lines of those that start", err=True)
            return []
        if not ids:
            fail("no sandbus node answered (start one with `sandbus node`, or point -s/--server or NATS_URL at "
                 "the right bus)" if node is None else f"node {node!r} did not answer discovery", EXIT_NO_NODE)
        views = await asyncio.gather(*(client.control(n, "stats", timeout=timeout) for n in ids),
                                     return_exceptions=True)
        pairs = []
        for node_id, view in zip(ids, views, strict=True):
            if not isinstance(view, dict):
                _silent(node_id, view, timeout)
                continue
            plugins = view.get("plugins")
            names = [p.get("name") for p in plugins if isinstance(p, dict)] if isinstance(plugins, list) else []
            pairs += [(node_id, name) for name in names if isinstance(name, str) and plugin in (None, name)]
        if plugin is not None and not pairs:
            _not_loaded(plugin, follow)
            return []
    # one plugin on one node, once: its failure is the command's (a follower waits for it instead)
    explicit = node is not None and plugin is not None and not follow
    gate = asyncio.Semaphore(DEBUG_CONCURRENCY)
    gone: set[str] = set()
    # A node answers so many debug requests a second: asked for each of many plugins, it refuses some
    # (limit.rate), which are asked again until the time that many answers take.
    loop = asyncio.get_running_loop()
    per_node: dict[str, int] = {}
    for node_id, _ in pairs:
        per_node[node_id] = per_node.get(node_id, 0) + 1
    deadline = loop.time() + timeout + max(per_node.values(), default=0) / DEBUG_RATE

    async def one(node_id: str, name: str) -> list[dict[str, Any]]:
        async with gate:
            if node_id in gone:
                return []
            try:
                while True:
                    try:
                        states = await client.debug(name, node=node_id, timeout=timeout)
                        break
                    except RateLimitError:
                        if loop.time() >= deadline:
                            raise
                        await asyncio.sleep(RATE_RETRY_S)
            except PluginNotFoundError:
                if explicit:
                    raise
                if follow and node is not None and plugin is not None:
                    _not_loaded(plugin, follow)
                return []  # the plugin left the node meanwhile
            except Exception as e:  # the node did not answer in time, or not as a node
                if explicit:
                    raise
                if node_id not in gone:
                    gone.add(node_id)
                    _silent(node_id, e, timeout)
                return []
        found = []
        for state in states:
            lines = state.get("recent_logs")
            for line in lines if isinstance(lines, list) else []:
                checked = valid_log_line(line)
                if checked is not None and (checked["node"], checked["plugin"]) == (node_id, name):
                    found.append(checked)
        return found

    lines = [line for found in await asyncio.gather(*(one(n, p) for n, p in pairs)) for line in found]
    lines.sort(key=lambda line: (line["ts"], line["node"], line["seq"]))
    return lines


def _not_loaded(plugin: str, follow: bool) -> None:
    """No node has ``plugin``: the command's failure (as ``sandbus debug``'s), or, for a follower, a note
    said once on stderr -- a plugin may be loaded later, and its lines are then printed."""
    if not follow:
        fail(f"no node has plugin {plugin!r}", EXIT_NO_NODE)
    typer.echo(f"sandbus: no node has plugin {plugin!r} yet: following its lines once one loads it", err=True)


def _silent(node_id: str, error: object, timeout: float) -> None:
    """Say on stderr that ``node_id`` did not answer (its lines are missing from what is printed)."""
    from sandbus.host.cli.output import terminal_text

    why = f"no answer in {timeout:g} s" if isinstance(error, TimeoutError) else str(error)[:200]
    typer.echo(f"sandbus: node {terminal_text(node_id[:255])} did not answer ({terminal_text(why)}): its lines "
               "are not shown", err=True)


def _at_level(line: dict[str, Any], minimum: int) -> bool:
    level = line.get("level")
    return level in LEVELS and LEVELS.index(level) >= minimum


@with_connection
def logs(
    plugin: PluginOpt = None,
    level: Annotated[str | None, typer.Option("--level", "-l", help="Lowest level shown: debug, info, warning, "
                                                                     "error.", show_default=False)] = None,
    node: NodeOpt = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep following new lines (Ctrl-C ends).")]
    = False,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 2.0,
    *,
    conn: Connection,
) -> None:
    """Plugin log lines across the nodes: the recent ones each node keeps, merged by time; with -f, then
    every new line as it is published."""
    plugin, node = _token(plugin, "plugin"), _token(node, "node id")
    if level is not None:
        level = level.lower()  # WARNING as warning: the level is printed upper case
        if level not in LEVELS:
            fail(f"--level must be one of {', '.join(LEVELS)} (any case)", EXIT_USAGE)
    minimum = LEVELS.index(level) if level is not None else 0
    console = None if as_json else _console()

    async def run(client: Client) -> None:
        _quiet_close(client)
        seen: set[tuple[str, int]] = set()
        stream = client.logs(plugin, level=level, node=node) if follow else None
        if stream is not None:
            await stream.start()  # first: a line published while the rings are read is not missed
        try:
            for line in await _recent(client, plugin, node, timeout, follow=follow):
                if _at_level(line, minimum):
                    seen.add((line["node"], line["seq"]))
                    _print_line(console, line)
            if stream is None:
                return
            async for line in stream:
                key = (line["node"], line["seq"])
                if key in seen:
                    seen.discard(key)
                    continue
                _print_line(console, line)
        finally:
            if stream is not None:
                await stream.close()
        # The stream ends only when the connection closed (a command's client does not reconnect by itself).
        await _follow_again(conn, lambda c: c.logs(plugin, level=level, node=node), console)

    bus_call(run, conn)


async def _follow_again(conn: Connection, open_stream: Callable[[Client], Any], console: Console | None) -> None:
    """Keep following after the connection to NATS was lost: reconnect (once a second, for as long as it
    takes, said once on stderr) and subscribe again. Lines published while disconnected are missed (core
    NATS keeps none): said too. Ends with Ctrl-C."""
    from sandbus.host.cli.connect import _connect
    from sandbus.sdk.errors import BusError

    while True:
        typer.echo("sandbus: the connection to NATS was lost: reconnecting (lines published meanwhile are missed)",
                   err=True)
        while True:
            await asyncio.sleep(RECONNECT_WAIT_S)
            try:
                client = await _connect(conn)
                break
            except BusError:
                continue
        _quiet_close(client)
        try:
            async with open_stream(client) as stream:
                typer.echo("sandbus: reconnected, following again", err=True)
                async for line in stream:
                    _print_line(console, line)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2.0)


def _quiet_close(client: Client) -> None:
    """Say at once when the NATS server announces it is shutting down (lame duck mode: it closes its
    clients only after a grace period, 10 s by default, and a follower would be silent meanwhile), and keep
    a drain cancelled by Ctrl-C from printing a traceback (nats-py's drain leaves a gathered future whose
    cancellation nobody retrieves): the command exits 130 with nothing more said."""
    async def lame_duck() -> None:
        typer.echo("sandbus: the NATS server is shutting down: the connection will be lost (then reconnecting)",
                   err=True)

    # nats-py takes the callback only at connect, which is shared by every command: set on the client after.
    client.nc._lame_duck_mode_cb = lame_duck
    loop = asyncio.get_running_loop()

    def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not isinstance(context.get("exception"), asyncio.CancelledError):
            loop.default_exception_handler(context)

    loop.set_exception_handler(on_error)


def _histogram(name: str, hist: object, unit: str) -> str:
    """A histogram as text bars, the empty buckets left out."""
    if not isinstance(hist, dict):
        return f"{name}: -"
    bounds, counts = hist.get("bounds"), hist.get("counts")
    if not isinstance(bounds, list) or not isinstance(counts, list) or len(counts) != len(bounds) + 1:
        return f"{name}: -"
    total = sum(c for c in counts if isinstance(c, int))
    if not total:
        return f"{name}: no calls"
    rows = [f"{name}:"]
    for i, count in enumerate(counts):
        if not isinstance(count, int) or not count:
            continue
        label = f"<= {bounds[i]:g} {unit}" if i < len(bounds) else f">  {bounds[-1]:g} {unit}"
        bar = "#" * max(1, round(30 * count / total))
        rows.append(f"  {_text(label, 24):>16} {bar} {count}")
    return "\n".join(rows)


def _when(value: object) -> str:
    """A time as the log lines print theirs: ISO 8601 UTC with microseconds and ``Z``. The node sends
    ISO 8601 strings (``+00:00``) and audit events Unix seconds: each is shown the same way; anything
    else as text."""
    from datetime import UTC, datetime

    when: datetime | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(ValueError, OverflowError, OSError):
            when = datetime.fromtimestamp(value, UTC)
    elif isinstance(value, str) and len(value) <= 64:
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(value)
            when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    if when is None:
        return _text(value, 40)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _limit(key: str, value: object) -> str:
    """One limit as ``sandbus ls`` shows sizes (KiB, MiB), a flag as in ``--json`` (``true``, ``false``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return _bytes(value) if key.endswith("_bytes") else _text(value, 40)


def _render(state: dict[str, Any]) -> list[RenderableType]:
    from rich import box
    from rich.table import Table

    from sandbus.host.cli.output import cell

    out: list[RenderableType] = []
    head = (f"[bold]{_text(state.get('plugin'), 255)}[/bold] {_text(state.get('version'), 64)} on node "
            f"[bold]{_text(state.get('node_id'), 255)}[/bold]: {_text(state.get('status'), 16)}, "
            f"{_text(state.get('kind'), 16)}, {_text(state.get('isolation'), 16)}, loaded "
            f"{_when(state.get('last_loaded'))}, {_text(state.get('reloads'), 12)} reload(s)")
    out.append(head)
    counters = state.get("counters") if isinstance(state.get("counters"), dict) else {}
    assert isinstance(counters, dict)
    facts = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_header=False)
    facts.add_column("what")
    facts.add_column("value", overflow="fold")
    for key in ("executions", "errors", "host_errors", "rejected", "p50_ms", "p99_ms", "fuel_used", "last_fuel_used"):
        value = counters.get(key, "-")
        facts.add_row(cell(key), cell(_ms(value) if key.endswith("_ms") else value, 40))
    facts.add_row(cell("in_flight"), cell(state.get("in_flight"), 40))
    facts.add_row(cell("queue_depth"), cell(state.get("queue_depth"), 40))
    limits = state.get("limits")
    if isinstance(limits, dict):
        shown = ", ".join(f"{k}={_limit(k, limits[k])}" for k in (
            "memory_bytes", "fuel", "timeout_s", "max_instances", "log_bytes", "isolation", "debug_info")
            if k in limits)
        facts.add_row(cell("limits"), cell(shown, 400))
    out.append(facts)
    instances = state.get("instances")
    if isinstance(instances, list) and instances:
        table = Table(title="instances", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for title in ("id", "memory", "busy", "calls"):
            table.add_column(title, justify="right")
        for inst in instances:
            if isinstance(inst, dict):
                flag = inst.get("busy")
                busy = ("busy" if flag else "idle") if isinstance(flag, bool) else "-"
                table.add_row(cell(inst.get("id"), 20), cell(_bytes(inst.get("memory_bytes")), 20), cell(busy, 8),
                              cell(inst.get("calls"), 20))
        out.append(table)
    out.append(_histogram("latency", state.get("latency_ms"), "ms"))
    out.append(_histogram("fuel", state.get("fuel"), ""))
    errors = state.get("recent_errors")
    if isinstance(errors, list) and errors:
        table = Table(title="recent errors", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for title in ("at", "function", "code", "message"):
            table.add_column(title, overflow="fold")
        for err in errors[-SHOWN_LOGS:]:
            if isinstance(err, dict):
                table.add_row(cell(_when(err.get("at")), 40), cell(err.get("function"), 80), cell(err.get("code"), 60),
                              cell(err.get("message"), 400))
        out.append(table)
    lines = state.get("recent_logs")
    if isinstance(lines, list) and lines:
        out.append(f"[bold]recent log lines[/bold] (last {min(len(lines), SHOWN_LOGS)} of {len(lines)}):")
        out += [format_line(line) for line in lines[-SHOWN_LOGS:] if isinstance(line, dict)]
    events = state.get("recent_audit")
    if isinstance(events, list) and events:
        out.append(f"[bold]recent audit events[/bold] (last {min(len(events), SHOWN_AUDIT)} of {len(events)}):")
        for event in events[-SHOWN_AUDIT:]:
            if isinstance(event, dict):
                out.append(f"  [dim]{_when(event.get('timestamp'))}[/dim] {_text(event.get('level'), 10)} "
                           f"{_text(event.get('kind'), 64)}: "
                           f"{_text(event.get('message'), 400)}")
    return out


@with_connection
def debug(
    plugin: Annotated[str, typer.Argument(help="Plugin name.", show_default=False)],
    node: NodeOpt = None,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 2.0,
    *,
    conn: Connection,
) -> None:
    """PLUGIN's state on each node that has it: status, limits, instances and their memory, histograms,
    recent errors, log lines and audit events. Exit 6 when no node has it."""
    checked = _token(plugin, "plugin")
    assert checked is not None
    node = _token(node, "node id")
    states: list[dict[str, Any]] = bus_call(lambda c: c.debug(checked, node=node, timeout=timeout), conn)
    if as_json:
        import orjson

        sys.stdout.buffer.write(terminal_json(orjson.dumps(states, option=orjson.OPT_INDENT_2)) + b"\n")
    if not states:
        fail(f"no node has plugin {plugin!r}", EXIT_NO_NODE)
    if as_json:
        return
    console = _console()
    for state in states:
        for part in _render(state):
            console.print(part)
        console.print()


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add ``logs`` and ``debug`` to ``app``, or only the one named ``only``."""
    for command in (logs, debug):
        if only is None or command.__name__ == only:
            app.command()(command)
