"""GuardedNatsClient reads header blocks with its own parser where it can: it must give exactly what
nats-py's parser gives, for every block, hostile ones included."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient

from sandbus.sdk.nats_guard import GuardedNatsClient, header_lines

#: bytes that matter to a header parser, and a few that do not
_BYTES = st.sampled_from([b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x0b", b"\x0c", b"\x1c", b"\x1f", b"\x00",
                          b"\x7f", b"\xff", b"\xc3\xa9", b"a", b"Z", b"-", b"0", b"NATS/1.0"])
_LINE = st.lists(_BYTES, max_size=12).map(b"".join)
_BLOCK = st.tuples(st.sampled_from([b"NATS/1.0\r\n", b"NATS/1.0 503\r\n", b"NATS/1.0 100 Idle Heartbeat\r\n",
                                    b"NATS/1.0", b"NATS/1.0\r\n\r\n", b""]),
                   st.lists(_LINE, max_size=6), st.sampled_from([b"\r\n", b"", b"\r\n\r\n"])).map(
    lambda t: t[0] + b"\r\n".join(t[1]) + t[2])


def _both(block: bytes) -> tuple[object, object]:
    """What each client's parser gives for ``block``: its headers, or the type of what it raised (a
    block too short for nats-py raises; the read loop then drops that message)."""
    async def read(client: NatsClient) -> object:
        try:
            return await client._process_headers(block)
        except Exception as e:
            return type(e)

    async def run() -> tuple[object, object]:
        return await read(GuardedNatsClient()), await read(NatsClient())

    return asyncio.run(run())


@settings(max_examples=600, deadline=None)
@given(_BLOCK)
def test_every_block_reads_as_nats_py_reads_it(block: bytes) -> None:
    ours, theirs = _both(block)
    assert ours == theirs


def test_what_sandbus_sends_takes_the_fast_parser_and_agrees() -> None:
    block = (b"NATS/1.0\r\nContent-Type: application/vnd.sandbus.message+json\r\nNats-Msg-Id: 0123abcd\r\n"
             b"Sandbus-From: client\r\ntraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n")
    assert header_lines(block) == {"Content-Type": "application/vnd.sandbus.message+json", "Nats-Msg-Id": "0123abcd",
                                   "Sandbus-From": "client",
                                   "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    ours, theirs = _both(block)
    assert ours == theirs


def test_status_lines_and_other_bytes_go_to_nats_py() -> None:
    assert header_lines(b"NATS/1.0 503\r\n\r\n") is None
    assert header_lines(b"NATS/1.0\r\nName: caf\xc3\xa9\r\n\r\n") is None
    assert header_lines(b"NATS/1.0\r\n\r\n") == {}
    ours, theirs = _both(b"NATS/1.0 404 No Messages\r\n\r\n")
    assert ours == theirs == {"Status": "404", "Description": "No Messages"}


def test_odd_names_and_values_are_read_by_nats_py_rules() -> None:
    # whitespace inside a name drops the header; around a name or value it is stripped; \x1c counts as space
    block = b"NATS/1.0\r\n A : b \r\nB C: x\r\nD\x1c: y\r\nE:\r\n:v\r\nno colon\r\nF: a:b\r\n\r\n"
    ours, theirs = _both(block)
    assert ours == theirs == {"A": "b", "E": "", "": "v", "F": "a:b"}
