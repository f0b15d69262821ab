"""``sandbus dashboard``: a live web view of the nodes, their plugins, the audit trail and the logs.

One process serves every browser: it polls the nodes itself (``--interval``) and the pages read its memory,
so opening more pages adds no load on the nodes. It listens on loopback unless ``--host`` says otherwise
(with a warning). It is read-only unless started with ``--allow-control``; then it prints a URL with a
per-process token, and only a page opened with that token can reload or unload a plugin -- and only if the
NATS identity the dashboard connects with may (the nodes' permissions decide).

Exit codes: a bad option: 2; NATS unreachable: 5; the address cannot be bound: 1.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Annotated

import typer

from sandbus.host.cli.connect import Connection, with_connection
from sandbus.host.cli.main import EXIT_BUS, EXIT_USAGE, fail

if TYPE_CHECKING:
    from sandbus.host.dashboard.server import DashboardConfig

__all__ = ["dashboard", "register"]

log = logging.getLogger("sandbus.dashboard")

DEFAULT_PORT = 8470
#: Shortest polling interval accepted: below it the dashboard itself would become the nodes' load.
MIN_INTERVAL_S = 0.5


def _jaeger(url: str | None) -> str | None:
    """``--jaeger-url`` checked: an http(s) URL without credentials, query or fragment (it is put in links)."""
    if url is None:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password \
            or parts.query or parts.fragment or len(url) > 512 or any(c in url for c in "\"'<> \t\r\n"):
        fail(f"--jaeger-url must be an http(s) URL like http://localhost:16686 (found {url[:80]!r})", EXIT_USAGE)
    return url.strip().rstrip("/")


@with_connection
def dashboard(
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback exposes the dashboard "
                                           "to the network: choose it on purpose.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).", min=0, max=65535)] = DEFAULT_PORT,
    jaeger_url: Annotated[str | None, typer.Option(
        "--jaeger-url", help="Base URL of a Jaeger UI: trace ids become links to <URL>/trace/<id>.")] = None,
    interval: Annotated[float, typer.Option(
        help=f"Seconds between two polls of the nodes' stats (at least {MIN_INTERVAL_S}).")] = 2.0,
    allow_control: Annotated[bool, typer.Option(
        "--allow-control", help="Offer reload and unload (needs operator credentials on the NATS connection; "
                                "prints a URL with a secret token).")] = False,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", metavar="NAME",
        help="Another host name the page may be opened by (e.g. this machine's DNS name with --host 0.0.0.0); "
             "repeatable.")] = None,
    max_clients: Annotated[int, typer.Option(help="Pages that may watch live at once.", min=1, max=1024)] = 32,
    audit_history: Annotated[int, typer.Option(
        help="Audit events read back from the audit stream at start.", min=0, max=10_000)] = 200,
    *,
    conn: Connection,
) -> None:
    """Serve a live web dashboard of the cluster: nodes, plugins and their stats, deploys, audit trail, logs."""
    import math

    from sandbus.host.cli.extras import require_host

    require_host("dashboard")
    if not math.isfinite(interval) or interval < MIN_INTERVAL_S or interval > 3600:
        fail(f"--interval must be between {MIN_INTERVAL_S} and 3600 seconds", EXIT_USAGE)
    jaeger = _jaeger(jaeger_url)
    hosts = frozenset(h.strip().lower() for h in allow_host or ())
    if any(not h or len(h) > 253 or any(c in h for c in "/:@ \t") for h in hosts):
        fail("--allow-host takes a host name (no port, no scheme)", EXIT_USAGE)
    if allow_control and conn.user == "viewer":
        fail("--allow-control needs operator credentials: the viewer user may not reload or unload", EXIT_USAGE)
    if allow_control and not (conn.user or conn.token or conn.creds or conn.nkey or conn.tls_cert):
        typer.echo("warning: --allow-control without credentials: control works only on a bus that lets anyone "
                   "reload and unload plugins (a development bus); use the operator user on a shared one", err=True)

    from sandbus.host.cli.output import setup_logging
    from sandbus.host.dashboard.hub import HubLimits
    from sandbus.host.dashboard.security import is_loopback, new_token
    from sandbus.host.dashboard.server import DashboardConfig

    setup_logging(0)
    if not is_loopback(host):
        typer.echo(f"warning: listening on {host}: the dashboard is reachable from the network, without "
                   "authentication for reading. Prefer the default 127.0.0.1 and an SSH tunnel.", err=True)
    token = new_token() if allow_control else None
    config = DashboardConfig(host=host, port=port, interval=interval, jaeger_url=jaeger, allow_control=allow_control,
                             token=token, allow_hosts=hosts, nats_user=conn.user,
                             limits=HubLimits(max_listeners=max_clients), audit_history=audit_history)
    _run(conn, config)


def _run(conn: Connection, config: DashboardConfig) -> None:
    import asyncio
    import contextlib
    import signal

    from nats.errors import SlowConsumerError

    from sandbus.host.cli.connect import _client_class
    from sandbus.host.dashboard.collector import Collector
    from sandbus.host.dashboard.server import serve
    from sandbus.sdk.client import Client

    logging.getLogger("nats").setLevel(logging.CRITICAL + 1)  # reconnect attempts are said once, below

    def ready(url: str) -> None:
        typer.echo(f"dashboard on {url} (nodes polled every {config.interval:g} s; "
                   f"{'control allowed' if config.allow_control else 'read-only'})")
        if config.token is not None:
            typer.echo(f"open {url}#token={config.token} to reload or unload plugins (this token is printed only "
                       "here; anyone with it can act as the dashboard's NATS user)")

    async def go() -> None:
        connected = False
        causes: list[str] = []
        collectors: list[Collector] = []

        async def on_disconnect() -> None:
            if connected:
                log.warning("dashboard: disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            log.warning("dashboard: reconnected to NATS")

        async def on_error(e: Exception) -> None:
            if isinstance(e, SlowConsumerError):  # a flood beyond a subscription's bound: counted on the pages
                for collector in collectors:
                    collector.lost(e.subject)
                return
            if not connected and len(causes) < 8:
                causes.append(f"{type(e).__name__}: {str(e)[:200]}")
            log.debug("NATS: %s", e)

        nc = _client_class(conn)()
        try:
            # the first connection is tried once per server: an unreachable bus is said at once ...
            await nc.connect(servers=list(conn.servers), connect_timeout=2.0, max_reconnect_attempts=1,
                             reconnect_time_wait=0.5, disconnected_cb=on_disconnect, reconnected_cb=on_reconnect,
                             error_cb=on_error, **conn.nats_kwargs())
        except Exception as e:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 0.5)
            cause = causes[-1] if causes else f"{type(e).__name__}: {str(e)[:200]}"
            fail(f"NATS at {conn.shown_url} is unreachable ({cause})", EXIT_BUS)
        # ... and once connected, a long-running watcher reconnects for as long as it runs
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 1.0
        connected = True
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        client = Client(nc, sender="dashboard")
        try:
            await serve(client, config, stop=stop, on_ready=ready, on_collector=collectors.append)
        except OSError as e:
            fail(f"cannot listen on {config.host}:{config.port}: {e.strerror or e} (--port 0 picks a free port)",
                 EXIT_USAGE)
        finally:
            connected = False  # closing is not an outage to report
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 2.0)

    asyncio.run(go())


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add ``dashboard`` to ``app``."""
    app.command()(dashboard)
