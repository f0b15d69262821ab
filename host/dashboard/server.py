"""The dashboard's HTTP side (aiohttp): the page, a JSON snapshot, the live event stream, debug, control.

Routes:

    GET  /                  the page (static/index.html; its script and style under /static/)
    GET  /api/state         everything the page shows, as JSON
    GET  /api/events        the same, live: Server-Sent Events (``snapshot`` first, then ``nodes``, ``logs``,
                            ``audit``, ``deploys``)
    GET  /api/debug?node=N&plugin=P   a plugin's debug state on a node (fetched at most once per interval);
                            with ``X-Sandbus-Dashboard: 1``
    POST /api/control       ``{"verb": "reload"|"unload", "node": N, "plugin": P}``; only with control allowed,
                            the token in ``X-Sandbus-Token``, and the page's own ``Origin``

Every response names no third party (a Content-Security-Policy of ``'self'`` only): the page works offline
and a script that some data smuggled into it could not run nor send anything anywhere. Every request's ``Host``
is checked (:mod:`.security`), bodies are capped (:data:`MAX_BODY`), event streams are capped (the hub's
limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from sandbus.host.dashboard.collector import Busy, Collector, NotShown
from sandbus.host.dashboard.hub import Hub, HubLimits, TooManyListeners
from sandbus.host.dashboard.security import FailureLimit, HostCheck, token_matches
from sandbus.host.dashboard.validate import debug_state
from sandbus.sdk.errors import SandbusError

if TYPE_CHECKING:
    from sandbus.sdk.client import Client

__all__ = ["MAX_BODY", "PAGE_HEADER", "TOKEN_HEADER", "DashboardConfig", "make_app", "serve"]

log = logging.getLogger("sandbus.dashboard")

#: Largest request body accepted (a control request is ~100 bytes).
MAX_BODY = 1024
#: The header that carries the control token.
TOKEN_HEADER = "X-Sandbus-Token"
#: The header the page sends with a debug request.
PAGE_HEADER = "X-Sandbus-Dashboard"
#: Seconds between two keep-alive comments on an idle event stream.
KEEPALIVE_S = 15.0
#: Seconds an event may take to reach a page's connection: a client that stops reading is closed after it (the
#: hub stops queueing for it earlier; this frees the connection and what its socket buffers hold).
SEND_TIMEOUT_S = 10.0
#: Seconds a connection may stay open without a request (a new one, or one whose header is still arriving):
#: a client that opens connections and trickles their headers cannot keep them, or their sockets, for long.
IDLE_TIMEOUT_S = 10.0
#: Seconds a control request's body may take to arrive.
BODY_TIMEOUT_S = 5.0

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
STATIC = {"app.js": "text/javascript", "style.css": "text/css"}



@dataclass(frozen=True)
class DashboardConfig:
    """How the dashboard serves.

    Parameters:
        host: the address to bind (loopback unless chosen otherwise).
        port: the port (0: any free one).
        interval: seconds between two rounds of ``stats``.
        jaeger_url: base URL of a Jaeger UI; trace ids link to ``<jaeger_url>/trace/<id>``.
        allow_control: whether reload / unload are offered (still gated by ``token``).
        token: the control token (required with ``allow_control``).
        allow_hosts: more ``Host`` names accepted (a DNS name of this machine).
        nats_user: the NATS identity control actions run as, for the log line that records them.
        limits: the hub's bounds.
        audit_history: audit events read back from the stream at start.
    """

    host: str = "127.0.0.1"
    port: int = 8470
    interval: float = 2.0
    jaeger_url: str | None = None
    allow_control: bool = False
    token: str | None = field(default=None, repr=False)
    allow_hosts: frozenset[str] = frozenset()
    nats_user: str | None = None
    limits: HubLimits = field(default_factory=HubLimits)
    audit_history: int = 200

    def __post_init__(self) -> None:
        if self.allow_control and not self.token:
            raise ValueError("control needs a token")


#: the Host check, in a one-item list: the port is known only once the server listens (``--port 0``)
HOST_KEY = web.AppKey("host_check", list[HostCheck])
CONFIG_KEY = web.AppKey("config", DashboardConfig)
HUB_KEY = web.AppKey("hub", Hub)
COLLECTOR_KEY = web.AppKey("collector", Collector)
PAGES_KEY = web.AppKey("pages", dict[str, bytes])
FAILURES_KEY = web.AppKey("failures", FailureLimit)
ORIGIN_REFUSALS_KEY = web.AppKey("origin_refusals", FailureLimit)


def _static(name: str) -> bytes:
    return (resources.files("sandbus.host.dashboard") / "static" / name).read_bytes()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data, default=str), status=status, content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


async def _no_icon(request: web.Request) -> web.StreamResponse:
    """Browsers ask for an icon on their own: no content, rather than a 404 in the console on every load."""
    return web.Response(status=204)


@web.middleware
async def _guard(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> web.StreamResponse:
    """The ``Host`` check, before anything else is looked at; then no other site's page may use the API.

    A page of another site can make the browser send requests here without reading the answers: opening event
    streams would take every listener slot, asking for debug states would load the nodes. Browsers say where a
    request comes from (``Sec-Fetch-Site``); only the dashboard's own page (or a tool, which sends no such
    header) may reach anything but the page itself, which a link on another site may open.
    """
    if not request.app[HOST_KEY][0].allows(request.headers.get("Host")):
        return _error(421, "dashboard.wrong_host", "this server does not answer to that host name")
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in ("same-origin", "none") and request.path != "/":
        return _error(403, "dashboard.cross_site", "requests from another site's page are refused")
    return await handler(request)


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Cache-Control", "no-store")


async def _index(request: web.Request) -> web.Response:
    return web.Response(body=request.app[PAGES_KEY]["index.html"], content_type="text/html", charset="utf-8")


async def _asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=request.app[PAGES_KEY][name], content_type=STATIC[name], charset="utf-8")


async def _state(request: web.Request) -> web.Response:
    return web.Response(body=request.app[HUB_KEY].snapshot_json(), content_type="application/json")


async def _events(request: web.Request) -> web.StreamResponse:
    hub = request.app[HUB_KEY]
    try:
        listener = hub.listen()
    except TooManyListeners as e:
        return web.Response(status=503, text=f"{e}\n", headers={"Retry-After": "10"})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})

    async def send(data: bytes) -> None:
        # a write waits while the client's socket is full: a client that never reads would hold this handler,
        # its connection and everything queued in its transport for ever
        await asyncio.wait_for(response.write(data), SEND_TIMEOUT_S)

    try:
        await response.prepare(request)
        # the browser waits this long before reconnecting after the stream ends (a cut-off listener)
        await send(b"retry: 2000\n\n")
        while True:
            try:
                item = await asyncio.wait_for(listener.take(), KEEPALIVE_S)
            except TimeoutError:
                await send(b": keep-alive\n\n")
                continue
            if item is None:
                break
            await send(item)
    except TimeoutError:
        log.info("dashboard: an event stream's client from %s stopped reading; closed", request.remote)
        _reset(request)
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        hub.leave(listener)
    return response


def _reset(request: web.Request) -> None:
    """Close the request's connection at once (a reset, not a close that waits to send what is queued: the
    client is not reading it), so neither this process nor the kernel keeps its buffers."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def _debug(request: web.Request) -> web.Response:
    # a header no other site's page can send without asking first (a CORS preflight this server never grants):
    # for browsers that do not say where a request comes from
    if request.headers.get(PAGE_HEADER) != "1":
        return _error(403, "dashboard.cross_site", f"debug requests need the {PAGE_HEADER}: 1 header")
    node, plugin = request.query.get("node", ""), request.query.get("plugin", "")
    try:
        state = await request.app[COLLECTOR_KEY].debug(node, plugin)
    except ValueError as e:
        return _error(400, "request.invalid", str(e))
    except NotShown as e:
        return _error(404, e.code, str(e))
    except Busy as e:
        return _error(503, e.code, str(e))
    except SandbusError as e:
        return _error(502, e.code, str(e)[:2048])
    except TimeoutError:
        return _error(504, "timeout", f"node {node[:64]!r} did not answer in time")
    return _json(state)


def _who(request: web.Request) -> str:
    agent = request.headers.get("User-Agent", "")[:120]
    return f"{request.remote} ({agent!r})"


async def _control(request: web.Request) -> web.Response:
    config = request.app[CONFIG_KEY]
    if not config.allow_control or config.token is None:
        return _error(403, "dashboard.read_only", "this dashboard is read-only (start it with --allow-control)")
    host = request.headers.get("Host")
    if not request.app[HOST_KEY][0].origin_allowed(request.headers.get("Origin"), host):
        refusals = request.app[ORIGIN_REFUSALS_KEY]
        if refusals.fail():  # said a few times a minute, not once per request of whoever sends them
            log.warning("dashboard control refused from %s: Origin %r is not this dashboard%s", _who(request),
                        request.headers.get("Origin", "")[:120], refusals.suffix())
        return _error(403, "dashboard.bad_origin", "control requests must come from the dashboard's own page")
    failures = request.app[FAILURES_KEY]
    locked = failures.locked_for()
    if locked > 0:
        # past the failures allowed, no token is even compared: guessing goes no faster than the limit
        return _error(429, "dashboard.too_many_failures",
                      f"too many wrong control tokens; control is refused for {math.ceil(locked)} s")
    if not token_matches(request.headers.get(TOKEN_HEADER), config.token):
        if failures.fail():
            log.warning("dashboard control refused from %s: missing or wrong token%s", _who(request),
                        failures.suffix())
        if failures.locked_for() > 0:
            log.warning("dashboard control: %d wrong tokens within %g s; control refused for %g s",
                        failures.max_failures, failures.window_s, failures.window_s)
        return _error(403, "dashboard.bad_token", "missing or wrong control token")
    if request.content_type != "application/json":
        return _error(415, "request.invalid", "the body must be application/json")
    try:
        body = orjson.loads(await asyncio.wait_for(request.read(), BODY_TIMEOUT_S))
    except web.HTTPRequestEntityTooLarge:
        return _error(413, "request.too_large", f"body over {MAX_BODY} bytes")
    except TimeoutError:
        return _error(408, "request.timeout", f"the body did not arrive within {BODY_TIMEOUT_S:g} s")
    except orjson.JSONDecodeError:
        return _error(400, "request.invalid", "the body is not JSON")
    if not isinstance(body, dict) or set(body) != {"verb", "node", "plugin"} \
            or not all(isinstance(v, str) for v in body.values()):
        return _error(400, "request.invalid", 'the body must be {"verb": ..., "node": ..., "plugin": ...}')
    verb, node, plugin = body["verb"], body["node"], body["plugin"]
    collector = request.app[COLLECTOR_KEY]
    who = _who(request)
    try:
        result = await collector.control(verb, node, plugin)
    except ValueError as e:
        return _error(400, "request.invalid", str(e))
    except NotShown as e:
        return _error(404, e.code, str(e))
    except (SandbusError, TimeoutError) as e:
        code = e.code if isinstance(e, SandbusError) else "timeout"
        log.warning("dashboard control: %s %s on node %s by %s as NATS user %s failed: %s", verb, plugin, node, who,
                    config.nats_user or "(none)", e)
        collector.note("warning", "dashboard.control", f"{verb} of {plugin} on {node} by {who} failed: {e}",
                       plugin=plugin)
        return _error(502, code, str(e)[:2048])
    log.warning("dashboard control: %s %s on node %s by %s as NATS user %s: done", verb, plugin, node, who,
                config.nats_user or "(none)")
    collector.note("info", "dashboard.control", f"{verb} of {plugin} on {node} by {who}", plugin=plugin)
    return _json({"ok": True, "result": debug_state(result)})


def make_app(config: DashboardConfig, hub: Hub, collector: Collector, port: int) -> web.Application:
    """The aiohttp application over ``hub`` and ``collector``, answering to ``config.host`` on ``port``  (0: the
    server puts the real one in ``app[HOST_KEY][0]`` once it listens)."""
    app = web.Application(client_max_size=MAX_BODY, middlewares=[_guard])
    app[CONFIG_KEY] = config
    app[HUB_KEY] = hub
    app[COLLECTOR_KEY] = collector
    app[HOST_KEY] = [HostCheck(config.host, port, config.allow_hosts)]
    app[FAILURES_KEY] = FailureLimit()
    app[ORIGIN_REFUSALS_KEY] = FailureLimit()
    app[PAGES_KEY] = {name: _static(name) for name in ("index.html", *STATIC)}  # read once: no file I/O per request
    app.on_response_prepare.append(_headers)

    async def close_streams(_: web.Application) -> None:
        hub.close_all()

    app.on_shutdown.append(close_streams)
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _asset)
    app.router.add_get("/favicon.ico", _no_icon)
    app.router.add_get("/api/state", _state)
    app.router.add_get("/api/events", _events)
    app.router.add_get("/api/debug", _debug)
    app.router.add_post("/api/control", _control)
    return app


async def serve(client: Client, config: DashboardConfig, *, stop: asyncio.Event,
                on_ready: Callable[[str], None] | None = None,
                on_collector: Callable[[Collector], None] | None = None) -> None:
    """Collect from ``client``'s bus and serve until ``stop`` is set; ``on_ready(url)`` once listening;
    ``on_collector(collector)`` as soon as it exists (before it subscribes), for the connection's error callback
    to report the messages NATS drops (:meth:`Collector.lost`).

    Raises:
        OSError: the address could not be bound.
    """
    from sandbus.host.dashboard.collector import Collector

    hub = Hub(limits=config.limits, info={"jaeger_url": config.jaeger_url, "control": config.allow_control,
                                          "interval": config.interval, "started_at": time.time()})
    collector = Collector(client, hub, interval=config.interval, audit_history=config.audit_history)
    if on_collector is not None:
        on_collector(collector)
    await collector.start()
    hub.info["audit_source"] = collector.audit_source
    runner: web.AppRunner | None = None
    listener: asyncio.Server | None = None
    try:
        app = make_app(config, hub, collector, config.port)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0,
                               keepalive_timeout=IDLE_TIMEOUT_S)
        await runner.setup()
        listener = await _listen(runner, config)
        sock_port = int(listener.sockets[0].getsockname()[1])
        # the Host check needs the real port (``--port 0``); no request is read before this line runs
        app[HOST_KEY][0] = HostCheck(config.host, sock_port, config.allow_hosts)
        shown = f"[{config.host}]" if ":" in config.host else config.host
        if on_ready is not None:
            on_ready(f"http://{shown}:{sock_port}/")
        await stop.wait()
    finally:
        if listener is not None:
            listener.close()  # no new connections; the runner closes the open ones
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        await collector.stop()


def max_connections(config: DashboardConfig) -> int:
    """Connections open at once: every page's event stream, plus room for the pages' other requests."""
    return config.limits.max_listeners + 64


class _Refused(asyncio.Protocol):
    """A connection over :func:`max_connections`: told so and closed, nothing read."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n"
                        b"Retry-After: 10\r\n\r\n")
        transport.close()


async def _listen(runner: web.AppRunner, config: DashboardConfig) -> asyncio.Server:
    """Listen on the configured address with at most :func:`max_connections` connections open (aiohttp's own
    sites take every connection: whoever reaches the port could hold thousands, each with its buffers).

    Raises:
        OSError: the address could not be bound.
    """
    server = runner.server
    assert server is not None  # set up
    limit = max_connections(config)

    def protocol() -> asyncio.BaseProtocol:
        if len(server.connections) >= limit:
            return _Refused()
        return server()

    return await asyncio.get_running_loop().create_server(protocol, config.host, config.port, reuse_address=True)
