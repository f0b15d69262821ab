"""Connecting to NATS: server lists, credentials, TLS, and reconnect behaviour in one place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import ParseResult

from nats.aio.client import Client
from nats.errors import Error as NatsError
from pydantic import BaseModel, ConfigDict, Field

from sandbus.bus.wire import server_info_problem
from sandbus.sdk.errors import BusError
from sandbus.sdk.nats_auth import auth_kwargs, tls_context
from sandbus.sdk.nats_guard import MAX_OUTSTANDING_PINGS, PING_INTERVAL_S, GuardedNatsClient

__all__ = ["ConnectOptions", "TlsStrictClient", "connect", "is_permanent", "shown_servers"]

# Its own logger, so a process that is stopping can silence the reconnect attempts it no longer cares about.
log = logging.getLogger("sandbus.bus.connection")


class ConnectOptions(BaseModel):
    """How to reach NATS.

    Parameters:
        servers: one or more URLs (``nats://a:4222``); a cluster's members for failover.
        user / password, token, creds (a .creds file), nkey_seed (a seed file): authentication.
        tls_ca / tls_cert / tls_key: TLS (client certificate optional); tls_first: the TLS handshake
            before the server's INFO (servers configured with ``handshake_first``).
        name: connection name shown by the server.
        max_reconnect_attempts: -1 reconnects forever (what a node wants).
        ping_interval_s / max_outstanding_pings: a connection whose server left this many PINGs
            unanswered is stale and replaced (nats-py's own default, 120 s x 2, left a node deaf ~6 min).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = Field(default=None, repr=False)  # never in a log line
    token: str | None = Field(default=None, repr=False)
    creds: Path | None = None
    nkey_seed: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_first: bool = False
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
        kw.update(auth_kwargs(user=self.user, password=self.password, token=self.token, creds=self.creds,
                              nkey_seed=self.nkey_seed, tls=tls_context(self.tls_ca, self.tls_cert, self.tls_key),
                              tls_first=self.tls_first))
        return kw


async def _log_error(e: Exception) -> None:
    log.warning("NATS: %s", e)


class TlsStrictClient(GuardedNatsClient):
    """A :class:`~sandbus.sdk.nats_guard.GuardedNatsClient` that will not go on unencrypted when TLS was
    asked for (a ``tls://`` URL or a TLS context).

    nats-py upgrades to TLS only when the server's INFO says ``tls_required``, whatever the URL or the
    options say: a server that does not (or a man in the middle) would receive the CONNECT, credentials
    included, in the clear. Here the INFO is checked before anything is sent.
    """

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        server = self._current_server
        wants_tls = "tls" in self.options or (server is not None and server.uri.scheme == "tls")
        if (initial_connection and wants_tls and not info.get("tls_required")
                and not self.options.get("tls_handshake_first")):
            raise NatsError("TLS: the server does not offer TLS, and TLS was asked for")
        await super()._process_info(info, initial_connection)


def is_permanent(e: BaseException) -> bool:
    """A connection failure that trying again cannot mend: refused credentials, a certificate that does
    not verify, TLS asked of a server without it."""
    text = str(e).lower()
    return ("authorization violation" in text or isinstance(e, ssl.SSLCertVerificationError)
            or text.startswith("tls: "))


async def connect(options: ConnectOptions, *,
                  on_reconnect: Callable[[], Awaitable[None]] | None = None,
                  on_disconnect: Callable[[], Awaitable[None]] | None = None) -> Client:
    """Connect, turning failures into a BusError that names the servers tried.

    The client is a :class:`TlsStrictClient`: a message nats-py cannot decode is dropped and logged, a
    read loop that ends anyway is replaced by an immediate reconnect, and TLS asked for is TLS had.

    An unreachable server is retried as ``max_reconnect_attempts`` says (forever for a node); a permanent
    failure on the first connection (see :func:`is_permanent`) ends it at once: a node started with the
    wrong password says so and stops, instead of warning twice a second forever.
    """
    permanent: list[BaseException] = []
    gave_up = asyncio.Event()

    async def on_error(e: Exception) -> None:
        if permanent:  # given up: what follows (the server hanging up) is no news
            return
        if is_permanent(e) and not nc.is_connected:
            permanent.append(e)
            gave_up.set()
            return
        await _log_error(e)

    kw = options.kwargs()
    kw["error_cb"] = on_error
    if on_reconnect is not None:
        kw["reconnected_cb"] = on_reconnect
    if on_disconnect is not None:
        kw["disconnected_cb"] = on_disconnect
    nc = TlsStrictClient()
    connecting = asyncio.ensure_future(nc.connect(**kw))
    waiting = asyncio.ensure_future(gave_up.wait())
    try:
        await asyncio.wait({connecting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            raise BusError(f"cannot connect to NATS at {shown_servers(options.servers)}: {_reason(permanent[0])}")
        connecting.result()
        problem = server_info_problem(nc)
        if problem is not None:
            raise BusError(f"NATS at {shown_servers(options.servers)} is not a server sandbus can use: {problem}")
        return nc
    except BaseException as e:
        # nats-py can wait forever closing a connection whose TLS handshake failed: bounded.
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(nc.close(), 1.0)
        if isinstance(e, BusError | asyncio.CancelledError) or not isinstance(e, Exception):
            raise
        raise BusError(f"cannot connect to NATS at {shown_servers(options.servers)}: {_reason(e)}") from e
    finally:
        waiting.cancel()


def shown_servers(servers: Iterable[object]) -> str:
    """The servers for a message or a log line, credentials written into a URL (``nats://user:pass@host``)
    hidden. Takes URLs as strings or as nats-py's parsed ones (``Client.connected_url``)."""
    urls = (s.geturl() if isinstance(s, ParseResult) else str(s) for s in servers)
    return ", ".join(re.sub(r"//[^/@]*@", "//***@", url) for url in urls)


def _reason(e: BaseException) -> str:
    if "authorization violation" in str(e).lower():
        return "authorization violation"
    if isinstance(e, ssl.SSLCertVerificationError):
        return f"TLS: {e.verify_message or 'certificate verify failed'}"
    return str(e).removeprefix("nats: ")
