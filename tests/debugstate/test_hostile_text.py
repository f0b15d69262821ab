"""Text no log line may carry as it is: invalid UTF-8, lone surrogates, a line that looks like a JSON
record. Each becomes one safe line, on the bus and in ``debug`` (a real node, a real C plugin, nats-server)."""

from __future__ import annotations

import orjson
import pytest

from sandbus.bus.server import NatsServer
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from sandbus.sdk.errors import SandbusError
from tests.bus.conftest import collect, until


@pytest.mark.parametrize("raw", [b'"\\udc80 lone"', b'"\\ud800\\udc00 pair"', b'"\xff\xfe bytes"',
                                 b'"\xed\xa0\x80 cesu"',
                                 b'"x\\", \\"level\\": \\"error\\", \\"node\\": \\"other\\"}\\n{\\"ts\\": 1"'])
@pytest.mark.parametrize("function", ["say", "err"])
async def test_hostile_text_is_one_safe_line_on_the_bus_and_in_debug(node: Node, nats: NatsServer, raw: bytes,
                                                                     function: str) -> None:
    async with await Client.connect(nats.url) as client:
        got = await collect(client.nc, "sandbus.log.dn1.logger")
        body = b'{"text": ' + raw + b"}"
        try:
            await client.request("logger", function, body)
        except SandbusError:
            return  # refused as a typed error: nothing logged, nothing to check
        await until(lambda: len(got) >= 1, 5, "the line")
        (state,) = await client.debug("logger", node="dn1")
    for msg in got:
        line = orjson.loads(msg.data)
        assert (line["node"], line["plugin"]) == ("dn1", "logger")
        assert line["level"] in ("info", "warning")
    assert state["recent_logs"]
    assert node.logs.dropped == 0
