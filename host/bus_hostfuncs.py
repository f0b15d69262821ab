"""Host functions that reach the bus from inside a plugin: ``sandbus_v1.publish``.

Wasm calls run in worker threads (host/node.py); NATS lives on the node's event loop, so a host
function hands its coroutine to the loop and waits for it, bounded.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson

from sdk.errors import AbiViolationError, BusError, SecurityViolationError
from sdk.subjects import check_topic

from .manifest import subject_matches
from .sandbox import AuditLevel, CallContext, HostFunction, HostFunctions

if TYPE_CHECKING:
    from .node import Node

__all__ = ["BusBridge"]

PUBLISH_TIMEOUT_S = 5.0


class BusBridge:
    """Late binding between the manager's host functions and the node created after it."""

    def __init__(self) -> None:
        self.node: Node | None = None

    def host_functions(self) -> HostFunctions:
        funcs = HostFunctions()
        funcs.add(HostFunction("publish", ("i32", "i32", "i32", "i32"), ("i32",), self._publish,
                               capability="messaging"))
        return funcs

    def _publish(self, ctx: CallContext, topic_ptr: int, topic_len: int, data_ptr: int, data_len: int) -> int:
        topic = ctx.read_str(topic_ptr, topic_len, "topic")
        try:
            check_topic(topic)
        except ValueError as e:
            raise AbiViolationError(f"publish: {e}", plugin=ctx.plugin) from e
        node = self.node
        if node is None or node._loop is None:
            raise BusError("publish: this plugin is not running on a node", plugin=ctx.plugin)
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
        if node._loop.is_running() and _on_loop(node._loop):
            raise BusError("publish called on the event loop thread", plugin=ctx.plugin)
        future = asyncio.run_coroutine_threadsafe(node.publish(topic, payload, sender=ctx.plugin), node._loop)
        try:
            future.result(timeout=PUBLISH_TIMEOUT_S)
        except TimeoutError as e:
            future.cancel()
            raise BusError(f"publish to {topic!r} not confirmed within {PUBLISH_TIMEOUT_S:g} s",
                           plugin=ctx.plugin) from e
        return 0


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
