"""Hostile NATS clients against bytes plugins (Extism) on a real node and nats-server: bodies at the input
cap and one byte over, raw message bodies whose base64 envelope outgrows the cap (core: a typed error reply;
durable: dead-lettered at once with the body intact, never retried nor lost), a reply over the server's max
payload, content types with parameters, unicode or control characters, and an envelope that claims base64
it does not hold."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
from nats.aio.msg import Msg

from sandbus.bus.server import NatsServer
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from sandbus.sdk.envelope import ENVELOPE_CONTENT_TYPE
from sandbus.sdk.errors import InvalidJsonError, PayloadTooLargeError
from tests.extism_bus.conftest import MIB, server_with_max_payload, start_node
from tests.extism_bus.test_extism_bus import POLICY, write_plugin


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("attack_bytes")
    d = base / "plugins"
    d.mkdir()
    (base / "policy.toml").write_text(POLICY)
    write_plugin(d, "bytes_echo", topics=("attack.core.*",))
    write_plugin(d, "durable_echo", topics=("attack.durable.*",), durable=True)
    return d


@pytest.fixture
async def node(big_server: NatsServer, plugins: Path) -> AsyncIterator[Node]:
    n = await start_node(big_server, plugins, "a1")
    try:
        yield n
    finally:
        await n.stop()
        n.manager.close()


# -- requests: the input cap, exactly --------------------------------------------------------------------------


async def test_a_body_exactly_at_the_input_cap_is_served_and_one_byte_over_is_refused(node: Node,
                                                                                      client: Client) -> None:
    at_cap = bytes(range(256)) * (MIB // 256)
    assert len(at_cap) == MIB
    assert (await client.request_raw("bytes_echo", "echo", at_cap, timeout=20)).data == at_cap
    with pytest.raises(PayloadTooLargeError) as caught:
        await client.request_raw("bytes_echo", "echo", at_cap + b"\x00", timeout=20)
    assert caught.value.details.get("direction") == "input"
    assert (await client.request_raw("bytes_echo", "echo", b"ok")).data == b"ok"


# -- messages: the base64 envelope outgrowing the cap ---------------------------------------------------------


async def test_a_raw_direct_message_whose_envelope_outgrows_the_cap_is_answered_typed(node: Node,
                                                                                     client: Client) -> None:
    """900 KB of bytes is under the 1 MiB input cap, its base64 envelope (1.2 MB) is not: a typed error
    reply, never silence."""
    with pytest.raises(PayloadTooLargeError):
        await client.send_raw("bytes_echo", b"\xff" * 900_000, timeout=20)
    small = await client.send_raw("bytes_echo", b"\xff" * 1000, timeout=5)
    assert small is not None
    assert base64.b64decode(orjson.loads(small.data)["payload"]) == b"\xff" * 1000


async def test_a_durable_raw_message_whose_envelope_outgrows_the_cap_is_dead_lettered_at_once(
        node: Node, client: Client) -> None:
    """The same message fails the same way on every delivery: it goes to the dead letters on its first,
    with its body byte for byte (not retried for seconds, and never lost)."""
    letters: asyncio.Queue[Msg] = asyncio.Queue()

    async def on_letter(msg: Msg) -> None:
        await letters.put(msg)

    sub = await client.nc.subscribe("sandbus.dlq.durable_echo", cb=on_letter)
    await client.nc.flush()
    body = bytes(range(256)) * 3500  # 896 000 bytes; 1.19 MB as base64
    msg_id = await client.publish_raw("attack.durable.big", body, content_type="image/x-raw")
    letter = await asyncio.wait_for(letters.get(), timeout=20.0)
    await sub.unsubscribe()
    headers = letter.headers or {}
    assert bytes(letter.data) == body
    assert headers["Content-Type"] == "image/x-raw"
    assert headers["Sandbus-Error-Code"] == "limit.payload"
    assert headers["Sandbus-Deliveries"] == "1"
    assert headers["Sandbus-Msg-Id"] == msg_id


# -- content types --------------------------------------------------------------------------------------------


async def test_content_types_with_parameters_unicode_or_controls(node: Node, client: Client) -> None:
    """A media type with parameters is kept as sent (in the envelope's headers); one that is not a valid
    media type (unicode, a control byte) is not trusted: the body is then JSON, and bytes are refused typed."""
    nc = client.nc
    reply = await nc.request("sandbus.msg.bytes_echo", b"\x00\x01", timeout=5,
                             headers={"Content-Type": 'text/plain; charset="utf-8"; q=1'})
    envelope = orjson.loads(reply.data)
    assert envelope["headers"]["Content-Type"] == 'text/plain; charset="utf-8"; q=1'
    assert base64.b64decode(envelope["payload"]) == b"\x00\x01"
    for hostile in ("tëxt/plain", "text/plain\x07", "text/" + "x" * 300):
        reply = await nc.request("sandbus.msg.bytes_echo", b"\x00\x01", timeout=5, headers={"Content-Type": hostile})
        headers = reply.headers or {}
        assert headers.get("Sandbus-Error-Code") == InvalidJsonError.code
        assert headers["Content-Type"] == "application/json"


async def test_an_envelope_claiming_base64_it_does_not_hold_reaches_the_plugin_as_sent(node: Node,
                                                                                       client: Client) -> None:
    """The host never decodes a payload: a sender's envelope saying base64 over text that is not is the
    plugin's to judge, and reaches it as sent."""
    envelope = {"id": "m-1", "from": "client", "payload": "!!not base64!!", "timestamp": 1.0,
                "headers": {"Content-Type": "application/octet-stream", "Content-Transfer-Encoding": "base64"}}
    reply = await client.nc.request("sandbus.msg.bytes_echo", orjson.dumps(envelope), timeout=5,
                                    headers={"Content-Type": ENVELOPE_CONTENT_TYPE})
    got = orjson.loads(reply.data)
    assert got["payload"] == "!!not base64!!"
    assert got["headers"]["Content-Transfer-Encoding"] == "base64"


# -- replies over the server's max payload -------------------------------------------------------------------


@pytest.fixture
def small_server() -> Iterator[NatsServer]:
    """The server's default max payload (1 MiB), the same as the sandbox's input and output caps."""
    yield from server_with_max_payload(MIB)


async def test_a_bytes_reply_over_the_servers_max_payload_is_a_typed_error_reply(small_server: NatsServer,
                                                                                 plugins: Path) -> None:
    n = await start_node(small_server, plugins, "a1")
    c = await Client.connect(small_server.url)
    try:
        body = b"\x00" * MIB  # the whole max payload, no headers: the echo with its headers cannot fit
        reply = await c.nc.request("sandbus.req.bytes_echo.echo", body, timeout=20)
        headers = reply.headers or {}
        assert headers.get("Sandbus-Error-Code") == PayloadTooLargeError.code
        assert headers["Content-Type"] == "application/json"
        assert (await c.request_raw("bytes_echo", "echo", b"still")).data == b"still"
    finally:
        await c.close()
        await n.stop()
        n.manager.close()
