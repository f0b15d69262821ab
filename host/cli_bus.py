"""CLI commands on the bus: ``node``, ``request``, ``pub``, ``ls``."""

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

from bus.connection import ConnectOptions
from bus.server import NatsServer
from sdk.client import Client
from sdk.errors import SandbusError

from .cli import exit_code_for, fail, read_json_arg, setup_logging

__all__ = ["DEFAULT_NATS", "register"]

DEFAULT_NATS = "nats://127.0.0.1:4222"
NatsOpt = Annotated[str | None, typer.Option("--nats", help="NATS URL(s), comma-separated "
                                                               "[env SANDBUS_NATS; default nats://127.0.0.1:4222].")]
PluginArg = Annotated[str, typer.Argument(help="Plugin name.")]
FunctionArg = Annotated[str, typer.Argument(help="Function to call.")]
RequestArg = Annotated[str, typer.Argument(help="Request JSON, or - for stdin.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the reply.")]


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
    workers: Annotated[int, typer.Option(help="Worker processes (each its own NATS connection).")] = 1,
    watch: Annotated[bool, typer.Option(help="Hot-reload plugins when their files change.")] = True,
    durable: Annotated[bool, typer.Option(help="Durable topics through JetStream when available.")] = True,
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
    setup_logging(max(verbose, 1))
    from .node import Node, default_node_id
    from .policy import Policy, load_policy

    server: NatsServer | None = None
    url = nats_url or os.environ.get("SANDBUS_NATS")
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
        n = Node.create(plugins, options, policy=pol, node_id=base_id, durable=durable)
        manager = n.manager
        manager.discover_and_load()
        for info in manager.list_plugins():
            typer.echo(f"  {info.name:20s} {info.version or '-':10s} {info.status.value}"
                       + (f"  ({info.last_error})" if info.last_error else ""))
        for i in range(1, workers):
            args = [sys.executable, "-m", "host.cli", "node", "--plugins", str(plugins), "--nats", url,
                    "--node-id", f"{base_id}-w{i}", "--no-watch" if not watch else "--watch",
                    "--durable" if durable else "--no-durable"]
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
    watcher = n.manager.watch() if watch else None
    await n.start()
    typer.echo(f"node {n.node_id} ready")
    try:
        await stop.wait()
    finally:
        typer.echo(f"node {n.node_id} draining")
        if watcher is not None:
            watcher.stop()
        await n.stop()
        n.manager.close()


def _client_run(coro_factory: Any, url: str | None) -> Any:
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


def request(
    plugin: PluginArg,
    function: FunctionArg = "handle_request",
    payload: RequestArg = "{}",
    nats_url: NatsOpt = None,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """Call PLUGIN's FUNCTION on whichever node serves it; print the reply."""
    data = read_json_arg(payload, "payload")
    reply: bytes = _client_run(lambda c: c.request_bytes(plugin, function, data, timeout=timeout), nats_url)
    sys.stdout.buffer.write(reply + b"\n")
    decoded = orjson.loads(reply)
    if isinstance(decoded, dict) and decoded.get("success") is False:
        raise typer.Exit(1)


def pub(
    topic: Annotated[str, typer.Argument(help="Topic, e.g. orders.created.")],
    payload: Annotated[str, typer.Argument(help="Payload JSON, or - for stdin.")] = "null",
    nats_url: NatsOpt = None,
    core: Annotated[bool, typer.Option(help="Core NATS publish (at most once) even if JetStream is on.")] = False,
) -> None:
    """Publish onto TOPIC: every plugin subscribed to it gets one copy. Prints the message id."""
    data = orjson.loads(read_json_arg(payload, "payload"))
    msg_id = _client_run(lambda c: c.publish(topic, data, durable=not core), nats_url)
    typer.echo(msg_id)


def ls(
    nats_url: NatsOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to gather node answers.")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Nodes, their plugins, versions and counts, across the cluster."""
    nodes: list[dict[str, Any]] = _client_run(lambda c: c.nodes(timeout=timeout), nats_url)
    if as_json:
        sys.stdout.buffer.write(orjson.dumps(nodes, option=orjson.OPT_INDENT_2) + b"\n")
        return
    table = Table(title=f"{len(nodes)} node(s)")
    for col in ("node", "plugin", "version", "status", "calls", "errors", "p50 ms", "p99 ms", "instances",
                "in flight", "queued", "fuel", "memory", "last error"):
        table.add_column(col)
    for view in nodes:
        for p in view.get("plugins", []) or [{}]:
            table.add_row(view["node_id"], p.get("name", "-"), p.get("version") or "-", p.get("status", "-"),
                          str(p.get("executions", "")), str(p.get("errors", "")), _ms(p.get("p50_ms")),
                          _ms(p.get("p99_ms")), str(p.get("instances", "")), str(p.get("in_flight", "")),
                          str(p.get("queue_depth", "")), str(p.get("fuel_used", "")),
                          _bytes(p.get("memory_bytes")), (p.get("last_error") or "")[:60])
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def trace_cmd(
    plugin: PluginArg,
    function: FunctionArg = "handle_request",
    payload: RequestArg = "{}",
    nats_url: NatsOpt = None,
    timeout: TimeoutOpt = 5.0,
) -> None:
    """Send one traced request; print its trace id and the spans of the client and the serving node."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from rich.tree import Tree

    from .telemetry import SpanCollector

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
    spans = collector.take(trace_id) + node_spans
    typer.echo(f"trace id {trace_id:032x}  (Jaeger: /trace/{trace_id:032x})")
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    ids = {s["span_id"] for s in spans}
    for s in spans:
        by_parent.setdefault(s["parent_id"] if s["parent_id"] in ids else None, []).append(s)
    tree = Tree("spans")

    def add(node: Tree, parent: str | None) -> None:
        for s in by_parent.get(parent, []):
            attrs = {k: v for k, v in s["attributes"].items() if k.startswith(("sandbus.", "error."))}
            label = f"[bold]{s['name']}[/] {s['duration_ms']:.3f} ms  [dim]{s['service']}[/]"
            if attrs:
                label += "  " + " ".join(f"{k.removeprefix('sandbus.')}={v}" for k, v in attrs.items())
            if s["events"]:
                label += "  [yellow]" + ", ".join(s["events"]) + "[/]"
            add(node.add(label), s["span_id"])

    add(tree, None)
    Console(stderr=True).print(tree)
    sys.stdout.buffer.write(reply + b"\n")
    if "Sandbus-Error-Code" in headers:
        raise typer.Exit(1)


def _bytes(v: int | None) -> str:
    return "-" if v is None else f"{v / 1024:.0f} KiB"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def register(app: typer.Typer) -> None:
    app.command()(node)
    app.command()(request)
    app.command()(pub)
    app.command()(ls)
    app.command("trace")(trace_cmd)
    logging.getLogger("nats").setLevel(logging.WARNING)
