"""Each log line carries the trace of the call that logged it, under concurrency, inline and on threads
(a real node, a real C plugin, a real nats-server; 32 concurrent traced requests from two clients)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable

import pytest

from sandbus.bus.server import NatsServer
from sandbus.host.node.node import Node
from sandbus.sdk.client import Client
from tests.bus.conftest import until


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "threads"])
async def test_no_line_carries_another_calls_trace(make_node: Callable[..., Node], nats: NatsServer,
                                                   inline: bool) -> None:
    node = make_node(inline_budget_s=0.05 if inline else None, threads=4)
    await node.start()
    try:
        async with await Client.connect(nats.url) as one, await Client.connect(nats.url) as two:
            got: list[dict[str, object]] = []
            async with one.logs("logger") as stream:

                async def follow() -> None:
                    async for line in stream:
                        got.append(line)

                follower = asyncio.create_task(follow())

                async def call(client: Client) -> str:
                    trace_id = secrets.token_hex(16)
                    # the trace id is the text: each line says which call logged it
                    await client.nc.request("sandbus.req.logger.say",
                                            f'{{"text": "{trace_id}", "n": 2}}'.encode(), timeout=10,
                                            headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
                    return trace_id

                sem = asyncio.Semaphore(32)

                async def bounded(client: Client) -> str:
                    async with sem:
                        return await call(client)

                ids = await asyncio.gather(*(bounded(one if i % 2 else two) for i in range(96)))
                await until(lambda: len(got) >= 2 * len(ids), 10, "every line followed")
                follower.cancel()
        assert sorted(str(x["message"]) for x in got) == sorted(ids * 2)
        wrong = [x for x in got if x["trace_id"] != x["message"]]
        assert not wrong, wrong[:3]
    finally:
        await node.stop()
        node.manager.close()
