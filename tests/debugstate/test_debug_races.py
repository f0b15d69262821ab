"""``debug`` while the plugin is reloaded, unloaded and loaded again: every answer is a whole state or
the plugin's typed absence, never an internal error (a real node, real plugins, a real nats-server)."""

from __future__ import annotations

import asyncio

from sandbus.bus.server import NatsServer
from sandbus.host.node.debugstate import DEBUG_KEYS
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from sandbus.sdk.errors import PluginNotFoundError, RateLimitError


async def test_debug_during_reloads_and_unloads_answers_whole_states(node: Node, nats: NatsServer) -> None:
    states: list[dict[str, object]] = []
    absent = 0
    stop = asyncio.Event()

    async def ask(client: Client) -> None:
        nonlocal absent
        while not stop.is_set():
            try:
                states.extend(await client.debug("logger", node="dn1", timeout=5))
            except PluginNotFoundError:
                absent += 1
            except RateLimitError:  # the node's debug rate: asked again shortly
                await asyncio.sleep(0.05)

    async with await Client.connect(nats.url) as client:
        askers = [asyncio.create_task(ask(client)) for _ in range(4)]
        try:
            for _ in range(5):
                await client.control("dn1", "reload", {"plugin": "logger"}, timeout=30)
                await client.request("logger", "say", {"text": "between"})
                await client.control("dn1", "unload", {"plugin": "logger"}, timeout=30)
                await client.control("dn1", "load", {"plugin": "logger"}, timeout=30)
        finally:
            stop.set()
            await asyncio.gather(*askers)
    assert states
    for state in states:
        assert tuple(state) == DEBUG_KEYS
        assert state["status"] in ("loaded", "stale", "unloading", "failed")


async def test_debug_of_a_plugin_unloading_while_its_call_runs(node: Node, nats: NatsServer) -> None:
    """Unloaded with a call still running, the plugin is listed as ``unloading`` until the call ends:
    ``debug`` answers its state meanwhile, as ``list`` shows it."""
    async with await Client.connect(nats.url) as client:
        slow = asyncio.create_task(client.request("logger", "say", {"text": "s", "n": 2_000_000}, timeout=10))
        await until_in_flight(node)
        await client.control("dn1", "unload", {"plugin": "logger"}, timeout=10)
        listed = {p["name"]: p["status"] for p in (await client.control("dn1", "list"))["plugins"]}
        (state,) = await client.debug("logger", node="dn1")
        await asyncio.gather(slow, return_exceptions=True)
    assert listed["logger"] == "unloading"
    assert tuple(state) == DEBUG_KEYS
    assert state["status"] == "unloading"


async def until_in_flight(node: Node) -> None:
    async with asyncio.timeout(10):
        while node.manager.info("logger").in_flight == 0:
            await asyncio.sleep(0.001)
