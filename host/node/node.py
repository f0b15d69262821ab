"""A host node: a :class:`PluginManager` wired onto a :class:`~sandbus.bus.PluginBus`.

The bus owns everything said on NATS (subscriptions, durable delivery, discovery and control, audit
publishing); the node is the bus's handler (:class:`~sandbus.bus.handler.BusHandler`) and decides
only what involves the sandbox: where a call runs, and how many of a plugin's calls may wait. The
request path reads top to bottom in three files:

    bus/requests.py           Requests.on_request: the function token and the JSON body checked
      -> host/node/node.py    Node.request_now: run inline when the plugin may (the common case), or
                              Node.serve (a task): Node.call -> Node._call: the plugin's gate, then
                              one of the plugin's own worker threads
      -> host/lifecycle/manager.py  PluginManager.execute_detailed -> the sandbox's instance pool -> wasm
    and the reply goes back through bus/requests.py, published with its own headers.

Where a call runs (measured in bench/bench_bus.py): a hand-off to a worker thread costs more than
the wasm call itself (a ~15 us echo becomes ~300 us of hand-off and GIL ping-pong), so a call runs
*inline* on the event loop under a short budget (``inline_budget_s``, default 20 ms), which nearly
every call finishes well inside. The budget is wall-clock, and a thread returning from wasm may wait
for the GIL up to the switch interval (lowered to 1 ms by the node), so the budget sits well above
it. A call that overruns it is interrupted (its instance is discarded, nothing was returned), runs
again from the start in a worker thread under the plugin's full limits, and the plugin stays on
threads for ``demote_s``. Re-running is only correct for a call that can have had no side effect,
so a plugin with a writable directory or a host function that acts on the bus or the network never
runs inline (one rule, :func:`sandbus.host.sandbox.sandbox.rerun_safe`, enforced by the sandbox).
An inline call only takes an idle instance (``wait=False``): building one runs guest code under the
plugin's full timeout, so when none is idle the call goes to a worker thread, which builds it. The
loop is therefore never held longer than the budget (plus one epoch tick), whatever a plugin does.

Overload is answered, never silent. A call that cannot run inline waits for one of the plugin's
instances on the loop, in a queue of at most ``max_waiting`` calls per plugin (beyond it: an
``InstanceLimitError`` at once; durable deliveries just wait their turn, JetStream redelivers them).
Each plugin has its own worker threads, as many as its instances, so a call that got its turn
starts at once, never behind another plugin's calls running to their timeouts. Its deadline is its
arrival plus the plugin's timeout: waiting ends there with an ``InstanceLimitError``, the call
itself with an ``ExecutionTimeoutError``, so every request is answered within its plugin's timeout
plus a margin, and no work goes on for a caller that has stopped waiting.

Tracing follows the same split. A request served inline is traced by host/telemetry/fast_spans.py
(its ``process`` and ``execute`` spans are one tuple, exported in batches off the request path);
everything else (threaded calls, whose host functions need the current span; messages; durable
deliveries; ``sandbus trace``) is traced through the OpenTelemetry SDK.

A plugin still loading in the background (a slow first compile: ``PluginManager.discover_and_load``) is
not served: the node subscribes to nothing of it until it is in service, so in a cluster the nodes that
serve it take all its requests and durable deliveries (its durable consumer, kept on the server across
restarts, holds them meanwhile: nothing is dead-lettered for it), and where no node serves it a request
gets ``plugin.not_found`` ("no node serves") at once; ``list`` and ``stats`` show it ``loading``. It
joins (its subscriptions made) when its ``lifecycle.load`` event fires.

What plugins log is captured by host/node/logbus.py (published on ``sandbus.log.<node>.<plugin>``, kept in
a ring per plugin), and ``debug`` (host/node/debugstate.py) gathers one plugin's whole state for an operator.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.trace import SpanContext

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.handler import Reply, Served
from sandbus.bus.plugin_bus import PluginBus, default_node_id
from sandbus.bus.requests import check_json, internal_error
from sandbus.host.lifecycle import PluginInfo, PluginManager
from sandbus.host.lifecycle.policy import Policy
from sandbus.host.node import logbus
from sandbus.host.node.debugstate import AuditRing, debug_state
from sandbus.host.node.hostfuncs import BusBridge, note_incoming_hops
from sandbus.host.node.logbus import DEFAULT_LOG_RATE, PluginLogs
from sandbus.host.sandbox import AuditEvent, AuditLevel, BudgetExceeded, CallResult
from sandbus.host.sandbox.pool import NotInline
from sandbus.host.telemetry.fast_spans import FastSpans, RequestTrace
from sandbus.host.telemetry.otel import Telemetry
from sandbus.sdk.envelope import CONTENT_TYPE, H_MSG_ID, OCTET_STREAM, error_reply, header_value
from sandbus.sdk.errors import (
    InstanceLimitError,
    InvalidJsonError,
    PluginLoadingError,
    PluginNotFoundError,
    RequestError,
    SandbusError,
)
from sandbus.sdk.subjects import plugin_queue
from sandbus.sdk.tracing import H_TRACE_DEBUG, H_TRACE_SPANS, extract

__all__ = ["Node", "default_node_id"]

log = logging.getLogger("sandbus.node")

MESSAGE_FUNCTION = "handle_message"
DEFAULT_FUNCTION = "handle_request"
#: Calls per plugin that may wait for an instance on a node (see :class:`Node`).
DEFAULT_MAX_WAITING = 64
#: Audit events a node keeps from before it started (plugins loaded before it connects), to publish then.
EARLY_AUDIT_EVENTS = 1024
#: the per-plugin counters ``stats`` adds to ``list`` (bus/control.py documents them)
_COUNTERS = ("executions", "errors", "host_errors", "rejected", "p50_ms", "p99_ms", "fuel_used", "last_fuel_used",
             "memory_bytes", "instances", "in_flight", "max_open_files")


def _bounded(details: dict[str, Any]) -> dict[str, Any]:
    """An error's details fit for an audit event: plain values only, strings cut to 256 characters."""
    return {k: v[:256] if isinstance(v, str) else v for k, v in details.items()
            if isinstance(v, str | int | float | bool) or v is None}


def set_trace_headers(headers: dict[str, str], context: SpanContext) -> None:
    """Write ``context`` as a reply's ``traceparent`` (and ``tracestate`` when it has one)."""
    headers["traceparent"] = f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
    state = context.trace_state.to_header() if context.trace_state else ""
    if state:
        headers["tracestate"] = state
    else:
        headers.pop("tracestate", None)


class _Lane:
    """How one plugin's calls are run on this node (looked up once per request)."""

    __slots__ = ("executor", "gate", "inline_from", "limit", "max_waiting", "threaded", "timeout_s", "waiting")

    def __init__(self, name: str, concurrency: int, timeout_s: float, max_waiting: int,
                 initializer: Callable[[], None] | None = None) -> None:
        # As many calls at once as the plugin has instances: the rest wait here, on the loop,
        # instead of in threads that would time out on the instance pool.
        self.gate = asyncio.Semaphore(concurrency)
        self.limit = concurrency
        # The plugin's own worker threads (created on demand, so a plugin that runs inline costs none).
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"sandbus-{name}",
                                           initializer=initializer)
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
    """Serves a :class:`PluginManager`'s plugins on a :class:`~sandbus.bus.PluginBus`.

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
        bus_logs: publish plugins' log lines on ``sandbus.log.<node>.<plugin>`` (False: they are only
            kept in the node's rings for ``debug``, and logged as before). Either way the node lowers
            the ``sandbus.plugin`` logger (when it has no level of its own) to capture the guests'
            debug lines: a program that prints its log should give its handlers a level
            (:func:`sandbus.host.node.logbus.keep_handler_levels`).
        log_rate: log lines per second and plugin published; the excess is dropped and counted.

    Its :attr:`bus` is the :class:`~sandbus.bus.PluginBus` it handles; plugins reach it through the host
    functions of :meth:`create` (publish, request, kv).
    """

    def __init__(self, manager: PluginManager, options: ConnectOptions, *, node_id: str | None = None,
                 durable: bool = True, threads: int | None = None, version: str = "0.1.0",
                 inline_budget_s: float | None = 0.02, demote_s: float = 30.0,
                 telemetry: Telemetry | None = None, max_waiting: int = DEFAULT_MAX_WAITING,
                 bus_logs: bool = True, log_rate: float = DEFAULT_LOG_RATE) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be 0 or more, found {max_waiting}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be 1 or more, found {threads}")
        self.manager = manager
        self.options = options
        self.node_id = node_id or default_node_id()
        self.version = version
        self.threads = threads
        self.inline_budget_s = inline_budget_s
        self.demote_s = demote_s
        self.max_waiting = max_waiting
        self.telemetry = telemetry or Telemetry("sandbus-node", self.node_id)
        self.bus = PluginBus(self, options, node_id=self.node_id, durable=durable, version=version,
                             tracing=self.telemetry.enabled)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._lanes: dict[str, _Lane] = {}
        #: The plugins the bus was last told take bytes: it passes their bodies on unchecked.
        self._told_bytes: frozenset[str] = frozenset()
        self._versions: dict[str, str] = {}
        self._debug_telemetry: Telemetry | None = None
        #: plugins still loaded whose requests this node no longer takes (:meth:`withdraw`)
        self._withdrawn: set[str] = set()
        #: what plugins log: rings for ``debug``, published on the bus unless ``bus_logs`` is off
        self.logs = PluginLogs(self.node_id, version_of=self._versions.get, trace_id=self._trace_id,
                               owns=self.manager.__contains__, publish=bus_logs, rate=log_rate,
                               audit=self._audit_drops)
        #: each plugin's latest audit events, for ``debug`` (filled on the loop)
        self.recent_audit = AuditRing()
        #: audit events raised before the node has a loop (plugins loaded before it connects): told once it
        #: starts, so that a plugin's ``lifecycle.load`` reaches the audit trail like a later reload's
        self._early_audit: deque[AuditEvent] = deque(maxlen=EARLY_AUDIT_EVENTS)
        self._early_audit_lost = 0
        # Captured from now on: what plugins log while they load, before the node connects, is kept too.
        logbus.attach(self.logs)
        manager.auditor.add_sink(self._on_audit)
        manager.auditor.add_sink(self.telemetry.on_audit)
        self.telemetry.observe(self._gauges)

    @classmethod
    def create(cls, plugins: str | Path, options: ConnectOptions, *, policy: Policy | None = None,
               **kwargs: Any) -> Node:
        """A manager for ``plugins`` whose plugins reach the bus through this node, and the node."""
        bridge = BusBridge()
        manager = PluginManager(plugins, policy=policy, host_functions=bridge.host_functions())
        node = cls(manager, options, **kwargs)
        bridge.attach(node.bus, manager.grant)
        return node

    @property
    def nc(self) -> Client | None:
        """The bus's NATS connection (None before :meth:`start`)."""
        return self.bus.nc

    async def start(self) -> None:
        """Serve: returns once the server has the subscriptions (a request sent now is routed here)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # Worker threads and the span exporter hand the GIL back sooner: an inline call returning
        # from wasm then waits at most ~1 ms for it (see the module docstring).
        sys.setswitchinterval(0.001)
        logbus.attach(self.logs)
        logbus.claim_thread(self.logs)
        try:
            await self.bus.start()
        except BaseException:
            logbus.detach(self.logs)
            raise
        self.logs.start(self._publish_log)
        self.bus.on_close.append(self.logs.close)
        self._tell_early_audit()

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful: the bus drains and answers every message it accepted (see PluginBus.stop), then the
        plugins' threads end."""
        await self.bus.stop(timeout)
        await self.logs.close()  # when the bus never started
        for lane in self._lanes.values():
            lane.executor.shutdown(wait=True, cancel_futures=False)
        logbus.detach(self.logs)
        self.telemetry.shutdown()

    # -- plugin logs -------------------------------------------------------------------------------

    async def _publish_log(self, subject: str, data: bytes, headers: dict[str, str]) -> None:
        nc = self.bus.nc
        if nc is None or not nc.is_connected:
            raise ConnectionError("not connected")
        await nc.publish(subject, data, headers=headers)

    def _trace_id(self) -> str | None:
        """The trace of the call logging on this thread: the fast path's inline request, else the current
        OpenTelemetry span (threaded calls, messages), else None."""
        fast = self.telemetry.fast
        if fast is not None:
            rt = fast.current
            if rt is not None and fast.current_thread == threading.get_ident():
                return rt.trace_id
        context = trace.get_current_span().get_span_context()
        return format(context.trace_id, "032x") if context.is_valid else None

    def _audit_drops(self, plugin: str, dropped: int) -> None:
        self.manager.auditor.emit(AuditLevel.WARNING, "log.dropped", plugin,
                                  f"{dropped} log line(s) were not published: over the {self.logs.rate:g} "
                                  "lines/s cap or the node's log queue was full", dropped=dropped,
                                  rate=self.logs.rate)

    def _claim_thread(self) -> None:
        logbus.claim_thread(self.logs)

    def debug_state(self, plugin: str) -> dict[str, Any]:
        """Everything the node knows of ``plugin``, for an operator (bus/control.py documents each key).
        Thread-safe: control requests call it from their threads.

        Raises:
            PluginNotFoundError: the node knows no plugin of that name.
        """
        return debug_state(self, plugin)

    def _tell_early_audit(self) -> None:
        """Publish the audit events raised before the node started (on the loop, once it has one)."""
        while self._early_audit:
            self._audit_on_loop(self._early_audit.popleft())
        if self._early_audit_lost:
            log.warning("%d audit event(s) raised before the node connected were not kept (at most %d are)",
                        self._early_audit_lost, EARLY_AUDIT_EVENTS)
            self._early_audit_lost = 0

    def _on_audit(self, event: AuditEvent) -> None:
        # Also while stopping: the calls being drained are still audited (published until disconnected).
        loop = self._loop
        if loop is None:
            if len(self._early_audit) == EARLY_AUDIT_EVENTS:
                self._early_audit_lost += 1
            self._early_audit.append(event)  # deque.append: safe from any thread
            return
        if loop.is_closed():
            return
        # Called from whatever thread raised the event: hop onto the loop.
        loop.call_soon_threadsafe(self._audit_on_loop, event)

    def _audit_on_loop(self, event: AuditEvent) -> None:
        if event.kind.startswith("lifecycle."):
            if event.kind in ("lifecycle.load", "lifecycle.reload", "lifecycle.unload") and event.plugin:
                self._withdrawn.discard(event.plugin)
            self.bus.sync_soon()
        if event.plugin:
            self.recent_audit.add(event)
        self.bus.publish_audit(event)

    # -- the bus's handler (sandbus.bus.handler.BusHandler) -----------------------------------------

    def serving(self) -> Sequence[Served]:
        """The plugins the manager serves, each with its lane set for its serving version."""
        plugins = self.manager.list_plugins()
        self._forget_gone({info.name for info in plugins} | set(self.manager.loading()))
        served = []
        for info in plugins:
            if not info.status.serving or info.name in self._withdrawn:
                continue
            name = info.name
            lane = self._set_lane(name)
            manifest = self.manager.manifest(name)
            subscriptions = manifest.subscriptions
            body = self.manager.body(name)
            served.append(Served(name, tuple(subscriptions.topics), subscriptions.durable,
                                 self._message_function(name), lane.timeout_s,
                                 self.manager.limits(name).max_instances, body,
                                 CONTENT_TYPE if body == "json" else manifest.plugin.content_type or OCTET_STREAM))
        self._told_bytes = frozenset(s.name for s in served if s.body == "bytes")
        return served

    def _forget_gone(self, known: set[str]) -> None:
        """Drop what the node keeps per plugin for plugins the manager no longer knows (unloaded): the lane
        and its threads (which end once the lane is garbage; a call already on it keeps it), the version,
        the log ring and rate bucket, the audit ring. Without this, loading and unloading plugins of ever
        new names would grow the node without bound. Loop thread only (the bus syncs on the loop)."""
        for name in [n for n in self._lanes if n not in known]:
            del self._lanes[name]
        for name in [n for n in self._versions if n not in known]:
            del self._versions[name]
        self.logs.retain(known)
        self.recent_audit.retain(known)

    def request_now(self, plugin: str, function: str, msg: Msg, reply_headers: dict[str, str]) -> bytes | None:
        """The reply of a request run inline now, or None: :meth:`serve` runs it in a task.

        When the call is traced, ``reply_headers`` gets its ``process`` span's ``traceparent``.
        """
        headers = msg.headers
        tel = self.telemetry
        if tel.enabled or (headers and H_TRACE_DEBUG in headers):
            fast = tel.fast
            if fast is None or (headers and H_TRACE_DEBUG in headers):
                return None  # traced through the SDK, in a task
            rt = fast.begin(headers)
            if rt is not None:
                return self._inline_traced(plugin, function, msg, fast, rt, reply_headers)
            result = self.try_inline(plugin, function, msg.data)
            if result is None:
                return None
            fast.latency(plugin, result.duration_s)  # not sampled: no spans, but the histogram counts it
            return result.reply
        result = self.try_inline(plugin, function, msg.data)
        return None if result is None else result.reply

    def _inline_traced(self, plugin: str, function: str, msg: Msg, fast: FastSpans, rt: RequestTrace,
                       reply_headers: dict[str, str]) -> bytes | None:
        """A sampled request, inline, with its spans recorded by :class:`FastSpans` (not the SDK)."""
        fast.current, fast.current_thread = rt, self._loop_thread
        exec_start = time.time_ns()
        error: SandbusError | None = None
        result: CallResult | None = None
        try:
            result = self.try_inline(plugin, function, msg.data)
        except SandbusError as e:
            error = e
        except Exception as e:  # a bug of ours must still answer
            log.exception("request %s failed", msg.subject)
            error = internal_error(e, plugin)
        finally:
            fast.current = None
        exec_end = time.time_ns()
        if result is None and error is None:
            return None  # not inline after all: the SDK traces it in serve()
        headers = msg.headers
        fast.finish(rt, msg.subject, plugin_queue(plugin), headers.get(H_MSG_ID) if headers else None, len(msg.data),
                    plugin, self._versions.get(plugin, ""), function, exec_start, exec_end,
                    None if result is None else (result.fuel_used, result.memory_bytes, result.duration_s),
                    None if error is None else (str(error.code or type(error).__name__), str(error)))
        reply_headers["traceparent"] = rt.traceparent()
        if rt.trace_state:
            reply_headers["tracestate"] = rt.trace_state
        if error is not None:
            raise error
        assert result is not None
        return result.reply

    async def serve(self, plugin: str, function: str, payload: bytes, msg: Msg, *, arrival: float | None,
                    delivery: int | None = None, reply_headers: dict[str, str] | None = None) -> Reply:
        if delivery is None and msg.headers and msg.headers.get(H_TRACE_DEBUG):
            return await self._serve_traced_debug(plugin, function, payload, msg, arrival, reply_headers)
        result = await self.call(plugin, function, payload, msg=msg, delivery=delivery, arrival=arrival,
                                 reply_headers=reply_headers)
        return result.reply, None

    def deliver_now(self, plugin: str, function: str, envelope: bytes, msg: Msg, delivery: int) -> bool:
        """A durable delivery run inline now (True), or False: :meth:`serve` runs it instead.

        The bus calls this for a plugin that runs inline, when its turn on the loop is not due
        (``DurableTopics._deliver_inline``): the same call as :meth:`serve` would make on the loop
        (:meth:`try_inline`: the re-check of a body the bus took unchecked, the log mark, demotion to
        threads on a budget overrun), without its coroutines. With tracing on, False: the spans of a
        delivery are made through the OpenTelemetry SDK in :meth:`call`. False too when the call cannot
        run inline now (no idle instance, threads busy, the budget overrun just now); nothing ran then.
        """
        if self.telemetry.enabled:
            return False
        # As call() does for every served message: the hops of the message this call serves.
        note_incoming_hops(msg.headers)
        return self.try_inline(plugin, function, envelope) is not None

    async def withdraw(self, plugin: str) -> None:
        """Stop taking ``plugin``'s requests and messages on this node while it stays loaded: its
        subscriptions are drained (what the server had already routed here is answered), so unloading it
        afterwards fails no request. Its next load, reload or unload ends the withdrawal."""
        self._withdrawn.add(plugin)
        await self.bus.sync()

    def refused(self, plugin: str, err: RequestError, subject: str) -> None:
        self.manager.note_rejected(plugin)
        self.manager.auditor.emit(AuditLevel.WARNING, "request.refused", plugin, err.message, code=err.code,
                                  subject=header_value(subject, 256), **_bounded(err.details))

    def runs_inline(self, plugin: str) -> bool:
        """Whether the plugin's calls run on the event loop now (not demoted to threads)."""
        lane = self._lanes.get(plugin)
        return lane is not None and self._loop is not None and lane.inline_now(self._loop)

    def control(self, verb: str, plugin: str, force: bool) -> Any:
        if verb == "load":
            return self.manager.load(plugin).model_dump(mode="json")
        if verb == "reload":
            return self.manager.reload(plugin).model_dump(mode="json")
        if verb == "unload":
            self.manager.unload(plugin, force=force)
            return {"unloaded": plugin}
        if verb == "debug":
            return self.debug_state(plugin)
        raise ValueError(f"unknown control verb {verb!r}")

    def describe(self, stats: bool) -> dict[str, Any]:
        """The node's part of ``list`` and ``stats`` (bus/control.py documents every key)."""
        plugins = self.manager.list_plugins()
        if not stats:
            return {"plugins": [self._listed(p) for p in plugins]}
        return {
            "inline_budget_ms": None if self.inline_budget_s is None else self.inline_budget_s * 1e3,
            # How requests served inline are traced: "fast" (host/telemetry/fast_spans.py), "sdk", or "off".
            "request_spans": "off" if not self.telemetry.enabled else ("fast" if self.telemetry.fast else "sdk"),
            # Spans the fast path could not hand to its exporter (queue full, exporter down): 0 means every
            # traced request reached the exporter process.
            "spans_dropped": self.telemetry.fast.dropped if self.telemetry.fast else 0,
            "plugins": [{**self._listed(p), **{k: getattr(p, k) for k in _COUNTERS},
                         "queue_depth": self.queue_depth(p.name)}
                        for p in plugins],
        }

    def _listed(self, info: PluginInfo) -> dict[str, Any]:
        """One plugin in ``list``: what it is, what it serves and why not (its latest failure), no counters."""
        topics: tuple[str, ...] = ()
        durable = False
        isolation: str | None = None
        kind: str | None = None
        content_type: str | None = None
        if info.status.serving:
            try:
                manifest = self.manager.manifest(info.name)
                subscriptions = manifest.subscriptions
                topics, durable = tuple(subscriptions.topics), subscriptions.durable
                isolation = self.manager.limits(info.name).isolation
                kind = self.manager.kind(info.name)
                content_type = (CONTENT_TYPE if self.manager.body(info.name) == "json"
                                else manifest.plugin.content_type or OCTET_STREAM)
            except SandbusError:  # unloaded meanwhile
                pass
        return {"name": info.name, "version": info.version, "status": info.status.value,
                "description": info.description, "sha256": info.sha256, "functions": list(info.functions),
                "topics": list(topics), "durable": durable, "isolation": isolation, "kind": kind,
                "content_type": content_type,
                "last_loaded": None if info.last_loaded is None else info.last_loaded.isoformat(),
                "reloads": info.reloads, "last_error": info.last_error, "last_error_code": info.last_error_code,
                "last_error_at": None if info.last_error_at is None else info.last_error_at.isoformat()}

    def audit(self, level: AuditLevel, kind: str, plugin: str, message: str, **details: Any) -> None:
        # Through the manager's auditor: logged, traced, and back to the bus's publisher like every event.
        self.manager.auditor.emit(level, kind, plugin, message, **details)

    # -- calls -------------------------------------------------------------------------------------

    def _message_function(self, plugin: str) -> str:
        """Plugins handle messages in ``handle_message`` when they export it, else ``handle_request``;
        an Extism plugin always in ``handle_message`` (its ``handle_request``, if any, takes the
        request's bytes, not an envelope: without ``handle_message`` a message is refused as an
        unknown function, and a plugin with topics but none does not load)."""
        if MESSAGE_FUNCTION in self.manager.module_info(plugin).functions or self.manager.body(plugin) == "bytes":
            return MESSAGE_FUNCTION
        return DEFAULT_FUNCTION

    def _set_lane(self, name: str) -> _Lane:
        """The lane for the serving version of ``name`` (kept when nothing it depends on changed)."""
        limits = self.manager.limits(name)
        inline = self.inline_budget_s is not None and self.manager.rerun_safe(name)
        self._versions[name] = self.manager.manifest(name).plugin.version
        concurrency = limits.max_instances if self.threads is None else min(limits.max_instances, self.threads)
        lane = self._lanes.get(name)
        if (lane is None or lane.limit != concurrency or lane.timeout_s != limits.timeout_s
                or lane.max_waiting != self.max_waiting):
            # The old lane is dropped, not shut down: calls waiting at its gate still run on its
            # threads (on the new version), which end once it is garbage.
            lane = self._lanes[name] = _Lane(name, concurrency, limits.timeout_s, self.max_waiting,
                                             self._claim_thread)
        if not inline:
            lane.inline_from = None  # the sandbox refuses anyway: skip the attempt
        elif lane.inline_from is None:
            lane.inline_from = 0.0
        return lane

    def try_inline(self, plugin: str, function: str, payload: bytes) -> CallResult | None:
        """Run the call on the loop under the inline budget; None when it must go to a thread instead."""
        lane = self._lanes.get(plugin)
        if lane is None:
            if plugin in self.manager.loading():
                raise PluginLoadingError(f"plugin {plugin!r} is still loading on node {self.node_id}; try again "
                                         "shortly", plugin=plugin)
            raise PluginNotFoundError(f"no plugin {plugin!r} is served by node {self.node_id}", plugin=plugin)
        if plugin in self._told_bytes and self.manager.body(plugin) == "json":
            # A reload made a bytes plugin a JSON one since the bus last synced: the bus took this body
            # unchecked, and a JSON plugin is promised valid JSON. Checked here, before either path runs.
            try:
                check_json(payload, plugin)
            except InvalidJsonError as e:
                self.refused(plugin, e, f"sandbus.req.{plugin}.{function}")
                raise
        assert self._loop is not None
        # Threads holding every instance: waiting for one here would block the loop.
        if lane.threaded >= lane.limit or not lane.inline_now(self._loop):
            return None
        mark = self.logs.last_seq
        try:
            # wait=False: an idle instance or NotInline, never a build or a wait on the loop.
            return self.manager.execute_detailed(plugin, function, payload, budget_s=self.inline_budget_s,
                                                 wait=False)
        except NotInline:
            return None
        except BudgetExceeded:
            # It runs again from the start, and logs again: what this attempt logged is taken back.
            self.logs.discard_since(plugin, mark)
            lane.inline_from = self._loop.time() + self.demote_s
            log.info("%s.%s overran the %g s inline budget: it runs again in a thread, and %s stays on threads "
                     "for %g s", plugin, function, self.inline_budget_s, plugin, self.demote_s)
            return None

    async def call(self, plugin: str, function: str, payload: bytes, *, msg: Msg | None = None,
                   delivery: int | None = None, telemetry: Telemetry | None = None,
                   arrival: float | None = None, reply_headers: dict[str, str] | None = None) -> CallResult:
        """Run one call: inline when it may, else in a worker thread under the plugin's concurrency gate.

        ``arrival`` (a ``time.monotonic()`` value): when the call's caller started waiting; the call
        then waits in a bounded queue and ends by ``arrival`` plus the plugin's timeout (see the
        module docstring). Without it (durable deliveries, which JetStream redelivers) it waits
        for its turn, unbounded here.

        With tracing on and the NATS message given, the call is a ``process`` span (parented by the
        sender's trace context) around an ``execute`` span; a recorded ``process`` span's context goes
        into ``reply_headers`` (``traceparent``/``tracestate``), so the caller gets its trace back.
        """
        # Plugin -> plugin requests count their hops: the request host function reads this (the
        # worker thread runs in a copy of this task's context). Set on every call: nothing carries over.
        note_incoming_hops(msg.headers if msg is not None else None)
        tel = telemetry or self.telemetry
        if msg is None or not tel.enabled:
            return await self._call(plugin, function, payload, arrival)
        headers = msg.headers or {}
        with tel.process_span(msg.subject, headers, group=plugin_queue(plugin), message_id=headers.get(H_MSG_ID),
                              body_size=len(msg.data), delivery=delivery) as process, \
                tel.execute_span(plugin, self._versions.get(plugin), function) as span:
            if reply_headers is not None and process.is_recording():
                set_trace_headers(reply_headers, process.get_span_context())
            try:
                result = await self._call(plugin, function, payload, arrival)
            except BaseException as e:
                tel.finish_call(span, plugin, None, e)
                raise
            tel.finish_call(span, plugin, result, None)
            return result

    async def _call(self, plugin: str, function: str, payload: bytes, arrival: float | None) -> CallResult:
        turns = self.bus.turns
        if turns.due() and self.runs_inline(plugin):
            await turns.wait(plugin)
        turns.begin()
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

    async def _serve_traced_debug(self, plugin: str, function: str, payload: bytes, msg: Msg,
                                  arrival: float | None, reply_headers: dict[str, str] | None) -> Reply:
        """``sandbus trace``: trace this call whatever the sampling, and return our spans in a header."""
        if not self.telemetry.enabled and self._debug_telemetry is None:
            self._debug_telemetry = Telemetry("sandbus-node", self.node_id, enabled=True, export=False,
                                              set_global=False)
        tel = self.telemetry if self.telemetry.enabled else self._debug_telemetry
        assert tel is not None
        parent = trace.get_current_span(extract(msg.headers)).get_span_context()
        tel.collector.watch(parent.trace_id)
        headers: dict[str, str] | None
        try:
            data = (await self.call(plugin, function, payload, msg=msg, telemetry=tel, arrival=arrival,
                                    reply_headers=reply_headers)).reply
            headers = {}
        except SandbusError as e:
            data, headers = error_reply(e)
        except Exception as e:  # a bug of ours must still answer
            log.exception("request %s failed", msg.subject)
            data, headers = error_reply(internal_error(e, plugin))
        headers[H_TRACE_SPANS] = orjson.dumps(tel.collector.take(parent.trace_id)).decode()
        return data, headers

    # -- stats -------------------------------------------------------------------------------------

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
