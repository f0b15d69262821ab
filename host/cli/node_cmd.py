"""``sandbus node``: a host node serving a plugin directory over NATS, and with ``--cluster`` the cluster's deploys.

With no server URL (no option, variable or nats context), there is one bus on this machine, not two by
accident: a NATS server already listening on 127.0.0.1:4222 is joined; a free port gets an embedded
nats-server (JetStream); a port taken by something else gets the embedded server on a free port.

Stopping (Ctrl-C, SIGTERM, SIGHUP) is bounded: the ``--workers`` children are told first and drain in
parallel with this process; the embedded server, in a session of its own so the terminal's SIGINT does
not reach it, is stopped last, after every drain, and only by its owner.

With ``--cluster`` the node also follows the cluster's deploys (:mod:`sandbus.host.cluster.agent`): it
reports itself with its ``--label``s, loads what placement gives it from the registry, verified against the
policy's trusted publishers. Its plugin directory is then optional (none given: no local plugins). A
cluster member is one node process: ``--workers`` is refused with ``--cluster`` (start more nodes instead),
since placement counts members, and replicas on workers of one machine would share its fate. Stopping, the
agent stops first: its report is withdrawn, other nodes take its share at once, and the node keeps serving
until they do (at most 5 s more), then drains.

It runs plugins, so it needs the host extra, and imports the host side only once it knows it is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from sandbus.host.cli.connect import Connection, default_port, with_connection
from sandbus.host.cli.extras import require_host, require_nats_server
from sandbus.host.cli.main import EXIT_USAGE, exit_code_for, fail
from sandbus.host.cli.output import setup_logging
from sandbus.host.sandbox.guest_text import escape_controls
from sandbus.sdk.errors import SandbusError

if TYPE_CHECKING:
    from sandbus.bus.server import NatsServer

__all__ = ["node", "register"]

#: Seconds the workers get to drain once told to stop, and the embedded server to exit; each then
#: gets SIGKILL. Together with this node's own drain they keep a stop within about two seconds.
WORKER_STOP_S = 1.5
SERVER_STOP_S = 0.5
#: Seconds this node's own drain may take when no call is in flight (a call in flight is still
#: answered by its deadline).
DRAIN_S = 1.0


DEFAULT_PLUGINS = Path("plugins/build")


def node(
    plugins: Annotated[Path | None, typer.Option(
        "--plugins", help="Directory of plugins (<name>.wasm + <name>.toml) [default: plugins/build; with "
                          "--cluster: none]")] = None,
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
    bus_logs: Annotated[bool, typer.Option(
        help="Publish plugins' log lines on sandbus.log.<node>.<plugin> (`sandbus logs` follows them).")] = True,
    log_rate: Annotated[float, typer.Option(
        help="Log lines per second and plugin published on the bus; the excess is dropped and counted.",
        min=1, max=1_000_000)] = 200.0,
    cluster: Annotated[bool, typer.Option(
        "--cluster", help="Also run the cluster's deploys (`sandbus deploy`): needs JetStream.")] = False,
    label: Annotated[list[str] | None, typer.Option(
        "--label", metavar="KEY=VALUE", help="A label of this cluster node (deploys select nodes by them); "
                                             "repeatable.")]
    = None,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True)] = 0,
    *,
    conn: Connection,
) -> None:
    """Run a host node serving PLUGINS over NATS (joins the NATS server on 127.0.0.1:4222, or embeds one,
    when no server is given); with --cluster, also the cluster's deploys."""
    require_host("node")
    from sandbus.host.lifecycle.policy import Policy, load_policy
    from sandbus.host.node.node import Node, default_node_id

    labels = _cluster_options(cluster, label or [], workers)
    setup_logging(max(verbose, 1))
    # The node lowers the plugin loggers to capture their debug lines for the bus: stderr keeps its level.
    from sandbus.host.node.logbus import keep_handler_levels

    keep_handler_levels()
    server: NatsServer | None = None
    children: list[subprocess.Popen[bytes]] = []
    signalled: set[int] = set()
    code = 0
    try:
        try:
            if conn.is_default:
                conn, server = _one_bus(conn, data_dir)
            pol = load_policy(policy) if policy else Policy.default()
            base_id = node_id or default_node_id()
            options = conn.connect_options(name=f"sandbus-node-{base_id}")
            if cluster and plugins is None:
                n = _memory_node(options, pol, data_dir, node_id=base_id, durable=durable, max_waiting=max_waiting,
                                 bus_logs=bus_logs, log_rate=log_rate)
                watch = False  # nothing on disk to watch
            else:
                n = Node.create(plugins or DEFAULT_PLUGINS, options, policy=pol, node_id=base_id, durable=durable,
                                max_waiting=max_waiting, bus_logs=bus_logs, log_rate=log_rate)
            if cluster and not pol.registry.trusted_publishers:
                typer.echo("warning: the policy lists no [registry] trusted_publishers: this cluster node refuses "
                           "every deploy", err=True)
            manager = n.manager
            # Plugins that compile for seconds load in the background: the node serves the others meanwhile.
            manager.discover_and_load(background=True)
            for info in manager.list_plugins():  # a failed plugin's name is a file stem: any characters
                typer.echo(f"  {escape_controls(info.name):20s} {escape_controls(info.version or '-'):10s} "
                           f"{info.status.value}"
                           + (f"  ({escape_controls(info.last_error)})" if info.last_error else ""))
            for i in range(1, workers):
                # The connection travels in the environment (secrets never in argv, which ps shows to
                # everyone); --no-context: the child uses exactly what this node resolved.
                args = [sys.executable, "-m", "sandbus", "node", "--plugins", str(plugins or DEFAULT_PLUGINS),
                        "--no-context",
                        "--node-id", f"{base_id}-w{i}", "--no-watch" if not watch else "--watch",
                        "--durable" if durable else "--no-durable", "--max-waiting", str(max_waiting),
                        "--bus-logs" if bus_logs else "--no-bus-logs", "--log-rate", repr(log_rate)]
                if policy is not None:
                    args += ["--policy", str(policy)]
                children.append(subprocess.Popen(args, env=conn.child_env(os.environ)))
            asyncio.run(_serve(n, watch, on_stop=lambda: _signal_once(children, signalled),
                               cluster_labels=labels if cluster else None))
        except SandbusError as e:
            # Another node already answers under this id: the operator's mistake, not the bus's.
            fail(str(e), EXIT_USAGE if e.code == "bus.node_id_in_use" else exit_code_for(e))
        finally:
            # Stopping already: a late signal (a worker's parent tells it too when the terminal already
            # did) must not cut the cleanup short, and every wait below is bounded.
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            _stop_children(children, signalled, WORKER_STOP_S)
            if server is not None:
                server.stop(timeout=SERVER_STOP_S)
    except typer.Exit as e:
        code = e.exit_code
    _exit_now(code)


def _cluster_options(cluster: bool, label: list[str], workers: int) -> dict[str, str]:
    """The node's labels, checked; ``--label`` without ``--cluster``, or ``--cluster`` with workers: exit 2."""
    if not cluster:
        if label:
            fail("--label labels a cluster node: add --cluster", EXIT_USAGE)
        return {}
    if workers > 1:
        fail("--cluster runs one cluster member per node process: instead of --workers, start more nodes "
             "(each with its own --node-id)", EXIT_USAGE)
    from sandbus.host.cluster.deploys import parse_label_args

    try:
        return parse_label_args(label)
    except SandbusError as e:
        fail(str(e), EXIT_USAGE)


def _memory_node(options: Any, policy: Any, data_dir: Path, **kwargs: Any) -> Any:
    """A node with no plugin directory: it serves only what the cluster deploys to it (loaded from memory);
    the plugins' data directories live under ``data_dir/plugin-data``."""
    from sandbus.host.lifecycle import PluginManager
    from sandbus.host.node.hostfuncs import BusBridge
    from sandbus.host.node.node import Node

    bridge = BusBridge()
    manager = PluginManager(None, policy=policy, data_root=data_dir / "plugin-data",
                            host_functions=bridge.host_functions())
    n = Node(manager, options, **kwargs)
    bridge.attach(n.bus, manager.grant)
    return n


def _exit_now(code: int) -> NoReturn:
    """Exit once everything is stopped, without the interpreter's teardown.

    The node has drained, closed its plugins and flushed its telemetry; what is left is freeing the
    wasmtime engine and compiled modules object by object, which took 0.3-0.5 s of a stop (more on a
    loaded machine) and does nothing the operating system would not do at once.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _one_bus(conn: Connection, data_dir: Path) -> tuple[Connection, NatsServer | None]:
    """Join the NATS server on the default port, or start the embedded one (see the module's docstring).

    Only a server of this user (or of root: a system service) is joined: one that another user started
    on the port first is left alone, as explicit ``--nats`` can still join it.
    """
    from sandbus.bus.server import NatsServer, listener_uids, probe_nats

    port = default_port()
    found = probe_nats("127.0.0.1", port)
    foreign: set[int] = set()
    if isinstance(found, dict):
        foreign = (listener_uids(port) or set()) - {os.getuid(), 0}
        if not foreign:
            version = found.get("version")
            typer.echo(f"joining the NATS server already listening on {conn.url}"
                       + (f" (nats-server {escape_controls(str(version))[:40]})" if version else ""))
            return conn, None
    require_nats_server("node")
    data_dir.mkdir(parents=True, exist_ok=True)
    server = NatsServer(store_dir=data_dir / "nats", port=-1 if found else port).start()
    typer.echo(f"embedded nats-server (JetStream) on {server.url}, pid {server.pid}; data in {data_dir / 'nats'}")
    if foreign:
        typer.echo(f"port {port} is served by a NATS server of another user (uid {min(foreign)}), not joined "
                   f"(--nats nats://127.0.0.1:{port} joins it): export NATS_URL={server.url} for other commands")
    elif found:
        typer.echo(f"port {port} is taken by something that is not a NATS server: "
                   f"export NATS_URL={server.url} for other commands")
    return conn.with_servers(server.url, "default"), server


def _signal_once(children: list[subprocess.Popen[bytes]], signalled: set[int]) -> None:
    """SIGTERM each running child once: a second one would find its handlers gone (its loop closed while
    it finishes) and kill it in the middle of closing its plugins."""
    for child in children:
        if child.pid not in signalled and child.poll() is None:
            signalled.add(child.pid)
            with contextlib.suppress(OSError):
                child.send_signal(signal.SIGTERM)


def _stop_children(children: list[subprocess.Popen[bytes]], signalled: set[int], timeout: float) -> None:
    """SIGTERM every child not yet told, wait for all under one deadline, SIGKILL what is left."""
    _signal_once(children, signalled)
    deadline = time.monotonic() + timeout
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.poll() is None:
            child.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1.0)


async def _serve(n: Any, watch: bool, on_stop: Callable[[], None], *,
                 cluster_labels: dict[str, str] | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
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
        on_stop()
        _quiet()
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, SandbusError):
            await starting
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)
        n.manager.close()
        typer.echo(f"node {n.node_id} stopped before it connected", err=True)
        return
    stopping.cancel()
    try:
        starting.result()  # a start that failed raises here, as before
    except BaseException:
        on_stop()
        raise
    agent = None
    if cluster_labels is not None:
        from sandbus.host.cluster.agent import ClusterAgent

        agent = ClusterAgent(n, labels=cluster_labels)
        try:
            await agent.start()
        except BaseException:
            on_stop()
            await n.stop(DRAIN_S)
            n.manager.close()
            raise
        shown = ",".join(f"{k}={v}" for k, v in sorted(cluster_labels.items())) or "no labels"
        typer.echo(f"node {n.node_id} follows the cluster's deploys ({escape_controls(shown)})")
    _report_background(n)  # before "ready": whoever waits for "ready" has read what is still loading
    typer.echo(f"node {n.node_id} ready")
    try:
        await stop.wait()
    finally:
        on_stop()  # the workers drain while this node does
        _quiet()
        if agent is not None:  # first: its report withdrawn, the others take its share while this node drains
            await agent.stop()
        typer.echo(f"node {n.node_id} draining")
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)
        await n.stop(DRAIN_S)
        n.manager.close()


def _report_background(n: Any) -> None:
    """"ready" means serving what has loaded; a plugin still compiling joins when its load ends, which is
    printed (``node <id> loaded <plugin>: <status>``) from a daemon thread, so stopping never waits for it."""
    loading = n.manager.loading()
    if not loading:
        return
    typer.echo(f"node {n.node_id} still loading in the background: {', '.join(map(escape_controls, loading))}")

    def report() -> None:
        n.manager.wait_loaded()
        for name in loading:
            with contextlib.suppress(SandbusError):
                info = n.manager.info(name)
                typer.echo(f"node {n.node_id} loaded {escape_controls(name)}: {info.status.value}"
                           + (f" ({escape_controls(info.last_error)})" if info.last_error else ""))

    threading.Thread(target=report, name="sandbus-load-report", daemon=True).start()


def _quiet() -> None:
    """While stopping, a lost connection is expected: its reconnect attempts are not worth a warning each."""
    for name in ("sandbus.bus.connection", "nats"):
        logging.getLogger(name).setLevel(logging.ERROR)


def register(app: typer.Typer) -> None:
    app.command()(with_connection(node))
