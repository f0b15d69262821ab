"""nats-py's client, hardened so that no message a peer publishes can stop it from reading.

Why: nats-py 2.16 decodes a message's subject, reply subject and header status line as strict UTF-8
inside its read loop (``Client._build_message`` / ``Client._process_headers``). nats-server relays
subjects byte for byte, so any client on the account can publish ``PUB sandbus.req.x.\\xff``; every
subscriber whose wildcard or queue subscription matches then gets a ``UnicodeDecodeError`` in its
read loop, which nats-py logs and ends *without* reconnecting (``Client._read_loop``'s last
``except Exception``). The connection stays "connected" but deaf until the stale-ping check
notices, about 6 minutes with nats-py's default pings (120 s x 2).

:class:`GuardedNatsClient` fixes both halves:

* a message the client cannot turn into a ``Msg`` is dropped and reported to the error callback
  (counted in :attr:`GuardedNatsClient.dropped_messages`); the parser has already consumed its
  bytes, so reading goes on with the next message and nothing else is lost;
* if the read loop ends for any other reason while the connection is up, the client reconnects at
  once instead of waiting for pings;
* pings default to every :data:`PING_INTERVAL_S` seconds, :data:`MAX_OUTSTANDING_PINGS` unanswered
  meaning a stale connection, so a dead peer is noticed within ~20 s;
* the fields of a ``MSG``/``HMSG`` line are split the way nats-server writes them (see
  :class:`StrictParser`), so no byte a publisher puts in a subject can move the line's fields;
* message frames are cut out of what the server sends by sdk/_frames.c where it is built (the
  canonical ``MSG``/``HMSG`` forms only; anything else goes to nats-py's parser, see
  :class:`StrictParser`): about 4 us a message instead of 11 from the socket to a direct handler;
* a subscription may have its messages handled right in the read loop
  (:meth:`GuardedNatsClient.dispatch_directly`), skipping the subscription's queue and task when
  its handler can finish at once (a request answered inline: several microseconds a message);
* a header block of ASCII bytes (every one sandbus sends) is parsed by :func:`header_lines`, with
  nats-py's rules but faster (the five headers of a message published by sandbus's Client: 3.1 us
  instead of 7.8); any other block (a status line, other bytes) goes to nats-py's parser; a block
  of more than :data:`MAX_HEADER_LINES` lines is not parsed at all (its message is dropped and reported);
* ``flush()`` is a barrier again: nats-py 2.16 writes a flush's PING straight to the socket while
  commands queued before it (a ``SUB``, a ``PUB``) still wait for the flusher task, so the PONG could
  come back before the server had seen the subscription, and a request sent next got "no responders".
  Here the PING is queued behind them.

It relies on nats-py internals (``_process_msg``, ``_read_loop``, ``_process_op_err``, ``_status``,
``_send_ping``, ``_pongs``, ``_send_command``, ``_flush_pending``, ``_build_message``, ``_subs``, ``_ps``,
the parser's ``buf``/``state``/``needed`` and the ``MSG_RE``/``HMSG_RE`` globals of ``Parser.parse``),
which is why nats-py's major is pinned; tests/bus/test_hardening_bus.py sends the raw messages through
a real nats-server and fails if the library moves under it, and tests/bus/test_frames.py holds the
compiled frame cutter to nats-py's parser.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
import types
from collections.abc import Callable
from typing import Any

from nats import errors as nats_errors
from nats.aio.client import PING_PROTO
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol import parser as nats_parser

__all__ = ["MAX_HEADER_LINES", "MAX_OUTSTANDING_PINGS", "PING_INTERVAL_S", "REPORT_EVERY_S", "DirectHandler",
           "GuardedNatsClient", "StrictParser", "UndeliverableMessage", "header_lines"]

log = logging.getLogger("sandbus.bus")

#: seconds between client PINGs (nats-py's default is 120)
PING_INTERVAL_S = 5
#: unanswered PINGs after which the connection is stale and replaced
MAX_OUTSTANDING_PINGS = 3
#: bytes of a bad subject quoted in a report
_QUOTE = 64
#: at most one report of dropped messages per this many seconds (a flood of them is one line a second)
REPORT_EVERY_S = 1.0
#: most lines of a header block read; a message with more is dropped and reported. A header block
#: costs the read loop per line, not per byte: a megabyte of one-line headers (250,000 lines) held it
#: for 80 ms (186 ms with nats-py's parser), so a publisher sending such blocks stalled every node it
#: reached, while one header of a megabyte (a reply's ``Sandbus-Trace-Spans``) takes 4 ms. Sandbus
#: sends fewer than ten lines.
MAX_HEADER_LINES = 1024


class UndeliverableMessage(nats_errors.Error):
    """A message the client could not decode (handed to the error callback, then dropped)."""


# nats-server ends a subject at ' ', '\t', '\r' or '\n' (its ``splitArg``) and relays every other byte,
# \x0b and \x0c included, then writes "MSG <subject> <sid> [<reply>] <size>" with single spaces.
# nats-py splits that line on ``\s``, which also matches \x0b and \x0c: a publisher choosing the
# subject ``public.x\x0b7`` had its message handed to the subscriber's subscription 7 (whatever that
# is: a control endpoint, a JetStream pull inbox), and other such subjects made the parser raise
# (a reconnect per message) or never match (deaf until the stale-ping check, ~20 s). Fields here are
# split on exactly what the server splits on.
_FIELD = rb"([^ \t\r\n]+)"
_SEP = rb"[ \t]+"
STRICT_MSG_RE = re.compile(rb"\AMSG" + _SEP + _FIELD + _SEP + _FIELD + _SEP + rb"(" + _FIELD + _SEP + rb")?(\d+)\r\n")
STRICT_HMSG_RE = re.compile(rb"\AHMSG" + _SEP + _FIELD + _SEP + _FIELD + _SEP + rb"(" + _FIELD + _SEP + rb")?(\d+)"
                            + _SEP + rb"(\d+)\r\n")


def _strict_parse() -> Any:
    """nats-py's own ``Parser.parse``, reading ``MSG_RE``/``HMSG_RE`` from globals where they are strict.

    Reusing the library's code (not a copy of its text) keeps every other part of the protocol as the
    pinned nats-py has it; the names it must read are checked, and tests/bus/test_hardening_bus.py
    sends the hostile subjects through a real nats-server.
    """
    parse = nats_parser.Parser.parse
    code = parse.__code__
    if not {"MSG_RE", "HMSG_RE"} <= set(code.co_names) or parse.__closure__:
        log.warning("nats-py's parser changed: subjects with \\x0b/\\x0c are parsed by the library's rules")
        return parse
    scope = {**vars(nats_parser), "MSG_RE": STRICT_MSG_RE, "HMSG_RE": STRICT_HMSG_RE}
    return types.FunctionType(code, scope, parse.__name__, parse.__defaults__)


def _native_scan() -> Callable[[bytearray], tuple[list[Frame], int, int]] | None:
    """The compiled frame scanner (sdk/_frames.c), or None: not built, or ``SANDBUS_NATIVE=0``."""
    if os.environ.get("SANDBUS_NATIVE", "1") == "0":
        return None
    try:
        from sandbus.sdk import _frames
    except ImportError:
        return None
    return _frames.scan


#: one message frame as :func:`sandbus.sdk._frames.scan` cuts it: sid, subject, reply, header block, body
Frame = tuple[int, bytes, bytes, bytes | None, bytes]
#: what :func:`sandbus.sdk._frames.scan` says is left after the frames it cut, when nats-py's parser must
#: take over: something only it reads, or a frame whose body is not complete (0: nothing, 1: a line to
#: wait for, are left in the buffer)
_OTHER, _NEED_BODY = 2, 3


class StrictParser(nats_parser.Parser):
    """nats-py's protocol parser with ``MSG``/``HMSG`` fields split as nats-server separates them,
    and message frames cut in C where that extension is built.

    The compiled scanner (sdk/_frames.c) cuts the canonical ``MSG``/``HMSG`` frames at the front of
    the buffer in one call (about 0.3 us a frame against 4.7 in the library's parser). Whatever it
    does not read (a ``PING``, an ``INFO``, ``-ERR``, a line not in the form nats-server writes) is
    left to the library's parser from there, so those are parsed, refused or waited on exactly as
    before; tests/bus/test_frames.py holds the two to the same calls on generated hostile streams.
    Each message cut goes first to the client's synchronous path
    (:meth:`GuardedNatsClient._take_now`), and only when that declines to the awaiting
    ``_process_msg``.
    """

    library_parse = _strict_parse()

    def __init__(self, nc: Any = None) -> None:
        super().__init__(nc)
        #: the compiled scanner; None parses everything with the library's parser
        self.scan = _native_scan()

    async def parse(self, data: bytes = b"") -> None:
        scan = self.scan
        if scan is None:
            await self.library_parse(data)
            return
        buf = self.buf
        buf.extend(data)
        if self.state != nats_parser.AWAITING_CONTROL_LINE:
            # The library read this message's control line and waits for its body: it finishes that
            # message alone (handed exactly its bytes), and the frames after it come back here. A header
            # size past the body (no server sends one) makes it read further: then it reads on itself.
            need = self.needed + nats_parser.CRLF_SIZE
            if len(buf) < need:
                return
            if self.header_needed > self.needed:
                await self.library_parse()
                return
            rest = buf[need:]
            del buf[need:]
            await self.library_parse()
            if self.buf is not buf:  # reset (a reconnect) while the message was handled
                return
            buf.extend(rest)
        frames, used, status = scan(buf)
        del buf[:used]
        nc = self.nc
        for sid, subject, reply, headers, body in frames:
            taken = nc._take_now(sid, subject, reply, body, headers)
            if taken is False:
                await nc._process_msg(sid, subject, reply, body, headers)
            elif taken is not True:
                await nc._refused(subject, taken)
        if status in (_OTHER, _NEED_BODY) and self.buf is buf:
            # Something only the library reads; or a frame whose body is still coming, whose control
            # line the library then takes once, and only counts bytes after that (scanning the line
            # again at every read cost up to 4 KiB a read for a large body under a long line).
            await self.library_parse()


#: handles one message in the read loop: True when done with it, False to queue it for the subscription's callback
DirectHandler = Callable[[Msg], bool]

#: the first line of a header block without an inline status (``NATS/1.0 503`` has one)
_PLAIN_HEADER_LINE = b"NATS/1.0\r\n"
#: what nats-py strips around a header's name and value (``bytes.strip()``: ASCII whitespace)
_STRIP = " \t\n\r\x0b\x0c"
#: what makes nats-py drop a header name (``str.isspace`` on ASCII: \x1c-\x1f too)
_SPACE_IN_NAME = re.compile(r"[\t\n\x0b\x0c\r\x1c-\x1f ]")


def header_lines(block: bytes) -> dict[str, str] | None:
    """The headers of a ``NATS/1.0`` block without an inline status, as nats-py 2.x's
    ``Client._process_headers`` reads them, for a block of ASCII bytes; None for any other block
    (a status line, a byte above 0x7f), which only nats-py's parser reads.

    An empty dict is a block with no header (nats-py then gives the message ``headers=None``).
    tests/bus/test_direct_dispatch.py checks that the two agree on generated blocks.
    """
    if not block.startswith(_PLAIN_HEADER_LINE) or not block.isascii():
        return None
    out: dict[str, str] = {}
    if len(block) <= len(_PLAIN_HEADER_LINE):
        return out
    for line in block[len(_PLAIN_HEADER_LINE):].decode("ascii").split("\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip(_STRIP)
        # A printable name without a space has no whitespace: the regex only for the rare other ones.
        if (" " in key or not key.isprintable()) and _SPACE_IN_NAME.search(key) is not None:
            continue
        out[key] = value.strip(_STRIP)
    return out


def _unfinished(queue: asyncio.Queue[Msg]) -> int:
    """Messages put in a subscription's queue whose callback has not finished (waiting, or running).

    nats-py's subscription task calls ``task_done()`` after each callback (what ``drain`` joins on);
    asyncio counts that in ``_unfinished_tasks``. A Python without it: the messages still waiting.
    """
    count = getattr(queue, "_unfinished_tasks", None)
    return count if isinstance(count, int) else queue.qsize()


class GuardedNatsClient(NatsClient):
    """A nats-py ``Client`` whose read loop no published message can end (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._ps = StrictParser(self)
        #: messages dropped because the client could not decode them
        self.dropped_messages = 0
        #: times the read loop ended unexpectedly and a reconnect was forced
        self.read_loop_restarts = 0
        self._reported_at = -REPORT_EVERY_S
        self._reported_drops = 0
        #: subscription id -> the handler its messages go to first (:meth:`dispatch_directly`)
        self._direct: dict[int, DirectHandler] = {}
        #: subscriptions whose handler sees no message while older ones wait for the callback
        self._in_order: set[int] = set()

    def dispatch_directly(self, sub: Subscription, handler: DirectHandler, *, keep_order: bool = False) -> None:
        """Hand each message of ``sub`` to ``handler`` in the read loop, before the subscription's queue.

        Why: nats-py puts every message in its subscription's ``asyncio.Queue``, and a task per
        subscription takes it out and awaits the callback: a queue hand-off, a task wake-up and a
        coroutine per message, a few microseconds each for a request that costs a node ~50 in all. A handler that
        can finish at once (no await) does so here and returns True; it returns False for a message
        it leaves alone, which then goes to the subscription's callback as it would have, with
        nats-py's slow-consumer limits. The handler runs while nothing else is read: it must be
        quick and must not raise (one that raises is logged and its message queued, so the
        callback still sees it). ``sub`` must have a callback, no message limit and no JetStream
        context; the registration ends with the subscription.

        ``keep_order``: while messages the handler left wait in the queue or run in the callback,
        later ones go behind them without being offered to the handler. Without it a handler that
        declines under load (a request waiting for its turn on the loop) lets newer messages overtake
        the ones it queued, again and again under a steady flood, so those starve.
        """
        if sub._cb is None or sub._max_msgs > 0 or sub._jsi is not None:
            raise ValueError("direct dispatch needs a subscription with a callback, no message limit and no "
                             "JetStream context")
        # nats-py drops some subscriptions without _remove_sub (one that reached an unsubscribe limit,
        # in its read loop or at a reconnect): their registrations go here, or with their next message.
        for gone in [sid for sid in self._direct if sid not in self._subs]:
            self._forget(gone)
        self._direct[sub._id] = handler
        if keep_order:
            self._in_order.add(sub._id)
        else:
            self._in_order.discard(sub._id)

    def _forget(self, sid: int) -> None:
        self._direct.pop(sid, None)
        self._in_order.discard(sid)

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        self._forget(sid)
        super()._remove_sub(sid, max_msgs)

    def _take_now(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
                  ) -> bool | nats_errors.SlowConsumerError:
        """What ``_process_msg`` does with a message of a directly dispatched subscription, without
        awaiting: True when it is done with it, an error for the error callback when the subscription
        refused it as a slow consumer's, False (with nothing done yet) when the message must take the
        awaiting path: no direct handler, a header block or subject only nats-py's parser reads."""
        handler = self._direct.get(sid)
        if handler is None:
            return False
        sub = self._subs.get(sid)
        if sub is None or sub._max_msgs > 0:
            return False
        parsed: dict[str, str] | None = None
        if headers:
            if len(headers) > 2 * MAX_HEADER_LINES:
                return False  # counted (and maybe refused) by _process_headers
            parsed = header_lines(headers)
            if parsed is None:
                return False
            parsed = parsed or None
        try:
            msg = self._build_message(sid, subject, reply, data, parsed)
        except UnicodeDecodeError:
            return False  # dropped and reported by _process_msg
        self._count(sub, len(data))
        refused = self._offer(handler, sid, sub, msg, len(data))
        return True if refused is None else refused

    def _count(self, sub: Subscription, size: int) -> None:
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += size
        sub._received += 1

    def _offer(self, handler: DirectHandler, sid: int, sub: Subscription, msg: Msg, size: int
               ) -> nats_errors.SlowConsumerError | None:
        """The handler first, then the subscription's queue (nats-py's slow-consumer limits): None when
        the message is taken, or the error to report when the queue refused it."""
        try:
            if (sid not in self._in_order or not _unfinished(sub._pending_queue)) and handler(msg):
                return None
        except Exception:
            log.exception("a direct handler of %s raised: the message goes to the subscription's callback",
                          sub.subject)
        sub._pending_size += size
        if 0 < sub._pending_bytes_limit <= sub._pending_size:
            sub._pending_size -= size
            return nats_errors.SlowConsumerError(subject=msg.subject, reply=msg.reply, sid=sid, sub=sub)
        try:
            sub._pending_queue.put_nowait(msg)
        except asyncio.QueueFull:
            sub._pending_size -= size
            return nats_errors.SlowConsumerError(subject=msg.subject, reply=msg.reply, sid=sid, sub=sub)
        return None

    async def _dispatch(self, handler: DirectHandler, sid: int, subject: bytes, reply: bytes, data: bytes,
                        headers: bytes) -> None:
        """``_process_msg`` for a subscription with a direct handler (nats-py's steps for a plain
        subscription with a callback, with the handler before the queue)."""
        sub = self._subs.get(sid)
        if sub is None or sub._max_msgs > 0:  # gone, or given a limit since (``unsubscribe(limit)``)
            await super()._process_msg(sid, subject, reply, data, headers)
            if sid not in self._subs:  # gone, or its limit reached just now: nats-py dropped it
                self._forget(sid)
            return
        self._count(sub, len(data))
        msg = self._build_message(sid, subject, reply, data, await self._process_headers(headers))
        refused = self._offer(handler, sid, sub, msg, len(data))
        if refused is not None:
            await self._error_cb(refused)

    async def connect(self, *args: Any, **options: Any) -> None:
        """``nats-py``'s ``connect``, with sandbus's ping defaults unless the caller sets its own."""
        options.setdefault("ping_interval", PING_INTERVAL_S)
        options.setdefault("max_outstanding_pings", MAX_OUTSTANDING_PINGS)
        await super().connect(*args, **options)

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        self._pongs.append(future if future is not None else asyncio.Future())
        await self._send_command(PING_PROTO)  # in order, after whatever was queued before the flush
        await self._flush_pending()

    async def _process_headers(self, headers: bytes) -> dict[str, str] | None:
        if headers:  # None for a message without headers
            # A block shorter than two bytes a line cannot have too many: no count on the hot path.
            if len(headers) > 2 * MAX_HEADER_LINES and (lines := headers.count(b"\r\n")) > MAX_HEADER_LINES:
                raise UndeliverableMessage(f"a header block of {lines} lines (at most {MAX_HEADER_LINES} are read)")
            parsed = header_lines(headers)
            if parsed is not None:
                return parsed or None
        return await super()._process_headers(headers)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        try:
            handler = self._direct.get(sid)
            if handler is None:
                await super()._process_msg(sid, subject, reply, data, headers)
            else:
                await self._dispatch(handler, sid, subject, reply, data, headers)
        except Exception as e:
            await self._dropped(subject, e)

    async def _refused(self, subject: bytes, err: nats_errors.SlowConsumerError) -> None:
        """Report a message its subscription refused (the synchronous path's share of ``_dispatch``)."""
        try:
            await self._error_cb(err)
        except Exception as e:
            await self._dropped(subject, e)

    async def _dropped(self, subject: bytes, e: Exception) -> None:
        """Count a message the client could not hand over, and report it (at most once a second)."""
        # The parser consumed the message before handing it over: dropping it loses nothing else.
        self.dropped_messages += 1
        now = time.monotonic()
        if now - self._reported_at < REPORT_EVERY_S:
            return  # counted; reported with the next report
        unreported = self.dropped_messages - self._reported_drops - 1
        self._reported_at, self._reported_drops = now, self.dropped_messages
        report = UndeliverableMessage(
            f"dropped a message on {bytes(subject[:_QUOTE])!r} that nats-py could not decode: {e!r}"
            + (f" ({unreported} more dropped since the last report)" if unreported else ""))
        try:
            await self._error_cb(report)
        except Exception:  # the application's callback must not end the read loop either
            log.warning("%s", report)

    async def _read_loop(self) -> None:
        await super()._read_loop()
        # nats-py's loop returns after a cancel (reconnect, close: the status says so), after an error
        # it handed to _process_op_err (reconnecting already), or after an exception it only logged:
        # then the connection looks up but nobody reads it. Reconnect at once.
        if self.is_connected and not self.is_reconnecting and not self.is_closed:
            self.read_loop_restarts += 1
            url = self.connected_url
            shown = re.sub(r"//[^/@]*@", "//***@", url.geturl() if url is not None else "?")  # no password in logs
            log.error("NATS read loop ended unexpectedly on %s: reconnecting now", shown)
            await self._process_op_err(nats_errors.ProtocolError())
