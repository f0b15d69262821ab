"""The dashboard under the shipped NATS permissions (deploy/nats/permissions.conf): as the ``viewer`` user it
shows everything and triggers no permission violation; control needs the operator's credentials."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbus.bus.server import NatsServer
from sandbus.sdk.client import Client
from sandbus.sdk.errors import SandbusError
from tests.bus.conftest import NodeProcess
from tests.bus.test_hardening_permissions import CONFIG, PASSWORDS, violations
from tests.dashboard.stack import ROOT, DashboardProcess, api_state, make_plugins, wait_for

pytestmark = pytest.mark.slow

NODE = "sec-n1"


@pytest.fixture
def secured(tmp_path: Path, plugins_dir: Path) -> Iterator[tuple[NatsServer, NodeProcess]]:
    store = tmp_path / "nats"
    env = {"NATS_HOST": "127.0.0.1", "NATS_PORT": "-1", "NATS_STORE": str(store),
           "SANDBUS_NODE_PASSWORD": PASSWORDS["sandbus-node"], "SANDBUS_OPERATOR_PASSWORD": PASSWORDS["operator"],
           "SANDBUS_CLIENT_PASSWORD": PASSWORDS["client"], "SANDBUS_PUBLISHER_PASSWORD": PASSWORDS["publisher"],
           "SANDBUS_VIEWER_PASSWORD": PASSWORDS["viewer"]}
    server = NatsServer(config=CONFIG, jetstream=False, store_dir=store, env=env).start()
    node: NodeProcess | None = None
    try:
        plugins = make_plugins(tmp_path, plugins_dir)
        node = NodeProcess(NODE, plugins, server.url, tmp_path / "node.log", "--user", "sandbus-node",
                           env={"SANDBUS_NATS_PASSWORD": PASSWORDS["sandbus-node"]})
        node.wait_ready()
        yield server, node
    finally:
        if node is not None:
            node.terminate()
        server.stop()


def _as(user: str) -> dict[str, str]:
    return {"NATS_USER": user, "NATS_PASSWORD": PASSWORDS[user]}


async def _traffic(url: str, marker: str) -> None:
    async with await Client.connect(url, user="client", password=PASSWORDS["client"]) as c:
        await c.request("shouter", "handle_request", {"say": marker})
        with contextlib.suppress(SandbusError):
            await c.request("echo", marker, {})


async def _deploy(url: str) -> None:
    from sandbus.host.cluster.deploys import Deploy, DeployStore

    async with await Client.connect(url, user="operator", password=PASSWORDS["operator"]) as c:
        await (await DeployStore.open(c.nc.jetstream())).put(Deploy(plugin="echo", range="^1.0", version="1.0.0"))


def test_as_viewer_everything_shows_and_nothing_is_refused(secured: tuple[NatsServer, NodeProcess],
                                                           tmp_path: Path) -> None:
    server, _ = secured
    asyncio.run(_traffic(server.url, "before_dashboard"))
    dashboard = DashboardProcess(server.url, tmp_path / "viewer.log", "--interval", "0.5",
                                 env=_as("viewer")).wait_ready()
    try:
        state = wait_for(lambda: (s := api_state(dashboard.url))["nodes"] and s, "the node")
        assert state["nodes"][0]["node_id"] == NODE
        assert state["info"]["audit_source"] == "stream"
        wait_for(lambda: any("before_dashboard" in e["message"] for e in api_state(dashboard.url)["audit"]),
              "the audit event from before, read from the stream")
        asyncio.run(_traffic(server.url, "while_watching"))
        wait_for(lambda: any("while_watching" in e["message"] for e in api_state(dashboard.url)["audit"]),
              "a live audit event")
        wait_for(lambda: any("while_watching" in line["message"] for line in api_state(dashboard.url)["logs"]),
              "a live log line")
        debug = urllib.request.Request(f"{dashboard.url}api/debug?node={NODE}&plugin=echo",
                                       headers={"X-Sandbus-Dashboard": "1"})
        with urllib.request.urlopen(debug, timeout=10) as r:
            assert json.loads(r.read())["status"] == "loaded"
        asyncio.run(_deploy(server.url))
        wait_for(lambda: [d["plugin"] for d in api_state(dashboard.url)["deploys"]["deploys"]] == ["echo"],
              "the operator's deploy, read from the bucket")
    finally:
        dashboard.stop()
    assert violations(server, "viewer") == []
    assert "Permissions Violation" not in dashboard.output()


def test_control_needs_the_operator(secured: tuple[NatsServer, NodeProcess], tmp_path: Path) -> None:
    server, _ = secured
    refused = subprocess.run([sys.executable, "-m", "sandbus", "dashboard", "--nats", server.url, "--no-context",
                              "--port", "0", "--allow-control"], capture_output=True, text=True, timeout=30,
                             cwd=ROOT, env={**_os_env(), **_as("viewer")})
    assert refused.returncode == 2
    assert "--allow-control needs operator credentials" in refused.stderr
    dashboard = DashboardProcess(server.url, tmp_path / "operator.log", "--interval", "0.5", "--allow-control",
                                 env=_as("operator")).wait_ready()
    try:
        assert dashboard.token
        request = urllib.request.Request(
            dashboard.url + "api/control", method="POST",
            data=json.dumps({"verb": "reload", "node": NODE, "plugin": "echo"}).encode(),
            headers={"Content-Type": "application/json", "Origin": dashboard.url.rstrip("/"),
                     "X-Sandbus-Token": dashboard.token})
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.loads(r.read())["ok"] is True
        wait_for(lambda: "dashboard control: reload echo on node sec-n1 by 127.0.0.1" in dashboard.output()
              and "as NATS user operator: done" in dashboard.output(), "the control action logged with who")
    finally:
        dashboard.stop()
    assert violations(server, "operator") == []


def _os_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
