"""What the protocol tests share: the published JSON Schemas, a raw NATS connection, and bounded waits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import nats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"
SCHEMAS = ROOT / "docs" / "schemas"
#: the node every protocol test talks to (tests/protocol/conftest.py starts it)
NODE_ID = "proto-node"
ENVELOPE_TYPE = "application/vnd.sandbus.message+json"
ENVELOPE_KEYS = {"id", "from", "to", "topic", "payload", "timestamp", "headers"}
#: the docs' recommended client timeout: every example plugin's timeout_seconds (5) + 1 s
TIMEOUT_S = 6.0


@cache
def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    return loaded


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema(name), format_checker=jsonschema.FormatChecker())


def validate(name: str, instance: Any) -> None:
    """Raise with every schema error listed (not only the first) when ``instance`` breaks ``name``."""
    errors = sorted(validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  at {'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]
        raise AssertionError(f"{name} schema violated by {json.dumps(instance)[:2000]}:\n" + "\n".join(lines))


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(url, max_reconnect_attempts=0, connect_timeout=5)
    try:
        yield nc
    finally:
        await nc.close()


async def request(nc: NatsClient, subject: str, body: bytes | Any, headers: dict[str, str] | None = None) -> Msg:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await nc.request(subject, data, timeout=TIMEOUT_S, headers=headers)


def headers_of(msg: Msg) -> dict[str, str]:
    return dict(msg.headers or {})


def body_of(msg: Msg) -> Any:
    return json.loads(msg.data)


async def next_matching(queue: asyncio.Queue[Msg], pred: Any, timeout: float = 5.0) -> Msg:
    """The first message in ``queue`` for which ``pred(msg)`` holds, within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        msg = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
        if pred(msg):
            return msg
