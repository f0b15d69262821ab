"""One real nats-server (JetStream) and one real `sandbus node` process for the protocol tests.

The node serves the example plugins of plugins/build: ``echo`` (replies with what it got: a direct
message's reply is the envelope the plugin received), ``text_processor`` (loaded, reloaded and unloaded
by the control tests) and ``order_logger`` (a durable subscriber of ``orders.*``). Both processes are
started once for the tests under tests/protocol and stopped by PID after the last of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.bus.conftest import NodeProcess, example_plugins, served
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
    plugins = example_plugins(base, plugins_dir, ("echo", "text_processor", "order_logger"), POLICY)
    with served(NODE_ID, plugins, base / "node.log") as (url, node):
        yield Bus(url, NODE_ID, node)
