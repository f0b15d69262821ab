"""``sandbus node``: a host node serving a plugin directory over NATS (an embedded nats-server when no URL is given).

It runs plugins, so it needs the host extra, and imports the host side only once it knows it is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sandbus.host.cli.connect import NatsOpt
from sandbus.host.cli.extras import require_host, require_nats_server
from sandbus.host.cli.main import exit_code_for, fail
from sandbus.host.cli.output import setup_logging
from sandbus.host.sandbox.guest_text import escape_controls
from sandbus.sdk.errors import SandbusError

__all__ = ["node", "register"]


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


def register(app: typer.Typer) -> None:
    app.command()(node)
