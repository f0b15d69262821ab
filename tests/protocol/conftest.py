"""One real nats-server (JetStream) and one real `sandbus node` process for the protocol tests.

The node serves the example plugins of plugins/build: ``echo`` (replies with what it got: a direct
message's reply is the envelope the plugin received), ``text_processor`` (loaded, reloaded and unloaded
by the control tests) and ``order_logger`` (a durable subscriber of ``orders.*``). Both processes are
started once for the tests under tests/protocol and stopped by PID after the last of them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandbus.bus.server import NatsServer
from tests.bus.conftest import NodeProcess
from tests.protocol.wire import NODE_ID

POLICY = """
[capabilities]
allowed = ["compute"]
[messaging]
subscribe_topics = ["orders.*"]
"""


@dataclass(frozen=True)
class Bus:
    url: str
    node_id: str
    node: NodeProcess


@pytest.fixture(scope="package")
def protocol_bus(plugins_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    base = tmp_path_factory.mktemp("protocol")
    plugins = base / "plugins"
    plugins.mkdir()
    for name in ("echo", "text_processor", "order_logger"):
        for ext in ("wasm", "toml"):
            shutil.copy(plugins_dir / f"{name}.{ext}", plugins / f"{name}.{ext}")
    (base / "policy.toml").write_text(POLICY)
    server = NatsServer(jetstream=True).start()
    node: NodeProcess | None = None
    try:
        node = NodeProcess(NODE_ID, plugins, server.url, base / "node.log")
        node.wait_ready()
        yield Bus(server.url, NODE_ID, node)
    finally:
        if node is not None:
            node.terminate()
        server.stop()
