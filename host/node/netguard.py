"""Where a granted host name may lead: resolve once, check every address, connect to what was checked.

A network grant names a host, but a connection goes to an address. A name the operator allowed can
resolve to loopback, a private network or a cloud metadata service (``169.254.169.254``,
``fd00:ec2::254``) -- by mistake, or because whoever controls its DNS wants it to (DNS rebinding:
answer a public address when checked, a private one when connected). So the ``http_request`` host
function resolves the name exactly once (:func:`resolve_checked`), refuses it if *any* address is not
public unless the policy's ``[network] allow_addresses`` names it, and connects to the checked
addresses only: nothing resolves the name a second time.

"Public" is :attr:`ipaddress.IPv4Address.is_global`, not multicast, and outside every range of
:data:`NOT_PUBLIC` (the IANA special-purpose registries, written out here because what ``is_global``
says of them changes between Python patch releases: 3.11's says IPv4-compatible ``::127.0.0.1`` and
site-local ``fec0::/10`` are global), after unwrapping the IPv4 address inside IPv4-mapped
(``::ffff:a.b.c.d``), NAT64 (``64:ff9b::/96``), 6to4 and Teredo IPv6 addresses, so no IPv6 spelling
reaches an IPv4 range that is refused.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_LOOKUPS", "MAX_LOOKUPS_PER_OWNER", "NOT_PUBLIC", "IPAddress", "IPNetwork", "NameNotResolved",
           "NotPermitted", "is_public", "lookups_in_progress", "refused_address", "resolve_checked"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: Ranges that are never public, whatever ``is_global`` of the running Python says: the IANA IPv4 and
#: IPv6 special-purpose address registries (documentation, benchmarking, shared, reserved ...), plus the
#: deprecated IPv6 forms that can carry an IPv4 address a resolver should never hand out (IPv4-compatible
#: ``::a.b.c.d``, IPv4-translated ``::ffff:0:a.b.c.d``), local-use NAT64 and site-local addresses. The
#: forms :func:`_embedded_v4` unwraps (IPv4-mapped, NAT64, 6to4, Teredo) are judged by the IPv4 address
#: they carry as well.
NOT_PUBLIC: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
#: Name lookups run in daemon threads, so a slow resolver cannot hold a call past its deadline (nor the
#: process at exit): a lookup cannot be cancelled, it finishes in the background and its answer is
#: dropped. At most this many may be in progress at once in the process ...
MAX_LOOKUPS = 64
#: ... and at most this many for one owner (a plugin). A lookup counts against its owner until its thread
#: ends, not until the call that started it gives up: otherwise one plugin, calling again and again with
#: a short deadline for a name that resolves slowly, would fill every slot and no other plugin could
#: resolve anything.
MAX_LOOKUPS_PER_OWNER = 4
_lookups = threading.BoundedSemaphore(MAX_LOOKUPS)
_owner_lock = threading.Lock()
_owner_lookups: dict[str, int] = {}


class NotPermitted(Exception):
    """A resolved address is not public and not allowed by the policy (``args[0]``: the address)."""


class NameNotResolved(Exception):
    """The name did not resolve (or not within the time given)."""


def _embedded_v4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr in _NAT64:
        return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    return None


def _forms(addr: IPAddress) -> list[IPAddress]:
    """The address and the IPv4 address it carries, if any."""
    forms: list[IPAddress] = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_v4(addr)
        if inner is not None:
            forms.append(inner)
    return forms


def is_public(addr: IPAddress) -> bool:
    """Whether ``addr`` (and any IPv4 address inside it) is a global unicast address."""
    return all(a.is_global and not a.is_multicast
               and not any(a in net for net in NOT_PUBLIC if net.version == a.version) for a in _forms(addr))


def refused_address(addr: IPAddress, allowed: Sequence[IPNetwork]) -> bool:
    """Whether a connection to ``addr`` must be refused: it is not public and no ``allowed`` network
    holds it (or, for an IPv6 address carrying an IPv4 one, holds that)."""
    if is_public(addr):
        return False
    return not any(a in net for a in _forms(addr) for net in allowed if a.version == net.version)


def _take_slot(owner: str) -> bool:
    with _owner_lock:
        if _owner_lookups.get(owner, 0) >= MAX_LOOKUPS_PER_OWNER:
            return False
        if not _lookups.acquire(blocking=False):
            return False
        _owner_lookups[owner] = _owner_lookups.get(owner, 0) + 1
        return True


def _give_slot(owner: str) -> None:
    with _owner_lock:
        left = _owner_lookups[owner] - 1
        if left:
            _owner_lookups[owner] = left
        else:
            del _owner_lookups[owner]
        _lookups.release()


def lookups_in_progress(owner: str) -> int:
    """How many of ``owner``'s name lookups are still running (those its calls gave up on included)."""
    with _owner_lock:
        return _owner_lookups.get(owner, 0)


def _lookup(host: str, port: int, timeout: float, owner: str) -> list[Any]:
    """``getaddrinfo`` in a daemon thread, waited for at most ``timeout`` seconds."""
    if not _take_slot(owner):
        raise NameNotResolved(f"{host} not looked up: {MAX_LOOKUPS_PER_OWNER} name lookups of {owner!r} (or "
                              f"{MAX_LOOKUPS} in all) are still in progress")
    result: list[Any] = []
    error: list[OSError] = []
    done = threading.Event()

    def run() -> None:
        try:
            result.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP))
        except OSError as e:
            error.append(e)
        finally:
            _give_slot(owner)
            done.set()

    threading.Thread(target=run, name="sandbus-dns", daemon=True).start()
    if not done.wait(max(timeout, 0.0)):
        raise NameNotResolved(f"{host} did not resolve within {timeout:.3g} s")
    if error:
        raise NameNotResolved(f"{host} did not resolve: {error[0]}")
    return result


def resolve_checked(host: str, port: int, allowed: Sequence[IPNetwork], timeout: float, *, owner: str = ""
                    ) -> list[tuple[socket.AddressFamily, IPAddress]]:
    """Resolve ``host`` once and return its addresses, every one of them checked.

    ``owner`` (the plugin) is who the lookup counts against (:data:`MAX_LOOKUPS_PER_OWNER`).

    Raises:
        NameNotResolved: no answer (or none within ``timeout`` seconds).
        NotPermitted: an address is refused (:func:`refused_address`); one bad answer refuses the
            name, so a resolver cannot slip a private address in among public ones.
    """
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        infos = [(socket.AF_INET6 if literal.version == 6 else socket.AF_INET, str(literal))]
    else:
        answer = _lookup(host, port, timeout, owner)
        infos = [(family, str(sockaddr[0])) for family, _, _, _, sockaddr in answer
                 if family in (socket.AF_INET, socket.AF_INET6)]
    out: list[tuple[socket.AddressFamily, IPAddress]] = []
    for family, text in infos:
        addr = ipaddress.ip_address(text.split("%", 1)[0])  # a scoped IPv6 address is link-local anyway
        if refused_address(addr, allowed):
            raise NotPermitted(str(addr))
        if (family, addr) not in out:
            out.append((socket.AddressFamily(family), addr))
    if not out:
        raise NameNotResolved(f"{host} has no IPv4 or IPv6 address")
    return out
