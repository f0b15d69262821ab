"""A real nats-server and a real node (in this process, or a `sandbus node` child) serving C plugins that log."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbus.bus.connection import ConnectOptions
from sandbus.bus.server import NatsServer
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.node.node import Node
from sandbus.host.telemetry.otel import Telemetry

ROOT = Path(__file__).resolve().parents[2]

MANIFEST = """
[plugin]
name = "{name}"
version = "{version}"
description = "logs for the debug-state tests"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute"]
[resources]
timeout_seconds = 2
max_instances = 2
"""

POLICY = '[capabilities]\nallowed = ["compute"]\n'
#: the logging plugins of every test: "logger" (used for lines), "flooder" (floods), "quiet" (never logs)
PLUGINS = {"logger": "1.2.3", "flooder": "1.0.0", "quiet": "1.0.0"}


@pytest.fixture(scope="session")
def logger_wasm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/debugstate/guests/logger.c, built with clang and wasi-libc."""
    out = tmp_path_factory.mktemp("debugstate") / "logger.wasm"
    subprocess.run(["clang", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-mexec-model=reactor",
                    "-Wl,--strip-all", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "sdk" / "guest" / "c"),
                    "-o", str(out), str(ROOT / "tests" / "debugstate" / "guests" / "logger.c")],
                   check=True, capture_output=True)
    return out


@pytest.fixture
def log_plugins(tmp_path: Path, logger_wasm: Path) -> Path:
    """A plugin directory with the three logging plugins, and ``policy.toml`` beside it."""
    d = tmp_path / "plugins"
    d.mkdir()
    for name, version in PLUGINS.items():
        shutil.copy(logger_wasm, d / f"{name}.wasm")
        (d / f"{name}.toml").write_text(MANIFEST.format(name=name, version=version))
    (tmp_path / "policy.toml").write_text(POLICY)
    return d


@pytest.fixture
def nats() -> Iterator[NatsServer]:
    with NatsServer(jetstream=False) as server:
        yield server


@pytest.fixture
def make_node(log_plugins: Path, nats: NatsServer) -> Callable[..., Node]:
    """Build (not start) an in-process node on ``nats`` serving ``log_plugins``; the test stops it."""

    def make(node_id: str = "dn1", **kwargs: Any) -> Node:
        kwargs.setdefault("telemetry", Telemetry("sandbus-node", node_id, enabled=True, export=False,
                                                 set_global=False))
        node = Node.create(log_plugins, ConnectOptions.from_urls(nats.url),
                           policy=load_policy(log_plugins.parent / "policy.toml"), node_id=node_id, durable=False,
                           **kwargs)
        node.manager.discover_and_load()
        return node

    return make


@pytest.fixture
async def node(make_node: Callable[..., Node]) -> AsyncIterator[Node]:
    """A started node "dn1" with bus logs on (rate 200 lines/s and plugin)."""
    n = make_node()
    await n.start()
    try:
        yield n
    finally:
        await n.stop()
        n.manager.close()
