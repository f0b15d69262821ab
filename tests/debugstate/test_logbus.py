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


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def test_debug_lines_are_captured_and_printed_handlers_keep_their_level() -> None:
    """The plugin logger is lowered to capture every line; a handler given its level (as ``sandbus node`` gives
    its stderr) prints what it printed before."""
    root, plugin_logger = logging.getLogger(), logging.getLogger("sandbus.plugin")
    printed = _Collect()
    root.addHandler(printed)
    previous = root.level
    root.setLevel(logging.INFO)
    try:
        if logbus._dispatch is not None:  # attached by an earlier test: start over as a fresh process would
            plugin_logger.removeHandler(logbus._dispatch)
            logbus._dispatch = None
        plugin_logger.setLevel(logging.NOTSET)
        logbus.keep_handler_levels()
        hub = PluginLogs("lv", version_of=lambda _: None, trace_id=lambda: None, owns=lambda _: True, publish=False)
        logbus.attach(hub)
        try:
            guest = logging.getLogger("sandbus.plugin.lvp")
            guest.log(5, "%s%s", "", "a trace line")
            guest.debug("%s%s", "", "captured, not printed")
            guest.info("%s%s", "", "captured and printed")
        finally:
            logbus.detach(hub)
        assert plugin_logger.level == logbus.CAPTURE_LEVEL
        assert printed.level == logging.INFO
        assert printed.messages == ["captured and printed"]
        assert [(x["level"], x["message"]) for x in hub.recent("lvp")] == [
            ("debug", "a trace line"), ("debug", "captured, not printed"), ("info", "captured and printed")]
    finally:
        root.removeHandler(printed)
        root.setLevel(previous)
