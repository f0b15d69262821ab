"""An Extism plugin goes through the cluster like any plugin: signed into the registry, verified by the node
that loads it, deployed, and answering bytes on the bus. Nothing in the registry or the agent knows the kind."""

from __future__ import annotations

from pathlib import Path

import orjson
from nats.aio.client import Client as NATS

from sandbus.bus.server import NatsServer
from sandbus.host.cluster.keys import PublisherKey
from sandbus.host.cluster.registry import Registry
from sandbus.sdk.client import Client
from tests.bus.conftest import until
from tests.cluster.agent_kit import deploy, members


async def test_a_signed_extism_plugin_is_deployed_and_answers_bytes(server: NatsServer, server_nc: NATS,
                                                                    tmp_path: Path, plugins_dir: Path,
                                                                    publisher: PublisherKey) -> None:
    registry = await Registry.open(server_nc)
    entry = await registry.push((plugins_dir / "count_vowels.wasm").read_bytes(),
                                (plugins_dir / "count_vowels.toml").read_bytes(), publisher)
    assert entry.version == "1.0.0"
    async with members(server.url, tmp_path, [publisher.public_key], 2) as ms:
        await deploy(server_nc, "count_vowels", "1.0.0", replicas=1)
        await until(lambda: any(m.version("count_vowels") == "1.0.0" for m in ms), 10, "count_vowels deployed")
        holder = next(m for m in ms if m.version("count_vowels") == "1.0.0")
        assert holder.node.manager.body("count_vowels") == "bytes"
        async with await Client.connect(server.url) as c:
            reply = await c.request_raw("count_vowels", "count_vowels", b"Hello, World!\xff\x00")
        assert reply.content_type == "application/json"
        assert orjson.loads(reply.data)["count"] == 3
