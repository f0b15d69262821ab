"""A host node: a plugin manager wired onto the PluginBus.

The request path, top to bottom:

    NATS message on sandbus.req.<plugin>.<function>  (queue group sandbus.<plugin>)
      -> Node._on_request        (subscription callback: check the body, run the call inline if it may)
      -> Node._serve_request     (a task, when it may not: the callback returns at once)
      -> Node._call              (per-plugin gate: a bounded wait for one of the plugin's instances)
      -> the plugin's own worker threads (see below)
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
threads for a while. Re-running is only correct for a call that can have had no side effect, so a
plugin with a writable directory or a host function that acts on the bus or the network never runs
inline (one rule, :func:`sandbus.host.sandbox.sandbox.rerun_safe`, enforced by the sandbox itself).

An inline call only takes an instance that is idle (``wait=False``): building one runs guest code
(instantiation, ``_initialize``, ``sandbus_init``) under the plugin's full timeout, so when none is
idle -- the plugin's instances are busy, or one failed and its replacement is not built yet -- the
call goes to a worker thread, which builds it. Shutting instances down is handed off the loop too
(host/sandbox/pool.py). The loop is therefore never held longer than the budget (plus one epoch
tick), whatever a plugin does.

Overload is answered, never silent. A request or a core message that cannot run inline waits for
one of the plugin's instances on the loop, in a queue of at most ``max_waiting`` calls per plugin
(beyond it: an ``InstanceLimitError`` at once; durable deliveries just wait their turn, JetStream
redelivers them). Each plugin has its own worker threads, as many as its instances: a call that
got its turn starts at once, never behind another plugin's calls running to their timeouts. Its
deadline is its arrival plus the plugin's timeout: waiting ends there with an ``InstanceLimitError``,
and the call itself is stopped there with an ``ExecutionTimeoutError``. So every request is answered
within its plugin's timeout plus a margin (the inline budget it may have used first, two epoch
ticks, and publishing the reply), and no work goes on for a caller that has stopped waiting. Every
message the node sends (replies, and the publishes and requests of plugins) is measured against the
server's max payload with its headers first: the server would answer a larger one by closing the
node's connection.

Stopping drains: the subscriptions are drained (the server stops routing to this node, and every
message it had already sent is handled), then the calls in flight finish and their replies are
flushed, so a request the node accepted is answered, whichever moment the signal came (the node
waits for a call up to its plugin's timeout). Conversely :meth:`Node.start` returns, and a ``load``
or ``reload`` control request is answered, only once the server has the new subscriptions.

Tracing follows the same split. A request served inline is traced by host/telemetry/fast_spans.py: its
``process`` and ``execute`` spans are one tuple on the request path and are encoded and exported
in batches by a background thread, because the OpenTelemetry SDK's span objects and encoder cost
several times the request itself. Everything else (threaded calls, whose host functions need the
current span; durable deliveries; ``sandbus trace``) is traced through the SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
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

from sandbus.bus.connection import ConnectOptions, connect
from sandbus.host.lifecycle import PluginManager
from sandbus.host.lifecycle.policy import Policy
from sandbus.host.node.audit_publish import AuditPublisher
from sandbus.host.node.delivery import DurableTopics
from sandbus.host.node.hostfuncs import BusBridge, note_incoming_hops
from sandbus.host.sandbox import AuditEvent, AuditLevel, BudgetExceeded, CallResult
from sandbus.host.sandbox.pool import NotInline
from sandbus.host.telemetry.fast_spans import FastSpans, RequestTrace
from sandbus.host.telemetry.otel import Telemetry
from sandbus.sdk.envelope import H_FROM, H_HOPS, H_MSG_ID, JSON, PluginMessage, error_reply, new_message_id
from sandbus.sdk.errors import (
    AbiViolationError,
    InstanceLimitError,
    PayloadTooLargeError,
    PluginNotFoundError,
    SandbusError,
)
from sandbus.sdk.jsonbound import MAX_JSON_DEPTH, too_deep
from sandbus.sdk.subjects import (
    MSG_PREFIX,
    NODE_SERVICE,
    REQ_PREFIX,
    audit_subject,
    control_subject,
    plugin_queue,
    topic_subject,
)
from sandbus.sdk.tracing import H_TRACE_DEBUG, H_TRACE_SPANS, extract, send_span

__all__ = ["Node", "default_node_id"]

log = logging.getLogger("sandbus.node")

MESSAGE_FUNCTION = "handle_message"
DEFAULT_FUNCTION = "handle_request"
#: Longest body a control request (load / unload / reload) may have.
MAX_CONTROL_BODY = 4096


def _check_json(data: bytes, plugin: str) -> None:
    try:
        decoded = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise AbiViolationError(f"request body is not valid JSON: {e}", plugin=plugin) from e
    if too_deep(data, decoded):
        raise AbiViolationError(f"request body is nested too deeply (more than {MAX_JSON_DEPTH} levels)",
                                plugin=plugin)


async def _drain(sub: Subscription) -> None:
    """Unsubscribe, and handle the messages the server had sent before it knew (nats-py's drain).

    nats-py's drain is UNSUB, one PING/PONG round trip, then it stops reading the subscription.
    But the server routes a publisher's message on the publisher's connection: one matched to us
    just before our UNSUB can be queued to us just *after* that PONG, and nats-py then drops it
    unanswered (seen about once in 40 drains under load). So the UNSUB goes first, alone, and
    the drain's round trip comes after another one: such a message is in by then.
    """
    try:
        conn = sub._conn
        await conn._send_unsubscribe(sub._id)
        await conn.flush()
        await sub.drain()  # type: ignore[no-untyped-call]
    except Exception as e:  # already closed, or the connection is gone: nothing left to handle
        log.debug("draining %s: %s", sub.subject, e)


async def _drain_all(subs: list[Subscription], timeout: float) -> None:
    """:func:`_drain` every one of ``subs`` at once, waiting at most ``timeout`` seconds."""
    if subs:
        await asyncio.wait([asyncio.ensure_future(_drain(sub)) for sub in subs], timeout=timeout)


def nats_size(data: bytes, headers: dict[str, str] | None) -> int:
    """What the server counts against its max payload: the body plus the encoded header block
    (nats-py checks the body alone; a larger message makes the server close the connection)."""
    if not headers:
        return len(data)
    # "NATS/1.0\r\n", then "key: value\r\n" per header, then "\r\n"
    return len(data) + 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def default_node_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}".replace(".", "-")


#: Calls per plugin that may wait for an instance on a node (see :class:`Node`).
DEFAULT_MAX_WAITING = 64


class _Lane:
    """How one plugin's calls are run on this node (looked up once per request)."""

    __slots__ = ("executor", "gate", "inline_from", "limit", "max_waiting", "threaded", "timeout_s", "waiting")

    def __init__(self, name: str, concurrency: int, timeout_s: float, max_waiting: int) -> None:
        # As many calls at once as the plugin has instances: the rest wait here, on the loop,
        # instead of in threads that would time out on the instance pool.
        self.gate = asyncio.Semaphore(concurrency)
        self.limit = concurrency
        # The plugin's own worker threads, as many as the gate lets through: a call that passed the
        # gate starts at once, never queued behind another plugin's calls running to their timeout
        # (threads are created on demand, so a plugin that runs inline costs none).
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"sandbus-{name}")
        #: the plugin's timeout: a waiting caller's deadline is its arrival plus this
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        #: calls running in worker threads now, and calls waiting for the gate
        self.threaded = 0
        self.waiting = 0
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
        threads: most worker threads per plugin for wasm calls that do not run inline (default: as
            many as the plugin has instances). Each plugin has its own, so one plugin's calls can
            never hold the threads another plugin's calls need.
        version: reported by the micro service.
        inline_budget_s: how long a call may hold the event loop before it moves to a thread
            (None: every call in a thread).
        demote_s: how long a plugin whose call overran the budget stays on threads.
        telemetry: traces and metrics (default: configured from the ``OTEL_*`` environment).
        max_waiting: how many requests and direct messages per plugin may wait for one of its
            instances; beyond it a call is refused at once with an ``InstanceLimitError``.
    """

    def __init__(self, manager: PluginManager, options: ConnectOptions, *, node_id: str | None = None,
                 durable: bool = True, threads: int | None = None, version: str = "0.1.0",
                 inline_budget_s: float | None = 0.02, demote_s: float = 30.0,
                 telemetry: Telemetry | None = None, max_waiting: int = DEFAULT_MAX_WAITING) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, found {max_waiting}")
        self.manager = manager
        self.options = options
        self.node_id = node_id or default_node_id()
        self.durable = durable
        self.version = version
        self.nc: Client | None = None
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be 1 or more, found {threads}")
        self.threads = threads
        # Control work (load, reload, unload, list) only: wasm calls run on their plugin's lane.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbus-control")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._subs: dict[str, list[Subscription]] = {}
        self._topics: dict[str, tuple[str, ...]] = {}
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._service: Service | None = None
        self._durable: DurableTopics | None = None
        self._audit_out: AuditPublisher | None = None
        self._sync_lock = asyncio.Lock()
        self._stopping = False
        self.max_payload = 1024 * 1024
        self.inline_budget_s = inline_budget_s
        self.demote_s = demote_s
        self.max_waiting = max_waiting
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
        nc = self.nc
        # Repeats of one audit event within a second are published once, with a count.
        self._audit_out = AuditPublisher(nc.publish, audit_subject(self.node_id), connected=lambda: nc.is_connected)
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
        # Subscribing only queues SUB lines: return once the server has them, so a request sent
        # now is routed here instead of answered "no responders".
        await self.nc.flush()
        log.info("node %s serving %d plugin(s) on %s", self.node_id, len(self._subs), ", ".join(self.options.servers))

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful: stop taking work, answer every message already received, then disconnect.

        ``timeout`` bounds the drain and the disconnect; calls in flight are waited for up to the
        longest plugin timeout (plus a second) when that is longer, since each was accepted with
        the promise of an answer by its deadline.

        The subscriptions are drained, not dropped: unsubscribing alone discards the messages the
        server had already sent to this node (in the socket or the client's queue), and their
        requesters would wait in vain, although another node serves the plugin.
        """
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A sync in progress (a reload) finishes first: else it could subscribe after the drain below.
        async with self._sync_lock:
            subs = [sub for subs in self._subs.values() for sub in subs]
            self._subs.clear()
        await _drain_all(subs, timeout)
        if self._durable is not None:
            await self._durable.stop()
        # Handling drained messages spawns tasks: wait until none is left. Each ends by its call's
        # deadline (arrival + the plugin's timeout, see the module docstring), which may be later than
        # ``timeout``: the calls accepted are answered, so wait that long when it is longer.
        longest = max((lane.timeout_s for lane in self._lanes.values()), default=0.0)
        tasks_deadline = max(deadline, loop.time() + longest + 1.0)
        while self._tasks and (remaining := tasks_deadline - loop.time()) > 0:
            await asyncio.wait(list(self._tasks), timeout=remaining)
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
        if self._audit_out is not None:  # repeats still being counted go out with their count
            with contextlib.suppress(Exception):
                await self._audit_out.close()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), max(1.0, deadline - loop.time()))
            if not self.nc.is_closed:  # NATS is down (drain refused): close, or nats-py reconnects forever
                with contextlib.suppress(Exception):
                    await self.nc.close()
        self._executor.shutdown(wait=True, cancel_futures=False)
        for lane in self._lanes.values():
            lane.executor.shutdown(wait=True, cancel_futures=False)
        self.telemetry.shutdown()

    async def _on_reconnect(self) -> None:
        # nats-py re-sends our subscriptions itself; JetStream consumers are durable on the server,
        # but the pull requests waiting there may be gone.
        log.info("node %s reconnected to %s", self.node_id, self.nc.connected_url if self.nc else "?")
        if self._durable is not None:
            self._durable.reconnected()

    def _on_audit(self, event: AuditEvent) -> None:
        # Also while stopping: the calls being drained are still audited (published until disconnected).
        if self._loop is None or self._loop.is_closed():
            return
        # Called from whatever thread raised the event: hop onto the loop.
        self._loop.call_soon_threadsafe(self._spawn_audit, event)

    def _spawn_audit(self, event: AuditEvent) -> None:
        if event.kind.startswith("lifecycle."):
            self._spawn(self.sync())
        if self.nc is not None and self.nc.is_connected and self._audit_out is not None:
            # The SANDBUS_AUDIT stream keeps the trail, so an operator can replay it.
            self._audit_out.offer(event)

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
            if self._stopping:  # stop() took the lock after we were called: it owns the subscriptions now
                return
            serving = {p.name for p in self.manager.list_plugins() if p.status.serving}
            for name in [n for n in self._subs if n not in serving]:
                await self._unsubscribe(name)
            subscribed = False
            for name in sorted(serving):
                topics = tuple(self.manager.manifest(name).subscriptions.topics)
                if name in self._subs and self._topics.get(name) == topics:
                    # Same subscriptions; a reload may still have changed how its calls run.
                    self._set_lane(name)
                    continue
                await self._unsubscribe(name)
                await self._subscribe(name, topics)
                subscribed = True
            if subscribed and self.nc.is_connected:
                # Until the server has the SUBs, a request to the new plugin gets "no responders".
                with contextlib.suppress(Exception):  # disconnected meanwhile: nats-py re-sends them
                    await self.nc.flush(timeout=5)

    def _set_lane(self, name: str) -> _Lane:
        """The lane for the serving version of ``name`` (kept when nothing it depends on changed)."""
        limits = self.manager.limits(name)
        info = self.manager.module_info(name)
        inline = self.inline_budget_s is not None and self.manager.rerun_safe(name)
        self._message_fn[name] = MESSAGE_FUNCTION if MESSAGE_FUNCTION in info.functions else DEFAULT_FUNCTION
        self._versions[name] = self.manager.manifest(name).plugin.version
        concurrency = limits.max_instances if self.threads is None else min(limits.max_instances, self.threads)
        lane = self._lanes.get(name)
        if (lane is None or lane.limit != concurrency or lane.timeout_s != limits.timeout_s
                or lane.max_waiting != self.max_waiting):
            # The old lane is dropped, not shut down: calls waiting at its gate still run on its
            # threads (on the new version), which end once it is garbage.
            lane = self._lanes[name] = _Lane(name, concurrency, limits.timeout_s, self.max_waiting)
        if not inline:
            lane.inline_from = None  # the sandbox refuses anyway: skip the attempt
        elif lane.inline_from is None:
            lane.inline_from = 0.0
        return lane

    async def _subscribe(self, name: str, topics: tuple[str, ...]) -> None:
        assert self.nc is not None
        manifest = self.manager.manifest(name)
        self._set_lane(name)
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
        # Drained: the messages already received are answered (PluginNotFoundError if unloaded).
        await _drain_all(self._subs.pop(name, []), 10.0)
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

    async def publish(self, topic: str, payload: Any, *, sender: str, context: Context | None = None,
                      hops: int = 0) -> str:
        """Publish a PluginMessage onto ``topic`` (durably when JetStream is on); returns its id.

        ``context``: the trace context of the plugin call that publishes (captured in its thread).
        ``hops``: its ``Sandbus-Hops`` (one above the message the publishing call serves), so chains
        through topics end at the hop limit like request chains; stored with a durable message.
        """
        assert self.nc is not None
        message_id, data = PluginMessage.encode(payload, from_=sender, topic=topic)
        headers = {**JSON, H_MSG_ID: message_id, "Nats-Msg-Id": message_id, H_FROM: sender}
        if hops:
            headers[H_HOPS] = str(hops)
        subject = topic_subject(topic)
        with (send_span(subject, headers, message_id=message_id, body_size=len(data), context=context)
              if self.telemetry.enabled else contextlib.nullcontext()):
            self.check_fits(data, headers, f"publish to {topic!r}", sender)  # trace headers included
            if self._durable is not None:
                await self.nc.jetstream().publish(subject, data, headers=headers)
            else:
                await self.nc.publish(subject, data, headers=headers)
        return message_id

    def check_fits(self, data: bytes, headers: dict[str, str] | None, what: str, plugin: str) -> None:
        """Refuse a message the server would refuse: above its max payload, headers included.

        nats-py checks the body alone, and the server answers a larger message by closing this
        node's connection (every call in flight loses its reply): so every message a plugin makes
        the node send is measured here first.

        Raises:
            PayloadTooLargeError: it does not fit.
        """
        size = nats_size(data, headers)
        if size > self.max_payload:
            raise PayloadTooLargeError(f"{what}: {size} bytes (envelope and headers included) exceed the NATS "
                                       f"max payload of {self.max_payload} bytes", plugin=plugin, size=size,
                                       limit=self.max_payload)

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
            # wait=False: an idle instance or NotInline, never a build or a wait on the loop.
            return self.manager.execute_detailed(plugin, function, payload, budget_s=self.inline_budget_s,
                                                 wait=False)
        except NotInline:
            return None
        except BudgetExceeded:
            lane.inline_from = self._loop.time() + self.demote_s
            log.info("%s.%s overran the %g s inline budget: it runs again in a thread, and %s stays on threads "
                     "for %g s", plugin, function, self.inline_budget_s, plugin, self.demote_s)
            return None

    async def call(self, plugin: str, function: str, payload: bytes, *, msg: Msg | None = None,
                   delivery: int | None = None, telemetry: Telemetry | None = None,
                   arrival: float | None = None) -> CallResult:
        """Run one call: inline when it may, else in a worker thread under the plugin's concurrency gate.

        ``arrival`` (a ``time.monotonic()`` value): when the call's caller started waiting; the call
        then waits in a bounded queue and ends by ``arrival`` plus the plugin's timeout (see the
        module docstring). Without it (durable deliveries, which JetStream redelivers) it waits
        for its turn, unbounded here.

        With tracing on and the NATS message given, the call is a ``process`` span (parented by the
        sender's trace context) around an ``execute`` span.
        """
        # Plugin -> plugin requests count their hops: the request host function reads this (the
        # worker thread runs in a copy of this task's context). Set on every call: nothing carries over.
        note_incoming_hops(msg.headers if msg is not None else None)
        tel = telemetry or self.telemetry
        if msg is None or not tel.enabled:
            return await self._call(plugin, function, payload, arrival)
        headers = msg.headers or {}
        with tel.process_span(msg.subject, headers, group=plugin_queue(plugin), message_id=headers.get(H_MSG_ID),
                              body_size=len(msg.data), delivery=delivery), \
                tel.execute_span(plugin, self._versions.get(plugin), function) as span:
            try:
                result = await self._call(plugin, function, payload, arrival)
            except BaseException as e:
                tel.finish_call(span, plugin, None, e)
                raise
            tel.finish_call(span, plugin, result, None)
            return result

    async def _call(self, plugin: str, function: str, payload: bytes, arrival: float | None) -> CallResult:
        result = self.try_inline(plugin, function, payload)
        if result is not None:
            return result
        lane = self._lanes[plugin]
        deadline = None if arrival is None else arrival + lane.timeout_s
        gate = lane.gate
        if deadline is not None and gate.locked():
            await self._wait_turn(plugin, lane, deadline)
        else:
            await gate.acquire()
        lane.threaded += 1
        try:
            loop = asyncio.get_running_loop()
            # The worker thread runs in a copy of our context: the current span follows the call, so
            # audit events and host-function publishes attach to it.
            ctx = contextvars.copy_context()
            run = functools.partial(self.manager.execute_detailed, plugin, function, payload, deadline=deadline)
            return await loop.run_in_executor(lane.executor, ctx.run, run)
        finally:
            lane.threaded -= 1
            gate.release()

    async def _wait_turn(self, plugin: str, lane: _Lane, deadline: float) -> None:
        """Wait for the lane's gate until ``deadline``, in a queue of at most ``lane.max_waiting``.

        Raises:
            InstanceLimitError: the queue is full, or the deadline passed first (audited, like
                every refusal; the caller then answers at once instead of leaving its requester
                to time out, and nothing runs for a caller that has stopped waiting).
        """
        if lane.waiting >= lane.max_waiting:
            raise self._refuse(plugin, f"{lane.waiting} calls already wait for the plugin's {lane.limit} "
                               f"instance(s) on node {self.node_id} (at most {lane.max_waiting} may)",
                               limit=lane.limit, waiting=lane.waiting, max_waiting=lane.max_waiting)
        lane.waiting += 1
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await lane.gate.acquire()
        except TimeoutError:
            raise self._refuse(plugin, f"all {lane.limit} instance(s) stayed busy for the plugin's whole "
                               f"{lane.timeout_s:g} s timeout", limit=lane.limit) from None
        finally:
            lane.waiting -= 1

    def _refuse(self, plugin: str, message: str, **details: Any) -> InstanceLimitError:
        err = InstanceLimitError(message, plugin=plugin, **details)
        self.manager.auditor.emit(AuditLevel.WARNING, err.code, plugin, message, **details)
        return err

    async def _reply(self, msg: Msg, data: bytes, headers: dict[str, str] | None) -> None:
        """Publish a reply. Successful replies carry no headers (the body is the plugin's JSON).

        A reply the server would refuse (body and headers above its max payload; the server would
        also close this node's connection) is replaced by a ``PayloadTooLargeError`` reply.
        """
        if not msg.reply or self.nc is None:
            return
        size = nats_size(data, headers)
        if size > self.max_payload:
            err = PayloadTooLargeError(f"reply of {size} bytes (headers included) exceeds the NATS max payload "
                                       f"of {self.max_payload} bytes", size=size, limit=self.max_payload)
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
                self._spawn(self._serve_request(msg, plugin, function, time.monotonic()))
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
        except Exception as e:  # a bug of ours must still answer, not leave the caller to time out
            log.exception("request %s failed", msg.subject)
            await self._reply(msg, *error_reply(SandbusError(f"internal error: {e}", plugin=plugin)))
            return
        if result is None:
            self._spawn(self._serve_request(msg, plugin, function, time.monotonic(), checked=True))
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
        except Exception as e:  # a bug of ours must still answer
            log.exception("request %s failed", msg.subject)
            error = SandbusError(f"internal error: {e}", plugin=plugin)
        finally:
            fast.current = None
        exec_end = time.time_ns()
        if result is None and error is None:
            self._spawn(self._serve_request(msg, plugin, function, time.monotonic(), checked=True))
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

    async def _serve_request(self, msg: Msg, plugin: str, function: str, arrival: float, *,
                             checked: bool = False) -> None:
        """Serve a request that did not run inline (``checked``: its body was already found valid JSON)."""
        if msg.headers and msg.headers.get(H_TRACE_DEBUG):
            await self._serve_traced_debug(msg, plugin, function, arrival)
            return
        try:
            if not checked:
                _check_json(msg.data, plugin)
            result = await self.call(plugin, function, msg.data, msg=msg, arrival=arrival)
        except SandbusError as e:
            await self._reply(msg, *error_reply(e))
            return
        except Exception as e:  # a bug of ours must still answer, not leave the caller to time out
            log.exception("request %s failed", msg.subject)
            await self._reply(msg, *error_reply(SandbusError(f"internal error: {e}", plugin=plugin)))
            return
        await self._reply(msg, result.reply, None)

    async def _serve_traced_debug(self, msg: Msg, plugin: str, function: str, arrival: float) -> None:
        """``sandbus trace``: trace this request whatever the sampling, and return our spans in a header."""
        if not self.telemetry.enabled and self._debug_telemetry is None:
            self._debug_telemetry = Telemetry("sandbus-node", self.node_id, enabled=True, export=False,
                                              set_global=False)
        tel = self.telemetry if self.telemetry.enabled else self._debug_telemetry
        assert tel is not None
        parent = trace.get_current_span(extract(msg.headers)).get_span_context()
        tel.collector.watch(parent.trace_id)
        try:
            _check_json(msg.data, plugin)  # traced on request or not, a body is checked before it is used
            data: bytes = (await self.call(plugin, function, msg.data, msg=msg, telemetry=tel,
                                           arrival=arrival)).reply
            headers: dict[str, str] = {}
        except SandbusError as e:
            data, headers = error_reply(e)
        except Exception as e:  # a bug of ours must still answer
            log.exception("request %s failed", msg.subject)
            data, headers = error_reply(SandbusError(f"internal error: {e}", plugin=plugin))
        headers[H_TRACE_SPANS] = orjson.dumps(tel.collector.take(parent.trace_id)).decode()
        await self._reply(msg, data, headers)

    async def _on_direct(self, msg: Msg) -> None:
        self._spawn(self._serve_message(msg, msg.subject.rsplit(".", 1)[1], None, time.monotonic()))

    def _topic_handler(self, plugin: str) -> Callable[[Msg], Awaitable[None]]:
        async def on_topic(msg: Msg) -> None:
            self._spawn(self._serve_message(msg, plugin, msg.subject.split(".", 2)[2], time.monotonic()))

        return on_topic

    async def _serve_message(self, msg: Msg, plugin: str, topic: str | None, arrival: float) -> None:
        """A direct or core-topic PluginMessage: handled, or answered with an error if it has a reply."""
        try:
            envelope = self.envelope_for(msg.data, msg.headers, topic=topic, to=None if topic else plugin)
            result = await self.call(plugin, self.message_function(plugin), envelope, msg=msg, arrival=arrival)
        except SandbusError as e:
            log.warning("message to %s on %s failed: %s", plugin, msg.subject, e)
            await self._reply(msg, *error_reply(e))
            return
        except Exception as e:  # a bug of ours must still answer, not leave the caller to time out
            log.exception("message %s failed", msg.subject)
            await self._reply(msg, *error_reply(SandbusError(f"internal error: {e}", plugin=plugin)))
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

        def encoded(message: PluginMessage) -> bytes:
            try:
                return message.to_json()
            except TypeError as e:  # orjson reads 1024 levels of nesting but writes only 254
                raise AbiViolationError(f"message body cannot be re-encoded: {e} (nested too deeply)") from e

        if isinstance(decoded, dict) and "payload" in decoded and "id" in decoded:
            try:
                message = PluginMessage.model_validate(decoded)
            except ValueError as e:
                raise AbiViolationError(f"malformed PluginMessage envelope: {e}") from e
            if topic is not None and message.topic is None:
                return encoded(message.model_copy(update={"topic": topic}))
            return data  # valid, and complete: as the sender wrote it
        headers = headers or {}
        message = PluginMessage(id=headers.get(H_MSG_ID) or new_message_id(), from_=headers.get(H_FROM, "client"),
                                to=to, topic=topic, payload=decoded)
        return encoded(message)

    # -- control endpoints (NATS micro) ------------------------------------------------------------

    async def _ctl_reply(self, req: Request, work: Callable[[], Any], *, then_sync: bool = False) -> None:
        """Run ``work`` off the loop and answer: its JSON, or an error reply -- whatever went wrong.

        An exception escaping a micro handler would make nats-py answer a bare
        ``Nats-Service-Error-Code: 500`` with an empty body, which a sandbus client cannot read.
        ``then_sync``: subscribe to what ``work`` loaded before answering, so that a request sent
        after a successful ``load`` or ``reload`` answer is routed to the plugin.
        """
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, work)
            if then_sync:
                await self.sync()
            data = orjson.dumps(result, default=str)
            headers: dict[str, str] | None = dict(JSON)
        except SandbusError as e:
            data, headers = error_reply(e)
        except Exception as e:  # a bug of ours must still answer
            log.exception("control request on %s failed", req.subject)
            data, headers = error_reply(SandbusError(f"internal error: {type(e).__name__}: {e}"))
        if (size := nats_size(data, headers)) > self.max_payload:  # a listing of very many plugins
            data, headers = error_reply(PayloadTooLargeError(
                f"answer of {size} bytes exceeds the NATS max payload of {self.max_payload} bytes",
                size=size, limit=self.max_payload))
        await req.respond(data, headers=headers)

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
            # How requests served inline are traced: "fast" (host/telemetry/fast_spans.py), "sdk", or "off".
            "request_spans": "off" if not self.telemetry.enabled else ("fast" if self.telemetry.fast else "sdk"),
            # Spans the fast path could not hand to its exporter (queue full, exporter down): 0 means every
            # traced request reached the exporter process.
            "spans_dropped": self.telemetry.fast.dropped if self.telemetry.fast else 0,
            "plugins": [{**p.model_dump(mode="json"), "queue_depth": self.queue_depth(p.name)}
                        for p in self.manager.list_plugins()],
        }

    async def _ctl_list(self, req: Request) -> None:
        await self._ctl_reply(req, self._node_view)

    def _control_args(self, req: Request, verb: str, *, force: bool = False) -> tuple[str, bool]:
        """``{"plugin": "<name>"}`` (plus ``"force": bool`` for unload), checked before any use.

        Raises:
            AbiViolationError: anything else (too long, not JSON, not an object, a missing, unknown or
                mistyped field); audited as ``control.refused``.
        """
        shape = '{"plugin": "<name>", "force": false}' if force else '{"plugin": "<name>"}'
        data = req.data or b""
        try:
            if len(data) > MAX_CONTROL_BODY:
                raise ValueError(f"body of {len(data)} bytes (at most {MAX_CONTROL_BODY})")
            body = orjson.loads(data or b"{}")
            if not isinstance(body, dict):
                raise ValueError(f"a JSON {type(body).__name__}, not an object")
            extra = set(body) - ({"plugin", "force"} if force else {"plugin"})
            if extra:
                raise ValueError(f"unknown field(s) {sorted(extra)}")
            name, forced = body.get("plugin"), body.get("force", False)
            if not isinstance(name, str):
                raise ValueError('"plugin" must be a string')
            if not isinstance(forced, bool):
                raise ValueError('"force" must be true or false')
            return name, forced
        except (orjson.JSONDecodeError, ValueError) as e:
            message = f"control request {verb} must be {shape}: {e}"
            self.manager.auditor.emit(AuditLevel.WARNING, "control.refused", "", message, verb=verb,
                                      size=len(data))
            raise AbiViolationError(message, verb=verb) from e

    async def _ctl_load(self, req: Request) -> None:
        await self._ctl_args_then(req, "load", lambda name, _: self.manager.load(name).model_dump(mode="json"))

    async def _ctl_reload(self, req: Request) -> None:
        await self._ctl_args_then(req, "reload", lambda name, _: self.manager.reload(name).model_dump(mode="json"))

    async def _ctl_unload(self, req: Request) -> None:
        def work(name: str, force: bool) -> dict[str, Any]:
            self.manager.unload(name, force=force)
            return {"unloaded": name}

        await self._ctl_args_then(req, "unload", work, force=True)

    async def _ctl_args_then(self, req: Request, verb: str, work: Callable[[str, bool], Any], *,
                             force: bool = False) -> None:
        try:
            name, forced = self._control_args(req, verb, force=force)
        except SandbusError as e:
            await req.respond(*error_reply(e))
            return
        await self._ctl_reply(req, lambda: work(name, forced), then_sync=verb != "unload")

    @staticmethod
    def control_subject(node_id: str, verb: str) -> str:
        return control_subject(node_id, verb)

