"""The ``debug`` control verb and ``Client.debug``: a real node's state after real calls."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest

from sandbus.bus.server import NatsServer
from sandbus.host.node.debugstate import DEBUG_KEYS
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from sandbus.sdk.errors import PluginNotFoundError, SandbusError
from tests.bus.conftest import collect, until
from tests.protocol.wire import validate


async def _calls(client: Client) -> None:
    """One trap, three good calls, one call of a function the plugin lacks (refused and audited)."""
    with pytest.raises(SandbusError) as trapped:
        await client.request("logger", "boom", {})
    assert trapped.value.code == "sandbox.trap"
    for i in range(3):
        await client.request("logger", "say", {"text": f"call {i}"})
    with pytest.raises(SandbusError) as refused:
        await client.request("logger", "nope", {})
    assert refused.value.code == "request.unknown_function"


async def test_debug_after_real_calls(node: Node, nats: NatsServer) -> None:
    async with await Client.connect(nats.url) as client:
        await _calls(client)
        await until(lambda: any(e["kind"] == "request.refused" for e in node.recent_audit.get("logger")), 5,
                    "the refusal in the audit ring")
        states = await client.debug("logger")
        assert await client.debug("logger", node="dn1") == states or len(states) == 1
    assert len(states) == 1
    state = states[0]
    validate("control-debug", state)
    assert tuple(state) == DEBUG_KEYS
    assert (state["node_id"], state["plugin"], state["status"], state["version"], state["kind"],
            state["isolation"]) == ("dn1", "logger", "loaded", "1.2.3", "module", "pooled")
    assert state["limits"]["max_instances"] == 2
    assert state["limits"]["log_bytes"] == 64 * 1024
    counters = state["counters"]
    assert (counters["executions"], counters["errors"], counters["rejected"]) == (4, 1, 1)
    latency, fuel = state["latency_ms"], state["fuel"]
    assert len(latency["counts"]) == len(latency["bounds"]) + 1
    assert sum(latency["counts"]) == counters["executions"]
    assert sum(fuel["counts"]) == counters["executions"] - counters["errors"]  # fuel: calls that returned
    assert latency["bounds"] == sorted(latency["bounds"])
    # The trap poisoned its instance (dropped); the one built after it has memory and took the good calls.
    (instance,) = state["instances"]
    assert instance["memory_bytes"] > 0
    assert instance["busy"] is False
    assert instance["calls"] == 3
    (error,) = state["recent_errors"]
    assert (error["code"], error["function"]) == ("sandbox.trap", "boom")
    assert [x["message"] for x in state["recent_logs"]] == ["call 0", "call 1", "call 2"]
    kinds = [e["kind"] for e in state["recent_audit"]]
    assert "request.refused" in kinds
    assert all(e["plugin"] == "logger" for e in state["recent_audit"])
    for line in state["recent_logs"]:
        validate("log-line", line)


async def test_a_debug_reply_too_large_for_nats_is_cut_to_fit(node: Node, nats: NatsServer) -> None:
    node.logs.ring_chars = 4 * 1024 * 1024  # a ring of 200 long lines (by default it keeps ~256 KiB of them)
    async with await Client.connect(nats.url) as client:
        for _ in range(25):  # 200 lines of 8 KiB: 1.6 MB of ring, more than the 1 MiB max payload
            await client.request("logger", "say", {"text": "q" * 8000, "n": 8})
        (state,) = await client.debug("logger", node="dn1")
        max_payload = client.nc.max_payload
    assert len(node.logs.recent("logger")) == 200
    assert 0 < len(state["recent_logs"]) < 200
    assert len(orjson.dumps(state)) <= max_payload
    assert state["recent_logs"][-1]["seq"] == node.logs.recent("logger")[-1]["seq"]  # the newest kept


@pytest.mark.parametrize("body", [b"[]", b'{"plugin": 1}', b'{"plugin": "logger", "force": true}', b"not json",
                                  b'{"plugin": "' + b"a" * 5000 + b'"}'])
async def test_invalid_debug_bodies_are_refused_and_audited(node: Node, nats: NatsServer, body: bytes) -> None:
    async with await Client.connect(nats.url) as client:
        audit = await collect(client.nc, "sandbus.audit.dn1")
        reply = await client.nc.request("sandbus.node.dn1.debug", body, timeout=5)
        await until(lambda: audit, 5, "the control.refused audit event")
    assert reply.headers is not None
    assert reply.headers["Sandbus-Error-Code"] == "request.invalid_control"
    error = orjson.loads(reply.data)["error"]
    assert error["code"] == "request.invalid_control"
    assert error["details"]["verb"] == "debug"
    event = orjson.loads(audit[0].data)
    assert (event["kind"], event["details"]["verb"]) == ("control.refused", "debug")


async def test_debug_of_an_unknown_plugin(node: Node, nats: NatsServer) -> None:
    async with await Client.connect(nats.url) as client:
        with pytest.raises(PluginNotFoundError):
            await client.debug("ghost", node="dn1")
        assert await client.debug("ghost") == []  # asked everywhere: no node has it
        with pytest.raises(ValueError, match="plugin"):
            await client.debug("bad.name")


async def test_node_debug_state_is_the_same_object_for_embedders(node: Node, nats: NatsServer) -> None:
    async with await Client.connect(nats.url) as client:
        await client.request("quiet", "handle_request", {})
        (over_bus,) = await client.debug("quiet")
    local = node.debug_state("quiet")
    assert set(local) == set(over_bus)
    assert local["counters"] == over_bus["counters"]
    assert local["recent_logs"] == []


async def test_histograms_add_up_over_many_calls(make_node: Callable[..., Node], nats: NatsServer) -> None:
    node = make_node("hist")
    await node.start()
    try:
        async with await Client.connect(nats.url) as client:
            for _ in range(40):
                await client.request("quiet", "handle_request", {"k": "v"})
            (state,) = await client.debug("quiet", node="hist")
    finally:
        await node.stop()
        node.manager.close()
    counts: Any = state["latency_ms"]["counts"]
    assert sum(counts) == state["counters"]["executions"] == 40
    assert sum(state["fuel"]["counts"]) == 40
    # Calls into the guest: the 40 requests, and the health check of the load on the first instance.
    assert sum(i["calls"] for i in state["instances"]) == 41
