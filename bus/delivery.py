"""Durable topics over JetStream: at-least-once delivery to each subscribing plugin.

One stream holds every topic (``SANDBUS_TOPICS`` on ``sandbus.topic.>``); each subscribing plugin has
one durable pull consumer (``plugin-<name>``), shared by every node that serves the plugin, so each
message reaches the plugin once whichever nodes hold it. Each message goes, as a PluginMessage envelope,
to the bus's handler (``BusHandler.serve``; on a node, the plugin's call; for a plugin served inline, the
handler's synchronous ``deliver_now`` when it has one); it is acked after that returns;
on a failure that may pass (``retryable``: a timeout, a busy plugin, a node dying) it is nak'ed with a
growing delay, and after ``max_deliver`` attempts it goes to the dead-letter subject
``sandbus.dlq.<plugin>`` (kept by the ``SANDBUS_DLQ`` stream) with the error in its headers, and is
terminated. A failure that cannot pass (not ``retryable``: a body that is not JSON, a malformed
envelope, an unknown function, the hop limit) is dead-lettered at the delivery it happened on,
with ``Sandbus-Deliveries`` saying which: retrying it cannot help. A client's mistake also counts
in the plugin's ``rejected`` and is audited (``request.refused``). An exception that is not a
SandbusError (a bug of ours) is retried like a passing failure. A node killed mid-call
never acks, so the server redelivers after ``ack_wait``. Publishers set ``Nats-Msg-Id`` so a retried
publish is stored once (the stream's duplicate window).

No exception ends a plugin's delivery loop: each message is handled under a catch-all, and a loop
that dies anyway is restarted (with a growing delay), logged and audited (``delivery.restarted``).
When the plugin's consumer or the stream is deleted under it (an operator, a restore, a retention
mistake), the server answers the loop's pull requests with "consumer deleted" or "no responders";
the loop then recreates what it owns and resumes, logged and audited (``delivery.recreated``).

Every stream is capped by bytes, messages and age (:class:`StreamLimits`, configurable through
``SANDBUS_<STREAM>_MAX_BYTES`` / ``_MAX_MSGS`` / ``_MAX_AGE_S`` with STREAM one of TOPICS, DLQ,
AUDIT), discarding the oldest messages when full; an existing stream whose limits differ is updated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from sandbus.bus.handler import DEFAULT_FUNCTION, BusHandler, Served
from sandbus.bus.requests import internal_error
from sandbus.sdk.audit import AuditLevel
from sandbus.sdk.envelope import (
    CONTENT_TYPE,
    H_CONTENT_TYPE,
    H_ERROR,
    H_ERROR_CODE,
    H_MSG_ID,
    envelope_for,
    error_reply,
    header_value,
    valid_media_type,
)
from sandbus.sdk.errors import RequestError, SandbusError
from sandbus.sdk.nats_guard import GuardedNatsClient
from sandbus.sdk.natsraw import RAW_WRITES, can_write_raw, write_raw
from sandbus.sdk.subjects import AUDIT_PREFIX, DLQ_PREFIX, TOPIC_PREFIX, dlq_subject, topic_subject

if TYPE_CHECKING:
    from sandbus.bus.plugin_bus import PluginBus

__all__ = ["AUDIT_STREAM", "DLQ_STREAM", "TOPIC_STREAM", "DurableTopics", "StreamLimits", "ensure_streams"]

log = logging.getLogger("sandbus.delivery")

TOPIC_STREAM = "SANDBUS_TOPICS"
AUDIT_STREAM = "SANDBUS_AUDIT"
DLQ_STREAM = "SANDBUS_DLQ"
MAX_DELIVER = 5
BACKOFF_S = (0.1, 0.5, 2.0, 5.0)
WEEK_S = 7 * 24 * 3600.0
MIB = 1024 * 1024
#: of a dead letter's max payload, what its headers may take (error, original subject, message id...)
DLQ_HEADER_ROOM = 8 * 1024
#: characters of the publisher's subject and message id copied into a dead letter's headers
MAX_DLQ_SUBJECT = 1024
MAX_DLQ_MSG_ID = 256


@dataclasses.dataclass(frozen=True)
class StreamLimits:
    """How much one stream keeps; the oldest messages go first when a limit is reached.

    Parameters:
        max_bytes: total size of the stored messages (-1: unlimited).
        max_msgs: number of stored messages (-1: unlimited).
        max_age_s: how long a message is kept, in seconds.
    """

    max_bytes: int
    max_msgs: int
    max_age_s: float

    def with_env(self, stream: str, env: Mapping[str, str] | None = None) -> StreamLimits:
        """These limits, overridden by ``SANDBUS_<STREAM>_MAX_BYTES`` / ``_MAX_MSGS`` / ``_MAX_AGE_S``."""
        env = os.environ if env is None else env
        prefix = f"SANDBUS_{stream}_"
        values: dict[str, Any] = {}
        for name, kind in (("max_bytes", int), ("max_msgs", int), ("max_age_s", float)):
            raw = env.get(prefix + name.upper())
            if raw is None:
                continue
            try:
                value = kind(raw)
            except ValueError:
                raise SandbusError(f"{prefix + name.upper()}={raw!r} is not a number") from None
            if value == 0 or value < -1:
                raise SandbusError(f"{prefix + name.upper()} must be positive (or -1 for no limit), not {raw}")
            values[name] = value
        return dataclasses.replace(self, **values)

    def apply(self, config: api.StreamConfig) -> api.StreamConfig:
        return dataclasses.replace(config, max_bytes=self.max_bytes, max_msgs=self.max_msgs,
                                   max_age=self.max_age_s, discard=api.DiscardPolicy.OLD)

    def matches(self, config: api.StreamConfig) -> bool:
        return (config.max_bytes == self.max_bytes and config.max_msgs == self.max_msgs
                and abs((config.max_age or 0.0) - self.max_age_s) < 1.0
                and config.discard in (None, api.DiscardPolicy.OLD))


#: defaults: a week of topics (1 GiB), four weeks of dead letters (256 MiB) and audit events (64 MiB)
DEFAULT_LIMITS = {
    "TOPICS": StreamLimits(max_bytes=1024 * MIB, max_msgs=-1, max_age_s=WEEK_S),
    "DLQ": StreamLimits(max_bytes=256 * MIB, max_msgs=1_000_000, max_age_s=4 * WEEK_S),
    "AUDIT": StreamLimits(max_bytes=64 * MIB, max_msgs=1_000_000, max_age_s=4 * WEEK_S),
}


def stream_configs(env: Mapping[str, str] | None = None) -> list[api.StreamConfig]:
    """The node's three streams, with their limits (defaults overridden by the environment)."""
    limits = {name: lim.with_env(name, env) for name, lim in DEFAULT_LIMITS.items()}
    file = api.StorageType.FILE
    return [
        limits["TOPICS"].apply(api.StreamConfig(name=TOPIC_STREAM, subjects=[f"{TOPIC_PREFIX}.>"],
                                                duplicate_window=120.0, storage=file)),
        limits["DLQ"].apply(api.StreamConfig(name=DLQ_STREAM, subjects=[f"{DLQ_PREFIX}.>"], storage=file)),
        limits["AUDIT"].apply(api.StreamConfig(name=AUDIT_STREAM, subjects=[f"{AUDIT_PREFIX}.>"], storage=file)),
    ]


async def _ensure_stream(nc: Client, config: api.StreamConfig) -> str:
    """Create the stream, or bring an existing one's limits to ours; returns what was done."""
    js = nc.jetstream()
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        return "created"
    if StreamLimits(config.max_bytes or -1, config.max_msgs or -1, config.max_age or 0.0).matches(info.config):
        return "kept"
    await js.update_stream(dataclasses.replace(info.config, max_bytes=config.max_bytes, max_msgs=config.max_msgs,
                                               max_age=config.max_age, discard=config.discard))
    log.info("stream %s: limits updated to %s bytes, %s messages, %g s", config.name, config.max_bytes,
             config.max_msgs, config.max_age or 0.0)
    return "updated"


async def ensure_streams(nc: Client, env: Mapping[str, str] | None = None) -> bool:
    """Create (or keep, with our limits) the topic, dead-letter and audit streams; False without JetStream."""
    try:
        for config in stream_configs(env):
            await _ensure_stream(nc, config)
    except SandbusError:
        raise  # a bad SANDBUS_*_MAX_* setting: the operator must see it
    except ServiceUnavailableError as e:  # no JetStream on this server
        log.debug("JetStream unavailable: %r", e)
        return False
    except APIError as e:  # JetStream answered, and refused (e.g. limits above what the server may store)
        log.warning("JetStream refused the sandbus streams (%s): topics are not durable; see SANDBUS_<TOPICS|DLQ|"
                    "AUDIT>_MAX_BYTES", e)
        return False
    except Exception as e:  # no answer at all (NoRespondersError, timeout)
        log.debug("JetStream unavailable: %r", e)
        return False
    return True


#: how long a pull request waits on the server for messages (then a new one is sent)
PULL_EXPIRES_S = 5.0
#: fewer messages than this waiting: let more arrive for LINGER_S before handling them. A turn costs
#: the same whatever it handles (a wake-up, a timer, an ack write, now and then a pull request): under
#: a steady flow of ~9,000 messages/s (bench/bench_bus.py), 5 ms and 64 cost a node 37-39 us a message
#: against 41-47 with 2 ms and 16, and nats-server less too (fewer, larger ack writes). The price is at
#: most 5 ms more before a message is handled, and only while messages flow in: one arriving alone
#: after a quiet spell does not wait (Kafka's producers linger 5 ms too).
LINGER_BATCH = 64
LINGER_S = 0.005
#: messages fetched per round trip for a plugin whose calls run inline
INLINE_FETCH = 128
#: at most this many handled messages wait for their acks to be written together
ACK_BATCH = 64
#: how long stopping a plugin waits for the server to confirm it has the last acks
ACK_FLUSH_TIMEOUT_S = 2
#: longest ack subject written raw
_MAX_ACK_SUBJECT = 1024
#: the nats-py internals the batched acks use (nats-py 2.x); without them, each ack is a ``Msg.ack``


#: after a loop died: wait this long before restarting it, doubling per restart up to the maximum
RESTART_DELAY_S = 0.1
RESTART_DELAY_MAX_S = 5.0
#: after the consumer or stream was found gone and could not be recreated: retry within this, doubling
RESTORE_DELAY_S = 0.2
RESTORE_DELAY_MAX_S = 5.0
#: a recreated consumer starts this long before the last sign of life of the old one (clock skew)
RESTORE_MARGIN_S = 2.0


#: the tokens of a JetStream ack subject: ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer
#: seq>.<time>.<pending>``, or with a domain and an account hash after ``ACK`` (and more tokens after)
_ACK_TOKENS_V1 = 9
_ACK_TOKENS_V2 = 11


def delivery_count(reply: str | None) -> int:
    """The delivery count a JetStream ack subject carries (1 when it is not one, or the count is not a number).

    What nats-py's ``Msg.metadata`` reads, without building its dataclasses and timestamp: that cost
    about 10 µs, a tenth of a node's whole delivery of a message.
    """
    if not reply or not reply.startswith("$JS.ACK."):
        return 1
    # Counted and cut in C: the tokens after the count are not needed.
    tokens = reply.count(".") + 1
    if tokens == _ACK_TOKENS_V1:
        count = reply.split(".", 5)[4]
    elif tokens >= _ACK_TOKENS_V2:
        count = reply.split(".", 7)[6]
    else:
        return 1
    if count == "1":  # a first delivery: nearly every message
        return 1
    # ASCII digits only (int() takes others), at most 19: anyone who can publish to the pull inbox may
    # have written it.
    return max(int(count), 1) if count.isascii() and count.isdigit() and len(count) <= 19 else 1


def _ack_subject(reply: str) -> bool:
    """Whether ``reply`` may be copied into a protocol line as it is: 1-1024 printable ASCII characters
    without a space, as the server writes ack subjects (string methods in C: a regex cost twice as much)."""
    return 0 < len(reply) <= _MAX_ACK_SUBJECT and reply.isascii() and reply.isprintable() and " " not in reply


def _pending_messages(headers: Mapping[str, str] | None) -> int | None:
    """How many messages an ended pull request will not bring (its ``Nats-Pending-Messages``), or None."""
    value = (headers or {}).get("Nats-Pending-Messages", "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 9 else None


def _backoff(attempt: int) -> float:
    """How long a message that failed its ``attempt``-th delivery waits before the next one."""
    return BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)]


class _Pull:
    """One delivery loop's pull request, shared with the callback that receives its messages."""

    __slots__ = ("arrived", "inbox", "last_batch", "open", "wake")

    def __init__(self, wake: asyncio.Event) -> None:
        self.wake = wake
        self.arrived: deque[Msg] = deque()
        self.inbox = ""
        #: messages the outstanding pull request may still bring
        self.open = 0
        #: messages the last turn handled: more than one means a flow, worth lingering for
        self.last_batch = 0


class DurableTopics:
    """The durable consumers of one bus: one delivery loop per subscribing plugin, calling the handler."""

    def __init__(self, nc: Client, bus: PluginBus, handler: BusHandler, *, max_deliver: int = MAX_DELIVER,
                 linger_s: float = LINGER_S) -> None:
        self.nc = nc
        self.linger_s = linger_s
        self.js = nc.jetstream()
        self.bus = bus
        self.handler = handler
        self.max_deliver = max_deliver
        #: acks go out as one write per batch through nats-py internals (see :meth:`_send_acks`)
        self._raw_acks = RAW_WRITES
        self._loops: dict[str, asyncio.Task[None]] = {}
        self._psubs: dict[str, Any] = {}
        self._wakes: dict[str, asyncio.Event] = {}
        self._reissue: set[str] = set()
        self._stopping: set[str] = set()
        self._configs: dict[str, api.ConsumerConfig] = {}
        #: plugins whose consumer (or stream) the server said is gone: the loop restores it
        self._lost: set[str] = set()
        #: wall time of the last answer to a plugin's pull request (the consumer existed then)
        self._alive_at: dict[str, float] = {}
        #: loop restarts and consumer/stream recreations per plugin (stats and tests)
        self.restarts: dict[str, int] = {}
        self.recreated: dict[str, int] = {}

    async def setup(self) -> bool:
        return await ensure_streams(self.nc)

    @staticmethod
    def durable_name(plugin: str) -> str:
        return f"plugin-{plugin}"

    async def consume(self, served: Served) -> None:
        plugin = served.name
        durable = self.durable_name(plugin)
        timeout = served.timeout_s
        config = api.ConsumerConfig(
            durable_name=durable,
            filter_subjects=[topic_subject(t, wildcards=True) for t in served.topics],
            ack_policy=api.AckPolicy.EXPLICIT,
            # Redelivery after a node dies mid-call: the call's timeout plus a margin.
            ack_wait=timeout + 2.0,
            max_deliver=self.max_deliver,
            deliver_policy=api.DeliverPolicy.NEW,
            max_ack_pending=1000,
        )
        self._configs[plugin] = config
        self._alive_at[plugin] = time.time()
        try:
            info = await self.js.consumer_info(TOPIC_STREAM, durable)
            if sorted(info.config.filter_subjects or [info.config.filter_subject or ""]) != sorted(
                    config.filter_subjects or []):
                await self.js.add_consumer(TOPIC_STREAM, config)  # update the filter (manifest edited)
        except NotFoundError:
            await self.js.add_consumer(TOPIC_STREAM, config)
        self.restarts[plugin] = 0
        self._start_loop(plugin, durable)

    # -- supervision -------------------------------------------------------------------------------

    def _start_loop(self, plugin: str, durable: str) -> None:
        task = asyncio.create_task(self._fetch_loop(plugin, durable), name=f"durable-{plugin}")
        self._loops[plugin] = task
        task.add_done_callback(lambda t: self._loop_ended(plugin, durable, t))

    def _loop_ended(self, plugin: str, durable: str, task: asyncio.Task[None]) -> None:
        """A loop that ends while its plugin is served is restarted, logged and audited: never silent."""
        if task.cancelled() or plugin in self._stopping or self._loops.get(plugin) is not task:
            return  # stopped on purpose
        err = task.exception()
        restarts = self.restarts[plugin] = self.restarts.get(plugin, 0) + 1
        delay = min(RESTART_DELAY_S * 2 ** (restarts - 1), RESTART_DELAY_MAX_S)
        log.error("durable delivery loop of %s ended (%r): restarting it in %g s", plugin, err, delay,
                  exc_info=err)
        self._audit(AuditLevel.WARNING, "delivery.restarted", plugin,
                    f"the durable delivery loop of {plugin} ended ({err!r}) and was restarted",
                    error=repr(err)[:512], restarts=restarts)

        def restart() -> None:
            if self._loops.get(plugin) is task and plugin not in self._stopping:
                self._start_loop(plugin, durable)

        asyncio.get_running_loop().call_later(delay, restart)

    def _audit(self, level: AuditLevel, kind: str, plugin: str, message: str, **details: Any) -> None:
        try:
            self.handler.audit(level, kind, plugin, message, **details)
        except Exception:  # auditing must not be what stops delivery
            log.exception("could not audit %s for %s", kind, plugin)

    async def _restore(self, plugin: str, durable: str) -> bool:
        """Recreate the plugin's consumer (and the streams) after the server said they are gone.

        The new consumer starts from shortly before the old one was last seen alive, so messages
        stored while it was gone are delivered too (at-least-once: some may come twice). True when
        the consumer exists again (recreated, or it was there after all); False to retry later.
        """
        config = self._configs.get(plugin)
        if config is None:
            return True
        try:
            await self.js.consumer_info(TOPIC_STREAM, durable)
            return True  # a passing hiccup (a cluster electing a leader): nothing was lost
        except NotFoundError:
            pass
        except Exception as e:
            log.debug("consumer_info for %s failed: %r", plugin, e)
            return False
        try:
            stream_gone = False
            try:
                await self.js.stream_info(TOPIC_STREAM)
            except NotFoundError:
                stream_gone = True
                await ensure_streams(self.nc)
            if not stream_gone:  # a new stream holds only what came after it: NEW is right there
                since = self._alive_at.get(plugin, time.time()) - RESTORE_MARGIN_S
                config = dataclasses.replace(config, deliver_policy=api.DeliverPolicy.BY_START_TIME,
                                             opt_start_time=datetime.datetime.fromtimestamp(since, datetime.UTC))
            await self.js.add_consumer(TOPIC_STREAM, config)
        except Exception as e:
            log.warning("could not recreate the durable consumer of %s yet: %r", plugin, e)
            return False
        what = f"stream {TOPIC_STREAM} and consumer {durable}" if stream_gone else f"consumer {durable}"
        self.recreated[plugin] = self.recreated.get(plugin, 0) + 1
        log.warning("%s of %s was deleted on the server: recreated it, delivery resumes", what, plugin)
        self._audit(AuditLevel.WARNING, "delivery.recreated", plugin,
                    f"{what} was deleted on the server and has been recreated", stream_deleted=stream_gone,
                    consumer=durable)
        return True

    # -- the loop ----------------------------------------------------------------------------------

    async def _fetch_loop(self, plugin: str, durable: str) -> None:
        """Pull requests kept open on the server; messages handled as they arrive.

        Why not nats-py's ``fetch``: it waits for each message of a batch with its own timer (a
        ``wait_for`` and a task per message), which cost more than the plugin call. Here one pull
        request asks for a batch and stays on the server for up to ``PULL_EXPIRES_S``, which sends
        each message as soon as it is stored; the subscription callback only queues it (on a
        :class:`~sandbus.sdk.nats_guard.GuardedNatsClient`, right in its read loop: no queue and task
        per message on the way), and this loop runs what has arrived. A new request goes out when
        the last one is used up or ended. Each turn runs under a catch-all: what goes wrong is
        logged and the loop goes on.
        """
        served = self.bus.served(plugin)
        instances = max(1, served.instances if served is not None else 1)
        pull = _Pull(self._wakes.setdefault(plugin, asyncio.Event()))

        def arrived(msg: Msg) -> bool:
            """Note one message of the pull inbox (a message to handle, or the end of a pull request)
            and wake the loop. Never raises: it may run inside the connection's read loop."""
            status = msg.headers.get("Status") if msg.headers else None
            if status != "503":
                self._alive_at[plugin] = time.time()
            if status is not None and not msg.data:
                if status != "100":  # 100: idle heartbeat; 404/408/409/503: a request is over
                    description = (msg.headers or {}).get("Description", "").lower()
                    # 503: nobody serves the consumer (it is gone); 409 "consumer deleted": it just went.
                    if status == "503" or (status == "409" and "deleted" in description):
                        self._lost.add(plugin)
                        pull.open = 0
                    else:
                        # One of the requests ended (expired): what it would still have brought will not
                        # come. Without the server's count, assume nothing comes (a new request goes out).
                        unsent = _pending_messages(msg.headers)
                        pull.open = max(0, pull.open - unsent) if unsent is not None else 0
            else:
                pull.arrived.append(msg)
                pull.open -= 1
            pull.wake.set()
            return True

        async def on_message(msg: Msg) -> None:
            arrived(msg)

        old = self._psubs.pop(plugin, None)  # a restarted loop: the dead one's inbox goes
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        pull.inbox = self.nc.new_inbox()
        psub = self._psubs[plugin] = await self.nc.subscribe(pull.inbox, cb=on_message)
        if isinstance(self.nc, GuardedNatsClient) and self.bus.direct_dispatch:
            # Noted right in the read loop: no queue hand-off and task wake-up per message (the
            # subscription's callback still takes any message the client does not dispatch). The
            # bus's one switch for work done in the read loop (``direct_dispatch``) turns it off.
            self.nc.dispatch_directly(psub, arrived)
        next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{TOPIC_STREAM}.{durable}"
        restore_delay = RESTORE_DELAY_S
        while plugin not in self._stopping:
            try:
                if plugin in self._lost:
                    if await self._restore(plugin, durable):
                        self._lost.discard(plugin)
                        restore_delay = RESTORE_DELAY_S
                        pull.open = 0
                    else:
                        # Bounded retry while JetStream is away; a stop or a reconnect wakes it early,
                        # so stopping never waits out the delay.
                        pull.wake.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(pull.wake.wait(), restore_delay)
                        restore_delay = min(restore_delay * 2, RESTORE_DELAY_MAX_S)
                        continue
                await self._turn(plugin, next_subject, pull, instances)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug of ours or a library's: log it, keep serving (the messages are redelivered).
                log.exception("durable delivery of %s: a turn failed; continuing", plugin)
                pull.open = 0
                await asyncio.sleep(0.1)

    async def _turn(self, plugin: str, next_subject: str, pull: _Pull, instances: int) -> None:
        """One round: ask for messages if none are coming, wait for some, handle them."""
        if plugin in self._reissue:  # reconnected: the server forgot our pull request
            self._reissue.discard(plugin)
            pull.open = 0
        # A plugin served inline takes microseconds a message: ask for many, and ask again while half
        # of them are still to come, so the server always holds a request (a backlog flows without a
        # round trip per batch; the server shares messages between a consumer's waiting requests and
        # says, when one expires, how many it did not send). One on threads asks, once the last
        # request is used up, for what its instances can start at once, so nothing it was sent waits
        # in line long enough for its ack deadline to pass and be redelivered elsewhere.
        inline = self.handler.runs_inline(plugin)
        if pull.open <= (INLINE_FETCH // 2 if inline else 0):
            ask = INLINE_FETCH if inline else instances
            pull.open += ask
            try:
                await self.nc.publish(next_subject, orjson.dumps(
                    {"batch": ask, "expires": int(PULL_EXPIRES_S * 1e9)}), reply=pull.inbox)
            except Exception as e:  # disconnected: nats-py reconnects; ask again shortly
                log.debug("pull request for %s failed: %r", plugin, e)
                pull.open = 0
                await asyncio.sleep(0.2)
                return
        pull.wake.clear()
        if not pull.arrived:
            if plugin in self._lost:
                return
            waited_from = time.monotonic()
            try:
                await asyncio.wait_for(pull.wake.wait(), PULL_EXPIRES_S + 2.0)
            except TimeoutError:
                pull.open = 0  # the request was lost (a reconnect): ask again
            if time.monotonic() - waited_from > self.linger_s:
                pull.last_batch = 0  # a quiet spell: the next message comes alone
            return
        if len(pull.arrived) < LINGER_BATCH and pull.open > 0 and self.linger_s and pull.last_batch > 1:
            # Messages flowing in would each cost a loop turn and a socket write for their ack: let a
            # few more arrive first (Kafka's linger.ms; bounded added latency). Only during a flow
            # (the last turn had company): a message arriving alone is handled at once.
            await asyncio.sleep(self.linger_s)
        msgs = list(pull.arrived)
        pull.last_batch = len(msgs)
        pull.arrived.clear()
        if self.handler.runs_inline(plugin):
            # Inline calls run one at a time on the loop anyway: no task per message. Their acks go
            # out together (one write instead of a publish each), at the latest after ACK_BATCH
            # messages, and in any case before this turn ends, however it ends (a stop cancels it).
            acks: list[Msg] = []
            try:
                await self._deliver_inline(plugin, msgs, acks)
            finally:
                await self._send_acks(plugin, acks)
        else:
            # On threads a call may take seconds: each message is acked as soon as its call returned.
            await asyncio.gather(*(self._deliver_alone(plugin, m) for m in msgs))

    async def _deliver_inline(self, plugin: str, msgs: list[Msg], acks: list[Msg]) -> None:
        """Handle ``msgs`` one after the other (a plugin served inline); the successes go to ``acks``.

        A handler with ``deliver_now`` (:class:`~sandbus.bus.handler.DeliversNow`) runs each call right
        here, with no coroutine between this loop and the plugin: for a call of a few microseconds the
        coroutines of ``serve`` cost as much as the call. Only while inline work may go on without
        waiting for its turn (``turns.due()``): then the message goes through ``serve``, which waits
        for the turn, so a plugin with a backlog never holds the loop from the others. What fails is
        settled (nak, dead letter) by the same code as on the ``serve`` path.
        """
        deliver_now = getattr(self.handler, "deliver_now", None)
        turns = self.bus.turns
        for msg in msgs:
            try:
                if deliver_now is not None and not turns.due():
                    turns.begin()
                    rest = self._handle_now(plugin, msg, acks, deliver_now)
                else:
                    rest = self._handle_now(plugin, msg, acks, None)
                if rest is not None:
                    await rest
            except asyncio.CancelledError:
                raise
            except Exception:
                # Settling failed (disconnected?): unacked, the message comes back after ack_wait.
                log.exception("durable delivery of %s to %s failed", msg.subject, plugin)
            if len(acks) >= ACK_BATCH:
                await self._send_acks(plugin, acks)

    async def _deliver_alone(self, plugin: str, msg: Msg) -> None:
        acks: list[Msg] = []
        try:
            await self._deliver(plugin, msg, acks)
        finally:
            await self._send_acks(plugin, acks)

    async def _deliver(self, plugin: str, msg: Msg, acks: list[Msg]) -> None:
        """Handle one message; nothing it raises leaves here (the loop serves every other message).
        When it is to be acked, it is added to ``acks`` (the caller sends them: :meth:`_send_acks`)."""
        try:
            await self._handle(plugin, msg, acks)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Settling failed (disconnected?): unacked, the message comes back after ack_wait.
            log.exception("durable delivery of %s to %s failed", msg.subject, plugin)

    async def _send_acks(self, plugin: str, msgs: list[Msg]) -> None:
        """Ack ``msgs`` (each one's handler has returned), then empty the list.

        An ack is a message with an empty body on the message's ack subject, which the server does
        not answer (nats-py's ``Msg.ack`` is the same publish). Written as one buffer here, through
        the nats-py internals ``bus/wire.py``'s reply path uses: a ``Msg.ack`` each cost about 6 µs, a
        tenth of the message's whole delivery. Only an ack subject as the server writes them goes that
        way (printable ASCII, no space: it is copied into the protocol line); any other, and every ack
        while the connection is not up, goes through ``Msg.ack``. An ack written here is sent by
        nats-py's flusher on the next loop iteration; :meth:`stop_plugin` flushes the connection.
        Not sent (the node died first), the message is delivered again after ``ack_wait``.
        """
        if not msgs:
            return
        batch, rest = list(msgs), []
        msgs.clear()
        nc = self.nc
        if self._raw_acks and can_write_raw(nc):
            lines = []
            for m in batch:
                reply = m.reply
                if reply.startswith("$JS.ACK.") and _ack_subject(reply):
                    lines.append(f"PUB {reply} 0\r\n\r\n")
                else:
                    rest.append(m)
            if lines:
                await write_raw(nc, "".join(lines).encode(), len(lines), 0)
        else:
            rest = batch
        for m in rest:
            try:
                await m.ack()
            except Exception:  # not a JetStream message, or disconnected: it comes back after ack_wait
                log.exception("could not ack %s for %s", m.subject, plugin)

    async def _handle(self, plugin: str, msg: Msg, acks: list[Msg]) -> None:
        rest = self._handle_now(plugin, msg, acks, None)
        if rest is not None:
            await rest

    def _handle_now(self, plugin: str, msg: Msg, acks: list[Msg],
                    deliver_now: Callable[[str, str, bytes, Msg, int], bool] | None
                    ) -> Coroutine[Any, Any, None] | None:
        """The part of handling ``msg`` that needs no waiting: its envelope, and with ``deliver_now`` the
        call itself. Returns None when done (a success is added to ``acks``), else what is left to await:
        the call through ``serve``, or settling a failure (nak, dead letter)."""
        try:
            envelope = envelope_for(msg.data, msg.headers, to=None, topic=msg.subject.split(".", 2)[2])
        except RequestError as e:  # the message itself is wrong: every delivery would fail the same way
            return self._refused_message(plugin, msg, e)
        except Exception as e:  # a bug of ours: retried, then dead-lettered with its error
            log.exception("durable delivery of %s to %s: no envelope", msg.subject, plugin)
            return self._failed(plugin, msg, internal_error(e, plugin))
        served = self.bus.served(plugin)
        function = served.message_function if served is not None else DEFAULT_FUNCTION
        delivery = self._attempt(msg)
        if deliver_now is None:
            return self._serve(plugin, function, envelope, msg, delivery, acks)
        try:
            if not deliver_now(plugin, function, envelope, msg, delivery):
                return self._serve(plugin, function, envelope, msg, delivery, acks)
        except SandbusError as e:
            return self._failed(plugin, msg, e)
        except Exception as e:  # a bug of ours: retried like a failure, then dead-lettered with its error
            log.exception("durable delivery of %s to %s raised", msg.subject, plugin)
            return self._failed(plugin, msg, internal_error(e, plugin))
        acks.append(msg)
        return None

    async def _serve(self, plugin: str, function: str, envelope: bytes, msg: Msg, delivery: int,
                     acks: list[Msg]) -> None:
        try:
            await self.handler.serve(plugin, function, envelope, msg, arrival=None, delivery=delivery)
        except SandbusError as e:
            await self._failed(plugin, msg, e)
            return
        except Exception as e:  # a bug of ours: retried like a failure, then dead-lettered with its error
            log.exception("durable delivery of %s to %s raised", msg.subject, plugin)
            await self._failed(plugin, msg, internal_error(e, plugin))
            return
        acks.append(msg)

    async def _refused_message(self, plugin: str, msg: Msg, err: RequestError) -> None:
        """A message no delivery can handle (not JSON, a malformed envelope): counted, dead-lettered now."""
        try:
            self.handler.refused(plugin, err, msg.subject)
        except Exception:  # counting must not be what stops the dead letter
            log.exception("could not record a refused message for %s", plugin)
        await self._dead_letter(plugin, msg, err, self._attempt(msg))

    @staticmethod
    def _attempt(msg: Msg) -> int:
        """Which delivery of ``msg`` this is (1 for the first), from its ack subject."""
        return delivery_count(msg.reply)

    async def _failed(self, plugin: str, msg: Msg, err: SandbusError) -> None:
        """Nak for a later delivery, or dead-letter now: at the last delivery, or when ``err`` is permanent."""
        attempt = self._attempt(msg)
        if attempt >= self.max_deliver or not err.retryable:
            await self._dead_letter(plugin, msg, err, attempt)
            return
        await msg.nak(delay=_backoff(attempt))

    async def _dead_letter(self, plugin: str, msg: Msg, err: SandbusError, attempt: int) -> None:
        """Publish ``msg`` with its error to the plugin's dead-letter subject, bounded; then terminate it.

        Everything copied is bounded: the publisher's subject and message id, and the body, cut to
        what fits in the server's max payload beside our headers (``Sandbus-Original-Size`` tells it
        was cut; the whole message stays in the topic stream at ``Sandbus-Original-Sequence`` until
        its limits drop it). Its ``Content-Type`` is the original's (when a valid media type, else JSON's,
        as the protocol reads a message without one). A dead letter larger than the max payload made the
        server close the node's connection, again on every redelivery.
        """
        _, headers = error_reply(err)
        # The body is the original's, byte for byte: so is its media type (raw bytes stay bytes to a reader).
        original_type = valid_media_type(msg.headers.get(H_CONTENT_TYPE)) if msg.headers else None
        headers[H_CONTENT_TYPE] = original_type or CONTENT_TYPE
        headers.update({"Sandbus-Original-Subject": header_value(msg.subject, MAX_DLQ_SUBJECT),
                        "Sandbus-Deliveries": str(attempt), "Sandbus-Original-Size": str(len(msg.data))})
        with contextlib.suppress(Exception):  # not a JetStream message (tests): no sequence to give
            headers["Sandbus-Original-Sequence"] = str(int(msg.metadata.sequence.stream))
        if msg.headers and H_MSG_ID in msg.headers:
            headers[H_MSG_ID] = header_value(msg.headers[H_MSG_ID], MAX_DLQ_MSG_ID)
        room = max(0, self.nc.max_payload - DLQ_HEADER_ROOM)
        try:
            await self.js.publish(dlq_subject(plugin), msg.data[:room], headers=headers)
        except Exception as e:  # JetStream away, the DLQ stream refusing: retry while deliveries remain
            retry = attempt < self.max_deliver
            log.warning("could not dead-letter %s for %s (%r): %s", headers["Sandbus-Original-Subject"], plugin, e,
                        "retrying" if retry else "giving up; it stays in the topic stream")
            self._audit(AuditLevel.WARNING, "delivery.dead_letter_failed", plugin,
                        f"{headers['Sandbus-Original-Subject']} could not be dead-lettered: {e!r}",
                        error=repr(e)[:512], deliveries=attempt,
                        sequence=headers.get("Sandbus-Original-Sequence"))
            if retry:
                await msg.nak(delay=_backoff(attempt))
            else:
                await msg.term()
            return
        await msg.term()
        subject = headers["Sandbus-Original-Subject"]
        log.warning("dead-lettered %s for %s after %d deliveries: %s", subject, plugin, attempt, headers[H_ERROR])
        self._audit(
            AuditLevel.WARNING, "delivery.dead_letter", plugin,
            f"{subject} dead-lettered after {attempt} deliveries: {headers[H_ERROR]}",
            subject=subject, error_code=headers[H_ERROR_CODE], deliveries=attempt,
        )

    def reconnected(self) -> None:
        """After a reconnect the server may have lost the open pull requests: send new ones now."""
        for plugin, wake in self._wakes.items():
            self._reissue.add(plugin)
            wake.set()

    async def stop_plugin(self, plugin: str, timeout: float = 15.0) -> None:
        """Stop fetching; deliveries in flight finish (and are acked) first, within ``timeout``; the acks
        are flushed to the server before this returns."""
        task = self._loops.pop(plugin, None)
        self._configs.pop(plugin, None)
        self._alive_at.pop(plugin, None)
        self._lost.discard(plugin)
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
        except Exception:
            pass  # the loop died with an error: already logged by its supervisor
        finally:
            self._stopping.discard(plugin)
            psub = self._psubs.pop(plugin, None)
            if psub is not None:
                with contextlib.suppress(Exception):
                    await psub.unsubscribe()
            # The last acks are in nats-py's buffer: a PING/PONG behind them (flush) is the server's
            # word that it has them. Without it a close right after could lose them (redelivered later).
            with contextlib.suppress(Exception):
                await self.nc.flush(timeout=ACK_FLUSH_TIMEOUT_S)

    async def stop(self) -> None:
        for plugin in list(self._loops):
            await self.stop_plugin(plugin)
