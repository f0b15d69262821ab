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
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
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


#: after a fetch that did not fill its batch, wait this long before the next one (added latency, at most)
LINGER_S = 0.005
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
        psub = await self.js.pull_subscribe_bind(durable, stream=TOPIC_STREAM)
        self._psubs[plugin] = psub
        self._loops[plugin] = asyncio.create_task(self._fetch_loop(plugin, psub), name=f"durable-{plugin}")

    async def _fetch_loop(self, plugin: str, psub: Any) -> None:
        instances = max(1, self.node.manager.limits(plugin).max_instances)
        while plugin not in self._stopping:
            # A plugin served inline takes microseconds a message: fetch many per round trip. One
            # on threads gets what its instances can start at once, so nothing it fetched waits
            # in line long enough for its ack deadline to pass and be redelivered elsewhere.
            batch = INLINE_FETCH if self.node.runs_inline(plugin) else instances
            try:
                msgs = await psub.fetch(batch, timeout=1.0)
            except NatsTimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # disconnected: nats-py reconnects; try again shortly
                log.debug("fetch for %s failed: %r", plugin, e)
                await asyncio.sleep(0.2)
                continue
            if batch == INLINE_FETCH:
                # Inline calls run one at a time on the loop anyway: no task per message.
                for m in msgs:
                    await self._deliver(plugin, m)
            else:
                await asyncio.gather(*(self._deliver(plugin, m) for m in msgs))
            if len(msgs) < batch and self.linger_s:
                # A fetch costs a round trip and ~100 us of Python whatever it brings back: when messages
                # trickle in, let a few more arrive before asking again (Kafka's linger.ms).
                await asyncio.sleep(self.linger_s)

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

    async def stop_plugin(self, plugin: str, timeout: float = 15.0) -> None:
        """Stop fetching; deliveries in flight finish (and are acked) first, within ``timeout``."""
        task = self._loops.pop(plugin, None)
        if task is None:
            return
        self._stopping.add(plugin)
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

