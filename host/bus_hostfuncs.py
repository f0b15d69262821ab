"""Host functions that reach beyond the sandbox: publish and request (messaging), kv_* (storage),
http_request (network).

Calls of plugins that import these run in worker threads (host/node.py); NATS lives on the node's
event loop, so a host function hands its coroutine to the loop and waits for it, bounded.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import threading
import urllib.parse
from collections.abc import Coroutine, Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

import nats.errors
import orjson
from opentelemetry import context as otel_context
from opentelemetry.context import Context

from sdk.envelope import H_FROM, H_HOPS, H_MSG_ID, JSON, error_from_reply, hops_of, new_message_id
from sdk.errors import (
    AbiViolationError,
    BusError,
    HopLimitError,
    PayloadTooLargeError,
    PluginNotFoundError,
    RequestTimeoutError,
    ResourceLimitError,
    SandbusError,
    SecurityViolationError,
)
from sdk.subjects import check_token, check_topic, request_subject
from sdk.tracing import record_error, send_span

from .manifest import subject_matches
from .sandbox import DEFAULT_FUNCTION, AuditLevel, CallContext, HostFunction, HostFunctions

if TYPE_CHECKING:
    from .node import Node

__all__ = [
    "BusBridge",
    "MAX_HOPS",
    "REQUEST_ENOTFOUND",
    "REQUEST_EREMOTE",
    "REQUEST_ETIMEOUT",
    "REQUEST_TIMEOUT_S",
    "REQUEST_TIMEOUT_SHARE",
    "deliver_result",
    "incoming_hops",
    "keep_result",
    "note_incoming_hops",
    "parse_target",
]

PUBLISH_TIMEOUT_S = 5.0
#: The longest a ``request`` waits for its reply (see :meth:`BusBridge.request_timeout`).
REQUEST_TIMEOUT_S = 5.0
#: A request waits at most this share of the calling plugin's own timeout: the rest is left for the
#: guest to handle a timeout outcome before its own call is stopped. (The host cannot see how much of
#: the call has already passed, so it cannot do better than a share of the whole.)
REQUEST_TIMEOUT_SHARE = 0.8
#: The longest plugin-to-plugin chain: a request that would carry ``Sandbus-Hops`` above it fails.
MAX_HOPS = 8
#: ``request`` return codes (docs/abi.md); each leaves the error JSON in ``take_result``.
REQUEST_EREMOTE = -1  # the target's call failed (its error reply)
REQUEST_ENOTFOUND = -2  # no node serves the target plugin (NATS "no responders")
REQUEST_ETIMEOUT = -3  # no reply in time
KV_QUOTA_BYTES = 1024 * 1024
KV_MAX_VALUE = 64 * 1024
HTTP_TIMEOUT_S = 10.0
HTTP_MAX_RESPONSE = 1024 * 1024
HTTP_MAX_CONNECTIONS = 4
_RESULT = "bus_result"
T = TypeVar("T")

_incoming_hops: ContextVar[int] = ContextVar("sandbus_incoming_hops", default=0)


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


class BusBridge:
    """Late binding between the manager's host functions and the node created after it."""

    def __init__(self, *, kv_quota_bytes: int = KV_QUOTA_BYTES, http_timeout_s: float = HTTP_TIMEOUT_S,
                 http_max_response: int = HTTP_MAX_RESPONSE, http_max_connections: int = HTTP_MAX_CONNECTIONS,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, max_hops: int = MAX_HOPS) -> None:
        self.node: Node | None = None
        self.request_timeout_s = request_timeout_s
        self.max_hops = max_hops
        self.kv_quota_bytes = kv_quota_bytes
        self.http_timeout_s = http_timeout_s
        self.http_max_response = http_max_response
        self.http_max_connections = http_max_connections
        self._conn_gates: dict[str, threading.BoundedSemaphore] = {}
        self._gates_lock = threading.Lock()
        self._buckets: dict[str, Any] = {}

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
        return funcs

    # -- plumbing --------------------------------------------------------------------------------

    def _node(self, ctx: CallContext) -> Node:
        node = self.node
        if node is None or node._loop is None:
            raise BusError("this plugin is not running on a node", plugin=ctx.plugin)
        if _on_loop(node._loop):
            raise BusError("a bus host function was called on the event loop thread", plugin=ctx.plugin)
        return node

    def _on_loop_wait(self, ctx: CallContext, coro: Coroutine[Any, Any, T], what: str,
                      timeout: float = PUBLISH_TIMEOUT_S) -> T:
        node = self._node(ctx)
        assert node._loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, node._loop)
        try:
            return future.result(timeout=timeout)
        except TimeoutError as e:
            future.cancel()
            raise BusError(f"{what} not done within {timeout:g} s", plugin=ctx.plugin) from e

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
        bucket = self._buckets.get(plugin)
        if bucket is None:
            node = self.node
            assert node is not None
            assert node.nc is not None
            js = node.nc.jetstream()
            name = f"sandbus_kv_{plugin}"
            try:
                bucket = await js.key_value(name)
            except Exception:
                bucket = await js.create_key_value(bucket=name, max_bytes=self.kv_quota_bytes,
                                                   max_value_size=KV_MAX_VALUE, history=1)
            self._buckets[plugin] = bucket
        return bucket

    @staticmethod
    def _key(ctx: CallContext, ptr: int, length: int) -> str:
        key = ctx.read_str(ptr, length, "key")
        if not key or len(key) > 256 or not all(c.isalnum() or c in "-_=./" for c in key) or key.startswith("."):
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
        if val_len > KV_MAX_VALUE:
            raise PayloadTooLargeError(f"kv value of {val_len} bytes exceeds {KV_MAX_VALUE}", plugin=ctx.plugin)
        value = ctx.read(val_ptr, val_len)

        async def put() -> None:
            await (await self._bucket(ctx.plugin)).put(key, value)

        try:
            self._on_loop_wait(ctx, put(), f"kv_put {key!r}")
        except BusError:
            raise
        except Exception as e:  # the bucket's max_bytes: the plugin's storage quota
            if "maximum bytes" in str(e).lower() or "insufficient" in str(e).lower():
                ctx.auditor.emit(AuditLevel.WARNING, "limit.storage", ctx.plugin,
                                 f"kv quota of {self.kv_quota_bytes} bytes reached", limit=self.kv_quota_bytes)
                raise ResourceLimitError(f"storage quota of {self.kv_quota_bytes} bytes reached",
                                         plugin=ctx.plugin, limit=self.kv_quota_bytes) from e
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
        try:
            req = orjson.loads(ctx.read(req_ptr, req_len))
            url = urllib.parse.urlsplit(str(req["url"]))
            method = str(req.get("method", "GET")).upper()
            headers = {str(k): str(v) for k, v in (req.get("headers") or {}).items()}
            body = req.get("body")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as e:
            raise AbiViolationError(f"http_request: expected {{\"url\": ...}} JSON: {e}", plugin=ctx.plugin) from e
        if url.scheme not in ("http", "https") or not url.hostname:
            raise AbiViolationError(f"http_request: unsupported URL {req['url']!r}", plugin=ctx.plugin)
        port = url.port or (443 if url.scheme == "https" else 80)
        grant = self._node(ctx).manager.grant(ctx.plugin)
        if not grant.may_connect(url.hostname, port):
            ctx.auditor.emit(AuditLevel.CRITICAL, "security.network_denied", ctx.plugin,
                             f"connection to {url.hostname}:{port} denied", host=url.hostname, port=port)
            raise SecurityViolationError(
                f"network access to {url.hostname}:{port} was not granted (granted: {list(grant.network_hosts)})",
                plugin=ctx.plugin, host=url.hostname, port=port)
        gate = self._gate(ctx.plugin)
        if not gate.acquire(timeout=self.http_timeout_s):
            raise ResourceLimitError(f"more than {self.http_max_connections} HTTP connections at once",
                                     plugin=ctx.plugin, limit=self.http_max_connections)
        try:
            response = self._fetch(ctx, url, port, method, headers, body)
        finally:
            gate.release()
        return self._deliver(ctx, response, buf_ptr, buf_cap)

    def _gate(self, plugin: str) -> threading.BoundedSemaphore:
        with self._gates_lock:
            gate = self._conn_gates.get(plugin)
            if gate is None:
                gate = self._conn_gates[plugin] = threading.BoundedSemaphore(self.http_max_connections)
            return gate

    def _fetch(self, ctx: CallContext, url: urllib.parse.SplitResult, port: int, method: str,
               headers: dict[str, str], body: Any) -> bytes:
        cls = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
        conn = cls(url.hostname or "", port, timeout=self.http_timeout_s)
        path = url.path or "/"
        if url.query:
            path += "?" + url.query
        data = body.encode() if isinstance(body, str) else (orjson.dumps(body) if body is not None else None)
        try:
            # No redirects are followed: a redirect to a host outside the grant must not be reached.
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read(self.http_max_response + 1)
            if len(raw) > self.http_max_response:
                ctx.auditor.emit(AuditLevel.WARNING, "limit.http_response", ctx.plugin,
                                 f"response from {url.hostname} above {self.http_max_response} bytes")
                raise PayloadTooLargeError(f"HTTP response above {self.http_max_response} bytes",
                                           plugin=ctx.plugin, limit=self.http_max_response)
            return orjson.dumps({"status": resp.status, "headers": dict(resp.getheaders()),
                                 "body": raw.decode(errors="replace")})
        except OSError as e:
            raise BusError(f"http_request to {url.hostname}:{port} failed: {e}", plugin=ctx.plugin) from e
        finally:
            conn.close()

    def _publish(self, ctx: CallContext, topic_ptr: int, topic_len: int, data_ptr: int, data_len: int) -> int:
        topic = ctx.read_str(topic_ptr, topic_len, "topic")
        try:
            check_topic(topic)
        except ValueError as e:
            raise AbiViolationError(f"publish: {e}", plugin=ctx.plugin) from e
        node = self._node(ctx)
        allowed = node.manager.manifest(ctx.plugin).permissions.publish_topics
        if not any(subject_matches(p, topic) for p in allowed):
            ctx.auditor.emit(AuditLevel.CRITICAL, "security.publish_denied", ctx.plugin,
                             f"publish to {topic!r} denied (granted: {list(allowed)})", topic=topic)
            raise SecurityViolationError(
                f"publishing to {topic!r} was not granted (manifest [permissions] publish_topics: {list(allowed)})",
                plugin=ctx.plugin, topic=topic,
            )
        data = ctx.read(data_ptr, data_len)
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise AbiViolationError(f"publish: payload is not valid JSON: {e}", plugin=ctx.plugin) from e
        # This runs in the call's thread, whose context holds the execution span: hand it over.
        self._on_loop_wait(ctx, node.publish(topic, payload, sender=ctx.plugin, context=otel_context.get_current()),
                           f"publish to {topic!r}")
        return 0

    # -- messaging: request/reply to another plugin ------------------------------------------------

    def request_timeout(self, ctx: CallContext) -> float:
        """How long a request of this call waits: :attr:`request_timeout_s`, and never more than
        :data:`REQUEST_TIMEOUT_SHARE` of the caller's own timeout, so that a request cannot outlive
        the call that waits for it (a plugin requesting itself with one instance ends here)."""
        return min(self.request_timeout_s, ctx.limits.timeout_s * REQUEST_TIMEOUT_SHARE)

    def _request(self, ctx: CallContext, target_ptr: int, target_len: int, json_ptr: int, json_len: int,
                 buf_ptr: int, buf_cap: int) -> int:
        """``request(target, json, buf, cap)``: the reply's full length (``min(len, cap)`` bytes written),
        or a negative ``REQUEST_E*`` code with the error JSON left for ``take_result``."""
        try:
            plugin, function = parse_target(ctx.read_str(target_ptr, target_len, "request target"))
        except ValueError as e:
            raise AbiViolationError(f"request: {e}", plugin=ctx.plugin) from e
        target = f"{plugin}.{function}"
        node = self._node(ctx)
        grant = node.manager.grant(ctx.plugin)
        if not grant.may_request(plugin, function):
            granted = list(grant.request_plugins)
            ctx.auditor.emit(AuditLevel.CRITICAL, "security.request_denied", ctx.plugin,
                             f"request to {target!r} denied (granted: {granted})", target=target)
            raise SecurityViolationError(
                f"requesting {target!r} was not granted (manifest [permissions] request_plugins: {granted})",
                plugin=ctx.plugin, target=target,
            )
        hops = incoming_hops() + 1
        if hops > self.max_hops:
            raise HopLimitError(
                f"request to {target!r} would be hop {hops} of a plugin-to-plugin request chain, above the "
                f"limit of {self.max_hops} (do plugins request each other in a cycle?)",
                plugin=ctx.plugin, target=target, limit=self.max_hops,
            )
        max_payload = node.max_payload
        if json_len > max_payload:
            raise PayloadTooLargeError(f"request to {target!r} of {json_len} bytes exceeds the NATS max payload "
                                       f"of {max_payload} bytes", plugin=ctx.plugin, size=json_len,
                                       limit=max_payload)
        data = ctx.read(json_ptr, json_len)
        try:
            orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise AbiViolationError(f"request to {target!r}: body is not valid JSON: {e}", plugin=ctx.plugin) from e
        timeout = self.request_timeout(ctx)
        # Captured here, in the call's thread, whose context holds the execution span.
        coro = self._send_request(node, ctx.plugin, plugin, function, data, hops, timeout, otel_context.get_current())
        status, body = self._on_loop_wait(ctx, coro, f"request to {target!r}", timeout=timeout + 1.0)
        if status == 0:
            return self._deliver(ctx, body, buf_ptr, buf_cap)
        keep_result(ctx, body)
        return status

    @staticmethod
    async def _send_request(node: Node, sender: str, plugin: str, function: str, data: bytes, hops: int,
                            timeout: float, context: Context) -> tuple[int, bytes]:
        """One NATS request, as a client sends it plus ``Sandbus-Hops``: ``(0, reply)`` or
        ``(REQUEST_E*, error JSON)``. The reply is bounded by the server's max payload (a node
        answers a larger one with an error reply)."""
        assert node.nc is not None
        subject = request_subject(plugin, function)
        msg_id = new_message_id()
        headers = {**JSON, H_MSG_ID: msg_id, H_FROM: sender, H_HOPS: str(hops)}
        target = f"{plugin}.{function}"
        err: SandbusError | None
        with contextlib.ExitStack() as stack:
            span = (stack.enter_context(send_span(subject, headers, message_id=msg_id, body_size=len(data),
                                                  context=context))
                    if node.telemetry.enabled else None)
            try:
                reply = await node.nc.request(subject, data, timeout=timeout, headers=headers)
            except nats.errors.NoRespondersError:
                status = REQUEST_ENOTFOUND
                err = PluginNotFoundError(f"no node serves plugin {plugin!r} (nobody listens on {subject})",
                                          plugin=plugin, target=target)
            except nats.errors.TimeoutError:
                status = REQUEST_ETIMEOUT
                err = RequestTimeoutError(f"no reply from {target} within {timeout:g} s", plugin=plugin,
                                          target=target, timeout=timeout)
            except nats.errors.Error as e:
                raise BusError(f"request to {target!r} failed: {e}", plugin=sender) from e
            else:
                err = error_from_reply(reply.data, reply.headers)
                if err is None:
                    return 0, bytes(reply.data)
                status = REQUEST_EREMOTE
            if span is not None:
                record_error(span, err)
            return status, orjson.dumps(err.to_dict(), default=str)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
