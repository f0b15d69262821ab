"""What happens on a node before it connects, and a call that is interrupted and run again, are told once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import orjson

from sandbus.bus.server import NatsServer
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from tests.bus.conftest import collect, until


async def test_what_plugins_log_and_raise_before_the_node_connects_reaches_the_bus(
        make_node: Callable[..., Node], nats: NatsServer) -> None:
    """Plugins load before a node connects (``sandbus node`` loads its directory first): their
    ``lifecycle.load`` audit events and what they log then reach the bus once it connects."""
    node = make_node("early1")  # loads every plugin, not started
    node.manager.execute("logger", "say", b'{"text": "logged before the node connected"}')
    async with await Client.connect(nats.url) as client:
        audit = await collect(client.nc, "sandbus.audit.>")
        logs = await collect(client.nc, "sandbus.log.>")
        await node.start()
        try:
            await until(lambda: any(orjson.loads(m.data)["message"] == "logged before the node connected"
                                    for m in logs), 5, "the line logged before the node connected")
            await until(lambda: any(orjson.loads(m.data)["kind"] == "lifecycle.load"
                                    and orjson.loads(m.data)["plugin"] == "logger" for m in audit), 5,
                        "the lifecycle.load of logger")
            state = node.debug_state("logger")
            assert "lifecycle.load" in [e["kind"] for e in state["recent_audit"]]
            assert "logged before the node connected" in [x["message"] for x in state["recent_logs"]]
        finally:
            await node.stop()
            node.manager.close()


async def test_a_call_run_again_after_overrunning_the_inline_budget_logs_each_line_once(
        make_node: Callable[..., Node], nats: NatsServer) -> None:
    """An inline call that overruns its budget is interrupted and runs again from the start in a thread:
    the lines its first attempt logged are taken back, so each line of the call is told once."""
    lines = 3000
    node = make_node("rerun1", inline_budget_s=0.001, log_rate=1e6)
    await node.start()
    try:
        async with await Client.connect(nats.url) as client:
            got = await collect(client.nc, "sandbus.log.rerun1.logger")
            captured = node.logs.captured
            body = {"text": "a line of a long call", "n": lines}
            assert await client.request("logger", "say", body, timeout=10) == {"ok": True}
            loop = asyncio.get_running_loop()
            # It did overrun: the plugin was moved to threads for a while.
            assert node._lanes["logger"].inline_from > loop.time()
            await until(lambda: len(got) >= lines, 10, f"{lines} lines")
            assert node.logs.captured - captured == lines
            # Nothing more arrives: the first attempt's lines were never published.
            marker = {"text": "the next call", "n": 1}
            await client.request("logger", "say", marker, timeout=10)
            await until(lambda: orjson.loads(got[-1].data)["message"] == "the next call", 10, "the next call's line")
            assert len(got) == lines + 1
    finally:
        await node.stop()
        node.manager.close()
