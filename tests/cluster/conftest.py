"""Registry fixtures: one JetStream nats-server per test module, fresh registry buckets per test, a publisher
key pair in tmp_path, and a helper that pushes an example plugin from plugins/build (under any name and
version)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS

from sandbus.bus.server import NatsServer
from sandbus.host.cli.main import main
from sandbus.host.cluster.entry import RegistryEntry
from sandbus.host.cluster.keys import PublisherKey, keygen
from sandbus.host.cluster.names import ARTIFACTS_BUCKET, REGISTRY_BUCKET
from sandbus.host.cluster.registry import Registry

PushFn = Callable[..., Awaitable[RegistryEntry]]
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def js_server() -> Iterator[NatsServer]:
    """A nats-server with JetStream, shared by the tests of one module (each gets fresh buckets)."""
    server = NatsServer(jetstream=True).start()
    try:
        yield server
    finally:
        server.stop()


async def empty_registry(conn: NATS) -> None:
    """Remove the registry's buckets, emptied first: nats-server may leave a deleted stream's directory behind
    when another deletion of the same name is still being cleaned up (under load), and a stream created
    again under that name then recovers the old messages -- empty ones, this way."""
    js = conn.jetstream()
    for stream, delete in ((f"KV_{REGISTRY_BUCKET}", js.delete_key_value), (f"OBJ_{ARTIFACTS_BUCKET}",
                                                                           js.delete_object_store)):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.purge_stream(stream)
            await delete(stream.split("_", 1)[1])


@pytest.fixture
async def nc(js_server: NatsServer) -> AsyncIterator[NATS]:
    """A connection to ``js_server`` with the registry buckets removed: every test starts with an empty registry."""
    conn = await nats.connect(js_server.url)
    await empty_registry(conn)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def registry(nc: NATS) -> Registry:
    return await Registry.open(nc)


@pytest.fixture
def publisher(tmp_path: Path) -> PublisherKey:
    """A publisher key pair: ``tmp_path/publisher.nk`` and ``publisher.nk.pub``."""
    return keygen(tmp_path / "publisher.nk")


def manifest_of(plugins_dir: Path, source: str, *, name: str | None = None, version: str | None = None,
                extra: str = "") -> bytes:
    """The manifest of the built example ``source``, renamed / re-versioned, with ``extra`` TOML appended."""
    text = (plugins_dir / f"{source}.toml").read_text()
    if name is not None:
        text = re.sub(r'(?m)^name = ".*"$', f'name = "{name}"', text, count=1)
    if version is not None:
        text = re.sub(r'(?m)^version = ".*"$', f'version = "{version}"', text, count=1)
    return (text + extra).encode()


@pytest.fixture
def push(registry: Registry, publisher: PublisherKey, plugins_dir: Path) -> PushFn:
    """``await push(name="echo", version="1.0.0", source="echo", extra="", key=publisher)``: publish the built
    example ``source`` as ``name@version``."""

    async def go(name: str = "echo", version: str = "1.0.0", *, source: str = "echo", extra: str = "",
                 key: PublisherKey | None = None) -> RegistryEntry:
        wasm = (plugins_dir / f"{source}.wasm").read_bytes()
        manifest = manifest_of(plugins_dir, source, name=name, version=version, extra=extra)
        return await registry.push(wasm, manifest, key or publisher)

    return go


@pytest.fixture
def server() -> Iterator[NatsServer]:
    """A JetStream nats-server of this test's own (its buckets start empty)."""
    s = NatsServer(jetstream=True).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
async def server_nc(server: NatsServer) -> AsyncIterator[NATS]:
    """A connection to :func:`server`."""
    client = await nats.connect(server.url)
    try:
        yield client
    finally:
        await client.close()


# -- the command line ------------------------------------------------------------------------------------------

@pytest.fixture
def sandbus(capsys: pytest.CaptureFixture[str]) -> Run:
    """Run the ``sandbus`` command in this process: (exit code, stdout, stderr).

    ``main`` registers only the command it runs (a process runs one command); running several here, the
    registry's, the cluster's and ``node`` are all registered first."""
    cli_main = importlib.import_module("sandbus.host.cli.main")
    from sandbus.host.cli import cluster_cmd, node_cmd, registry_cmd

    have = {c.callback.__name__ for c in cli_main.app.registered_commands if c.callback is not None}
    for module, names in ((registry_cmd, ("keygen", "push", "search", "pull", "install")),
                          (cluster_cmd, ("deploy", "status", "undeploy"))):
        cli_main._registered.add(module.__name__.rsplit(".", 1)[1])
        for name in names:
            if name not in have:
                module.register(cli_main.app, only=name)
    if "node" not in have:
        cli_main._registered.add("node_cmd")
        node_cmd.register(cli_main.app)

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as done:
            main(list(args))
        captured = capsys.readouterr()
        return int(done.value.code or 0), captured.out, captured.err

    return run


def run_nats(url: str, action: Callable[[NATS], Awaitable[None]]) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await action(nc)
        finally:
            await nc.close()

    asyncio.run(go())


@pytest.fixture
def url(js_server: NatsServer) -> str:
    """The shared server's URL, with the registry emptied."""

    run_nats(js_server.url, empty_registry)
    return js_server.url


@pytest.fixture
def key(tmp_path: Path, sandbus: Run) -> Path:
    """A publisher seed made with `sandbus keygen`: ``tmp_path/pub.nk`` (and ``pub.nk.pub``)."""
    code, _, _ = sandbus("keygen", "-o", str(tmp_path / "pub.nk"))
    assert code == 0
    return tmp_path / "pub.nk"
