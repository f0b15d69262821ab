"""Durable topics over JetStream: at-least-once delivery to each subscribing plugin.

One stream holds every topic (``SANDBUS_TOPICS`` on ``sandbus.topic.>``); each subscribing plugin has
one durable pull consumer (``plugin-<name>``), shared by every node that serves the plugin, so each
message reaches the plugin once whichever nodes hold it. A message is acked after the plugin returns;
on failure it is nak'ed with a growing delay; after ``max_deliver`` attempts it goes to the dead-letter
subject ``sandbus.dlq.<plugin>`` (kept by the ``SANDBUS_DLQ`` stream) with the error in its headers,
and is terminated. A node killed mid-call never acks, so the server redelivers after ``ack_wait``.
Publishers set ``Nats-Msg-Id`` so a retried publish is stored once (the stream's duplicate window).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import NotFoundError

from sdk.envelope import H_ERROR, H_ERROR_CODE, H_MSG_ID, error_reply
from sdk.errors import SandbusError
from sdk.subjects import AUDIT_PREFIX, DLQ_PREFIX, TOPIC_PREFIX, dlq_subject, topic_subject

from .sandbox import AuditLevel

if TYPE_CHECKING:
    from .node import Node

__all__ = ["AUDIT_STREAM", "DLQ_STREAM", "TOPIC_STREAM", "DurableTopics", "ensure_streams"]

log = logging.getLogger("sandbus.delivery")

TOPIC_STREAM = "SANDBUS_TOPICS"
AUDIT_STREAM = "SANDBUS_AUDIT"
DLQ_STREAM = "SANDBUS_DLQ"
MAX_DELIVER = 5
BACKOFF_S = (0.1, 0.5, 2.0, 5.0)
WEEK_S = 7 * 24 * 3600.0


async def ensure_streams(nc: Client) -> bool:
    """Create (or keep) the topic and dead-letter streams; False when JetStream is unavailable."""
    js = nc.jetstream()
    try:
        await js.add_stream(name=TOPIC_STREAM, subjects=[f"{TOPIC_PREFIX}.>"], duplicate_window=120.0,
                            max_age=WEEK_S, storage=api.StorageType.FILE)
        await js.add_stream(name=DLQ_STREAM, subjects=[f"{DLQ_PREFIX}.>"], max_age=4 * WEEK_S,
                            storage=api.StorageType.FILE)
        await js.add_stream(name=AUDIT_STREAM, subjects=[f"{AUDIT_PREFIX}.>"], max_age=4 * WEEK_S,
                            storage=api.StorageType.FILE)
    except Exception as e:  # no JetStream on this server (NoRespondersError / ServiceUnavailable)
        log.debug("JetStream unavailable: %r", e)
        return False
    return True


#: how long a pull request waits on the server for messages (then a new one is sent)
PULL_EXPIRES_S = 5.0
#: fewer messages than this waiting: let more arrive for LINGER_S before handling them
LINGER_BATCH = 16
LINGER_S = 0.002
#: messages fetched per round trip for a plugin whose calls run inline
INLINE_FETCH = 128


class DurableTopics:
    """The durable consumers of one node."""

    def __init__(self, nc: Client, node: Node, *, max_deliver: int = MAX_DELIVER, linger_s: float = LINGER_S) -> None:
        self.nc = nc
        self.linger_s = linger_s
        self.js = nc.jetstream()
        self.node = node
        self.max_deliver = max_deliver
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._psubs: dict[str, Any] = {}
        self._wakes: dict[str, asyncio.Event] = {}
        self._reissue: set[str] = set()
        self._stopping: set[str] = set()

    async def setup(self) -> bool:
        return await ensure_streams(self.nc)

    @staticmethod
    def durable_name(plugin: str) -> str:
        return f"plugin-{plugin}"

    async def consume(self, plugin: str, topics: tuple[str, ...]) -> None:
        durable = self.durable_name(plugin)
        timeout = self.node.manager.limits(plugin).timeout_s
        config = api.ConsumerConfig(
            durable_name=durable,
            filter_subjects=[topic_subject(t, wildcards=True) for t in topics],
            ack_policy=api.AckPolicy.EXPLICIT,
            # Redelivery after a node dies mid-call: the call's timeout plus a margin.
            ack_wait=timeout + 2.0,
            max_deliver=self.max_deliver,
            deliver_policy=api.DeliverPolicy.NEW,
            max_ack_pending=1000,
        )
        try:
            info = await self.js.consumer_info(TOPIC_STREAM, durable)
            if sorted(info.config.filter_subjects or [info.config.filter_subject or ""]) != sorted(
                    config.filter_subjects or []):
                await self.js.add_consumer(TOPIC_STREAM, config)  # update the filter (manifest edited)
        except NotFoundError:
            await self.js.add_consumer(TOPIC_STREAM, config)
        self._loops[plugin] = asyncio.create_task(self._fetch_loop(plugin, durable), name=f"durable-{plugin}")

    async def _fetch_loop(self, plugin: str, durable: str) -> None:
        """Pull requests kept open on the server; messages handled as they arrive.

        Why not nats-py's ``fetch``: it waits for each message of a batch with its own timer (a
        ``wait_for`` and a task per message), which cost more than the plugin call. Here one pull
        request asks for a batch and stays on the server for up to ``PULL_EXPIRES_S``, which sends
        each message as soon as it is stored; the subscription callback only queues it, and this
        loop runs what has arrived. A new request goes out when the last one is used up or ended.
        """
        instances = max(1, self.node.manager.limits(plugin).max_instances)
        arrived: deque[Msg] = deque()
        wake = self._wakes[plugin] = asyncio.Event()
        open_ = 0  # messages the outstanding pull request may still bring

        async def on_message(msg: Msg) -> None:
            nonlocal open_
            status = msg.headers.get("Status") if msg.headers else None
            if status is not None and not msg.data:
                if status != "100":  # 100: idle heartbeat; 404/408/409: the request is over
                    open_ = 0
            else:
                arrived.append(msg)
                open_ -= 1
            wake.set()

        inbox = self.nc.new_inbox()
        sub = await self.nc.subscribe(inbox, cb=on_message)
        self._psubs[plugin] = sub
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{TOPIC_STREAM}.{durable}"
        while plugin not in self._stopping:
            if plugin in self._reissue:  # reconnected: the server forgot our pull request
                self._reissue.discard(plugin)
                open_ = 0
            if open_ <= 0:
                # A plugin served inline takes microseconds a message: ask for many. One on threads
                # asks for what its instances can start at once, so nothing it was sent waits in
                # line long enough for its ack deadline to pass and be redelivered elsewhere.
                open_ = INLINE_FETCH if self.node.runs_inline(plugin) else instances
                try:
                    await self.nc.publish(next_subject, orjson.dumps(
                        {"batch": open_, "expires": int(PULL_EXPIRES_S * 1e9)}), reply=inbox)
                except Exception as e:  # disconnected: nats-py reconnects; ask again shortly
                    log.debug("pull request for %s failed: %r", plugin, e)
                    open_ = 0
                    await asyncio.sleep(0.2)
                    continue
            wake.clear()
            if not arrived:
                try:
                    await asyncio.wait_for(wake.wait(), PULL_EXPIRES_S + 2.0)
                except TimeoutError:
                    open_ = 0  # the request was lost (a reconnect): ask again
                continue
            if len(arrived) < LINGER_BATCH and open_ > 0 and self.linger_s:
                # Messages trickling in one at a time would each cost a loop turn and a socket write
                # for their ack: let a few more arrive first (Kafka's linger.ms; bounded added latency).
                await asyncio.sleep(self.linger_s)
            msgs = list(arrived)
            arrived.clear()
            if self.node.runs_inline(plugin):
                # Inline calls run one at a time on the loop anyway: no task per message.
                for m in msgs:
                    await self._deliver(plugin, m)
            else:
                await asyncio.gather(*(self._deliver(plugin, m) for m in msgs))

    async def _deliver(self, plugin: str, msg: Msg) -> None:
        topic = msg.subject.split(".", 2)[2]
        try:
            envelope = self.node.envelope_for(msg.data, msg.headers, topic=topic, to=None)
            await self.node.call(plugin, self.node.message_function(plugin), envelope, msg=msg,
                                 delivery=msg.metadata.num_delivered)
        except SandbusError as e:
            await self._failed(plugin, msg, e)
            return
        await msg.ack()

    async def _failed(self, plugin: str, msg: Msg, err: SandbusError) -> None:
        attempt = msg.metadata.num_delivered or 1
        if attempt >= self.max_deliver:
            _, headers = error_reply(err)
            headers.update({"Sandbus-Original-Subject": msg.subject, "Sandbus-Deliveries": str(attempt)})
            if msg.headers and H_MSG_ID in msg.headers:
                headers[H_MSG_ID] = msg.headers[H_MSG_ID]
            await self.js.publish(dlq_subject(plugin), msg.data, headers=headers)
            await msg.term()
            log.warning("dead-lettered %s for %s after %d deliveries: %s", msg.subject, plugin, attempt,
                        headers[H_ERROR])
            self.node.manager.auditor.emit(
                AuditLevel.WARNING, "delivery.dead_letter", plugin,
                f"{msg.subject} dead-lettered after {attempt} deliveries: {err}",
                subject=msg.subject, error_code=headers[H_ERROR_CODE], deliveries=attempt,
            )
            return
        await msg.nak(delay=BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)])

    def reconnected(self) -> None:
        """After a reconnect the server may have lost the open pull requests: send new ones now."""
        for plugin, wake in self._wakes.items():
            self._reissue.add(plugin)
            wake.set()

    async def stop_plugin(self, plugin: str, timeout: float = 15.0) -> None:
        """Stop fetching; deliveries in flight finish (and are acked) first, within ``timeout``."""
        task = self._loops.pop(plugin, None)
        if task is None:
            return
        self._stopping.add(plugin)
        wake = self._wakes.pop(plugin, None)
        if wake is not None:
            wake.set()  # the loop may be waiting for messages: let it see it is stopping
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()  # unacked messages are redelivered: at-least-once holds
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        finally:
            self._stopping.discard(plugin)
            psub = self._psubs.pop(plugin, None)
            if psub is not None:
                with contextlib.suppress(Exception):
                    await psub.unsubscribe()

    async def stop(self) -> None:
        for plugin in list(self._loops):
            await self.stop_plugin(plugin)

