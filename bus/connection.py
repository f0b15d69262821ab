"""Connecting to NATS: server lists, credentials, TLS, and reconnect behaviour in one place."""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from pydantic import BaseModel, ConfigDict, Field

from sandbus.sdk.errors import BusError
from sandbus.sdk.nats_guard import MAX_OUTSTANDING_PINGS, PING_INTERVAL_S, GuardedNatsClient

__all__ = ["ConnectOptions", "connect"]

log = logging.getLogger("sandbus.bus")


class ConnectOptions(BaseModel):
    """How to reach NATS.

    Parameters:
        servers: one or more URLs (``nats://a:4222``); a cluster's members for failover.
        user / password, token, creds (a .creds file), nkey_seed (a seed file): authentication.
        tls_ca / tls_cert / tls_key: TLS (client certificate optional).
        name: connection name shown by the server.
        max_reconnect_attempts: -1 reconnects forever (what a node wants).
        ping_interval_s / max_outstanding_pings: a connection whose server left this many PINGs
            unanswered is stale and replaced (nats-py's own default, 120 s x 2, left a node deaf ~6 min).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: Path | None = None
    nkey_seed: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    name: str = "sandbus"
    connect_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_wait_s: float = Field(default=0.5, ge=0)
    max_reconnect_attempts: int = -1
    ping_interval_s: int = Field(default=PING_INTERVAL_S, ge=1)
    max_outstanding_pings: int = Field(default=MAX_OUTSTANDING_PINGS, ge=1)

    @classmethod
    def from_urls(cls, urls: str, **kwargs: Any) -> ConnectOptions:
        """``"nats://a:4222,nats://b:4222"`` → options."""
        servers = tuple(u.strip() for u in urls.split(",") if u.strip())
        if not servers:
            raise ValueError("no NATS server URL given")
        return cls(servers=servers, **kwargs)

    def _tls(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert:
            ctx.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        return ctx

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "servers": list(self.servers),
            "name": self.name,
            "connect_timeout": self.connect_timeout_s,
            "reconnect_time_wait": self.reconnect_wait_s,
            "max_reconnect_attempts": self.max_reconnect_attempts,
            "allow_reconnect": True,
            "drain_timeout": 10,
            "ping_interval": self.ping_interval_s,
            "max_outstanding_pings": self.max_outstanding_pings,
        }
        if self.user is not None:
            kw["user"] = self.user
            kw["password"] = self.password
        if self.token is not None:
            kw["token"] = self.token
        if self.creds is not None:
            kw["user_credentials"] = str(self.creds)
        if self.nkey_seed is not None:
            kw["nkeys_seed"] = str(self.nkey_seed)
        tls = self._tls()
        if tls is not None:
            kw["tls"] = tls
        return kw


async def _log_error(e: Exception) -> None:
    log.warning("NATS: %s", e)


async def connect(options: ConnectOptions, *,
                  on_reconnect: Callable[[], Awaitable[None]] | None = None,
                  on_disconnect: Callable[[], Awaitable[None]] | None = None) -> Client:
    """Connect, turning failures into a BusError that names the servers tried.

    The client is a :class:`~sandbus.sdk.nats_guard.GuardedNatsClient`: a message nats-py cannot decode is
    dropped and logged, and a read loop that ends anyway is replaced by an immediate reconnect.
    """
    kw = options.kwargs()
    kw["error_cb"] = _log_error
    if on_reconnect is not None:
        kw["reconnected_cb"] = on_reconnect
    if on_disconnect is not None:
        kw["disconnected_cb"] = on_disconnect
    nc = GuardedNatsClient()
    try:
        await nc.connect(**kw)
        return nc
    except Exception as e:
        with contextlib.suppress(Exception):
            await nc.close()
        raise BusError(f"cannot connect to NATS at {', '.join(options.servers)}: {e}") from e
