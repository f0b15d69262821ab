"""One real stack per test module: nats-server with JetStream, a node serving real plugins, two dashboards
(read-only with a Jaeger URL; control allowed), and a headless Chromium."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sandbus.bus.server import NatsServer
from sandbus.sdk.client import Client
from tests.bus.conftest import NodeProcess
from tests.dashboard.stack import CHROMEDRIVER, CHROMIUM, DashboardProcess, chrome, make_plugins

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

NODE = "dash-n1"
JAEGER = "http://jaeger.example:16686"
#: the dashboards poll fast, so a test's wait is short
INTERVAL = "0.5"


@dataclass
class Stack:
    url: str
    node: NodeProcess
    read_only: DashboardProcess
    control: DashboardProcess

    def call(self, fn: Callable[[Client], Any]) -> Any:
        """Run ``fn(client)`` on a fresh client of the stack's bus."""
        async def go() -> Any:
            async with await Client.connect(self.url) as client:
                return await fn(client)

        return asyncio.run(go())


#: the function a request asks for before the dashboards start: its refusal is in the audit stream only
BEFORE = "before_the_dashboard"


async def _refused_before(url: str) -> None:
    from sandbus.sdk.errors import SandbusError

    async with await Client.connect(url) as client:
        with contextlib.suppress(SandbusError):
            await client.request("echo", BEFORE, {})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, plugins_dir: Path) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("dashboard")
    plugins = make_plugins(base, plugins_dir)
    server = NatsServer(jetstream=True).start()
    started: list[DashboardProcess] = []
    node: NodeProcess | None = None
    try:
        # traced (spans printed to its log): a call's log lines then carry the call's trace id
        node = NodeProcess(NODE, plugins, server.url, base / "node.log", env={"OTEL_TRACES_EXPORTER": "console"})
        node.wait_ready()
        asyncio.run(_refused_before(server.url))
        read_only = DashboardProcess(server.url, base / "read_only.log", "--interval", INTERVAL,
                                     "--jaeger-url", JAEGER)
        started.append(read_only)
        control = DashboardProcess(server.url, base / "control.log", "--interval", INTERVAL, "--allow-control")
        started.append(control)
        yield Stack(server.url, node, read_only.wait_ready(), control.wait_ready())
    finally:
        for dashboard in started:
            dashboard.stop()
        if node is not None:
            node.terminate()
        server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("chromium and chromedriver are missing: run `make test-tools` "
                    "(apt-get install chromium chromium-driver)")
    with chrome() as driver:
        yield driver
