"""Who may talk to the dashboard: the ``Host`` header, the ``Origin`` of a control request, and its token.

Why each check:

- ``Host``: a page on another site can make the browser resolve its own name to 127.0.0.1 (DNS rebinding) and
  then read this server as same-origin. Its requests still carry *its* name in ``Host``; only the address the
  dashboard is bound to (and, on loopback, ``localhost``) is accepted. Bound to a wildcard address, a ``Host``
  that is an IP literal is accepted (rebinding needs a name), plus the names given with ``--allow-host``.
- ``Origin``: a control POST must come from the dashboard's own page (a cross-site form or fetch carries the
  other site's origin).
- the token: a secret made per process and printed once by the CLI, compared in constant time. Without it no
  control request is carried out, whatever the page or the network lets through. Wrong tokens are limited
  (:class:`FailureLimit`): past a few a minute, control is refused without comparing any, so guessing cannot
  go faster than that, and the log says so once rather than once per guess.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LOOPBACK_NAMES", "FailureLimit", "HostCheck", "is_loopback", "new_token", "token_matches"]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})


def new_token() -> str:
    """A fresh control token: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def token_matches(given: str | None, expected: str) -> bool:
    """Whether ``given`` is the token, compared in constant time (bytes: ``compare_digest`` refuses non-ASCII
    ``str``)."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_host(header: str) -> tuple[str, int | None] | None:
    """``name[:port]`` or ``[v6][:port]`` of a Host/Origin authority, or ``None`` when malformed."""
    header = header.strip().lower()
    if not header or len(header) > 255:
        return None
    if header.startswith("["):
        end = header.find("]")
        if end < 0:
            return None
        name, rest = header[1:end], header[end + 1:]
    else:
        name, _, port_text = header.partition(":")
        rest = f":{port_text}" if port_text else ""
    if rest and (not rest.startswith(":") or not rest[1:].isdigit() or len(rest) > 6):
        return None
    return name, int(rest[1:]) if rest else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostCheck:
    """The names this server answers to on ``port``.

    Parameters:
        bound: the address given to ``--host``.
        port: the port it listens on.
        extra: more names (``--allow-host``), e.g. the machine's DNS name when bound to all addresses.
    """

    bound: str
    port: int
    extra: frozenset[str] = field(default_factory=frozenset)

    def allows(self, host_header: str | None) -> bool:
        """Whether a request's ``Host`` header names this server."""
        if host_header is None:
            return False
        parts = _split_host(host_header)
        if parts is None:
            return False
        name, port = parts
        if port is not None and port != self.port:
            return False
        bound = self.bound.strip("[]").lower()
        if name == bound or name in self.extra:
            return True
        if is_loopback(bound) and name in LOOPBACK_NAMES:
            return True
        return bound in _WILDCARDS and _is_ip(name)

    def origin_allowed(self, origin: str | None, host_header: str | None) -> bool:
        """Whether a request's ``Origin`` is this server's own page: ``http://`` plus the same authority as
        its (already checked) ``Host``."""
        if origin is None or host_header is None:
            return False
        scheme, sep, authority = origin.partition("://")
        if scheme.lower() != "http" or not sep or "/" in authority:
            return False
        return authority.lower() == host_header.strip().lower() and self.allows(authority)


@dataclass
class FailureLimit:
    """Refusals counted over a sliding window: at most ``max_failures`` each ``window_s`` seconds.

    Used for wrong control tokens (past the limit, control is locked until the window has room again) and to
    keep refusals from writing one log line each: whoever can reach the port can send them as fast as it likes.
    """

    max_failures: int = 10
    window_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _times: deque[float] = field(default_factory=deque)
    #: refusals not logged since the last line that was
    _quiet: int = 0

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()

    def fail(self) -> bool:
        """Count one refusal; whether it is within the limit (worth a log line)."""
        now = self.clock()
        self._trim(now)
        if len(self._times) >= self.max_failures:
            self._quiet += 1
            return False
        self._times.append(now)
        return True

    def locked_for(self) -> float:
        """Seconds until a refusal is allowed again (0: now)."""
        now = self.clock()
        self._trim(now)
        if len(self._times) < self.max_failures:
            return 0.0
        return max(0.0, self._times[0] + self.window_s - now)

    def suffix(self) -> str:
        """For the log line of an allowed refusal: how many went unlogged before it."""
        quiet, self._quiet = self._quiet, 0
        return f" ({quiet} more not logged)" if quiet else ""
