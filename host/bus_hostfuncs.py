"""Host functions that reach beyond the sandbox: publish (messaging), kv_* (storage), http_request (network).

Calls of plugins that import these run in worker threads (host/node.py); NATS lives on the node's
event loop, so a host function hands its coroutine to the loop and waits for it, bounded.

Results of unknown size (kv_get, http_request) follow one pattern: the function returns the full
length and writes ``min(length, cap)`` bytes; a guest whose buffer was too small fetches the same
result again with ``take_result(buf, cap)`` instead of repeating the operation.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
import urllib.parse
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import orjson
from opentelemetry import context as otel_context

from sdk.errors import AbiViolationError, BusError, PayloadTooLargeError, ResourceLimitError, SecurityViolationError
from sdk.subjects import check_topic

from .manifest import subject_matches
from .sandbox import AuditLevel, CallContext, HostFunction, HostFunctions

if TYPE_CHECKING:
    from .node import Node

__all__ = ["BusBridge"]

PUBLISH_TIMEOUT_S = 5.0
KV_QUOTA_BYTES = 1024 * 1024
KV_MAX_VALUE = 64 * 1024
HTTP_TIMEOUT_S = 10.0
HTTP_MAX_RESPONSE = 1024 * 1024
HTTP_MAX_CONNECTIONS = 4
_RESULT = "bus_result"
T = TypeVar("T")


class BusBridge:
    """Late binding between the manager's host functions and the node created after it."""

    def __init__(self, *, kv_quota_bytes: int = KV_QUOTA_BYTES, http_timeout_s: float = HTTP_TIMEOUT_S,
                 http_max_response: int = HTTP_MAX_RESPONSE, http_max_connections: int = HTTP_MAX_CONNECTIONS) -> None:
        self.node: Node | None = None
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
        ctx.extra[_RESULT] = data
        ctx.write(buf_ptr, data[: max(0, buf_cap)])
        return len(data)

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


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
