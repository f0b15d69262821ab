"""Attacks on the compiled frame reader (sdk/_frames.c) and the parser glue around it (sdk/nats_guard.py).

The reader must behave as nats-py's parser for every stream and every way of cutting it into reads,
cost no more per byte, and keep the client's bookkeeping as nats-py keeps it. Tests that show an attack
failing stay as coverage the differential tests in tests/bus/test_frames.py lack: every single split of
a stream, control lines at nats-server's max_control_line, hostile subjects through a real nats-server
read by a native and a library client side by side, and a million tiny frames.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from sandbus.bus.server import NatsServer
from sandbus.sdk.nats_guard import GuardedNatsClient, StrictParser
from tests.bus.test_frames import _feed
from tests.bus.test_hardening_bus import raw_publish

_frames = pytest.importorskip("sandbus.sdk._frames", reason="the frame scanner is not built")


def _port(srv: NatsServer) -> int:
    return int(srv.url.rsplit(":", 1)[1])


async def _until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)  # yields to the read loop that makes the condition true


def _library_only(nc: GuardedNatsClient) -> None:
    """What SANDBUS_NATIVE=0 gives: every byte parsed by nats-py's parser."""
    parser = nc._ps
    assert isinstance(parser, StrictParser)
    parser.scan = None


async def _client(url: str, *, native: bool) -> GuardedNatsClient:
    nc = GuardedNatsClient()
    if not native:
        _library_only(nc)
    await nc.connect(url)
    return nc


# -- attacks that found something, fixed since ----------------------------------------------------------


def test_a_header_size_beyond_the_frame_held_across_reads_gives_what_nats_py_gives() -> None:
    """A hostile or broken server stream. An HMSG whose header size exceeds its total size is
    left to nats-py's parser; when that parser holds it across reads, it reads ``header_size`` bytes of
    whatever the buffer holds (here the next frame too), so it must be handed the whole buffer, not only
    ``needed + 2`` bytes. tests/bus/test_frames.py's bend (total + 1) is one byte too small to show it."""
    for lead in (b"", b"PING\r\n"):
        chunks = [lead + b"HMSG a 1 20 5\r\nhel", b"lo\r\nMSG b 2 2\r\nhi\r\n"]
        assert _feed(chunks, native=True) == _feed(chunks, native=False)


def test_a_large_body_under_a_long_control_line_is_not_scanned_again_at_every_read() -> None:
    """Any publisher can send a message whose MSG line is just under the scanner's MAX_LINE (a
    ~4000-byte subject that matches ``sandbus.req.<plugin>.*``, and a reply subject): nats-server
    relays it (see the long-subject test below). While its body arrives, scanning the line again at
    every read cost ~6x what nats-py's parser spends (19 ms against 2.9 ms for 3 MB in 1448-byte
    reads); once the line is complete, nats-py's parser takes it and only counts bytes after that."""
    line = b"MSG sandbus.req.echo." + b"x" * 3970 + b" 1 _INBOX." + b"r" * 80 + b" 1000000\r\n"
    assert len(line) < _frames.MAX_LINE
    stream = (line + b"b" * 1_000_000 + b"\r\n") * 3
    chunks = [stream[i:i + 1448] for i in range(0, len(stream), 1448)]
    taken: list[bytes] = []

    class Taker:
        def _take_now(self, sid: int, subject: bytes, reply: bytes, body: bytes, headers: bytes | None) -> bool:
            taken.append(body)
            return True

        async def _process_msg(self, sid: int, subject: bytes, reply: bytes, body: bytes,
                               headers: bytes | None) -> None:
            taken.append(body)

    parser = StrictParser(Taker())
    real = parser.scan
    assert real is not None
    scans = 0

    def counting(buf: bytearray) -> Any:
        nonlocal scans
        scans += 1
        return real(buf)

    parser.scan = counting

    async def run() -> None:
        for chunk in chunks:
            await parser.parse(chunk)

    asyncio.run(run())
    assert [len(b) for b in taken] == [1_000_000] * 3
    assert not parser.buf
    # a scan per read only while a control line itself arrives, then none until its body is complete
    assert scans <= 3 * (len(line) // 1448 + 2), f"{scans} scans for {len(chunks)} reads"


async def test_a_direct_registration_ends_when_an_unsubscribe_limit_is_reached(nats_server: NatsServer) -> None:
    """Memory. ``sub.unsubscribe(limit)`` on a directly dispatched subscription: nats-py's ``_process_msg``
    drops the subscription with ``self._subs.pop(sid)`` when the limit is reached, not through
    ``_remove_sub``; the client's ``_direct`` and ``_in_order`` entries (the handler and all it holds)
    must go with it."""
    nc, pub = await _client(nats_server.url, native=True), await _client(nats_server.url, native=True)
    try:
        got: list[bytes] = []

        async def cb(msg: Msg) -> None:
            got.append(msg.data)

        sub = await nc.subscribe("lim.x", cb=cb)
        nc.dispatch_directly(sub, lambda m: True, keep_order=True)
        await sub.unsubscribe(limit=2)
        await nc.flush()
        for i in range(3):
            await pub.publish("lim.x", b"%d" % i)
        await pub.flush()
        await _until(lambda: len(got) == 2 and sub._id not in nc._subs, "the limit to end the subscription")
        assert sub._id not in nc._direct
        assert sub._id not in nc._in_order
    finally:
        await nc.close()
        await pub.close()


# -- attacks that fail (the code holds): coverage the existing tests lack ------------------------------

#: frames nats-server writes (hostile subject bytes, a status header, protocol text in a body, a line at
#: the scanner's limit and one past it) and what else it sends between them
_PIECES = [
    b"MSG a.\x00\x0b\x0c\x7f\xff 7 5\r\nhello\r\n",
    b"HMSG _INBOX.x 8 $JS.ACK.S.c.1.2.3.4.0 12 14\r\nNATS/1.0\r\n\r\nhi\r\n",
    b"PING\r\n",
    b"HMSG s.\xc3\xa9 9 r.\x0b7 16 16\r\nNATS/1.0 503\r\n\r\n\r\n",
    b"MSG b 7 r 14\r\nMSG x 1 1\r\nz\r\n\r\n",
    b"MSG " + b"l" * (_frames.MAX_LINE - 12) + b" 7 2\r\nok\r\n",  # its CR is the last byte scanned
    b"MSG " + b"m" * (_frames.MAX_LINE + 4) + b" 7 2\r\nok\r\n",  # past the limit: nats-py reads it
    b"+OK\r\nMSG c 7 000000003\r\nabc\r\n",
]


def test_every_single_split_of_a_stream_gives_the_calls_nats_py_gives() -> None:
    """The stream cut in two at every byte offset (right after a control line, inside a trailing CRLF,
    inside a line at MAX_LINE), and cut again after its PING so that nats-py's parser holds the next
    frame's control line: always the calls nats-py's parser makes."""
    stream = b"".join(_PIECES)
    whole = _feed([stream], native=False)
    assert len([c for c in whole if c[0] == "msg"]) == 7
    ping_end = stream.index(b"PING\r\n") + 6
    for cut in range(len(stream) + 1):
        chunks = [stream[:cut], stream[cut:]]
        assert _feed(chunks, native=True) == whole, cut
        if ping_end + 3 <= cut:
            held = [stream[:ping_end + 3], stream[ping_end + 3:cut], stream[cut:]]
            assert _feed(held, native=True) == whole, ("held", cut)


def test_a_frame_fed_one_byte_at_a_time_gives_the_calls_nats_py_gives() -> None:
    stream = b"".join(_PIECES)
    chunks = [stream[i:i + 1] for i in range(len(stream))]
    assert _feed(chunks, native=True) == _feed([stream], native=False)


def test_sizes_of_nine_and_ten_digits_and_sids_of_eighteen_and_nineteen_read_as_nats_py_reads_them() -> None:
    """The scanner's digit limits (MAX_DIGITS 9, MAX_SID_DIGITS 18) at and past the edge: the longer
    ones go to nats-py's parser, which reads the same numbers."""
    frames = [b"MSG a 7 000000002\r\nok\r\n", b"MSG a 7 0000000002\r\nok\r\n",
              b"MSG a 000000000000000007 2\r\nok\r\n", b"MSG a 0000000000000000007 2\r\nok\r\n",
              b"HMSG a 7 000000012 000000014\r\nNATS/1.0\r\n\r\nok\r\n",
              b"HMSG a 7 0000000012 0000000014\r\nNATS/1.0\r\n\r\nok\r\n",
              b"MSG a 999999999999999999 2\r\nok\r\n", b"MSG a 9999999999999999999 2\r\nok\r\n"]
    for frame in frames:
        assert _frames.scan(frame)[2] in (_frames.AT_END, _frames.OTHER)
        assert _feed([frame], native=True) == _feed([frame], native=False), frame
    stream = b"".join(frames)
    assert _feed([stream], native=True) == _feed([stream], native=False)


def _hpub(subject: bytes, reply: bytes, hdr: bytes, body: bytes) -> bytes:
    sizes = b"%d %d\r\n" % (len(hdr), len(hdr) + len(body))
    return b"HPUB " + subject + b" " + (reply + b" " if reply else b"") + sizes + hdr + body + b"\r\n"


def _has_end(seen: list[tuple[str, str, bytes, Any]], subject: str = "t.end") -> Callable[[], bool]:
    return lambda: any(s[0] == subject for s in seen)


async def test_hostile_and_long_subjects_through_nats_server_reach_both_parsers_alike(nats_server: NatsServer) -> None:
    """Subjects and reply subjects with every byte nats-server relays, up to its max_control_line
    (a PUB line of 4096 bytes is refused; the MSG line it relays for one just under is longer than
    the scanner's limit), header blocks of several shapes and bodies holding protocol text, published
    raw: a native client and a SANDBUS_NATIVE=0 client, both with a direct handler, see the same
    messages in the same order, both drop only the one whose subject is not UTF-8 and the one whose
    header block nats-py cannot read, and neither restarts its read loop."""
    seen: dict[bool, list[tuple[str, str, bytes, Any]]] = {True: [], False: []}
    clients: dict[bool, GuardedNatsClient] = {}
    for native in (True, False):
        nc = clients[native] = await _client(nats_server.url, native=native)

        async def cb(msg: Msg, into: list[tuple[str, str, bytes, Any]] = seen[native]) -> None:
            into.append((msg.subject, msg.reply, msg.data, msg.headers))

        sub = await nc.subscribe(">", cb=cb)

        def direct(msg: Msg, into: list[tuple[str, str, bytes, Any]] = seen[native]) -> bool:
            into.append((msg.subject, msg.reply, msg.data, msg.headers))
            return True

        nc.dispatch_directly(sub, direct)
        await nc.flush()
    try:
        pubs = [b"PUB t.\x00\x01\x7f.\x0b.\x0c.\x1c 5\r\nhello\r\n",
                b"PUB t.\xc3\xa9 r.\x7f 14\r\nMSG x 1 1\r\nz\r\n\r\n",
                _hpub(b"t.h", b"", b"NATS/1.0\r\nA: b\r\nC:  d \r\n\r\n", b"hi"),
                _hpub(b"t.h", b"r", b"NATS/1.0 100 Idle Heartbeat\r\n\r\n", b""),
                _hpub(b"t.h", b"", b"NATS/1.0\r\nX: \xe2\x82\xac\r\n\r\n", b"PING\r\n")]
        for n in (3990, 4080, 4092):  # the MSG lines: ~4000 bytes, at the scanner's limit, past it
            pubs.append(b"PUB t." + b"s" * n + b" 2\r\nok\r\n")
        pubs.append(b"PUB t.r " + b"r" * 4088 + b" 2\r\nok\r\n")
        pubs.append(b"PUB t." + b"a" * 3990 + b" _INBOX." + b"r" * 80 + b" 1000000\r\n" + b"B" * 1_000_000 + b"\r\n")
        pubs.append(b"PUB t.\xff 2\r\nok\r\n")  # not UTF-8: dropped and reported by both, reading goes on
        pubs.append(b"HPUB t.z 0 5\r\nhello\r\n")  # relayed with an empty header block
        pubs.append(b"HPUB t.g 3 5\r\nhello\r\n")  # a header block "hel": nats-py raises, both drop it
        pubs.append(b"PUB t.end 3\r\nend\r\n")
        raw_publish(_port(nats_server), *pubs)
        for native in (True, False):
            await _until(_has_end(seen[native]), "the last message")
        assert seen[True] == seen[False]
        assert len(seen[True]) == len(pubs) - 2
        assert [len(s[0]) for s in seen[True][5:9]] == [3992, 4082, 4094, 3]
        assert len(seen[True][9][2]) == 1_000_000
        for nc in clients.values():
            assert nc.dropped_messages == 2
            assert nc.read_loop_restarts == 0
            assert nc.is_connected
    finally:
        for nc in clients.values():
            await nc.close()


async def test_a_publish_line_past_max_control_line_costs_the_subscriber_nothing(nats_server: NatsServer) -> None:
    """nats-server refuses a PUB line longer than its max_control_line (and closes that publisher), so
    no MSG line a publisher can cause is much longer than MAX_LINE; the subscriber reads on."""
    nc = await _client(nats_server.url, native=True)
    try:
        got: list[str] = []

        async def cb(msg: Msg) -> None:
            got.append(msg.subject)

        await nc.subscribe("u.>", cb=cb)
        await nc.flush()
        with pytest.raises((AssertionError, OSError)):  # the server answers -ERR and closes the connection
            raw_publish(_port(nats_server), b"PUB u." + b"x" * 8000 + b" 2\r\nok\r\n")
        raw_publish(_port(nats_server), b"PUB u.after 2\r\nok\r\n")
        await _until(lambda: got == ["u.after"], "the next message")
        assert nc.read_loop_restarts == 0
        assert nc.dropped_messages == 0
    finally:
        await nc.close()


def test_a_million_tiny_frames_keep_the_buffer_bounded() -> None:
    """``del buf[:used]`` after each scan: the read buffer never holds more than about one read, however
    many frames pass (a frame is left incomplete at the end of every read)."""
    unit = b"MSG a.b 1 5\r\nhello\r\nHMSG x 2 r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n"
    stream = unit * 10_000  # 20,000 frames, 520 kB
    read = 32_761  # not a multiple of the frame sizes: every read ends inside a frame

    class Counter:
        taken = 0

        def _take_now(self, *args: Any) -> bool:
            self.taken += 1
            return True

        async def _process_msg(self, *args: Any) -> None:
            self.taken += 1  # a frame split across reads may take the awaiting path

    nc = Counter()
    parser = StrictParser(nc)
    largest = 0

    async def run() -> None:
        nonlocal largest
        for _ in range(50):
            for i in range(0, len(stream), read):
                await parser.parse(stream[i:i + read])
                largest = max(largest, sys.getsizeof(parser.buf))

    asyncio.run(run())
    assert nc.taken == 1_000_000
    assert not parser.buf
    assert largest < 2 * read


def test_the_scanner_leaks_nothing_on_any_outcome() -> None:
    """scan() on frames read, incomplete, refused, from bytes, bytearray and memoryview:
    the Python heap does not grow with the number of calls."""
    inputs = [b"MSG a 1 5\r\nhello\r\nHMSG x 2 r 12 14\r\nNATS/1.0\r\n\r\nhi\r\n" * 20, b"MSG a 1 5\r\nhel",
              b"PING\r\n", b"HMSG a 1 99 5\r\n", b"MSG " + b"a" * 5000, b"MS", b"MSG a 1 5\r\nhelloXY"]

    def burst(n: int) -> None:
        for _ in range(n):
            for data in inputs:
                _frames.scan(data)
                _frames.scan(bytearray(data))
                _frames.scan(memoryview(data))

    burst(100)
    gc.collect()
    tracemalloc.start()
    try:
        burst(100)
        gc.collect()
        first = tracemalloc.get_traced_memory()[0]
        burst(5000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - first
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept after 105,000 scans"


class _Unconnected(GuardedNatsClient):
    """A client fed by hand: the PINGs and PONGs it reads are written down instead of answered."""

    def __init__(self) -> None:
        super().__init__()
        self.control: list[str] = []

    async def _process_ping(self) -> None:
        self.control.append("ping")

    async def _process_pong(self) -> None:
        self.control.append("pong")


def _two_subscriptions(chunks: list[bytes], *, native: bool, accept_every: int, in_order: bool, limit: int,
                       byte_limit: int, raising: bool, ends: str) -> tuple[Any, ...]:
    """What a client hands sid 7 (directly dispatched) and sid 8 (plain) for ``chunks`` read one by one:
    the handler's calls, the queues, the error callback, the counters. ``ends``: how sid 7 ends in the
    middle of a read: "" (it does not), "remove" (its handler unsubscribes on the third message),
    "limit" (``unsubscribe(limit=2)`` before the read)."""
    nc = _Unconnected()
    if not native:
        _library_only(nc)
    seen: list[Any] = []
    errors: list[str] = []

    async def on_error(e: Exception) -> None:
        errors.append(type(e).__name__)
        if raising:
            raise RuntimeError("the application's callback failed")

    async def cb(msg: Msg) -> None:
        pass

    def handler(msg: Msg) -> bool:
        seen.append((msg.subject, msg.reply, msg.data, msg.headers))
        if ends == "remove" and len(seen) == 3:
            nc._remove_sub(7)
        if msg.data == b"raise":
            raise ValueError("the handler failed")
        return len(msg.data) % accept_every != 0

    async def run() -> tuple[Any, ...]:
        nc._error_cb = on_error
        subs = [Subscription(nc, sid, "s.>", cb=cb, pending_msgs_limit=limit, pending_bytes_limit=byte_limit)
                for sid in (7, 8)]
        for sub in subs:
            nc._subs[sub._id] = sub
        nc.dispatch_directly(subs[0], handler, keep_order=in_order)
        if ends == "limit":
            subs[0]._max_msgs = 2  # what sub.unsubscribe(limit=2) sets
        for chunk in chunks:
            try:
                await nc._ps.parse(chunk)
            except Exception as e:
                seen.append(("raised", type(e).__name__))
                break
        queued = []
        for sub in subs:
            while not sub._pending_queue.empty():
                m = sub._pending_queue.get_nowait()
                queued.append((sub._id, m.subject, m.data, m.headers))
        return (seen, queued, errors, nc.stats["in_msgs"], nc.stats["in_bytes"], [s._received for s in subs],
                [s._pending_size for s in subs], sorted(nc._subs), nc.dropped_messages, nc.control)

    return asyncio.run(run())


@st.composite
def _frame_for(draw: st.DrawFn) -> bytes:
    """A frame as nats-server writes it for sid 7, 8 or an unknown one, hostile in subject, reply,
    headers or body (a subject at the scanner's line limit included), or something else it sends."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"PING\r\n", b"PONG\r\n", b"+OK\r\n"]))
    sid = draw(st.sampled_from([b"7", b"7", b"8", b"9"]))
    subject = b"s." + draw(st.sampled_from([b"a", b"\xff", b"\x0b", b"\xc3\xa9", b"b" * 4070, b"b" * 4090]))
    reply = draw(st.sampled_from([b"", b"r", b"\xff"]))
    hdr = draw(st.sampled_from([b"", b"NATS/1.0\r\n\r\n", b"NATS/1.0\r\nA: b\r\n\r\n", b"NATS/1.0 503\r\n\r\n",
                                b"NATS/1.0\r\nX: \xff\r\n\r\n", b"NATS/1.0\r\n" + b"A: b\r\n" * 1100 + b"\r\n"]))
    body = draw(st.sampled_from([b"", b"x", b"xy", b"raise", b"\xff\xff\xff", b"MSG s.a 7 1\r\nz\r\n"]))
    line = (b"HMSG " if hdr else b"MSG ") + subject + b" " + sid + b" " + (reply + b" " if reply else b"")
    line += (b"%d " % len(hdr) if hdr else b"") + b"%d\r\n" % (len(hdr) + len(body))
    return line + hdr + body + b"\r\n"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_frame_for(), min_size=1, max_size=8).map(b"".join), st.lists(st.integers(0, 10**6), max_size=4),
       st.sampled_from([1, 2, 3, 100]), st.booleans(), st.sampled_from([0, 1, 3]), st.sampled_from([0, 3, 10**6]),
       st.booleans(), st.sampled_from(["", "remove", "limit"]))
def test_split_reads_reach_handlers_queues_and_counters_as_through_nats_py(
        stream: bytes, cuts: list[int], accept_every: int, in_order: bool, limit: int, byte_limit: int,
        raising: bool, ends: str) -> None:
    """The client-level differential of tests/bus/test_frames.py, read in pieces (so nats-py's parser
    holds some frames across reads and hands them over through the awaiting path), with two
    subscriptions, a handler that declines, raises or ends its subscription in the middle of a read,
    an ``unsubscribe(limit)`` already in force, slow-consumer limits and an error callback that raises."""
    points = sorted({c % (len(stream) + 1) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    runs = [_two_subscriptions(chunks, native=native, accept_every=accept_every, in_order=in_order, limit=limit,
                               byte_limit=byte_limit, raising=raising, ends=ends) for native in (True, False)]
    assert runs[0] == runs[1]


#: what a broken or hostile server (or anyone on an unencrypted path) may send and nats-server never does
_BROKEN = [
    b"MSG w.a 1 0000000002\r\nok\r\n",  # a size of ten digits
    b"MSG w.b 1 2\r\nokXY",  # a body not ended by CRLF
    b"MSG w.c 0000000000000000001 2\r\nok\r\n",  # a subscription id of nineteen digits
    b"MSG w.d 99999999999999999999 2\r\nok\r\n",  # no such subscription
    b"HMSG w.e 1 12 12\r\nNATS/1.0\r\n\r\n\r\n",
    b"MSG w.f 1 r\x0b 2\r\nok\r\n",
    b"MSG w.end 1 3\r\nend\r\n",
]


async def _broken_server(stream: bytes) -> tuple[asyncio.Server, int]:
    """A server speaking just enough NATS: INFO, PONG to every PING, and ``stream`` after the first SUB."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'INFO {"server_id":"broken","version":"2.10.0","proto":1,"headers":true,'
                     b'"max_payload":1048576}\r\n')
        sent = False
        try:
            while line := await reader.readline():
                if line.startswith(b"PING"):
                    writer.write(b"PONG\r\n")
                elif line.startswith(b"SUB") and not sent:
                    sent = True
                    writer.write(stream)
                await writer.drain()
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def test_streams_nats_server_never_sends_reach_both_parsers_alike_and_reading_goes_on() -> None:
    """Through a real client connection: each of those frames is read (or dropped) the same way with and
    without the scanner, and the frame after them arrives; no read loop ends."""
    got: dict[bool, list[tuple[str, str, bytes, Any]]] = {True: [], False: []}
    srv, port = await _broken_server(b"".join(_BROKEN))
    try:
        for native in (True, False):
            nc = await _client(f"nats://127.0.0.1:{port}", native=native)
            try:
                async def cb(msg: Msg, into: list[tuple[str, str, bytes, Any]] = got[native]) -> None:
                    into.append((msg.subject, msg.reply, msg.data, msg.headers))

                await nc.subscribe("w.>", cb=cb)
                await _until(_has_end(got[native], "w.end"), "the last frame")
                assert nc.read_loop_restarts == 0
                assert nc.is_connected
            finally:
                await nc.close()
    finally:
        srv.close()
        await srv.wait_closed()
    assert got[True] == got[False]
    assert [g[0] for g in got[True]] == ["w.a", "w.b", "w.c", "w.e", "w.f", "w.end"]


async def test_a_nats_server_restart_in_a_flood_neither_duplicates_nor_reorders_nor_ends_reading() -> None:
    """A flood of tiny messages read through the scanner (and, side by side, through nats-py's parser),
    the server restarted in the middle: what each subscriber gets before and after the reconnect comes
    once and in order, and its read loop is replaced by nats-py's reconnect, never ended by an error."""
    srv = NatsServer(jetstream=False).start()
    clients: list[GuardedNatsClient] = []
    try:
        got: dict[bool, list[int]] = {True: [], False: []}
        for native in (True, False):
            nc = await _client(srv.url, native=native)
            clients.append(nc)

            async def cb(msg: Msg, into: list[int] = got[native]) -> None:
                into.append(int(msg.data))

            def direct(msg: Msg, into: list[int] = got[native]) -> bool:
                if len(msg.data) % 2:
                    return False  # some to the callback (in order: keep_order), the rest taken here
                into.append(int(msg.data))
                return True

            sub = await nc.subscribe("f.x", cb=cb)
            nc.dispatch_directly(sub, direct, keep_order=True)
            await nc.flush()
        pub = await _client(srv.url, native=True)
        clients.append(pub)
        restart: asyncio.Future[NatsServer] | None = None
        for i in range(20_000):
            await pub.publish("f.x", b"%d" % i)
            if i % 500 == 0:
                await asyncio.sleep(0)  # let the subscribers read
            if i == 10_000:
                restart = asyncio.ensure_future(asyncio.to_thread(srv.restart))
        assert restart is not None
        await restart
        await _until(lambda: all(c.is_connected and c.stats["reconnects"] >= 1 for c in clients), "the reconnects",
                     timeout=20)
        marker = 10**9
        async with asyncio.timeout(20):
            while not (marker in got[True] and marker in got[False]):
                await pub.publish("f.x", b"%d" % marker)  # until both subscriptions are on the new server
                await pub.flush()
                await asyncio.sleep(0.05)
        for native in (True, False):
            ids = [i for i in got[native] if i != marker]
            assert ids == sorted(set(ids)), f"native={native}: duplicated or reordered"
            assert len(ids) >= 1000
        for c in clients:
            assert c.read_loop_restarts == 0
            assert c.dropped_messages == 0
    finally:
        for c in clients:
            await c.close()
        srv.stop()
