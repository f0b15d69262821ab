"""A real node's ``$SRV`` answers against the official NATS micro (ADR-32) schemas.

The schemas are nats-io/jsm.go's ``schemas/micro/v1`` (vendored under fixtures/nats-micro, see its
README). ``$SRV`` has no queue group, so these requests are gathered the way docs/protocol.md says:
publish with a reply inbox and collect answers until a timeout.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from nats.aio.msg import Msg

from tests.protocol.conftest import Bus
from tests.protocol.wire import connected

MICRO = Path(__file__).parent / "fixtures" / "nats-micro"
VERBS = ("list", "stats", "load", "unload", "reload", "debug")


@cache
def micro_schema(kind: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((MICRO / f"{kind.lower()}_response.json").read_text())
    return loaded


async def gather(url: str, subject: str, node_id: str, *, then: float = 0.2, timeout: float = 5.0) -> list[Msg]:
    """The answers to ``subject`` (``$SRV`` has no queue group): until ``node_id``'s has come (at most
    ``timeout`` seconds), and whatever else comes in the ``then`` seconds after it."""
    async with connected(url) as nc:
        inbox = nc.new_inbox()
        answers: list[Msg] = []
        mine = asyncio.Event()

        async def on_answer(msg: Msg) -> None:
            answers.append(msg)
            if (json.loads(msg.data).get("metadata") or {}).get("node_id") == node_id:
                mine.set()

        sub = await nc.subscribe(inbox, cb=on_answer)
        await nc.publish(subject, b"", reply=inbox)
        await asyncio.wait_for(mine.wait(), timeout)
        await asyncio.sleep(then)  # a second answer (a duplicate) would come now: the assertions look for it
        await sub.unsubscribe()
        return answers


def ours(answers: list[Msg], node_id: str) -> dict[str, Any]:
    mine: list[dict[str, Any]] = [json.loads(m.data) for m in answers
                                  if (json.loads(m.data).get("metadata") or {}).get("node_id") == node_id]
    assert len(mine) == 1, [m.data for m in answers]
    return mine[0]


@pytest.mark.parametrize("kind", ["PING", "INFO", "STATS"])
@pytest.mark.parametrize("suffix", ["", ".sandbus-node"], ids=["all", "by_name"])
async def test_srv_answers_match_the_micro_schemas(protocol_bus: Bus, kind: str, suffix: str) -> None:
    answer = ours(await gather(protocol_bus.url, f"$SRV.{kind}{suffix}", protocol_bus.node_id), protocol_bus.node_id)
    validator = jsonschema.Draft7Validator(micro_schema(kind), format_checker=jsonschema.FormatChecker())
    problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(answer)]
    assert not problems, (answer, problems)
    assert answer["type"] == f"io.nats.micro.v1.{kind.lower()}_response"
    assert answer["name"] == "sandbus-node"
    if kind == "STATS":  # RFC 3339 (the schema's date-time, which jsonschema checks only with an extra package)
        assert datetime.fromisoformat(answer["started"]).utcoffset() is not None, answer["started"]
    if kind != "PING":
        endpoints = {e["name"]: e["subject"] for e in answer["endpoints"]}
        assert endpoints == {v: f"sandbus.node.{protocol_bus.node_id}.{v}" for v in VERBS}


async def test_srv_by_instance_id_reaches_one_node(protocol_bus: Bus) -> None:
    node_id = protocol_bus.node_id
    ping = ours(await gather(protocol_bus.url, "$SRV.PING.sandbus-node", node_id), node_id)
    answers = await gather(protocol_bus.url, f"$SRV.INFO.sandbus-node.{ping['id']}", node_id)
    assert [json.loads(m.data)["id"] for m in answers] == [ping["id"]]
