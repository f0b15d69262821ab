"""Make docs/img/dashboard.png: two real nodes, real traffic, a deploy, the page in headless Chromium.

    .venv/bin/python -m tests.dashboard.screenshot [OUT.png]

Needs plugins/build (``make plugins``) and Debian's chromium and chromium-driver (``make test-tools``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from sandbus.bus.server import NatsServer
from sandbus.host.cluster.deploys import Deploy, DeployStore
from sandbus.host.cluster.reports import NodeReport, PluginReport, ReportStore
from sandbus.sdk.client import Client
from sandbus.sdk.errors import SandbusError
from tests.bus.conftest import NodeProcess
from tests.dashboard.stack import ROOT, DashboardProcess, chrome, make_plugins

OUT = ROOT / "docs" / "img" / "dashboard.png"


async def traffic(url: str) -> None:
    async with await Client.connect(url) as c:
        for i in range(40):
            await c.request("echo", "handle_request", {"n": i})
            await c.request("text_processor", "handle_request", {"action": "uppercase", "text": f"line {i}"})
        for word in ("hello from a guest", "<b>markup stays text</b>", "order 1042 shipped"):
            await c.request("shouter", "handle_request", {"say": word})
        for _ in range(3):
            with contextlib.suppress(SandbusError):
                await c.request("text_processor", "handle_request", {"text": "no action"})
        with contextlib.suppress(SandbusError):
            await c.request("echo", "no_such_function", {})
        js = c.nc.jetstream()
        revision = await (await DeployStore.open(js)).put(
            Deploy(plugin="text_processor", range="^1.0", version="1.0.0", replicas=2, labels={"zone": "a"}))
        reports = await ReportStore.open(js)
        for node in ("web-1", "web-2"):
            await reports.put(NodeReport(node=node, labels={"zone": "a"}, plugins={
                "text_processor": PluginReport(version="1.0.0", state="serving", deploy_revision=revision)}))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    base = Path(tempfile.mkdtemp(prefix="sandbus-screenshot-"))
    server = NatsServer(jetstream=True).start()
    nodes: list[NodeProcess] = []
    dashboard: DashboardProcess | None = None
    try:
        for node_id in ("web-1", "web-2"):
            plugins = make_plugins(base / node_id, ROOT / "plugins" / "build")
            (plugins / "evil.wasm").unlink()
            (plugins / "evil.toml").unlink()
            nodes.append(NodeProcess(node_id, plugins, server.url, base / f"{node_id}.log"))
        for node in nodes:
            node.wait_ready()
        dashboard = DashboardProcess(server.url, base / "dashboard.log", "--interval", "1",
                                     "--jaeger-url", "http://localhost:16686").wait_ready()
        asyncio.run(traffic(server.url))
        with chrome(1500, 2000) as driver:
            driver.get(dashboard.url)
            wait = WebDriverWait(driver, 20, poll_frequency=0.1)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#deploy-rows tr")) == 1)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log-rows tr")) >= 3)
            driver.find_element(By.CSS_SELECTOR,
                                '#plugin-rows tr[data-node="web-1"][data-plugin="text_processor"]').click()
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#debug-facts td[data-key="status"]'))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#debug-instances tbody tr"))
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(out))
        print(f"wrote {out}")
    finally:
        if dashboard is not None:
            dashboard.stop()
        for node in nodes:
            node.terminate()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
