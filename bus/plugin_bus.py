"""The PluginBus: plugins served over NATS subjects, whatever runs them.

A :class:`PluginBus` owns one NATS connection and everything said on it for the plugins its handler
serves (sandbus.sdk.subjects has the scheme):

* subscriptions: ``sandbus.req.<plugin>.*`` (requests) and ``sandbus.msg.<plugin>`` (direct
  messages) in the queue group ``sandbus.<plugin>``, so every node serving a plugin shares its
  load; each core topic pattern in the same queue group, so each subscribing plugin gets one copy;
* durable topics (bus/delivery.py): one JetStream consumer per subscribing plugin, ack after the
  handler returns, nak with backoff, dead letters after ``max_deliver``;
* discovery and control (bus/control.py): the node's NATS micro service;
* audit events (bus/audit.py): published on ``sandbus.audit.<node>``, repeats folded;
* what plugins send through it (:meth:`publish`, :meth:`request`, :meth:`kv`), each measured
  against the server's max payload first.

It knows no wasm: it calls a :class:`~sandbus.bus.handler.BusHandler` (bus/handler.py), which a host
node implements (host/node/node.py). The request path continues in bus/requests.py.

Stopping drains: the subscriptions are drained (the server stops routing here, and every message
it had already sent is handled), then the calls in flight finish and their replies are flushed, so
a request the bus accepted is answered whichever moment the signal came (waiting for a call up to
the longest plugin timeout served). Conversely :meth:`start` returns, and :meth:`sync` returns, only
once the server has the new subscriptions: a request sent then is routed, not "no responders".

A node id names one node: :meth:`start` refuses (:class:`~sandbus.sdk.errors.NodeIdInUseError`),
before subscribing to anything, when a node with the same id already answers its ``list``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.kv import KeyValue
from opentelemetry.context import Context

from sandbus.bus.audit import AuditPublisher, fold_refusal_logs
from sandbus.bus.connection import ConnectOptions, connect, shown_servers
from sandbus.bus.control import Control
from sandbus.bus.delivery import MAX_DELIVER, DurableTopics
from sandbus.bus.handler import BusHandler, Served
from sandbus.bus.requests import Requests
from sandbus.bus.turns import LoopTurns
from sandbus.bus.wire import check_fits, drain_all, nats_size
from sandbus.sdk.audit import AuditEvent
from sandbus.sdk.envelope import (
    ENVELOPE,
    H_FROM,
    H_HOPS,
    H_MSG_ID,
    JSON,
    encode_message,
    error_from_reply,
    error_reply,
    header_value,
    new_message_id,
)
from sandbus.sdk.errors import (
    BusError,
    NodeIdInUseError,
    PayloadTooLargeError,
    PluginNotFoundError,
    RequestTimeoutError,
    SandbusError,
)
from sandbus.sdk.nats_guard import GuardedNatsClient
from sandbus.sdk.subjects import (
    MSG_PREFIX,
    REQ_PREFIX,
    audit_subject,
    check_token,
    control_subject,
    plugin_queue,
    request_subject,
    topic_subject,
)
from sandbus.sdk.tracing import record_error, send_span

__all__ = ["PluginBus", "RequestOutcome", "default_node_id"]

#: first pause before setting the durable streams up again when JetStream did not answer at start (doubling)
DURABLE_RETRY_S = 2.0
DURABLE_RETRY_MAX_S = 30.0

log = logging.getLogger("sandbus.bus")

#: how long :meth:`PluginBus.start` waits for another node with the same id to answer its ``list``
#: (a server with no such node answers "no responders" at once)
NODE_ID_PROBE_S = 1.0
#: NATS's default max payload, assumed until a server says otherwise
DEFAULT_MAX_PAYLOAD = 1024 * 1024


def default_node_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{os.getpid()}".replace(".", "-")


@dataclass(frozen=True, slots=True)
class RequestOutcome:
    """What a :meth:`PluginBus.request` came to, when it came to something a caller must handle.

    ``error`` None: ``reply`` is the target's reply. Else ``reply`` is the error as JSON, and
    ``answered`` says whether a node answered it (the target's call failed) or nobody did (no node
    serves the target: :class:`PluginNotFoundError`; no reply in time: :class:`RequestTimeoutError`).
    """

    reply: bytes
    error: SandbusError | None = None
    answered: bool = True


class PluginBus:
    """Serves a handler's plugins over NATS.

    Parameters:
        handler: what runs the calls (a node; see :class:`~sandbus.bus.handler.BusHandler`).
        options: how to reach NATS.
        node_id: this bus's name in discovery, control and audit subjects (one subject token).
        durable: deliver durable topics through JetStream (at least once) when the server has it.
        version: reported by the micro service (semver).
        tracing: wrap what plugins send (:meth:`publish`, :meth:`request`) in ``send`` spans.
        max_deliver: deliveries of a durable message before it is dead-lettered.
    """

    def __init__(self, handler: BusHandler, options: ConnectOptions, *, node_id: str | None = None,
                 durable: bool = True, version: str = "0.1.0", tracing: bool = False,
                 max_deliver: int = MAX_DELIVER) -> None:
        if max_deliver < 1:
            raise ValueError(f"max_deliver must be 1 or more, found {max_deliver}")
        self.handler = handler
        self.options = options
        self.node_id = check_token(node_id or default_node_id(), "node id")
        self.durable = durable
        self.version = version
        self.tracing = tracing
        self.max_deliver = max_deliver
        self.nc: Client | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        #: turns on the event loop for inline calls, shared by every path that runs them (bus/turns.py)
        self.turns = LoopTurns()
        #: handle requests that run inline, and durable pull deliveries, in the connection's read loop
        #: (False: every message goes through its subscription's queue and task, as nats-py hands them over)
        self.direct_dispatch = True
        self._requests = Requests(self, handler)
        self._control = Control(self, handler)
        self._subs: dict[str, list[Subscription]] = {}
        #: per plugin: what it was subscribed with (topics, durable), and what it is served as now
        self._keys: dict[str, tuple[tuple[str, ...], bool]] = {}
        self._served: dict[str, Served] = {}
        self._longest_timeout_s = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._durable: DurableTopics | None = None
        self._durable_retry: asyncio.Future[None] | None = None
        self._audit_out: AuditPublisher | None = None
        self._kv: dict[str, KeyValue] = {}
        self._sync_lock = asyncio.Lock()
        self._stopping = False
        #: awaited on stop once every call has finished, before the connection closes (what the handler
        #: still has to publish: plugin log lines)
        self.on_close: list[Callable[[], Awaitable[None]]] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def durable_topics(self) -> bool:
        """Whether durable topics go through JetStream now (False: core NATS, at most once)."""
        return self._durable is not None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def start(self) -> None:
        """Connect, set up the streams and the micro service, and subscribe for what the handler serves.

        Raises:
            NodeIdInUseError: another node already answers under this node id (nothing was subscribed,
                and the connection is closed).
        """
        self.loop = asyncio.get_running_loop()
        self.nc = nc = await connect(self.options, on_reconnect=self._on_reconnect)
        try:
            await self._check_node_id(nc)
        except NodeIdInUseError:
            with contextlib.suppress(Exception):
                await nc.close()
            self.nc = None
            raise
        # Repeats of one audit event within a second are published once, with a count (and logged once).
        fold_refusal_logs()
        self._audit_out = AuditPublisher(nc.publish, audit_subject(self.node_id), connected=lambda: nc.is_connected)
        if self.durable:
            durable = DurableTopics(nc, self, self.handler, max_deliver=self.max_deliver)
            if await durable.setup():
                self._durable = durable
            else:
                log.warning("JetStream is not available: topics are delivered at most once (core NATS) until it is")
                self._durable_retry = asyncio.ensure_future(self._retry_durable())
        await self._control.start()
        await self.sync()
        # Subscribing only queues SUB lines: return once the server has them, so a request sent
        # now is routed here instead of answered "no responders".
        await nc.flush()
        log.info("node %s serving %d plugin(s) on %s", self.node_id, len(self._subs),
                 shown_servers(self.options.servers))

    @property
    def max_payload(self) -> int:
        """The connected server's max payload, headers included (1 MiB before connecting).

        Read from the connection each time: nats-py takes it from the INFO of each server it
        (re)connects to, and a reconnect may reach a server with a smaller one; a value cached at
        start would let a reply through that the new server answers by closing the connection.
        """
        nc = self.nc
        value = nc.max_payload if nc is not None else DEFAULT_MAX_PAYLOAD
        return value if isinstance(value, int) and value > 0 else DEFAULT_MAX_PAYLOAD

    async def _check_node_id(self, nc: Client) -> None:
        """Refuse to be a second node under one id: its control subjects and audit subject would be
        shared, and ``list``/``load`` would reach either node at random."""
        subject = control_subject(self.node_id, "list")
        try:
            answer = await nc.request(subject, b"", timeout=NODE_ID_PROBE_S)
        except nats.errors.NoRespondersError:
            return
        except nats.errors.TimeoutError:  # nobody answered in time: a server without no-responders
            return
        # Whatever answered may be hostile: its version is quoted only as a short printable string.
        try:
            version = orjson.loads(answer.data).get("version")
        except (orjson.JSONDecodeError, AttributeError):
            version = None
        other = header_value(version, 40) if isinstance(version, str) else "?"
        raise NodeIdInUseError(f"another node already answers as node id {self.node_id!r} (version {other}) on "
                               f"{shown_servers(self.options.servers)}: choose another --node-id", node_id=self.node_id)

    async def _retry_durable(self) -> None:
        """Set the streams up again, with a growing pause, until JetStream answers (a server started without
        it, or a cluster still electing its leader when this node started); then the plugins' topics move to
        durable consumers (:meth:`sync`)."""
        pause = DURABLE_RETRY_S
        while not self._stopping:
            await asyncio.sleep(pause)  # a retry's pause, not a wait for a condition
            pause = min(pause * 2, DURABLE_RETRY_MAX_S)
            nc = self.nc
            if nc is None or not nc.is_connected or self._stopping:
                continue
            durable = DurableTopics(nc, self, self.handler, max_deliver=self.max_deliver)
            try:
                ready = await durable.setup()
            except SandbusError as e:  # a bad stream setting: said once, not retried
                log.warning("durable topics stay off: %s", e)
                return
            if ready and not self._stopping:
                self._durable = durable
                log.info("JetStream is available now: topics are durable")
                await self.sync()
                return

    async def stop(self, timeout: float = 10.0) -> None:
        """Graceful: stop taking work, answer every message already received, then disconnect.

        ``timeout`` bounds the drain and the disconnect; calls in flight are waited for up to the
        longest plugin timeout (plus a second) when that is longer, since each was accepted with
        the promise of an answer by its deadline.
        """
        self._stopping = True
        if self._durable_retry is not None:
            self._durable_retry.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # A sync in progress (a reload) finishes first: else it could subscribe after the drain below.
        async with self._sync_lock:
            subs = [sub for subs in self._subs.values() for sub in subs]
            self._subs.clear()
        await drain_all(subs, timeout)
        if self._durable is not None:
            await self._durable.stop()
        # Handling drained messages spawns tasks: wait until none is left. Each ends by its call's
        # deadline, which may be later than ``timeout``: the calls accepted are answered.
        tasks_deadline = max(deadline, loop.time() + self._longest_timeout_s + 1.0)
        while self._tasks and (remaining := tasks_deadline - loop.time()) > 0:
            await asyncio.wait(list(self._tasks), timeout=remaining)
        await self._control.stop()
        for hook in self.on_close:
            try:
                await hook()
            except Exception:  # one hook's failure must not keep the connection open
                log.exception("a stop hook of node %s failed", self.node_id)
        if self._audit_out is not None:  # repeats still being counted go out with their count
            with contextlib.suppress(Exception):
                await self._audit_out.close()
        if self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.drain(), max(1.0, deadline - loop.time()))
            if not self.nc.is_closed:  # NATS is down (drain refused): close, or nats-py reconnects forever
                with contextlib.suppress(Exception):
                    await self.nc.close()
        self._control.shutdown()

    async def _on_reconnect(self) -> None:
        # nats-py re-sends our subscriptions itself; JetStream consumers are durable on the server,
        # but the pull requests waiting there may be gone.
        log.info("node %s reconnected to %s", self.node_id,
                 shown_servers([self.nc.connected_url]) if self.nc and self.nc.connected_url else "?")
        if self._durable is not None:
            self._durable.reconnected()

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` as a task that :meth:`stop` waits for (loop thread only)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- subscriptions -----------------------------------------------------------------------------

    def served(self, plugin: str) -> Served | None:
        """How ``plugin`` is served now (None: not by this bus)."""
        return self._served.get(plugin)

    def sync_soon(self) -> None:
        """:meth:`sync` in a task (loop thread only): after a plugin was loaded, reloaded or unloaded."""
        self.spawn(self.sync())

    async def sync(self) -> None:
        """Make the subscriptions match what the handler serves now (plugins and their topics)."""
        if self.nc is None or self._stopping:
            return
        async with self._sync_lock:
            if self._stopping:  # stop() took the lock after we were called: it owns the subscriptions now
                return
            serving = {s.name: s for s in self.handler.serving()}
            for name in [n for n in self._subs if n not in serving]:
                await self._unsubscribe(name)
                self._served.pop(name, None)
            subscribed = False
            for name in sorted(serving):
                served = self._served[name] = serving[name]
                self._longest_timeout_s = max(self._longest_timeout_s, served.timeout_s)
                if name in self._subs and self._keys.get(name) == (served.topics, self._durably(served)):
                    continue  # same subscriptions (what they call may have changed: read per message)
                await self._unsubscribe(name)
                await self._subscribe(served)
                subscribed = True
            if subscribed and self.nc.is_connected:
                # Until the server has the SUBs, a request to the new plugin gets "no responders".
                with contextlib.suppress(Exception):  # disconnected meanwhile: nats-py re-sends them
                    await self.nc.flush(timeout=5)

    def _durably(self, served: Served) -> bool:
        """Whether ``served``'s topics are consumed through JetStream now."""
        return self._durable is not None and served.durable

    async def _subscribe(self, served: Served) -> None:
        assert self.nc is not None
        name = check_token(served.name, "plugin")
        queue = plugin_queue(name)
        requests = self._requests
        subs = [
            await self.nc.subscribe(f"{REQ_PREFIX}.{name}.*", queue=queue, cb=requests.on_request),
            await self.nc.subscribe(f"{MSG_PREFIX}.{name}", queue=queue, cb=requests.on_direct),
        ]
        if isinstance(self.nc, GuardedNatsClient) and self.direct_dispatch:
            # Requests answered inline skip the subscription's queue and task (bus/requests.py), in the
            # order they arrived: none overtakes one that waits for its turn in the queue.
            self.nc.dispatch_directly(subs[0], requests.request_direct, keep_order=True)
        durable = self._durably(served)
        if served.topics and durable:
            assert self._durable is not None
            await self._durable.consume(served)
        elif served.topics:
            for topic in served.topics:
                subs.append(await self.nc.subscribe(topic_subject(topic, wildcards=True), queue=queue,
                                                    cb=requests.topic_handler(name)))
        self._subs[name] = subs
        self._keys[name] = (served.topics, durable)
        log.info("serving %s (topics: %s, %s)", name, ", ".join(served.topics) or "none",
                 "durable" if durable and served.topics else "core")

    async def _unsubscribe(self, name: str) -> None:
        # Drained: the messages already received are answered (PluginNotFoundError if unloaded).
        await drain_all(self._subs.pop(name, []), 10.0)
        self._keys.pop(name, None)
        if self._durable is not None:
            await self._durable.stop_plugin(name)

    # -- sending -----------------------------------------------------------------------------------

    async def reply(self, msg: Msg, data: bytes, headers: dict[str, str] | None) -> None:
        """Publish a reply with its own headers (``Msg.respond`` would echo the request's): those of
        :meth:`sandbus.bus.requests.Requests.reply_headers`, plus the error headers on an error reply.

        A reply the server would refuse (body and headers above its max payload; the server would
        also close this connection) is replaced by a ``PayloadTooLargeError`` reply.
        """
        nc = self.nc
        if not msg.reply or nc is None:
            return
        size = nats_size(data, headers)
        if size > self.max_payload:
            err = PayloadTooLargeError(f"reply of {size} bytes (headers included) exceeds the NATS max payload "
                                       f"of {self.max_payload} bytes", size=size, limit=self.max_payload)
            data, error_headers = error_reply(err)
            headers = {**(headers or {}), **error_headers}
        await nc.publish(msg.reply, data, headers=headers)

    def check_fits(self, data: bytes, headers: dict[str, str] | None, what: str, plugin: str) -> None:
        """:func:`sandbus.bus.wire.check_fits` against this connection's max payload."""
        check_fits(data, headers, self.max_payload, what, plugin)

    def _connection(self, plugin: str) -> Client:
        if self.nc is None:
            raise BusError(f"bus {self.node_id} is not connected", plugin=plugin)
        return self.nc

    async def publish(self, topic: str, payload: Any, *, sender: str, context: Context | None = None,
                      hops: int = 0) -> str:
        """Publish a PluginMessage onto ``topic`` (durably when JetStream is on); returns its id.

        ``context``: the trace context of the call that publishes (captured in its thread).
        ``hops``: its ``Sandbus-Hops``, so chains through topics end at the hop limit like request
        chains; stored with a durable message.

        Raises:
            PayloadTooLargeError: the message would not fit (the server would close the connection).
            BusError: not connected.
        """
        nc = self._connection(sender)
        message_id, data = encode_message(payload, from_=sender, topic=topic)
        headers = {**ENVELOPE, H_MSG_ID: message_id, "Nats-Msg-Id": message_id, H_FROM: sender}
        if hops:
            headers[H_HOPS] = str(hops)
        subject = topic_subject(topic)
        with (send_span(subject, headers, message_id=message_id, body_size=len(data), context=context)
              if self.tracing else contextlib.nullcontext()):
            self.check_fits(data, headers, f"publish to {topic!r}", sender)  # trace headers included
            if self._durable is not None:
                await nc.jetstream().publish(subject, data, headers=headers)
            else:
                await nc.publish(subject, data, headers=headers)
        return message_id

    async def request(self, plugin: str, function: str, data: bytes, *, sender: str, hops: int, timeout: float,
                      context: Context | None = None) -> RequestOutcome:
        """One request to ``plugin.function``, as a client sends it plus ``Sandbus-Hops``.

        The outcomes a caller must handle come back as a :class:`RequestOutcome`; the reply is bounded by
        the server's max payload (a node answers a larger one with an error reply).

        Raises:
            PayloadTooLargeError: the request would not fit.
            BusError: NATS failed (not connected, ...).
        """
        nc = self._connection(sender)
        subject = request_subject(plugin, function)
        msg_id = new_message_id()
        headers = {**JSON, H_MSG_ID: msg_id, H_FROM: sender, H_HOPS: str(hops)}
        target = f"{plugin}.{function}"
        with contextlib.ExitStack() as stack:
            span = (stack.enter_context(send_span(subject, headers, message_id=msg_id, body_size=len(data),
                                                  context=context))
                    if self.tracing else None)
            self.check_fits(data, headers, f"request to {target!r}", sender)  # else NATS drops the connection
            answered = False
            err: SandbusError | None
            try:
                reply = await nc.request(subject, data, timeout=timeout, headers=headers)
            except nats.errors.NoRespondersError:
                err = PluginNotFoundError(f"no node serves plugin {plugin!r} (nobody listens on {subject})",
                                          plugin=plugin, target=target)
            except nats.errors.TimeoutError:
                err = RequestTimeoutError(f"no reply from {target} within {timeout:g} s", plugin=plugin,
                                          target=target, timeout=timeout)
            except nats.errors.Error as e:
                raise BusError(f"request to {target!r} failed: {e}", plugin=sender) from e
            else:
                err = error_from_reply(reply.data, reply.headers)
                if err is None:
                    return RequestOutcome(bytes(reply.data))
                answered = True
            if span is not None:
                record_error(span, err)
            return RequestOutcome(orjson.dumps(err.to_dict(), default=str), err, answered)

    async def kv(self, plugin: str, *, max_bytes: int, max_value: int) -> KeyValue:
        """The plugin's JetStream key-value bucket ``sandbus_kv_<plugin>``, created with these limits
        (its storage quota) on first use."""
        bucket = self._kv.get(plugin)
        if bucket is None:
            js = self._connection(plugin).jetstream()
            name = f"sandbus_kv_{check_token(plugin, 'plugin')}"
            try:
                bucket = await js.key_value(name)
            except Exception:
                bucket = await js.create_key_value(bucket=name, max_bytes=max_bytes, max_value_size=max_value,
                                                   history=1)
            self._kv[plugin] = bucket
        return bucket

    # -- audit -------------------------------------------------------------------------------------

    def publish_audit(self, event: AuditEvent) -> None:
        """Publish an audit event on ``sandbus.audit.<node>`` (the SANDBUS_AUDIT stream keeps the trail),
        repeats folded (bus/audit.py). Loop thread only; dropped while disconnected."""
        if self.nc is not None and self.nc.is_connected and self._audit_out is not None:
            self._audit_out.offer(event)

