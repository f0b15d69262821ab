"""What a node keeps for plugin logs and debug state stays bounded: plugins that come and go under new
names, lines at the message bound, a queue of long lines (a real node, real C plugins, a real nats-server)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import orjson

from sandbus.bus.server import NatsServer
from sandbus.host.node.logbus import LINE_OVERHEAD, MAX_LOG_MESSAGE, PluginLogs
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from tests.bus.conftest import until
from tests.debugstate.conftest import MANIFEST


async def test_plugins_unloaded_under_new_names_leave_nothing_behind(node: Node, nats: NatsServer,
                                                                      log_plugins: Path) -> None:
    before = node.logs.held()
    lanes, versions = len(node._lanes), len(node._versions)
    async with await Client.connect(nats.url) as client:
        for i in range(12):
            name = f"tmp{i}"
            shutil.copy(log_plugins / "logger.wasm", log_plugins / f"{name}.wasm")
            (log_plugins / f"{name}.toml").write_text(MANIFEST.format(name=name, version="1.0.0"))
            await client.control("dn1", "load", {"plugin": name})
            await client.request(name, "say", {"text": "x" * 100, "n": 3})
            await client.control("dn1", "unload", {"plugin": name})
            (log_plugins / f"{name}.wasm").unlink()
            (log_plugins / f"{name}.toml").unlink()
        await client.request("logger", "say", {"text": "still here"})
    # The last unload's sync runs on the loop: wait for it, then every trace of the twelve is gone.
    await until(lambda: "tmp11" not in node._lanes, 5, "the last unloaded plugin's lane dropped")
    held = node.logs.held()
    assert held["rings"] <= before["rings"] + 1  # logger's ring, if it had none before
    assert max(held["buckets"], held["subjects"], held["dropped_plugins"]) <= 3
    assert (len(node._lanes), len(node._versions)) == (lanes, versions)
    assert not [n for n in node.recent_audit._rings if n.startswith("tmp")]
    assert node.logs.recent("logger")[-1]["message"] == "still here"


def _hub(**kwargs: int) -> PluginLogs:
    return PluginLogs("n", version_of=lambda _: None, trace_id=lambda: None, owns=lambda _: True, **kwargs)


async def test_rings_and_the_queue_are_bounded_in_characters_too(node: Node, nats: NatsServer) -> None:
    # Lines at the message bound: the ring keeps what fits in its characters, newest last, not 200 of them.
    async with await Client.connect(nats.url) as client:
        for _ in range(6):  # 7 lines a call stay under the 64 KiB per-call cap
            await client.request("logger", "say", {"text": "y" * (MAX_LOG_MESSAGE - 10), "n": 7})
        await client.request("logger", "say", {"text": "z" * (MAX_LOG_MESSAGE * 2), "n": 3})
    hub = node.logs
    ring = hub.recent("logger")
    assert len(ring) < 200
    assert sum(len(x["message"]) + LINE_OVERHEAD for x in ring) <= hub.ring_chars
    assert ring[-1]["message"].startswith("zzz")
    assert ring[-1]["message"].endswith("characters cut)")
    assert hub.held()["ring_chars"] <= hub.ring_chars


def test_one_line_longer_than_the_ring_is_still_kept() -> None:
    hub = _hub(ring_chars=10)
    record = logging.LogRecord("sandbus.plugin.p", logging.INFO, "", 0, "%s%s", ("", "a" * 100), None)
    hub.take(record)
    hub.take(record)
    assert len(hub.recent("p")) == 1


async def test_the_queue_holds_at_most_its_characters_and_counts_the_rest() -> None:
    sent: list[bytes] = []

    async def publish(subject: str, data: bytes, headers: dict[str, str]) -> None:
        sent.append(data)

    hub = _hub(queue_chars=5 * (1000 + LINE_OVERHEAD))
    hub.start(publish)
    record = logging.LogRecord("sandbus.plugin.p", logging.INFO, "", 0, "%s%s", ("", "a" * 1000), None)
    for _ in range(8):  # no await: the publisher cannot run, the queue fills
        hub.take(record)
    assert hub.held()["queued"] == 5
    assert hub.held()["queued_chars"] <= hub.queue_chars
    await until(lambda: len(sent) == 5, 5, "the five queued lines published")
    hub.take(record)
    await until(lambda: len(sent) == 6, 5, "the next line")
    assert orjson.loads(sent[-1])["dropped"] == 3
    await hub.close()


def test_threads_that_ended_are_forgotten_by_the_dispatch() -> None:
    import threading

    from sandbus.host.node import logbus

    hub = _hub()
    logbus.attach(hub)
    try:
        for _ in range(50):  # worker threads of lanes that came and went
            t = threading.Thread(target=logbus.claim_thread, args=(hub,))
            t.start()
            t.join()
        logbus.claim_thread(hub)
        assert logbus._dispatch is not None
        alive = {t.ident for t in threading.enumerate()}
        assert set(logbus._dispatch.threads) <= alive
    finally:
        logbus.detach(hub)


async def test_a_sustained_flood_is_one_log_dropped_event_a_second_and_counts_every_line(
        make_node: Callable[..., Node], nats: NatsServer) -> None:
    import asyncio
    import time

    from tests.bus.conftest import collect

    node = make_node("flood", log_rate=20.0)
    await node.start()
    try:
        async with await Client.connect(nats.url) as client:
            got = await collect(client.nc, "sandbus.log.flood.flooder")
            audit = await collect(client.nc, "sandbus.audit.flood")
            started = time.monotonic()
            while time.monotonic() - started < 2.5:  # the load paced over 2.5 s
                await client.request("flooder", "say", {"text": "flood", "n": 40})
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - started

            def events() -> list[dict[str, object]]:
                return [e for e in (orjson.loads(m.data) for m in audit) if e["kind"] == "log.dropped"]

            await until(lambda: sum(int(e["details"]["dropped"]) for e in events()) == node.logs.dropped, 5,
                        "every dropped line audited")
        assert node.logs.dropped > 0
        assert len(events()) <= int(elapsed) + 2  # one an interval (1 s), not one a drop
        captured = node.logs.captured
        assert len(got) + node.logs.dropped == captured
    finally:
        await node.stop()
        node.manager.close()
