"""How a CLI command reaches NATS: the server URL(s), and running a client command against them.

Every command that connects takes the same options and goes through :func:`client_run` (client
commands) or builds its :class:`~sandbus.bus.connection.ConnectOptions` from the same values (``node``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Annotated, Any

import typer

from sandbus.host.cli.client_otel import client_tracing
from sandbus.host.cli.main import exit_code_for, fail
from sandbus.sdk.client import Client
from sandbus.sdk.errors import SandbusError

__all__ = ["DEFAULT_NATS", "NatsOpt", "client_run", "nats_url"]

DEFAULT_NATS = "nats://127.0.0.1:4222"
NatsOpt = Annotated[str | None, typer.Option("--nats", help="NATS URL(s), comma-separated "
                                                               "[env SANDBUS_NATS; default nats://127.0.0.1:4222].")]


def nats_url(url: str | None) -> str:
    return url or os.environ.get("SANDBUS_NATS") or DEFAULT_NATS


def client_run(coro_factory: Any, url: str | None) -> Any:
    # nats-py logs each failed connection attempt with its traceback; the command reports the failure
    # itself, once, as a sandbus error (exit 1), so the library's own account is not shown.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)

    async def go() -> Any:
        client = await Client.connect(nats_url(url))
        try:
            return await coro_factory(client)
        finally:
            await client.close()

    try:
        with client_tracing():
            return asyncio.run(go())
    except SandbusError as e:
        fail(str(e), exit_code_for(e))
