"""CLI commands on the bus: ``node``, ``request``, ``pub``, ``ls``, ``trace``.

``request``, ``pub``, ``ls`` and ``trace`` are clients: they need only what ``pip install sandbus`` brings.
``node`` runs plugins: it needs the host extra, and imports the host side only once it knows it is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from sandbus.host.cli.extras import require_host, require_nats_server
from sandbus.host.cli.main import EXIT_USAGE, exit_code_for, fail, finite_positive, read_json_arg
from sandbus.host.cli.output import cell, markup_safe, setup_logging, terminal_json
from sandbus.host.sandbox.guest_text import escape_controls
from sandbus.sdk.client import Client
from sandbus.sdk.errors import SandbusError
from sandbus.sdk.subjects import check_token, check_topic

__all__ = ["DEFAULT_NATS", "register"]

DEFAULT_NATS = "nats://127.0.0.1:4222"
NatsOpt = Annotated[str | None, typer.Option("--nats", help="NATS URL(s), comma-separated "
                                                               "[env SANDBUS_NATS; default nats://127.0.0.1:4222].")]
PluginArg = Annotated[str, typer.Argument(help="Plugin name.")]
FunctionArg = Annotated[str, typer.Argument(help="Function to call.")]
RequestArg = Annotated[str, typer.Argument(help="Request JSON, or - for stdin.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the reply.", callback=finite_positive)]


def _nats(url: str | None) -> str:
    return url or os.environ.get("SANDBUS_NATS") or DEFAULT_NATS


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def node(
    plugins: Annotated[Path, typer.Option("--plugins", help="Directory of plugins (<name>.wasm + <name>.toml).")]
    = Path("plugins/build"),
    nats_url: NatsOpt = None,
    node_id: Annotated[str | None, typer.Option("--node-id", help="This node's id (default host-pid).")] = None,
    policy: Annotated[Path | None, typer.Option(help="Operator policy TOML (default: deny all but compute).")]
    = None,
    data_dir: Annotated[Path, typer.Option(help="Embedded NATS / JetStream data.")] = Path(".sandbus"),
    workers: Annotated[int, typer.Option(help="Worker processes (each its own NATS connection).", min=1)] = 1,
    watch: Annotated[bool, typer.Option(help="Hot-reload plugins when their files change.")] = True,
    durable: Annotated[bool, typer.Option(help="Durable topics through JetStream when available.")] = True,
    max_waiting: Annotated[int, typer.Option(
        help="Requests that may wait for one plugin's instances on this node; beyond it they are refused "
             "at once (limit.instances).", min=1, max=100_000)] = 64,
    user: Annotated[str | None, typer.Option(help="NATS user (with --password).")] = None,
    password: Annotated[str | None, typer.Option(help="NATS password [env SANDBUS_NATS_PASSWORD].",
                                                 envvar="SANDBUS_NATS_PASSWORD")] = None,
    token: Annotated[str | None, typer.Option(help="NATS token [env SANDBUS_NATS_TOKEN].",
                                              envvar="SANDBUS_NATS_TOKEN")] = None,
    creds: Annotated[Path | None, typer.Option(help="NATS .creds file (JWT + nkey).")] = None,
    nkey_seed: Annotated[Path | None, typer.Option(help="File holding a NATS user nkey seed (SU...).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA bundle for TLS.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Client certificate for TLS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Client key for TLS.")] = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
) -> None:
    """Run a host node serving PLUGINS over NATS (an embedded nats-server when --nats is not given)."""
    require_host("node")
    url = nats_url or os.environ.get("SANDBUS_NATS")
    if url is None:
        require_nats_server("node")
    from sandbus.bus.connection import ConnectOptions
    from sandbus.bus.server import NatsServer
    from sandbus.host.lifecycle.policy import Policy, load_policy
    from sandbus.host.node.node import Node, default_node_id

    setup_logging(max(verbose, 1))
    server: NatsServer | None = None
    if url is None:
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            server = NatsServer(store_dir=data_dir / "nats", port=4222 if _port_free(4222) else -1).start()
        except SandbusError as e:
            fail(str(e), exit_code_for(e))
        url = server.url
        typer.echo(f"embedded nats-server (JetStream) on {url}, pid {server.pid}; data in {data_dir / 'nats'}")
        if not url.endswith(":4222"):
            typer.echo(f"port 4222 was busy: export SANDBUS_NATS={url} for other commands")
    children: list[subprocess.Popen[bytes]] = []
    try:
        pol = load_policy(policy) if policy else Policy.default()
        base_id = node_id or default_node_id()
        options = ConnectOptions.from_urls(url, name=f"sandbus-node-{base_id}", user=user, password=password,
                                           token=token, creds=creds, nkey_seed=nkey_seed, tls_ca=tls_ca,
                                           tls_cert=tls_cert, tls_key=tls_key)
        n = Node.create(plugins, options, policy=pol, node_id=base_id, durable=durable, max_waiting=max_waiting)
        manager = n.manager
        manager.discover_and_load()
        for info in manager.list_plugins():  # a failed plugin's name is a file stem: any characters
            typer.echo(f"  {escape_controls(info.name):20s} {escape_controls(info.version or '-'):10s} "
                       f"{info.status.value}" + (f"  ({escape_controls(info.last_error)})" if info.last_error else ""))
        for i in range(1, workers):
            args = [sys.executable, "-m", "sandbus", "node", "--plugins", str(plugins), "--nats", url,
                    "--node-id", f"{base_id}-w{i}", "--no-watch" if not watch else "--watch",
                    "--durable" if durable else "--no-durable", "--max-waiting", str(max_waiting)]
            for flag, value in (("--policy", policy), ("--user", user), ("--creds", creds),
                                ("--nkey-seed", nkey_seed), ("--tls-ca", tls_ca), ("--tls-cert", tls_cert),
                                ("--tls-key", tls_key)):
                if value is not None:
                    args += [flag, str(value)]
            # Secrets travel in the environment, not in argv (visible to every user in ps).
            env = {**os.environ, **({"SANDBUS_NATS_PASSWORD": password} if password else {}),
                   **({"SANDBUS_NATS_TOKEN": token} if token else {})}
            children.append(subprocess.Popen(args, env=env))
        asyncio.run(_serve(n, watch))
    except SandbusError as e:
        fail(str(e), exit_code_for(e))
    finally:
        for child in children:
            child.terminate()
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=15)
            if child.poll() is None:
                child.kill()
        if server is not None:
            server.stop()


async def _serve(n: Any, watch: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Watching syncs every plugin once, and stopping waits for a reload in progress: both off the loop,
    # which must stay free to answer requests and drain.
    watcher = await asyncio.to_thread(n.manager.watch) if watch else None
    # Starting retries the connection for as long as NATS is unreachable: a signal in the meantime stops
    # the node (the operator's Ctrl-C or a container stop is never ignored).
    starting = asyncio.ensure_future(n.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, SandbusError):
            await starting
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)
        n.manager.close()
        typer.echo(f"node {n.node_id} stopped before it connected", err=True)
        return
    stopping.cancel()
    starting.result()  # a start that failed raises here, as before
    typer.echo(f"node {n.node_id} ready")
    try:
        await stop.wait()
    finally:
        typer.echo(f"node {n.node_id} draining")
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)
        await n.stop()
        n.manager.close()


def _client_run(coro_factory: Any, url: str | None) -> Any:
    # nats-py logs each failed connection attempt with its traceback; the command reports the failure
    # itself, once, as a sandbus error (exit 1), so the library's own account is not shown.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)

    async def go() -> Any:
        client = await Client.connect(_nats(url))
        try:
            return await coro_factory(client)
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    except SandbusError as e:
        fail(str(e), exit_code_for(e))


def _check_target(plugin: str, function: str) -> None:
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
    _check_target(plugin, function)
    data = read_json_arg(payload, "payload")
    reply: bytes = _client_run(lambda c: c.request_bytes(plugin, function, data, timeout=timeout), nats_url)
    decoded = _decode_reply(reply)
    sys.stdout.buffer.write(terminal_json(reply) + b"\n")
    if isinstance(decoded, dict) and decoded.get("success") is False:
        raise typer.Exit(1)


def _decode_reply(reply: bytes) -> Any:
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
    msg_id = _client_run(lambda c: c.publish(topic, data, durable=not core), nats_url)
    typer.echo(msg_id)


def ls(
    nats_url: NatsOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to gather node answers.", callback=finite_positive)] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Nodes, their plugins, versions and counts, across the cluster."""
    nodes: list[dict[str, Any]] = _client_run(lambda c: c.nodes(timeout=timeout), nats_url)
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


def trace_cmd(
    plugin: PluginArg,
    function: FunctionArg = "handle_request",
    payload: RequestArg = "{}",
    nats_url: NatsOpt = None,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """Send one traced request; print its trace id and the spans of the client and the serving node."""
    _check_target(plugin, function)
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from rich.tree import Tree

    from sandbus.host.telemetry.otel import SpanCollector

    data = read_json_arg(payload, "payload")
    provider = TracerProvider(resource=Resource.create({"service.name": "sandbus-cli",
                                                        "service.instance.id": "cli"}))
    collector = SpanCollector()
    provider.add_span_processor(collector)
    trace.set_tracer_provider(provider)

    async def go(c: Client) -> tuple[int, bytes, dict[str, str], list[dict[str, Any]]]:
        with provider.get_tracer("sandbus.cli").start_as_current_span(f"sandbus trace {plugin}.{function}") as root:
            trace_id = root.get_span_context().trace_id
            collector.watch(trace_id)
            reply, headers, spans = await c.trace_request(plugin, function, data, timeout=timeout)
        return trace_id, reply, headers, spans

    trace_id, reply, headers, node_spans = _client_run(go, nats_url)
    spans = collector.take(trace_id) + _valid_spans(node_spans)
    typer.echo(f"trace id {trace_id:032x}  (Jaeger: /trace/{trace_id:032x})")
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for s in spans:
        by_parent.setdefault(s["parent_id"] if s["parent_id"] in ids else None, []).append(s)
    tree = Tree("spans")
    # Walked without recursion, each span once and at most MAX_TREE_DEPTH deep: the nodes' spans may
    # name any parent (themselves, a cycle, a chain thousands long).
    shown: set[str] = set()
    stack: list[tuple[Tree, str | None, int]] = [(tree, None, 0)]
    while stack:
        node, parent, depth = stack.pop()
        for s in reversed(by_parent.get(parent, [])):
            if s["span_id"] in shown or depth >= MAX_TREE_DEPTH:
                continue
            shown.add(s["span_id"])
            stack.append((node.add(_span_label(s)), s["span_id"], depth + 1))
    Console(stderr=True).print(tree)
    _decode_reply(reply)
    sys.stdout.buffer.write(terminal_json(reply) + b"\n")
    if "Sandbus-Error-Code" in headers:
        raise typer.Exit(1)


#: Most spans of a node shown by ``sandbus trace``, and the deepest nesting of the tree.
MAX_SPANS = 1000
MAX_TREE_DEPTH = 64


def _valid_spans(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The spans a node sent that have the shape ``sandbus trace`` shows, at most :data:`MAX_SPANS`;
    anything else (a hostile or broken node) is left out, never a crash."""
    valid: list[dict[str, Any]] = []
    for s in spans[:MAX_SPANS]:
        if (isinstance(s.get("span_id"), str) and isinstance(s.get("parent_id"), str | None)
                and isinstance(s.get("duration_ms"), int | float) and isinstance(s.get("attributes", {}), dict)
                and isinstance(s.get("events", []), list)):
            valid.append({"span_id": s["span_id"], "parent_id": s["parent_id"], "name": s.get("name", "?"),
                          "service": s.get("service", "?"), "duration_ms": s["duration_ms"],
                          "attributes": s.get("attributes", {}), "events": s.get("events", [])})
    return valid


def _span_label(s: dict[str, Any]) -> str:
    """One line of the span tree. Names, attributes and events come from the nodes: escaped before they
    meet markup, and cut to a line's worth."""
    attrs = {str(k): v for k, v in s["attributes"].items() if str(k).startswith(("sandbus.", "error."))}
    label = (f"[bold]{markup_safe(_cut(s['name']))}[/] {s['duration_ms']:.3f} ms  "
             f"[dim]{markup_safe(_cut(s['service']))}[/]")
    if attrs:
        label += "  " + " ".join(markup_safe(_cut(f"{k.removeprefix('sandbus.')}={v}")) for k, v in attrs.items())
    if s["events"]:
        label += "  [yellow]" + markup_safe(_cut(", ".join(map(str, s["events"])))) + "[/]"
    return label


def _cut(value: object, limit: int = 200) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bytes(v: object) -> str:
    return f"{v / 1024:.0f} KiB" if isinstance(v, int | float) else "-"


def _ms(v: object) -> str:
    return f"{v:.2f}" if isinstance(v, int | float) else "-"


def register(app: typer.Typer) -> None:
    app.command()(node)
    app.command()(request)
    app.command()(pub)
    app.command()(ls)
    app.command("trace")(trace_cmd)
    logging.getLogger("nats").setLevel(logging.WARNING)
