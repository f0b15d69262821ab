"""Plugin log lines on the bus, from a real node serving real C plugins over a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from nats.aio.msg import Msg

from sandbus.bus.server import NatsServer
from sandbus.host.node.logbus import MAX_LOG_MESSAGE
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from sandbus.sdk.errors import SandbusError
from tests.bus.conftest import collect, until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def _lines(msgs: list[Msg]) -> list[dict[str, Any]]:
    return [orjson.loads(m.data) for m in msgs]


async def test_lines_arrive_with_plugin_version_level_node_and_trace(node: Node, nats: NatsServer) -> None:
    async with await Client.connect(nats.url) as client:
        got = await collect(client.nc, "sandbus.log.>")
        for level in (1, 2, 3, 4):
            await client.request("logger", "say", {"text": f"level {level}", "level": level})
        # A traced request: the line carries the caller's trace id.
        reply = await client.nc.request("sandbus.req.logger.say", b'{"text": "traced"}',
                                        headers={"traceparent": TRACEPARENT}, timeout=5)
        assert orjson.loads(reply.data) == {"ok": True}
        await until(lambda: len(got) == 5, 5, "five log lines")
    lines = _lines(got)
    assert [m.subject for m in got] == ["sandbus.log.dn1.logger"] * 5
    assert all(m.headers and m.headers["Content-Type"] == "application/json" and m.headers["Sandbus-Node"] == "dn1"
               for m in got)
    assert [(x["level"], x["message"]) for x in lines] == [
        ("debug", "level 1"), ("info", "level 2"), ("warning", "level 3"), ("error", "level 4"), ("info", "traced")]
    for x in lines:
        assert set(x) == {"ts", "node", "plugin", "version", "level", "stream", "message", "trace_id", "seq",
                          "dropped"}
        assert (x["node"], x["plugin"], x["version"], x["stream"], x["dropped"]) == ("dn1", "logger", "1.2.3", None, 0)
        assert x["ts"].endswith("Z")
        assert len(x["ts"]) == len("2026-12-03T08:00:00.123456Z")
    assert lines[-1]["trace_id"] == TRACE_ID
    seqs = [x["seq"] for x in lines]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 5


async def test_the_client_follows_one_plugin_at_a_level(node: Node, nats: NatsServer) -> None:
    async with await Client.connect(nats.url) as client, client.logs("logger", level="warning") as stream:
        await client.request("logger", "say", {"text": "not shown", "level": 2})
        await client.request("flooder", "say", {"text": "other plugin", "level": 4})
        await client.request("logger", "say", {"text": "shown", "level": 3})
        line = await asyncio.wait_for(anext(aiter(stream)), 5)
    assert (line["plugin"], line["level"], line["message"]) == ("logger", "warning", "shown")


async def test_a_silent_plugin_publishes_nothing_and_the_per_call_cap_comes_first(node: Node,
                                                                                  nats: NatsServer) -> None:
    async with await Client.connect(nats.url) as client:
        got = await collect(client.nc, "sandbus.log.>")
        await client.request("quiet", "handle_request", {"x": 1})
        # 100 lines of 1,000 bytes: only what fits the 64 KiB per-call cap is logged; the call fails limit.log.
        with pytest.raises(SandbusError) as caught:
            await client.request("logger", "say", {"text": "y" * 1000, "n": 100})
        assert (caught.value.code, caught.value.details.get("direction")) == ("limit.payload", "log")
        await client.request("logger", "say", {"text": "after"})
        await until(lambda: got and orjson.loads(got[-1].data)["message"] == "after", 5, "the last line")
    lines = _lines(got)
    assert {x["plugin"] for x in lines} == {"logger"}
    assert len(lines) == 65 + 1  # 65 * 1000 bytes fit in 65,536
    assert node.logs.recent("quiet") == []


async def test_the_bus_rate_cap_drops_and_reports_in_the_next_line_and_the_audit(
        make_node: Callable[..., Node], nats: NatsServer) -> None:
    node = make_node("rated", log_rate=10.0)
    await node.start()
    try:
        async with await Client.connect(nats.url) as client:
            got = await collect(client.nc, "sandbus.log.rated.>")
            audit = await collect(client.nc, "sandbus.audit.rated")
            await client.request("logger", "say", {"text": "burst", "n": 50})

            def dropped_events() -> list[dict[str, Any]]:
                return [e for e in _lines(audit) if e["kind"] == "log.dropped"]

            await until(dropped_events, 5, "the log.dropped audit event")
            published = len(got)
            assert 10 <= published < 50
            # The audit event comes a second after the first drop: the bucket has refilled since.
            await client.request("logger", "say", {"text": "next"})
            await until(lambda: len(got) == published + 1, 5, "the next line")
        lines = _lines(got)
        last = lines[-1]
        assert last["message"] == "next"
        assert last["dropped"] == 50 - published
        assert sum(e["details"]["dropped"] for e in dropped_events()) == 50 - published
        assert last["seq"] - lines[0]["seq"] == 50  # the gap in seq shows the missed lines too
        assert len(node.logs.recent("logger")) == 51  # the ring keeps what the bus did not get
    finally:
        await node.stop()
        node.manager.close()


async def test_a_flooding_plugin_does_not_hold_up_another_plugins_requests(node: Node, nats: NatsServer) -> None:
    async with await Client.connect(nats.url) as client:
        stop = asyncio.Event()

        async def flood() -> None:
            while not stop.is_set():
                await client.request("flooder", "say", {"text": "z" * 900, "n": 60}, timeout=5)

        floods = [asyncio.create_task(flood()) for _ in range(4)]
        try:
            await until(lambda: node.logs.captured > 2000, 20, "the flood to be under way")
            worst = 0.0
            for _ in range(50):
                start = time.perf_counter()
                assert await client.request("quiet", "handle_request", {"n": 1}, timeout=2) == {"n": 1}
                worst = max(worst, time.perf_counter() - start)
            assert worst < 1.0, f"a request to another plugin waited {worst:.3f} s during the flood"
            assert node.logs.dropped > 0  # the flood hit the rate cap: dropped, not queued without end
        finally:
            stop.set()
            await asyncio.gather(*floods, return_exceptions=True)


async def test_hostile_lines_arrive_escaped_one_record_per_line_and_bounded(node: Node, nats: NatsServer) -> None:
    hostile = "\x1b[31mred\x1b[0m [bold]x[/bold]\nforged: sandbus.node INFO fine\r\u202eevil\x07"
    async with await Client.connect(nats.url) as client:
        got = await collect(client.nc, "sandbus.log.>")
        await client.request("logger", "say", {"text": hostile})
        await client.request("logger", "say", {"text": "w" * 60_000})  # under the per-call cap, over a message
        with pytest.raises(SandbusError) as caught:
            await client.request("logger", "say", {"text": "m" * 1_000_000})  # 1 MB: over the per-call cap
        assert (caught.value.code, caught.value.details.get("direction")) == ("limit.payload", "log")
        await client.request("logger", "say", {"text": "end"})
        await until(lambda: got and orjson.loads(got[-1].data)["message"] == "end", 5, "the last line")
    messages = [x["message"] for x in _lines(got)]
    assert messages[:3] == ["\\x1b[31mred\\x1b[0m [bold]x[/bold]", "forged: sandbus.node INFO fine",
                            "\\u202eevil\\x07"]
    assert len(messages[3]) < MAX_LOG_MESSAGE + 100
    assert messages[3].startswith("w" * MAX_LOG_MESSAGE)
    assert messages[3].endswith("(51808 characters cut)")
    assert messages[4:] == ["end"]  # nothing of the 1 MB line
    assert all(not any(ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0 for c in m) for m in messages)


async def test_the_ring_is_bounded_newest_last(node: Node, nats: NatsServer) -> None:
    async with await Client.connect(nats.url) as client:
        for i in range(3):
            await client.request("logger", "say", {"text": f"batch {i}", "n": 100})
    ring = node.logs.recent("logger")
    assert len(ring) == 200
    assert ring[-1]["message"] == "batch 2"
    assert ring[0]["message"] == "batch 1"
    assert [x["seq"] for x in ring] == sorted(x["seq"] for x in ring)


async def test_no_bus_logs_keeps_the_ring_and_publishes_nothing(make_node: Callable[..., Node],
                                                                nats: NatsServer) -> None:
    node = make_node("quietnode", bus_logs=False)
    await node.start()
    try:
        async with await Client.connect(nats.url) as client:
            got = await collect(client.nc, "sandbus.log.>")
            await client.request("logger", "say", {"text": "kept here", "n": 3})
            # A control round trip after the call: anything the node had queued would be on the wire by now.
            await client.control("quietnode", "list")
            await client.nc.flush()
        assert got == []
        assert node.logs.published == 0
        assert [x["message"] for x in node.logs.recent("logger")] == ["kept here"] * 3
    finally:
        await node.stop()
        node.manager.close()


async def test_the_client_skips_what_is_not_a_log_line(node: Node, nats: NatsServer) -> None:
    real = {"ts": "2026-12-03T08:00:00.000000Z", "node": "dn1", "plugin": "logger", "version": None,
            "level": "info", "stream": None, "message": "forged", "trace_id": None, "seq": 1, "dropped": 0}
    async with await Client.connect(nats.url) as client, client.logs() as stream:
        for body in (b"not json", b"[]", orjson.dumps({**real, "node": "elsewhere"}),
                     orjson.dumps({**real, "level": "loud"}), orjson.dumps({**real, "seq": "1"}),
                     orjson.dumps({k: v for k, v in real.items() if k != "trace_id"}), b"x" * 70_000):
            await client.nc.publish("sandbus.log.dn1.logger", body)
        await client.request("logger", "say", {"text": "real"})
        line = await asyncio.wait_for(anext(aiter(stream)), 5)
    assert line["message"] == "real"
