"""A node serves the plugins that loaded while a slow one compiles in the background; `ls` shows it loading.

The slow plugin is the componentize-py guest with an empty module cache: its compile in the compile worker
takes 5-15 s, far longer than what the test does while it loads (a request, a control ``list``, one
``sandbus ls``).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from sandbus.bus.server import NatsServer
from sandbus.host.sandbox.compiler import IN_PROCESS_BELOW
from sandbus.sdk.client import Client
from sandbus.sdk.errors import PluginNotFoundError
from tests.bus.conftest import POLICY, RECORDER_TOML, ROOT, NodeProcess, example_plugins, served, until


def _status(nodes: list[dict[str, Any]], plugin: str) -> str | None:
    for node in nodes:
        for p in node["plugins"]:
            if p["name"] == plugin:
                return str(p["status"])
    return None


def test_node_serves_fast_plugin_while_the_slow_one_loads(tmp_path: Path, plugins_dir: Path) -> None:
    if not (plugins_dir / "py_echo.wasm").exists():
        pytest.skip("py_echo was not built (componentize-py missing)")
    plugins = example_plugins(tmp_path, plugins_dir, ("echo", "py_echo"))
    env = {"SANDBUS_CACHE_DIR": str(tmp_path / "empty-cache")}  # py_echo compiles: seconds
    with served("bg1", plugins, tmp_path / "node.log", env=env) as (url, node):
        out = node.output()
        assert "still loading in the background: py_echo" in out
        ls = subprocess.Popen([sys.executable, "-m", "sandbus", "ls", "--nats", url], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
        try:
            async def while_loading() -> None:
                client = await Client.connect(url)
                try:
                    assert await client.request("echo", payload={"hi": 1}, timeout=10) == {"hi": 1}
                    nodes = await client.nodes(timeout=1)
                    assert _status(nodes, "echo") == "loaded"
                    assert _status(nodes, "py_echo") == "loading"
                    # Not served anywhere yet: a typed answer at once, not a timeout.
                    with pytest.raises(PluginNotFoundError):
                        await client.request("py_echo", "echo", payload={"x": 1}, timeout=10)
                finally:
                    await client.close()

            asyncio.run(while_loading())
            listing, _ = ls.communicate(timeout=60)
        finally:
            if ls.poll() is None:
                ls.kill()
                ls.wait(timeout=10)
        lines = [ln for ln in listing.decode(errors="replace").splitlines() if "py_echo" in ln]
        assert lines, listing
        assert "loading" in lines[0], listing

        async def after() -> None:
            await until(lambda: "loaded py_echo: loaded" in node.output(), 300, "py_echo's background load")
            client = await Client.connect(url)
            try:
                await until_served(client)
                assert await client.request("py_echo", "echo", payload={"x": 1}, timeout=10) == {"x": 1}
                assert _status(await client.nodes(timeout=1), "py_echo") == "loaded"
            finally:
                await client.close()

        async def until_served(client: Client) -> None:
            # The load's audit event makes the node subscribe: wait for the subscription, bounded.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                try:
                    await client.request("py_echo", "echo", payload={"ping": 1}, timeout=10)
                    return
                except PluginNotFoundError:
                    if loop.time() > deadline:
                        raise
                    await asyncio.sleep(0.05)

        asyncio.run(after())


def _compile_workers(marker: str) -> list[int]:
    """PIDs of compile workers whose environment carries ``marker`` (a path unique to this test)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if b"_compile_worker.py" in cmdline and marker.encode() in environ:
            found.append(int(entry))
    return found


def test_a_node_stopped_while_a_plugin_compiles_leaves_no_compile_worker(tmp_path: Path, plugins_dir: Path) -> None:
    if not (plugins_dir / "py_echo.wasm").exists():
        pytest.skip("py_echo was not built (componentize-py missing)")
    plugins = example_plugins(tmp_path, plugins_dir, ("echo", "py_echo"))
    marker = str(tmp_path / "empty-cache")
    with served("bg2", plugins, tmp_path / "node.log", env={"SANDBUS_CACHE_DIR": marker}) as (_, node):
        asyncio.run(until(lambda: _compile_workers(marker), 60, "the compile worker to start"))
        assert node.terminate() == 0
    # Killed as the node stops; a worker left running would go on compiling for seconds (5-15 s in all).
    asyncio.run(until(lambda: not _compile_workers(marker), 3, "the compile worker to end"))
    assert "loaded py_echo" not in node.output(), "the compile ended before the node stopped: the test showed nothing"


def _padded(wasm: bytes, size: int) -> bytes:
    """``wasm`` with a custom section making it ``size`` bytes or more: compiled in the compile worker."""
    body = b"\x03pad" + b"\0" * size
    n, leb = len(body), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        leb.append(byte | (0x80 if n else 0))
        if not n:
            break
    return wasm + b"\x00" + bytes(leb) + body


async def test_durable_deliveries_wait_for_a_plugin_that_loads_in_the_background(
        tmp_path: Path, nats_server: NatsServer, c_guest_flags: Any) -> None:
    """Messages for a durable subscriber that is loading are neither taken nor dead-lettered: they wait in
    its durable consumer and are delivered once it serves."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    wasm = c_guest_flags("recorder", "rec_big", '-DPLUGIN_NAME="rec_big"').read_bytes()
    (plugins / "rec_big.wasm").write_bytes(_padded(wasm, IN_PROCESS_BELOW))
    (plugins / "rec_big.toml").write_text(RECORDER_TOML.format(name="rec_big", durable="true"))
    (tmp_path / "policy.toml").write_text(POLICY)
    first = NodeProcess("bg3", plugins, nats_server.url, tmp_path / "first.log",
                        env={"SANDBUS_CACHE_DIR": str(tmp_path / "cache-1")})
    try:
        first.wait_ready()
        await until(lambda: "loaded rec_big: loaded" in first.output(), 120, "the first load")
    finally:
        assert first.terminate() == 0  # its durable consumer stays on the server
    async with await Client.connect(nats_server.url) as c:
        seen: list[dict[str, Any]] = []
        dead: list[bytes] = []

        async def on_seen(msg: Any) -> None:
            seen.append(orjson.loads(msg.data))

        async def on_dead(msg: Any) -> None:
            dead.append(msg.data)

        await c.nc.subscribe("sandbus.topic.seen.rec_big", cb=on_seen)
        await c.nc.subscribe("sandbus.dlq.rec_big", cb=on_dead)
        ids = [await c.publish("orders.created", {"n": i}) for i in range(20)]
        second = NodeProcess("bg3", plugins, nats_server.url, tmp_path / "second.log",
                             env={"SANDBUS_CACHE_DIR": str(tmp_path / "cache-2")})  # empty: compiles again
        try:
            second.wait_ready()
            assert "still loading in the background: rec_big" in second.output()
            await until(lambda: {m["payload"]["id"] for m in seen} >= set(ids), 120, "every message, after the load")
            assert "loaded rec_big: loaded" in second.output()
            assert dead == []
        finally:
            assert second.terminate() == 0
