"""Host functions that reach beyond the sandbox: publish and request (messaging), kv_* (storage),
http_request (network).

Calls of plugins that import these never run inline on the event loop (host/node/node.py): they run
in the plugin's worker threads. NATS lives on the loop, so a host function hands a coroutine of the
node's :class:`~sandbus.bus.PluginBus` (``publish``, ``request``, ``kv``) to the loop and waits for
it, bounded. What a plugin may reach is the policy's grant (``PluginManager.grant``).

Results of unknown size (kv_get, http_request, request) follow one pattern: the function returns the
full length and writes ``min(length, cap)`` bytes; a guest whose buffer was too small fetches the same
result again with ``take_result(buf, cap)`` instead of repeating the operation.

``request`` calls another plugin exactly as a client would (``sandbus.req.<plugin>.<function>``, so
it is load-balanced over every node serving the target). What can go wrong splits in two, by who can
do something about it: a request the plugin should never have made (a target it was not granted, a
malformed target or body, a chain beyond the hop limit) fails the whole call with a typed error, like
``publish``; an *outcome* a correct plugin must be ready for (the target's call failed, nobody serves
the target, no reply in time) is a negative return code, with the error as JSON in ``take_result``,
so the plugin can fall back, retry or report it in its own reply.

Two bounds hold for every function here. Time: whatever a host function waits for (a reply, an
ack, an HTTP response, a name lookup) it waits at most what is left of the call's deadline, as one
overall budget (host/sandbox/deadline.py); past it the call fails with ``ExecutionTimeoutError``.
Size: a guest buffer is checked against its cap before it is copied (host/sandbox/hostfuncs.py).

Chains: every message a plugin sends while serving one -- a ``request`` or a ``publish`` -- carries
``Sandbus-Hops`` one above the message it serves, and durable deliveries keep that header. So a
cycle through requests, publishes and topic subscriptions (a plugin that publishes onto a topic it
is subscribed to) ends at the hop limit with ``HopLimitError`` and a ``limit.hops`` audit event.
The hop limit bounds how deep a chain goes; how wide it fans out (a plugin that publishes several
messages per message it receives) is bounded by the policy's send limits (host/node/sendlimit.py): a
token bucket per plugin and a cap per call, beyond which a send fails the call with
``RateLimitError`` and a ``limit.rate`` audit event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, TypeVar

import nats.errors
import orjson
from opentelemetry import context as otel_context

from sandbus.host.node.netguard import NameNotResolved, NotPermitted, resolve_checked
from sandbus.host.node.sendlimit import SendLimiter
from sandbus.host.sandbox import DEFAULT_FUNCTION, AuditLevel, CallContext, HostFunction, HostFunctions
from sandbus.host.sandbox.deadline import expired, remaining
from sandbus.host.sandbox.extism.abi import EXTISM_ENV
from sandbus.host.sandbox.extism.hostfuncs import extism_invoker
from sandbus.host.sandbox.hostfuncs import read_bounded, read_str_bounded
from sandbus.sdk.envelope import hops_of
from sandbus.sdk.errors import (
    AbiViolationError,
    BusError,
    HopLimitError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ResourceLimitError,
    SandbusError,
    SecurityViolationError,
)
from sandbus.sdk.jsonbound import MAX_JSON_DEPTH, too_deep
from sandbus.sdk.subjects import MAX_TOPIC_LENGTH, check_token, check_topic

if TYPE_CHECKING:
    from sandbus.bus.plugin_bus import PluginBus
    from sandbus.host.lifecycle.policy import Grant

__all__ = [
    "BusBridge",
    "HttpResponse",
    "MAX_HOPS",
    "REQUEST_ENOTFOUND",
    "REQUEST_EREMOTE",
    "REQUEST_ETIMEOUT",
    "REQUEST_TIMEOUT_S",
    "REQUEST_TIMEOUT_SHARE",
    "check_hops",
    "deliver_result",
    "incoming_hops",
    "keep_result",
    "note_incoming_hops",
    "parse_target",
]

PUBLISH_TIMEOUT_S = 5.0
#: The longest a ``request`` waits for its reply (see :meth:`BusBridge.request_timeout`).
REQUEST_TIMEOUT_S = 5.0
#: A request waits at most this share of what is left of the calling call's deadline: the rest is
#: left for the guest to handle a timeout outcome before its own call is stopped.
REQUEST_TIMEOUT_SHARE = 0.8
#: The longest plugin-to-plugin chain: a request or publish that would carry ``Sandbus-Hops`` above it fails.
MAX_HOPS = 8
#: ``request`` return codes (docs/abi.md); each leaves the error JSON in ``take_result``.
REQUEST_EREMOTE = -1  # the target's call failed (its error reply)
REQUEST_ENOTFOUND = -2  # no node serves the target plugin (NATS "no responders")
REQUEST_ETIMEOUT = -3  # no reply in time
KV_QUOTA_BYTES = 1024 * 1024
KV_MAX_VALUE = 64 * 1024
HTTP_TIMEOUT_S = 10.0
HTTP_MAX_RESPONSE = 1024 * 1024
#: The largest ``http_request`` request JSON (url, headers, body) a guest may hand over.
HTTP_MAX_REQUEST = 1024 * 1024
#: The longest ``request`` target (``plugin.function``) and ``kv_*`` key (256 characters of up to 4
#: UTF-8 bytes) read from a guest, in bytes.
MAX_TARGET = 2 * 255 + 1
MAX_KEY = 4 * 256
HTTP_MAX_CONNECTIONS = 4
#: Request headers only the host sets: ``Host`` (the granted name) and everything that frames the message
#: or the connection, through which a guest could fit a second request of its own into the first.
_HOST_OWNED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade",
                                 "keep-alive", "proxy-connection", "te", "trailer"})
#: An HTTP method is a token (RFC 9110): no space, which would let a guest write its own request target.
_METHOD_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}")
_RESULT = "bus_result"
T = TypeVar("T")

_incoming_hops: ContextVar[int] = ContextVar("sandbus_incoming_hops", default=0)
#: What nats-py raises when the connection is gone or going: a BusError for the plugin.
_BUS_DOWN = (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError,
             nats.errors.ConnectionReconnectingError, nats.errors.NoServersError,
             nats.errors.OutboundBufferLimitError, nats.errors.StaleConnectionError)


def note_incoming_hops(headers: Mapping[str, str] | None) -> None:
    """Record the ``Sandbus-Hops`` of the message the current task is about to serve.

    The node calls this in the task that serves a request, before it hands the call to a worker
    thread; the thread runs in a copy of the task's context, so :func:`incoming_hops` there -- and the
    ``request`` host function -- see the value of the message being served, whichever node sent it.
    Every served message must set it (0 for a client's request), so no value leaks into another call.
    """
    _incoming_hops.set(hops_of(headers))


def incoming_hops() -> int:
    """The ``Sandbus-Hops`` of the request the current call serves (0: a client's, or not known)."""
    return _incoming_hops.get()


def check_hops(ctx: CallContext, what: str, max_hops: int, **details: Any) -> int:
    """The ``Sandbus-Hops`` of a message the current call sends (``what``): one above the message it
    serves.

    Raises:
        HopLimitError: that would be above ``max_hops`` (audited as ``limit.hops`` when the call fails).
    """
    hops = incoming_hops() + 1
    if hops > max_hops:
        raise HopLimitError(
            f"{what} would be hop {hops} of a chain of plugin requests and messages, above the limit of "
            f"{max_hops} (do plugins request or publish to each other, or to themselves, in a cycle?)",
            plugin=ctx.plugin, limit=max_hops, hops=hops, **details,
        )
    return hops


def keep_result(ctx: CallContext, data: bytes) -> None:
    """Leave ``data`` for the guest's next ``take_result``."""
    ctx.extra[_RESULT] = data


def deliver_result(ctx: CallContext, data: bytes, buf_ptr: int, buf_cap: int) -> int:
    """The result pattern: keep ``data`` for ``take_result``, write ``min(len, cap)`` bytes, return ``len``."""
    keep_result(ctx, data)
    ctx.write(buf_ptr, data[: max(0, buf_cap)])
    return len(data)


def parse_target(text: str) -> tuple[str, str]:
    """``"plugin"`` or ``"plugin.function"`` -> ``(plugin, function)``; a bare plugin means ``handle_request``.

    Raises:
        ValueError: the text is not one of those two forms (each part one subject token).
    """
    plugin, dot, function = text.partition(".")
    if dot and not function:
        raise ValueError(f"target {text!r} ends with '.': write 'plugin' or 'plugin.function'")
    function = function or DEFAULT_FUNCTION
    try:
        check_token(plugin, "plugin")
        check_token(function, "function")
    except ValueError as e:
        raise ValueError(f"target {text!r} must be 'plugin' or 'plugin.function': {e}") from None
    return plugin, function


def _refuse(ctx: CallContext, kind: str, attempt: str, doing: str, setting: str, granted: list[str],
            **fields: Any) -> NoReturn:
    """A send the plugin was not granted: the audit event, then the typed error (one wording for both)."""
    ctx.auditor.emit(AuditLevel.CRITICAL, kind, ctx.plugin, f"{attempt} denied (granted: {granted})", **fields)
    raise SecurityViolationError(f"{doing} was not granted ({setting}: {granted})", plugin=ctx.plugin, **fields)


class HttpResponse(NamedTuple):
    """What an HTTP exchange returned: status, headers (as the server sent them), body bytes."""

    status: int
    headers: dict[str, str]
    body: bytes


class BusBridge:
    """The bus host functions, bound late: the manager that links them is created before the node's
    :class:`~sandbus.bus.PluginBus`, which :meth:`attach` hands over (with the manager's grants).
    Unattached (the authoring tools, the test harness) every bus function fails with a ``BusError``."""

    def __init__(self, *, kv_quota_bytes: int = KV_QUOTA_BYTES, http_timeout_s: float = HTTP_TIMEOUT_S,
                 http_max_response: int = HTTP_MAX_RESPONSE, http_max_connections: int = HTTP_MAX_CONNECTIONS,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, max_hops: int = MAX_HOPS,
                 http_max_request: int = HTTP_MAX_REQUEST) -> None:
        self.bus: PluginBus | None = None
        self.grant: Callable[[str], Grant] | None = None
        self.request_timeout_s = request_timeout_s
        self.max_hops = max_hops
        self.kv_quota_bytes = kv_quota_bytes
        self.http_timeout_s = http_timeout_s
        self.http_max_response = http_max_response
        self.http_max_request = http_max_request
        self.http_max_connections = http_max_connections
        self._conn_gates: dict[str, threading.BoundedSemaphore] = {}
        self._gates_lock = threading.Lock()
        #: What each plugin may send, how fast and how many per call (host/node/sendlimit.py).
        self.sends = SendLimiter()

    def host_functions(self) -> HostFunctions:
        i32 = "i32"
        funcs = HostFunctions()
        funcs.add(HostFunction("publish", (i32,) * 4, (i32,), self._publish, capability="messaging"))
        funcs.add(HostFunction("request", (i32,) * 6, (i32,), self._request, capability="messaging"))
        funcs.add(HostFunction("kv_get", (i32,) * 4, (i32,), self._kv_get, capability="storage"))
        funcs.add(HostFunction("kv_put", (i32,) * 4, (i32,), self._kv_put, capability="storage"))
        funcs.add(HostFunction("kv_delete", (i32,) * 2, (i32,), self._kv_delete, capability="storage"))
        funcs.add(HostFunction("http_request", (i32,) * 4, (i32,), self._http_request, capability="network"))
        funcs.add(HostFunction("take_result", (i32,) * 2, (i32,), self._take_result))
        # Extism plugins' http_request goes through the same guarded exchange (docs/extism.md).
        funcs.add(HostFunction("http_request", ("i64", "i64"), ("i64",), self._extism_http_request,
                               capability="network", module=EXTISM_ENV))
        return funcs

    def attach(self, bus: PluginBus, grant: Callable[[str], Grant]) -> None:
        """Send through ``bus``, within what ``grant(plugin)`` allows."""
        self.bus = bus
        self.grant = grant

    # -- plumbing --------------------------------------------------------------------------------

    def _bus(self, ctx: CallContext) -> tuple[PluginBus, asyncio.AbstractEventLoop]:
        """The bus (running) and its loop, from a worker thread."""
        bus = self.bus
        loop = bus.loop if bus is not None else None
        if bus is None or loop is None or self.grant is None:
            raise BusError("this plugin is not running on a node", plugin=ctx.plugin)
        if _on_loop(loop):
            raise BusError("a bus host function was called on the event loop thread", plugin=ctx.plugin)
        return bus, loop

    def _granted(self, ctx: CallContext) -> tuple[PluginBus, Grant]:
        """The bus, and what the policy granted the calling plugin (not what its manifest asked for)."""
        bus, _ = self._bus(ctx)
        assert self.grant is not None  # checked by _bus
        return bus, self.grant(ctx.plugin)

    def _on_loop_wait(self, ctx: CallContext, coro: Coroutine[Any, Any, T], what: str,
                      timeout: float = PUBLISH_TIMEOUT_S) -> T:
        """Run ``coro`` on the node's loop and wait for it: at most ``timeout`` and at most what is left
        of the call's deadline (then :class:`ExecutionTimeoutError`; the coroutine is cancelled)."""
        try:
            bus, loop = self._bus(ctx)
            left = remaining(ctx, what)
        except BaseException:
            coro.close()  # never started: no "never awaited" warning
            raise
        budget = min(timeout, left)
        started = time.monotonic()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError as e:  # the loop is closed: the node stopped under the call
            coro.close()
            raise BusError(f"{what} not started: the node is not running ({e})", plugin=ctx.plugin) from e
        try:
            return future.result(timeout=budget)
        except SandbusError:
            raise
        except concurrent.futures.CancelledError as e:  # the loop cancelled it: the node is stopping
            raise BusError(f"{what} not done: it was cancelled (is the node stopping?)", plugin=ctx.plugin) from e
        except Exception as e:
            if isinstance(e, TimeoutError) and not future.done():  # our wait ran out, not the operation
                future.cancel()
                if not bus.connected:
                    raise BusError(f"{what} not done: NATS is not connected", plugin=ctx.plugin) from e
                if left <= timeout:
                    raise expired(ctx, what, time.monotonic() - started) from e
                raise BusError(f"{what} not done within {timeout:g} s", plugin=ctx.plugin) from e
            # The operation itself failed (or it finished just as the wait ran out).
            failure = future.exception() if future.done() and not future.cancelled() else e
            if failure is None:
                return future.result()
            error = _bus_error(ctx, what, failure)
            raise error from (None if error is failure else failure)

    @staticmethod
    def _deliver(ctx: CallContext, data: bytes, buf_ptr: int, buf_cap: int) -> int:
        return deliver_result(ctx, data, buf_ptr, buf_cap)

    def _take_result(self, ctx: CallContext, buf_ptr: int, buf_cap: int) -> int:
        data = ctx.extra.get(_RESULT)
        if data is None:
            return -1
        ctx.write(buf_ptr, data[: max(0, buf_cap)])
        return len(data)

    # -- storage: a JetStream KV bucket per plugin ---------------------------------------------------

    async def _bucket(self, plugin: str) -> Any:
        assert self.bus is not None  # _on_loop_wait checked
        return await self.bus.kv(plugin, max_bytes=self.kv_quota_bytes, max_value=KV_MAX_VALUE)

    @staticmethod
    def _key(ctx: CallContext, ptr: int, length: int) -> str:
        key = read_str_bounded(ctx, ptr, length, MAX_KEY, "kv key")
        if (not key or len(key) > 256 or key.startswith(".")
                or not all((c.isascii() and c.isalnum()) or c in "-_=./" for c in key)):
            raise AbiViolationError(f"invalid kv key {key[:64]!r}: use letters, digits and -_=./", plugin=ctx.plugin)
        return key

    def _kv_get(self, ctx: CallContext, key_ptr: int, key_len: int, buf_ptr: int, buf_cap: int) -> int:
        key = self._key(ctx, key_ptr, key_len)

        async def get() -> bytes | None:
            from nats.js.errors import KeyNotFoundError

            try:
                entry = await (await self._bucket(ctx.plugin)).get(key)
            except KeyNotFoundError:
                return None
            return bytes(entry.value or b"")

        value = self._on_loop_wait(ctx, get(), f"kv_get {key!r}")
        if value is None:
            ctx.extra.pop(_RESULT, None)
            return -1
        return self._deliver(ctx, value, buf_ptr, buf_cap)

    def _kv_put(self, ctx: CallContext, key_ptr: int, key_len: int, val_ptr: int, val_len: int) -> int:
        key = self._key(ctx, key_ptr, key_len)
        value = read_bounded(ctx, val_ptr, val_len, KV_MAX_VALUE, "kv value")

        async def put() -> None:
            await (await self._bucket(ctx.plugin)).put(key, value)

        try:
            self._on_loop_wait(ctx, put(), f"kv_put {key!r}")
        except Exception as e:
            # The bucket's max_bytes (the plugin's storage quota) arrives as a JetStream error.
            cause = e.__cause__ if isinstance(e, BusError) else e
            text = str(cause).lower()
            if cause is not None and ("maximum bytes" in text or "insufficient" in text):
                ctx.auditor.emit(AuditLevel.WARNING, "limit.storage", ctx.plugin,
                                 f"kv quota of {self.kv_quota_bytes} bytes reached", limit=self.kv_quota_bytes)
                raise ResourceLimitError(f"storage quota of {self.kv_quota_bytes} bytes reached",
                                         plugin=ctx.plugin, limit=self.kv_quota_bytes) from e
            if isinstance(e, SandbusError):
                raise
            raise BusError(f"kv_put {key!r} failed: {e}", plugin=ctx.plugin) from e
        return 0

    def _kv_delete(self, ctx: CallContext, key_ptr: int, key_len: int) -> int:
        key = self._key(ctx, key_ptr, key_len)

        async def delete() -> None:
            await (await self._bucket(ctx.plugin)).delete(key)

        self._on_loop_wait(ctx, delete(), f"kv_delete {key!r}")
        return 0

    # -- network: HTTP to granted hosts ----------------------------------------------------------

    def _http_request(self, ctx: CallContext, req_ptr: int, req_len: int, buf_ptr: int, buf_cap: int) -> int:
        """``{"method","url","headers","body"}`` -> ``{"status","headers","body"}`` (body as text)."""
        raw_req = read_bounded(ctx, req_ptr, req_len, self.http_max_request, "http_request request")
        try:
            req = orjson.loads(raw_req)
            url = str(req["url"])
            method = str(req.get("method", "GET")).upper()
            headers = {str(k): str(v) for k, v in (req.get("headers") or {}).items()}
            body = req.get("body")
            data = body.encode() if isinstance(body, str) else (orjson.dumps(body) if body is not None else None)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise AbiViolationError(f"http_request: expected {{\"url\": ...}} JSON: {e}", plugin=ctx.plugin) from e
        del raw_req
        status, resp_headers, raw = self.http_exchange(ctx, url, method, headers, data)
        response = orjson.dumps({"status": status, "headers": resp_headers, "body": raw.decode(errors="replace")})
        return self._deliver(ctx, response, buf_ptr, buf_cap)

    def _extism_http_request(self, ctx: CallContext, req_off: int, body_off: int) -> int:
        """Extism's ``http_request(request, body)``: the request JSON ``{"url", "method", "headers"}`` and the
        body are kernel blocks; the response body becomes one, its status and headers are kept for
        ``http_status_code`` / ``http_headers`` (per instance, reset when a call begins)."""
        inv = extism_invoker(ctx)
        raw_req = inv.block(req_off, self.http_max_request, "http_request")
        try:
            req = orjson.loads(raw_req)
            url = str(req["url"])
            method = str(req.get("method") or "GET").upper()
            headers = {str(k): str(v) for k, v in (req.get("headers") or {}).items()}
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise AbiViolationError(f"extism:host/env.http_request: expected {{\"url\": ...}} JSON: {e}",
                                    plugin=ctx.plugin, function="http_request") from e
        # One cap for what the plugin sends, as sandbus_v1.http_request's single buffer has: the body gets
        # what the request JSON left of it.
        sent = len(raw_req)
        del raw_req
        try:
            body = inv.block(body_off, self.http_max_request - sent, "http_request") if body_off else None
        except PayloadTooLargeError as e:
            size = sent + int(e.details.get("size", 0))
            raise PayloadTooLargeError(f"extism:host/env.http_request: the request and its body hold {size} bytes, "
                                       f"above the node's {self.http_max_request}-byte HTTP request cap",
                                       plugin=ctx.plugin, function="http_request", size=size,
                                       limit=self.http_max_request) from None
        status, resp_headers, raw = self.http_exchange(ctx, url, method, headers, body)
        inv.http_status, inv.http_headers = status, resp_headers
        return inv.alloc_bytes(raw)

    def http_exchange(self, ctx: CallContext, url_text: str, method: str, headers: dict[str, str],
                      body: bytes | None) -> HttpResponse:
        """One guarded HTTP exchange for the calling plugin, whichever ABI asked for it: the URL checked, the
        grant checked (deny by default, audited), the name resolved once to public addresses only (unless
        the policy allows others), the host's own framing, the connection cap, the response cap, and all
        of it within what is left of the call's deadline."""
        try:
            url = urllib.parse.urlsplit(url_text)
            port = url.port or (443 if url.scheme == "https" else 80)
        except ValueError as e:
            raise AbiViolationError(f"http_request: unusable URL {url_text[:200]!r}: {e}", plugin=ctx.plugin) from e
        if url.scheme not in ("http", "https") or not url.hostname:
            raise AbiViolationError(f"http_request: unsupported URL {url_text[:200]!r}", plugin=ctx.plugin)
        host = url.hostname
        grant = self._granted(ctx)[1]
        if not grant.may_connect(host, port):
            ctx.auditor.emit(AuditLevel.CRITICAL, "security.network_denied", ctx.plugin,
                             f"connection to {host}:{port} denied", host=host, port=port)
            raise SecurityViolationError(
                f"network access to {host}:{port} was not granted (granted: {list(grant.network_hosts)})",
                plugin=ctx.plugin, host=host, port=port)
        if not _METHOD_RE.fullmatch(method):
            raise AbiViolationError(f"http_request: method {method[:40]!r} is not an HTTP method token",
                                    plugin=ctx.plugin)
        framing = sorted({name.strip().lower() for name in headers} & _HOST_OWNED_HEADERS)
        if framing:
            # Host is the granted name; the framing is the host's: a guest-set Content-Length or
            # Transfer-Encoding would smuggle a second request, with a Host of its choosing, in the body.
            ctx.auditor.emit(AuditLevel.CRITICAL, "security.network_denied", ctx.plugin,
                             f"request to {host}:{port} with its own {', '.join(framing)} header(s) refused",
                             host=host, port=port, headers=framing)
            raise SecurityViolationError(
                f"http_request to {host}:{port} sets {', '.join(framing)}: a Host header or a framing header, "
                f"which the host sets itself (Host is the granted name {host!r}; the host frames the body)",
                plugin=ctx.plugin, host=host, port=port, headers=framing)
        what = f"http_request to {host}:{port}"
        # One budget for everything below: the gate, the name lookup, connect, send and every read.
        budget = min(self.http_timeout_s, remaining(ctx, what))
        deadline = time.monotonic() + budget
        gate = self._gate(ctx.plugin)
        if not gate.acquire(timeout=budget):
            if budget < self.http_timeout_s:
                raise expired(ctx, f"{what} (waiting for a connection slot)", budget)
            raise ResourceLimitError(f"more than {self.http_max_connections} HTTP connections at once",
                                     plugin=ctx.plugin, limit=self.http_max_connections)
        try:
            try:
                addresses = resolve_checked(host, port, grant.network_addresses, deadline - time.monotonic(),
                                            owner=ctx.plugin)
            except NotPermitted as e:
                ctx.auditor.emit(AuditLevel.CRITICAL, "security.network_denied", ctx.plugin,
                                 f"{host}:{port} resolves to {e.args[0]}, which is not a public address",
                                 host=host, port=port, address=e.args[0])
                raise SecurityViolationError(
                    f"{host} resolves to {e.args[0]}, a private, loopback, link-local or reserved address the "
                    "node's policy does not allow ([network] allow_addresses)",
                    plugin=ctx.plugin, host=host, port=port, address=e.args[0]) from None
            except NameNotResolved as e:
                if time.monotonic() >= deadline:
                    raise self._http_timeout(ctx, what, budget) from None
                raise BusError(f"{what} failed: {e}", plugin=ctx.plugin, host=host, port=port) from None
            return self._fetch(ctx, url, host, port, addresses, method, headers, body, deadline, budget)
        finally:
            gate.release()

    def _http_timeout(self, ctx: CallContext, what: str, budget: float) -> SandbusError:
        """Past the budget: the call's deadline (ExecutionTimeoutError) or the node's HTTP timeout (BusError)."""
        if budget < self.http_timeout_s:
            return expired(ctx, what, budget)
        return BusError(f"{what} took longer than {self.http_timeout_s:g} s", plugin=ctx.plugin,
                        timeout=self.http_timeout_s)

    def _gate(self, plugin: str) -> threading.BoundedSemaphore:
        with self._gates_lock:
            gate = self._conn_gates.get(plugin)
            if gate is None:
                gate = self._conn_gates[plugin] = threading.BoundedSemaphore(self.http_max_connections)
            return gate

    def _fetch(self, ctx: CallContext, url: urllib.parse.SplitResult, host: str, port: int,
               addresses: list[tuple[socket.AddressFamily, Any]], method: str, headers: dict[str, str],
               data: bytes | None, deadline: float, budget: float) -> HttpResponse:
        """One HTTP exchange with the checked ``addresses`` (never the name again), ``Host`` (and TLS SNI
        and certificate name) the granted ``host``, all of it over by ``deadline``.

        Socket timeouts only bound each operation; a server that sends one byte at a time would pass
        every one of them. So a timer shuts the socket down at the deadline, which ends whatever read
        or write is in progress.
        """
        what = f"http_request to {host}:{port}"
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        sock = self._connect(addresses, port, deadline)
        if sock is None:
            if time.monotonic() >= deadline:
                raise self._http_timeout(ctx, what, budget)
            raise BusError(f"{what} failed: no address accepted a connection", plugin=ctx.plugin)
        watchdog = _Watchdog(sock.fileno(), deadline - time.monotonic())
        conn: http.client.HTTPConnection | None = None
        resp: http.client.HTTPResponse | None = None
        try:
            if url.scheme == "https":
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
                conn = http.client.HTTPSConnection(host, port)
            else:
                conn = http.client.HTTPConnection(host, port)
            conn.sock = sock  # connected to the checked address: http.client must not resolve the name
            # No redirects are followed: a redirect to a host outside the grant must not be reached.
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            head = sum(len(k) + len(v) + 4 for k, v in resp.getheaders())  # http.client bounds them (100 lines)
            raw = resp.read(max(0, self.http_max_response - head) + 1)
            if head + len(raw) > self.http_max_response:
                ctx.auditor.emit(AuditLevel.WARNING, "limit.http_response", ctx.plugin,
                                 f"response from {host} above {self.http_max_response} bytes (headers and body)")
                raise PayloadTooLargeError(f"HTTP response above {self.http_max_response} bytes (headers and body)",
                                           plugin=ctx.plugin, limit=self.http_max_response)
            if time.monotonic() >= deadline:
                raise self._http_timeout(ctx, what, budget)
            return HttpResponse(resp.status, dict(resp.getheaders()), raw)
        except (OSError, http.client.HTTPException) as e:
            if time.monotonic() >= deadline:
                raise self._http_timeout(ctx, what, budget) from None
            raise BusError(f"{what} failed: {e}", plugin=ctx.plugin) from e
        except ValueError as e:  # http.client refuses a header name or value (CR/LF, ...)
            raise AbiViolationError(f"{what}: invalid request: {e}", plugin=ctx.plugin) from e
        finally:
            watchdog.stop()  # before the descriptor is closed and its number can be reused
            if resp is not None:
                resp.close()  # its reader holds the socket open (a refused response is never read to its end)
            if conn is not None:
                conn.close()
            sock.close()

    @staticmethod
    def _connect(addresses: list[tuple[socket.AddressFamily, Any]], port: int, deadline: float
                 ) -> socket.socket | None:
        """A TCP connection to the first of ``addresses`` that accepts one before ``deadline``."""
        for family, addr in addresses:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(left)
            try:
                sock.connect((str(addr), port))
            except OSError:
                sock.close()
                continue
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            return sock
        return None

    def _publish(self, ctx: CallContext, topic_ptr: int, topic_len: int, data_ptr: int, data_len: int) -> int:
        topic = read_str_bounded(ctx, topic_ptr, topic_len, MAX_TOPIC_LENGTH, "publish topic")
        try:
            check_topic(topic)
        except ValueError as e:
            raise AbiViolationError(f"publish: {e}", plugin=ctx.plugin) from e
        bus, grant = self._granted(ctx)
        if not grant.may_publish(topic):
            _refuse(ctx, "security.publish_denied", f"publish to {topic!r}", f"publishing to {topic!r}",
                    "[permissions] publish_topics", list(grant.publish_topics), topic=topic)
        hops = check_hops(ctx, f"publish to {topic!r}", self.max_hops, topic=topic)
        self.sends.check(ctx, grant.send_limits, f"publish to {topic!r}", topic=topic)
        data = read_bounded(ctx, data_ptr, data_len, bus.max_payload, "publish payload")
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise AbiViolationError(f"publish: payload is not valid JSON: {e}", plugin=ctx.plugin) from e
        if too_deep(data, payload):  # the envelope around it could not be written
            raise AbiViolationError(f"publish: payload is nested too deeply (more than {MAX_JSON_DEPTH} levels)",
                                    plugin=ctx.plugin)
        del data
        # This runs in the call's thread, whose context holds the execution span: hand it over.
        self._on_loop_wait(ctx, bus.publish(topic, payload, sender=ctx.plugin, context=otel_context.get_current(),
                                            hops=hops),
                           f"publish to {topic!r}")
        return 0

    # -- messaging: request/reply to another plugin ------------------------------------------------

    def request_timeout(self, ctx: CallContext) -> float:
        """How long a request of this call waits: :attr:`request_timeout_s`, and never more than
        :data:`REQUEST_TIMEOUT_SHARE` of what is left of the call's deadline, so that a request cannot
        outlive the call that waits for it and the guest still has time to handle a timeout (a plugin
        requesting itself with one instance ends here).

        Raises:
            ExecutionTimeoutError: nothing is left of the call's deadline.
        """
        return min(self.request_timeout_s, remaining(ctx, "request") * REQUEST_TIMEOUT_SHARE)

    def _request(self, ctx: CallContext, target_ptr: int, target_len: int, json_ptr: int, json_len: int,
                 buf_ptr: int, buf_cap: int) -> int:
        """``request(target, json, buf, cap)``: the reply's full length (``min(len, cap)`` bytes written),
        or a negative ``REQUEST_E*`` code with the error JSON left for ``take_result``."""
        try:
            plugin, function = parse_target(read_str_bounded(ctx, target_ptr, target_len, MAX_TARGET,
                                                             "request target"))
        except ValueError as e:
            raise AbiViolationError(f"request: {e}", plugin=ctx.plugin) from e
        target = f"{plugin}.{function}"
        bus, grant = self._granted(ctx)
        if not grant.may_request(plugin, function):
            _refuse(ctx, "security.request_denied", f"request to {target!r}", f"requesting {target!r}",
                    "manifest [permissions] request_plugins", list(grant.request_plugins), target=target)
        hops = check_hops(ctx, f"request to {target!r}", self.max_hops, target=target)
        self.sends.check(ctx, grant.send_limits, f"request to {target!r}", target=target)
        data = read_bounded(ctx, json_ptr, json_len, bus.max_payload, f"request to {target!r}")
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise AbiViolationError(f"request to {target!r}: body is not valid JSON: {e}", plugin=ctx.plugin) from e
        timeout = self.request_timeout(ctx)
        # Captured here, in the call's thread, whose context holds the execution span.
        coro = bus.request(plugin, function, data, sender=ctx.plugin, hops=hops, timeout=timeout,
                           context=otel_context.get_current())
        # The reply may come a moment after NATS's own timeout: wait for it up to the call's deadline.
        outcome = self._on_loop_wait(ctx, coro, f"request to {target!r}", timeout=timeout + 1.0)
        if outcome.error is None:
            return self._deliver(ctx, outcome.reply, buf_ptr, buf_cap)
        keep_result(ctx, outcome.reply)
        if outcome.answered:
            return REQUEST_EREMOTE
        return REQUEST_ETIMEOUT if isinstance(outcome.error, RequestTimeoutError) else REQUEST_ENOTFOUND


def _bus_error(ctx: CallContext, what: str, failure: BaseException) -> BaseException:
    """What a bus operation's own failure is for the plugin: NATS's errors (the connection is gone, no
    stream took a durable publish, a JetStream API error, its own timeout) are a :class:`BusError` -- the
    bus failed, not the plugin, whose stats do not blame it; anything else is passed on as it is."""
    if isinstance(failure, SandbusError):
        return failure
    if isinstance(failure, _BUS_DOWN):
        return BusError(f"{what} failed: NATS is not connected ({type(failure).__name__})", plugin=ctx.plugin)
    if isinstance(failure, nats.errors.Error):
        return BusError(f"{what} failed: {type(failure).__name__}: {failure}", plugin=ctx.plugin)
    return failure


class _Watchdog:
    """Shut a socket down (by descriptor: TLS wraps it in a new object) when its time is up, so the
    read or write in progress ends. :meth:`stop` before the descriptor is closed."""

    def __init__(self, fd: int, delay: float) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._stopped = False
        self._timer = threading.Timer(max(0.0, delay), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if self._stopped:
                return
            sock = socket.socket(fileno=self._fd)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer
            finally:
                sock.detach()  # the descriptor stays the connection's

    def stop(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._stopped = True


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
