"""``debug`` is answered at most so many times a second per node: anyone allowed to ask (the read-only
viewer too) cannot take the node's loop from its plugins' requests by asking without end; ``sandbus logs``
asks again what a node refused (a real node, real C plugins, a real nats-server)."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from nats.aio.msg import Msg

from sandbus.bus import control
from sandbus.bus.server import NatsServer
from sandbus.host.cli.debug_cmd import _recent
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from sandbus.sdk.errors import RateLimitError, RequestTimeoutError
from tests.bus.conftest import collect


async def test_a_debug_flood_is_refused_over_the_rate_and_audited_once_a_second(node: Node, nats: NatsServer) -> None:
    async with await Client.connect(nats.url) as client, await Client.connect(nats.url) as viewer:
        for _ in range(40):  # a full ring of long lines: each answer is ~300 KB to build and send
            await client.request("logger", "say", {"text": "q" * 8000, "n": 7})
        audit = await collect(client.nc, "sandbus.audit.dn1")
        answered = refused = 0
        stop = asyncio.Event()

        async def hammer() -> None:
            nonlocal answered, refused
            while not stop.is_set():
                try:
                    await viewer.control("dn1", "debug", {"plugin": "logger"})  # no asking again
                    answered += 1
                except RateLimitError:
                    refused += 1

        started = time.monotonic()
        tasks = [asyncio.create_task(hammer()) for _ in range(8)]
        await asyncio.sleep(2.0)  # the flood's length
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - started
        await client.nc.flush()
    assert refused > 0, answered
    assert answered <= control.DEBUG_RATE * (elapsed + 1) + 8
    events = [e for e in (orjson.loads(m.data) for m in audit)
              if e["kind"] == "control.refused" and e["details"].get("verb") == "debug"]
    assert 1 <= len(events) <= int(elapsed) + 2


async def test_logs_asks_again_what_a_node_refused_over_its_rate(node: Node, nats: NatsServer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "DEBUG_RATE", 1.0)  # a burst of one: the second plugin's ring is refused first
    node.bus._control._debug_tokens = 1.0
    async with await Client.connect(nats.url) as client:
        for name in ("logger", "flooder", "quiet"):
            await client.request(name, "say", {"text": f"{name}'s line"})
        lines = await _recent(client, None, None, 2.0)
    assert {line["message"] for line in lines} == {"logger's line", "flooder's line", "quiet's line"}


async def test_client_debug_asks_again_a_node_over_its_rate(node: Node, nats: NatsServer) -> None:
    def exhaust() -> None:  # as if a flood had just used the burst
        node.bus._control._debug_tokens, node.bus._control._debug_at = -5.0, time.monotonic()

    exhaust()
    async with await Client.connect(nats.url) as client:
        (state,) = await client.debug("logger", node="dn1", timeout=3)
        assert state["plugin"] == "logger"
        exhaust()
        assert [s["node_id"] for s in await client.debug("logger", timeout=3)] == ["dn1"]


async def test_client_debug_does_not_say_none_has_it_when_a_node_did_not_answer(node: Node,
                                                                               nats: NatsServer) -> None:
    async with await Client.connect(nats.url) as fake, await Client.connect(nats.url) as client:
        async def ping(msg: Msg) -> None:  # "hang1" answers discovery, never its control requests
            await fake.nc.publish(msg.reply, orjson.dumps({"metadata": {"node_id": "hang1"}}))

        async def hang(msg: Msg) -> None:
            return None

        await fake.nc.subscribe("$SRV.PING.sandbus-node", cb=ping)
        await fake.nc.subscribe("sandbus.node.hang1.>", cb=hang)
        await fake.nc.flush()
        # dn1 has no "ghost"; hang1 might: not knowing is not "no node has it"
        with pytest.raises(RequestTimeoutError):
            await client.debug("ghost", timeout=1)
        # a plugin that dn1 has is answered, whatever hang1 does
        assert [s["node_id"] for s in await client.debug("logger", timeout=1)] == ["dn1"]
