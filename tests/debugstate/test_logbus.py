"""The log capture's bounds on a real NATS connection: the queue never grows past its size, and what it
could not take is counted and reported."""

from __future__ import annotations

import logging

import nats as nats_py
import orjson

from sandbus.bus.server import NatsServer
from sandbus.host.node import logbus
from sandbus.host.node.logbus import PluginLogs
from tests.bus.conftest import collect, until


async def test_a_full_queue_drops_counts_and_never_blocks(nats: NatsServer) -> None:
    nc = await nats_py.connect(nats.url)
    reported: list[tuple[str, int]] = []
    hub = PluginLogs("unit", version_of=lambda _: "2.0.0", trace_id=lambda: None, owns=lambda _: True,
                     queue_size=5, rate=1000, audit=lambda plugin, n: reported.append((plugin, n)))
    got = await collect(nc, "sandbus.log.unit.>")
    logbus.attach(hub)
    logbus.claim_thread(hub)
    hub.start(nc.publish)
    try:
        logger = logging.getLogger("sandbus.plugin.unitp")
        # On the loop thread: the publisher cannot run until this returns, so 5 lines fill the queue and
        # 15 find it full; logging returns at once all the same.
        for i in range(20):
            logger.info("%s%s", "", f"line {i}")
        await until(lambda: len(got) == 5, 5, "the queued lines")
        logger.warning("%s%s", "[stderr] ", "after")
        await until(lambda: len(got) == 6, 5, "the next line")
        await until(lambda: reported, 5, "the log.dropped report")
    finally:
        await hub.close()
        logbus.detach(hub)
        await nc.close()
    lines = [orjson.loads(m.data) for m in got]
    assert [x["message"] for x in lines] == [f"line {i}" for i in range(5)] + ["after"]
    assert [x["dropped"] for x in lines] == [0] * 5 + [15]
    assert (lines[-1]["level"], lines[-1]["stream"], lines[-1]["version"]) == ("warning", "stderr", "2.0.0")
    assert lines[-1]["seq"] - lines[4]["seq"] == 16  # the 15 dropped lines have their numbers
    assert reported == [("unitp", 15)]
    assert len(hub.recent("unitp")) == 21  # the ring has them all


async def test_stderr_handlers_keep_their_level() -> None:
    """The plugin logger goes to DEBUG for the capture; a handler above it that printed at INFO still does."""
    root = logging.getLogger()
    handler = logging.StreamHandler()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)
    plugin_logger = logging.getLogger("sandbus.plugin")
    try:
        if logbus._dispatch is not None:  # attached by an earlier test: start over as a fresh process would
            plugin_logger.removeHandler(logbus._dispatch)
            logbus._dispatch = None
        plugin_logger.setLevel(logging.NOTSET)
        hub = PluginLogs("lv", version_of=lambda _: None, trace_id=lambda: None, owns=lambda _: True, publish=False)
        logbus.attach(hub)
        assert plugin_logger.level == logging.DEBUG
        assert handler.level == logging.INFO
        logging.getLogger("sandbus.plugin.lvp").debug("%s%s", "", "captured, not printed")
        assert [x["message"] for x in hub.recent("lvp")] == ["captured, not printed"]
        logbus.detach(hub)
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
