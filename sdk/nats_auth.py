"""Credentials and TLS as ``nats.connect`` keyword arguments: one mapping for the node's options and the CLI's.

Kept free of pydantic (the node's :class:`~sandbus.bus.connection.ConnectOptions` uses it) so a client
command that connects loads only what it needs.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

__all__ = ["auth_kwargs", "tls_context"]


def tls_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """A client TLS context trusting ``ca`` (else the system's), with a client certificate when given;
    None when neither a CA nor a certificate is given."""
    if not (ca or cert):
        return None
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def auth_kwargs(*, user: str | None, password: str | None, token: str | None, creds: Path | None,
                nkey_seed: Path | None, tls: ssl.SSLContext | None, tls_first: bool) -> dict[str, Any]:
    """The ``nats.connect`` arguments of these credentials and TLS settings (servers not included)."""
    kw: dict[str, Any] = {}
    if user is not None:
        kw["user"], kw["password"] = user, password
    if token is not None:
        kw["token"] = token
    if creds is not None:
        kw["user_credentials"] = str(creds)
    if nkey_seed is not None:
        kw["nkeys_seed"] = str(nkey_seed)
    if tls is not None:
        kw["tls"] = tls
    if tls_first:
        kw["tls_handshake_first"] = True
    return kw
