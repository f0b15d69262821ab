"""A host node: a plugin manager wired onto the PluginBus.

The request path, top to bottom:

    NATS message on sandbus.req.<plugin>.<function>  (queue group sandbus.<plugin>)
      -> Node._on_request        (subscription callback: spawn a task, return at once)
      -> Node._serve             (per-plugin concurrency gate)
      -> executor thread         (the wasm call never runs on the event loop)
      -> PluginManager.execute_detailed -> Sandbox pool -> wasm
      -> reply published with its own headers (never Msg.respond, which echoes the request's)

Where a call runs (measured in bench/bench_bus.py): handing every call to a worker thread costs
more than the wasm call itself (a ~15 us echo becomes ~300 us of thread hand-off and GIL ping-pong)
and caps a node at a quarter of a bare NATS responder. So a call runs *inline* on the event loop
under a short budget (``inline_budget_s``, default 20 ms): nearly every call finishes well inside it.
The budget is wall-clock, and a thread returning from wasm may wait for the GIL up to the switch
interval (5 ms by default, which the node lowers to 1 ms), so the budget sits well above that.
A call that does not is interrupted (its instance is discarded, nothing was returned) and runs
again from the start in a worker thread under the plugin's full limits, and the plugin is kept on
threads for a while. The loop is therefore never held longer than the budget (plus one epoch tick),
whatever a plugin does. Re-running is only safe for calls without side effects, so plugins that
import host functions which act on the bus (``publish``...) always run in threads, where those
functions can also wait on the loop.

Tracing follows the same split. A request served inline is traced by host/fast_spans.py: its
``process`` and ``execute`` spans are one tuple on the request path and are encoded and exported
in batches by a background thread, because the OpenTelemetry SDK's span objects and encoder cost
several times the request itself. Everything else (threaded calls, whose host functions need the
current span; durable deliveries; ``sandbus trace``) is traced through the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service
from opentelemetry import trace
from opentelemetry.context import Context

from bus.connection import ConnectOptions, connect
from sdk.envelope import H_FROM, H_MSG_ID, JSON, PluginMessage, error_reply, new_message_id
from sdk.errors import AbiViolationError, PayloadTooLargeError, PluginNotFoundError, SandbusError
from sdk.subjects import (
    MSG_PREFIX,
    NODE_SERVICE,
    REQ_PREFIX,
    audit_subject,
    control_subject,
    plugin_queue,
    topic_subject,
)
from sdk.tracing import H_TRACE_DEBUG, H_TRACE_SPANS, extract, send_span

from .bus_hostfuncs import BusBridge, note_incoming_hops
from .delivery import DurableTopics
from .fast_spans import FastSpans, RequestTrace
from .manager import PluginManager
from .policy import Policy
from .sandbox import AuditEvent, BudgetExceeded, CallResult
from .telemetry import Telemetry

__all__ = ["Node", "default_node_id"]

log = logging.getLogger("sandbus.node")

MESSAGE_FUNCTION = "handle_message"
#: Host functions with effects on the bus: a call that used them cannot be re-run, so never inline.
_BUS_EFFECTS = frozenset({"publish", "request", "kv_put", "kv_delete", "http_request"})
DEFAULT_FUNCTION = "handle_request"


def _check_json(data: bytes, plugin: str) -> None:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise AbiViolationError(f"request body is not valid JSON: {e}", plugin=plugin) from e


def default_node_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}".replace(".", "-")


class _Lane:
    """How one plugin's calls are run on this node (looked up once per request)."""

    __slots__ = ("gate", "inline_from", "limit", "threaded")

    def __init__(self, concurrency: int) -> None:
        # As many calls at once as the plugin has instances: the rest wait here, on the loop,
        # instead of in threads that would time out on the instance pool.
        self.gate = asyncio.Semaphore(concurrency)
        self.limit = concurrency
        #: calls running in worker threads now
        self.threaded = 0
        #: None: never inline; else the loop time until which calls run in threads (0.0: inline now)
        self.inline_from: float | None = 0.0

    def inline_now(self, loop: asyncio.AbstractEventLoop) -> bool:
        inline_from = self.inline_from
        # 0.0 (never demoted) needs no clock read: the common case, once per request
        return inline_from is not None and (not inline_from or loop.time() >= inline_from)


class Node:
    """Serves a :class:`PluginManager`'s plugins on NATS.

    Parameters:
        manager: the plugins to serve (the node follows its loads, reloads and unloads).
        options: how to reach NATS.
        node_id: this node's name in discovery and control subjects.
        durable: deliver topics through JetStream (at-least-once) when the server has it.
        threads: worker threads for wasm calls that do not run inline.
        version: reported by the micro service.
        inline_budget_s: how long a call may hold the event loop before it moves to a thread
            (None: every call in a thread).
        demote_s: how long a plugin whose call overran the budget stays on threads.
        telemetry: traces and metrics (default: configured from the ``OTEL_*`` environment).
    """

    def __init__(self, manager: PluginManager, options: ConnectOptions, *, node_id: str | None = None,
                 durable: bool = True, threads: int | None = None, version: str = "0.1.0",
                 inline_budget_s: float | None = 0.02, demote_s: float = 30.0,
                 telemetry: Telemetry | None = None) -> None:
        self.manager = manager
        self.options = options
        self.node_id = node_id or default_node_id()
        self.durable = durable
        self.version = version
        self.nc: Client | None = None
        self._executor = ThreadPoolExecutor(max_workers=threads or 32, thread_name_prefix="sandbus-call")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._subs: dict[str, list[Subscription]] = {}
        self._topics: dict[str, tuple[str, ...]] = {}
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._service: Service | None = None
        self._durable: DurableTopics | None = None
        self._sync_lock = asyncio.Lock()
        self._stopping = False
        self.max_payload = 1024 * 1024
        self.inline_budget_s = inline_budget_s
        self.demote_s = demote_s
        self._message_fn: dict[str, str] = {}
        self._versions: dict[str, str] = {}
        self.telemetry = telemetry or Telemetry("sandbus-node", self.node_id)
        self._debug_telemetry: Telemetry | None = None
        manager.auditor.add_sink(self._on_audit)
        manager.auditor.add_sink(self.telemetry.on_audit)
        self.telemetry.observe(self._gauges)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # Worker threads and the span exporter hand the GIL back sooner: an inline call returning
        # from wasm then waits at most ~1 ms for it (see the module docstring).
        sys.setswitchinterval(0.001)
        self.nc = await connect(self.options, on_reconnect=self._on_reconnect)
        self.max_payload = self.nc.max_payload
        if self.durable:
            self._durable = DurableTopics(self.nc, self)
            if not await self._durable.setup():
                log.warning("JetStream is not available: topics are delivered at most once (core NATS)")
                self._durable = None
        self._service = await add_service(
            self.nc, name=NODE_SERVICE, version=self.version,
            description="sandbus host node", metadata={"node_id": self.node_id},
        )
        group = self._service.add_group(name=f"sandbus.node.{self.node_id}")
        for verb, handler in (("list", self._ctl_list), ("stats", self._ctl_list), ("load", self._ctl_load),
                              ("unload", self._ctl_unload), ("reload", self._ctl_reload)):
            await group.add_endpoint(name=verb, handler=handler)
        await self.sync()
        log.info("node %s serving %d plugin(s) on %s", self.node_id, len(self._subs), ", ".join(self.options.servers))

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful: stop taking work, finish what is in flight, then disconnect."""
        self._stopping = True
        for subs in self._subs.values():
            for sub in subs:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        self._subs.clear()
        if self._durable is not None:
            await self._durable.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        self._executor.shutdown(wait=True, cancel_futures=False)
        self.telemetry.shutdown()

    async def _on_reconnect(self) -> None:
        # nats-py re-sends our subscriptions itself; JetStream consumers are durable on the server,
        # but the pull requests waiting there may be gone.
        log.info("node %s reconnected to %s", self.node_id, self.nc.connected_url if self.nc else "?")
        if self._durable is not None:
            self._durable.reconnected()

    def _on_audit(self, event: AuditEvent) -> None:
        if self._loop is None or self._loop.is_closed() or self._stopping:
            return
        # Called from whatever thread raised the event: hop onto the loop.
        self._loop.call_soon_threadsafe(self._spawn_audit, event)

    def _spawn_audit(self, event: AuditEvent) -> None:
        if event.kind.startswith("lifecycle."):
            self._spawn(self.sync())
        if self.nc is not None and self.nc.is_connected:
            # The SANDBUS_AUDIT stream keeps the trail, so an operator can replay it.
            self._spawn(self.nc.publish(audit_subject(self.node_id), orjson.dumps(event.to_dict(), default=str),
                                        headers=dict(JSON)))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- subscriptions -----------------------------------------------------------------------------

    async def sync(self) -> None:
        """Make our subscriptions match the plugins the manager serves (and their topics)."""
        if self.nc is None or self._stopping:
            return
        async with self._sync_lock:
            serving = {p.name for p in self.manager.list_plugins() if p.status.serving}
            for name in [n for n in self._subs if n not in serving]:
                await self._unsubscribe(name)
            for name in sorted(serving):
                topics = tuple(self.manager.manifest(name).subscriptions.topics)
                if name in self._subs and self._topics.get(name) == topics:
                    continue
                await self._unsubscribe(name)
                await self._subscribe(name, topics, self.manager.limits(name).max_instances)

    async def _subscribe(self, name: str, topics: tuple[str, ...], concurrency: int) -> None:
        assert self.nc is not None
        manifest = self.manager.manifest(name)
        lane = self._lanes[name] = _Lane(concurrency)
        info = self.manager.module_info(name)
        imports = info.imports_of("sandbus_v1")
        self._message_fn[name] = MESSAGE_FUNCTION if MESSAGE_FUNCTION in info.functions else DEFAULT_FUNCTION
        self._versions[name] = manifest.plugin.version
        if self.inline_budget_s is None or imports & _BUS_EFFECTS:
            lane.inline_from = None
        queue = plugin_queue(name)
        subs = [
            await self.nc.subscribe(f"{REQ_PREFIX}.{name}.*", queue=queue, cb=self._on_request),
            await self.nc.subscribe(f"{MSG_PREFIX}.{name}", queue=queue, cb=self._on_direct),
        ]
        durable = self._durable is not None and manifest.subscriptions.durable
        if topics and durable:
            assert self._durable is not None
            await self._durable.consume(name, topics)
        elif topics:
            for topic in topics:
                subs.append(await self.nc.subscribe(topic_subject(topic, wildcards=True), queue=queue,
                                                    cb=self._topic_handler(name)))
        self._subs[name] = subs
        self._topics[name] = topics
        log.info("serving %s (topics: %s, %s)", name, ", ".join(topics) or "none",
                 "durable" if durable and topics else "core")

    async def _unsubscribe(self, name: str) -> None:
        for sub in self._subs.pop(name, []):
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._topics.pop(name, None)
        if self._durable is not None:
            await self._durable.stop_plugin(name)

    @classmethod
    def create(cls, plugins: str | Path, options: ConnectOptions, *, policy: Policy | None = None,
               **kwargs: Any) -> Node:
        """A manager for ``plugins`` whose plugins can publish through this node, and the node."""
        bridge = BusBridge()
        manager = PluginManager(plugins, policy=policy, host_functions=bridge.host_functions())
        node = cls(manager, options, **kwargs)
        bridge.node = node
        return node

    async def publish(self, topic: str, payload: Any, *, sender: str, context: Context | None = None) -> str:
        """Publish a PluginMessage onto ``topic`` (durably when JetStream is on); returns its id.

        ``context``: the trace context of the plugin call that publishes (captured in its thread).
        """
        assert self.nc is not None
        message_id, data = PluginMessage.encode(payload, from_=sender, topic=topic)
        headers = {**JSON, H_MSG_ID: message_id, "Nats-Msg-Id": message_id, H_FROM: sender}
        subject = topic_subject(topic)
        with (send_span(subject, headers, message_id=message_id, body_size=len(data), context=context)
              if self.telemetry.enabled else contextlib.nullcontext()):
            if self._durable is not None:
                await self.nc.jetstream().publish(subject, data, headers=headers)
            else:
                await self.nc.publish(subject, data, headers=headers)
        return message_id

    # -- calls -------------------------------------------------------------------------------------

    def runs_inline(self, plugin: str) -> bool:
        """Whether the plugin's calls run on the event loop now (not demoted to threads)."""
        lane = self._lanes.get(plugin)
        return lane is not None and self._loop is not None and lane.inline_now(self._loop)

    def try_inline(self, plugin: str, function: str, payload: bytes) -> CallResult | None:
        """Run the call on the loop under the inline budget; None when it must go to a thread instead."""
        lane = self._lanes.get(plugin)
        if lane is None:
            raise PluginNotFoundError(f"no plugin {plugin!r} is served by node {self.node_id}", plugin=plugin)
        assert self._loop is not None
        # Threads holding every instance: waiting for one here would block the loop.
        if lane.threaded >= lane.limit or not lane.inline_now(self._loop):
            return None
        try:
            return self.manager.execute_detailed(plugin, function, payload, budget_s=self.inline_budget_s)
        except BudgetExceeded:
            lane.inline_from = self._loop.time() + self.demote_s
            log.info("%s.%s overran the %g s inline budget: it runs again in a thread, and %s stays on threads "
                     "for %g s", plugin, function, self.inline_budget_s, plugin, self.demote_s)
            return None

    async def call(self, plugin: str, function: str, payload: bytes, *, msg: Msg | None = None,
                   delivery: int | None = None, telemetry: Telemetry | None = None) -> CallResult:
        """Run one call: inline when it may, else in a worker thread under the plugin's concurrency gate.

        With tracing on and the NATS message given, the call is a ``process`` span (parented by the
        sender's trace context) around an ``execute`` span.
        """
        # Plugin -> plugin requests count their hops: the request host function reads this (the
        # worker thread runs in a copy of this task's context). Set on every call: nothing carries over.
        note_incoming_hops(msg.headers if msg is not None else None)
        tel = telemetry or self.telemetry
        if msg is None or not tel.enabled:
            return await self._call(plugin, function, payload)
        headers = msg.headers or {}
        with tel.process_span(msg.subject, headers, group=plugin_queue(plugin), message_id=headers.get(H_MSG_ID),
                              body_size=len(msg.data), delivery=delivery), \
                tel.execute_span(plugin, self._versions.get(plugin), function) as span:
            try:
                result = await self._call(plugin, function, payload)
            except BaseException as e:
                tel.finish_call(span, plugin, None, e)
                raise
            tel.finish_call(span, plugin, result, None)
            return result

    async def _call(self, plugin: str, function: str, payload: bytes) -> CallResult:
        result = self.try_inline(plugin, function, payload)
        if result is not None:
            return result
        lane = self._lanes[plugin]
        async with lane.gate:
            lane.threaded += 1
            try:
                loop = asyncio.get_running_loop()
                # The worker thread runs in a copy of our context: the current span follows the call, so
                # audit events and host-function publishes attach to it.
                ctx = contextvars.copy_context()
                return await loop.run_in_executor(self._executor, ctx.run, self.manager.execute_detailed, plugin,
                                                  function, payload)
            finally:
                lane.threaded -= 1

    async def _reply(self, msg: Msg, data: bytes, headers: dict[str, str] | None) -> None:
        """Publish a reply. Successful replies carry no headers (the body is the plugin's JSON)."""
        if not msg.reply or self.nc is None:
            return
        if len(data) > self.max_payload:
            err = PayloadTooLargeError(f"reply of {len(data)} bytes exceeds the NATS max payload of "
                                       f"{self.max_payload} bytes", size=len(data), limit=self.max_payload)
            data, headers = error_reply(err)
        await self.nc.publish(msg.reply, data, headers=headers)

    async def _on_request(self, msg: Msg) -> None:
        # The common case stays in this callback (no task): a valid request to a plugin that may run
        # inline. Everything else becomes a task, so this subscription keeps reading. This is the
        # node's hottest code: it is written flat, with the helpers it would otherwise call inlined.
        _, _, plugin, function = msg.subject.split(".", 3)
        headers = msg.headers
        tel = self.telemetry
        if tel.enabled or (headers and H_TRACE_DEBUG in headers):
            fast = tel.fast
            if fast is None or (headers and H_TRACE_DEBUG in headers):
                self._spawn(self._serve_request(msg, plugin, function))
                return
            rt = fast.begin(headers)
            if rt is not None:
                await self._serve_fast_traced(msg, plugin, function, fast, rt)
                return
            latency: FastSpans | None = fast  # not sampled: no spans, but the histogram counts it
        else:
            latency = None
        data = msg.data
        try:
            _check_json(data, plugin)
            result = self.try_inline(plugin, function, data)
        except SandbusError as e:
            await self._reply(msg, *error_reply(e))
            return
        if result is None:
            self._spawn(self._serve_request(msg, plugin, function))
            return
        if latency is not None:
            latency.latency(plugin, result.duration_s)
        reply = result.reply
        if len(reply) > self.max_payload or self.nc is None or not msg.reply:
            await self._reply(msg, reply, None)
        else:
            await self.nc.publish(msg.reply, reply)

    async def _serve_fast_traced(self, msg: Msg, plugin: str, function: str, fast: FastSpans,
                                 rt: RequestTrace) -> None:
        """A sampled request, inline, with its spans recorded by :class:`FastSpans` (not the SDK).

        A call that cannot run inline goes to :meth:`_serve_request` instead, where the SDK traces it.
        """
        data = msg.data
        fast.current, fast.current_thread = rt, self._loop_thread
        exec_start = time.time_ns()
        error: SandbusError | None = None
        result: CallResult | None = None
        try:
            _check_json(data, plugin)
            result = self.try_inline(plugin, function, data)
        except SandbusError as e:
            error = e
        finally:
            fast.current = None
        exec_end = time.time_ns()
        if result is None and error is None:
            self._spawn(self._serve_request(msg, plugin, function))
            return
        if result is not None:
            await self._reply(msg, result.reply, None)
        else:
            assert error is not None
            await self._reply(msg, *error_reply(error))
        headers = msg.headers
        fast.finish(rt, msg.subject, plugin_queue(plugin), headers.get(H_MSG_ID) if headers else None, len(data),
                    plugin, self._versions.get(plugin, ""), function, exec_start, exec_end,
                    None if result is None else (result.fuel_used, result.memory_bytes, result.duration_s),
                    None if error is None else (str(error.code or type(error).__name__), str(error)))

    async def _serve_request(self, msg: Msg, plugin: str, function: str) -> None:
        if msg.headers and msg.headers.get(H_TRACE_DEBUG):
            await self._serve_traced_debug(msg, plugin, function)
            return
        try:
            _check_json(msg.data, plugin)
            result = await self.call(plugin, function, msg.data, msg=msg)
        except SandbusError as e:
            await self._reply(msg, *error_reply(e))
            return
        except Exception as e:  # a bug of ours must still answer, not leave the caller to time out
            log.exception("request %s failed", msg.subject)
            await self._reply(msg, *error_reply(SandbusError(f"internal error: {e}", plugin=plugin)))
            return
        await self._reply(msg, result.reply, None)

    async def _serve_traced_debug(self, msg: Msg, plugin: str, function: str) -> None:
        """``sandbus trace``: trace this request whatever the sampling, and return our spans in a header."""
        if not self.telemetry.enabled and self._debug_telemetry is None:
            self._debug_telemetry = Telemetry("sandbus-node", self.node_id, enabled=True, export=False,
                                              set_global=False)
        tel = self.telemetry if self.telemetry.enabled else self._debug_telemetry
        assert tel is not None
        parent = trace.get_current_span(extract(msg.headers)).get_span_context()
        tel.collector.watch(parent.trace_id)
        try:
            data: bytes = (await self.call(plugin, function, msg.data, msg=msg, telemetry=tel)).reply
            headers: dict[str, str] = {}
        except SandbusError as e:
            data, headers = error_reply(e)
        headers[H_TRACE_SPANS] = orjson.dumps(tel.collector.take(parent.trace_id)).decode()
        await self._reply(msg, data, headers)

    async def _on_direct(self, msg: Msg) -> None:
        self._spawn(self._serve_message(msg, msg.subject.rsplit(".", 1)[1], None))

    def _topic_handler(self, plugin: str) -> Callable[[Msg], Awaitable[None]]:
        async def on_topic(msg: Msg) -> None:
            self._spawn(self._serve_message(msg, plugin, msg.subject.split(".", 2)[2]))

        return on_topic

    async def _serve_message(self, msg: Msg, plugin: str, topic: str | None) -> None:
        """A direct or core-topic PluginMessage: handled, or answered with an error if it has a reply."""
        try:
            envelope = self.envelope_for(msg.data, msg.headers, topic=topic, to=None if topic else plugin)
            result = await self.call(plugin, self.message_function(plugin), envelope, msg=msg)
        except SandbusError as e:
            log.warning("message to %s on %s failed: %s", plugin, msg.subject, e)
            await self._reply(msg, *error_reply(e))
            return
        await self._reply(msg, result.reply, None)

    def message_function(self, plugin: str) -> str:
        """Plugins handle messages in ``handle_message`` when they export it, else ``handle_request``."""
        return self._message_fn.get(plugin, DEFAULT_FUNCTION)

    @staticmethod
    def envelope_for(data: bytes, headers: dict[str, str] | None, *, topic: str | None, to: str | None) -> bytes:
        """The PluginMessage JSON a plugin receives: the sender's envelope, or one built around a raw payload."""
        try:
            decoded = orjson.loads(data) if data else None
        except orjson.JSONDecodeError as e:
            raise AbiViolationError(f"message body is not valid JSON: {e}") from e
        if isinstance(decoded, dict) and "payload" in decoded and "id" in decoded:
            try:
                message = PluginMessage.model_validate(decoded)
            except ValueError as e:
                raise AbiViolationError(f"malformed PluginMessage envelope: {e}") from e
            if topic is not None and message.topic is None:
                return message.model_copy(update={"topic": topic}).to_json()
            return data  # valid, and complete: as the sender wrote it
        headers = headers or {}
        message = PluginMessage(id=headers.get(H_MSG_ID) or new_message_id(), from_=headers.get(H_FROM, "client"),
                                to=to, topic=topic, payload=decoded)
        return message.to_json()

    # -- control endpoints (NATS micro) ------------------------------------------------------------

    async def _ctl_reply(self, req: Request, work: Callable[[], Any]) -> None:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, work)
            await req.respond(orjson.dumps(result, default=str), headers=JSON)
        except SandbusError as e:
            await req.respond(*error_reply(e))

    def queue_depth(self, plugin: str) -> int:
        """Calls waiting for one of the plugin's instances on this node."""
        lane = self._lanes.get(plugin)
        gate = lane.gate if lane is not None else None
        waiters = getattr(gate, "_waiters", None) if gate is not None else None
        return len(waiters) if waiters else 0

    def _gauges(self) -> dict[str, dict[str, float]]:
        plugins = self.manager.list_plugins()
        return {
            "sandbus.calls": {p.name: p.executions for p in plugins},
            "sandbus.call.errors": {p.name: p.errors for p in plugins},
            "sandbus.call.fuel": {p.name: p.fuel_used for p in plugins},
            "sandbus.plugin.in_flight": {p.name: p.in_flight for p in plugins},
            "sandbus.plugin.queue_depth": {p.name: self.queue_depth(p.name) for p in plugins},
            "sandbus.plugin.memory": {p.name: p.memory_bytes for p in plugins},
        }

    def _node_view(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "version": self.version,
            "durable_topics": self._durable is not None,
            "inline_budget_ms": None if self.inline_budget_s is None else self.inline_budget_s * 1e3,
            # How requests served inline are traced: "fast" (host/fast_spans.py), "sdk", or "off".
            "request_spans": "off" if not self.telemetry.enabled else ("fast" if self.telemetry.fast else "sdk"),
            # Spans the fast path could not hand to its exporter (queue full, exporter down): 0 means every
            # traced request reached the exporter process.
            "spans_dropped": self.telemetry.fast.dropped if self.telemetry.fast else 0,
            "plugins": [{**p.model_dump(mode="json"), "queue_depth": self.queue_depth(p.name)}
                        for p in self.manager.list_plugins()],
        }

    async def _ctl_list(self, req: Request) -> None:
        await self._ctl_reply(req, self._node_view)

    def _plugin_arg(self, req: Request) -> str:
        try:
            body = orjson.loads(req.data or b"{}")
            name = body["plugin"]
            if not isinstance(name, str):
                raise TypeError
            return name
        except (orjson.JSONDecodeError, KeyError, TypeError) as e:
            raise AbiViolationError('control request must be {"plugin": "<name>"}') from e

    async def _ctl_load(self, req: Request) -> None:
        await self._ctl_reply(req, lambda: self.manager.load(self._plugin_arg(req)).model_dump(mode="json"))

    async def _ctl_reload(self, req: Request) -> None:
        await self._ctl_reply(req, lambda: self.manager.reload(self._plugin_arg(req)).model_dump(mode="json"))

    async def _ctl_unload(self, req: Request) -> None:
        def work() -> dict[str, Any]:
            body = orjson.loads(req.data or b"{}")
            self.manager.unload(self._plugin_arg(req), force=bool(body.get("force", False)))
            return {"unloaded": body.get("plugin")}

        await self._ctl_reply(req, work)

    @staticmethod
    def control_subject(node_id: str, verb: str) -> str:
        return control_subject(node_id, verb)

