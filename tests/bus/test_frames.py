"""The compiled frame scanner (sdk/_frames.c) cuts MSG/HMSG frames out of what the server sends. It
must hand the client exactly the calls nats-py's parser hands it, for every byte stream, hostile ones
and every way of cutting them into reads included, and leave everything it does not read to that
parser."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbus.sdk import nats_guard
from sandbus.sdk.nats_guard import GuardedNatsClient, StrictParser

_frames = pytest.importorskip("sandbus.sdk._frames", reason="the frame scanner is not built")


class Recorder:
    """The parts of a client the parser calls, each call written down."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def _take_now(self, *args: Any) -> bool:
        return False

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        self.calls.append(("msg", sid, bytes(subject), bytes(reply), bytes(data),
                           None if headers is None else bytes(headers)))

    async def _process_ping(self) -> None:
        self.calls.append(("ping",))

    async def _process_pong(self) -> None:
        self.calls.append(("pong",))

    async def _process_info(self, info: Any) -> None:
        self.calls.append(("info", info))

    async def _process_err(self, err: str) -> None:
        self.calls.append(("err", err))


def _feed(chunks: list[bytes], *, native: bool) -> list[tuple[Any, ...]]:
    """The calls a parser makes for ``chunks`` read one after the other; what it raises ends the reading,
    as it ends nats-py's read loop."""
    nc = Recorder()
    parser = StrictParser(nc)
    if not native:
        parser.scan = None

    async def run() -> None:
        for chunk in chunks:
            try:
                await parser.parse(chunk)
            except Exception as e:
                nc.calls.append(("raised", type(e).__name__))
                return

    asyncio.run(run())
    return nc.calls


def _cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(stream[last:p])
        last = p
    out.append(stream[last:])
    return out


#: bytes a publisher can put in a subject (the server relays all but space, tab, CR and LF), and some it cannot
_SUBJECT_BYTE = st.sampled_from([b"a", b"Z", b".", b">", b"*", b"0", b"7", b"\x0b", b"\x0c", b"\x00", b"\xff",
                                 b"\xc3\xa9", b"\x1c", b"+", b"-", b"_", b"$"])
_SUBJECT = st.lists(_SUBJECT_BYTE, min_size=1, max_size=8).map(b"".join)
_SEP = st.sampled_from([b" ", b" ", b" ", b"\t", b"  ", b" \t"])
_SID = st.one_of(st.integers(0, 10**6).map(lambda i: str(i).encode()),
                 st.sampled_from([b"+7", b"1_0", b"007", b"x", b"9" * 19, b"-1", b"\xd9\xa3"]))


@st.composite
def _frame(draw: st.DrawFn) -> bytes:
    """A MSG or HMSG frame, mostly as the server writes them, sometimes bent."""
    headers = draw(st.booleans())
    subject, sid = draw(_SUBJECT), draw(_SID)
    reply = draw(st.one_of(st.none(), _SUBJECT))
    hdr = draw(st.sampled_from([b"", b"NATS/1.0\r\n\r\n", b"NATS/1.0\r\nA: b\r\n\r\n", b"NATS/1.0 503\r\n\r\n",
                                b"NATS/1.0\r\nX: \xff\r\n\r\n"])) if headers else b""
    body = draw(st.sampled_from([b"", b"hello", b"{}", b"MSG a 1 5\r\nhello\r\n", b"\r\n", b"PING\r\n", b"\x00\xff"]))
    hdr_size, total = len(hdr), len(hdr) + len(body)
    bend = draw(st.sampled_from(["none"] * 6 + ["hdr>total", "short", "long", "no crlf", "digits", "trailing sep",
                                                "lower", "lf", "extra field", "zeros"]))
    size_field = str(total).encode()
    if bend == "short":
        size_field = str(max(0, total - 1)).encode()
    elif bend == "long":
        size_field = str(total + 1).encode()
    elif bend == "digits":
        size_field = b"1" * 12
    elif bend == "zeros":
        size_field = b"0" * 10 + size_field
    fields = [subject, sid] + ([reply] if reply is not None else [])
    if headers:
        fields.append(str(total + 1 if bend == "hdr>total" else hdr_size).encode())
    fields.append(size_field)
    if bend == "extra field":
        fields.insert(1, b"x")
    line = (b"hmsg" if bend == "lower" and headers else b"msg" if bend == "lower" else b"HMSG" if headers else b"MSG")
    for f in fields:
        line += draw(_SEP) + f
    if bend == "trailing sep":
        line += b" "
    line += b"\n" if bend == "lf" else b"\r\n"
    return line + hdr + body + (b"XY" if bend == "no crlf" else b"\r\n")


_OTHER = st.sampled_from([b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"-ERR 'Stale Connection'\r\n",
                          b'INFO {"server_id":"x","max_payload":1048576}\r\n', b"INFO {bad json}\r\n",
                          b"BOGUS\r\n", b"MS", b"\r\n", b"M"])
_STREAM = st.lists(st.one_of(_frame(), _frame(), _frame(), _OTHER), min_size=1, max_size=12).map(b"".join)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_STREAM, st.lists(st.integers(0, 10**6), max_size=6))
def test_every_stream_gives_the_calls_nats_py_gives(stream: bytes, cuts: list[int]) -> None:
    chunks = _cut(stream, cuts)
    assert _feed(chunks, native=True) == _feed(chunks, native=False)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 10**6), max_size=4))
def test_random_bytes_give_the_calls_nats_py_gives(stream: bytes, cuts: list[int]) -> None:
    chunks = _cut(b"MSG a 1 2\r\nok\r\n" + stream, cuts)
    assert _feed(chunks, native=True) == _feed(chunks, native=False)


def test_the_scanner_cuts_what_the_server_writes_and_stops_at_the_rest() -> None:
    stream = (b"MSG a.b 7 5\r\nhello\r\nHMSG _INBOX.x 8 $JS.ACK.S.c.1.2.3.4.0 12 14\r\nNATS/1.0\r\n\r\nhi\r\n"
              b"PING\r\nMSG c 1 1\r\nz\r\n")
    frames, used, status = _frames.scan(stream)
    assert frames == [(7, b"a.b", b"", None, b"hello"),
                      (8, b"_INBOX.x", b"$JS.ACK.S.c.1.2.3.4.0", b"NATS/1.0\r\n\r\n", b"hi")]
    assert stream[used:].startswith(b"PING\r\n")
    assert status == _frames.OTHER
    # an incomplete frame is left in place, saying whether its line or its body is short
    for cut, status in ((3, _frames.NEED_MORE), (9, _frames.NEED_MORE), (14, _frames.NEED_BODY),
                        (16, _frames.NEED_BODY)):
        assert _frames.scan(b"MSG a 1 5\r\nhello\r\n"[:cut]) == ([], 0, status)
    # a subject with \x0b stays one field (nats-server relays it; nats-py's own expression split it)
    assert _frames.scan(b"MSG a\x0b7 1 1\r\nz\r\n")[0] == [(1, b"a\x0b7", b"", None, b"z")]


def test_a_long_line_without_an_end_is_left_to_nats_py() -> None:
    """The scanner looks at most MAX_LINE bytes for a line's end, so a peer sending an endless line costs
    it no more than that per read; nats-py's parser then waits for more, as it always did."""
    line = b"MSG " + b"a" * (_frames.MAX_LINE + 10)
    assert _frames.scan(line) == ([], 0, _frames.OTHER)
    assert _feed([line[:5000], line[5000:]], native=True) == _feed([line[:5000], line[5000:]], native=False) == []


def test_a_frame_split_while_nats_py_reads_it_comes_back_to_the_scanner() -> None:
    """After nats-py's parser read a control line (a PING came first), the next read finishes that message
    alone and the scanner cuts the frames after it."""
    nc = Recorder()
    parser = StrictParser(nc)
    cut: list[int] = []
    real = parser.scan
    assert real is not None

    def counting(buf: bytearray) -> Any:
        result = real(buf)
        cut.append(len(result[0]))
        return result

    parser.scan = counting
    tail = b"".join(b"MSG s %d 3\r\nabc\r\n" % i for i in range(50))

    async def run() -> None:
        await parser.parse(b"PING\r\nMSG s 1 3\r\nab")
        await parser.parse(b"c\r\n" + tail)

    asyncio.run(run())
    assert nc.calls[0] == ("ping",)
    assert len(nc.calls) == 52
    assert cut[-1] == 50  # the 50 frames after the split one were cut in C, not by nats-py's parser


def test_sandbus_native_0_parses_with_nats_py_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBUS_NATIVE", "0")
    assert StrictParser(Recorder()).scan is None
    monkeypatch.delenv("SANDBUS_NATIVE")
    assert StrictParser(Recorder()).scan is _frames.scan
    assert isinstance(GuardedNatsClient()._ps, StrictParser)
    assert nats_guard._native_scan() is _frames.scan
