"""What the PluginBus calls: the handler interface a host node implements.

The bus knows subjects, subscriptions, delivery guarantees and replies; what a call *is* (a wasm
sandbox, an instance pool, threads, spans) is the handler's business. So the interface is a handful
of methods, small enough that a test can implement it with a plain Python object and run a real
bus with no wasm at all.

Every input the bus hands over has been bounded and checked first: a request's function is one
subject token and its body valid JSON no deeper than :data:`sandbus.sdk.jsonbound.MAX_JSON_DEPTH`
(for a plugin whose ``body`` is ``"bytes"`` -- an Extism plugin -- any bytes: only the size caps apply);
a direct or topic message has been turned into a valid PluginMessage envelope. What a handler
raises as a :class:`~sandbus.sdk.errors.SandbusError` becomes the typed error reply (and, for a
durable message, a nak and finally a dead letter, or a dead letter at once when the error is not
``retryable``); anything else is answered as an internal error. A client's mistake the bus catches
itself (a function that is not a token, a body that is not JSON, a malformed envelope) never
reaches the plugin: the bus answers it and tells the handler (:meth:`BusHandler.refused`).

One method is optional (:class:`DeliversNow`): ``deliver_now``, a durable delivery run at once on the
loop, without the coroutines of :meth:`BusHandler.serve`. A handler without it gets every durable
message through ``serve``, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from nats.aio.msg import Msg

from sandbus.sdk.audit import AuditLevel
from sandbus.sdk.envelope import CONTENT_TYPE
from sandbus.sdk.errors import RequestError

__all__ = ["DEFAULT_FUNCTION", "BusHandler", "DeliversNow", "Reply", "Served"]

#: the function a direct or topic message goes to when a plugin names no other
DEFAULT_FUNCTION = "handle_request"

#: a reply body and its headers (None: a successful reply, whose body is the plugin's JSON)
Reply = tuple[bytes, dict[str, str] | None]


@dataclass(frozen=True, slots=True)
class Served:
    """One plugin as the bus serves it.

    Parameters:
        name: the plugin (one subject token): ``sandbus.req.<name>.*`` and ``sandbus.msg.<name>``.
        topics: topic patterns it subscribes to (``*`` and ``>`` allowed).
        durable: deliver its topics through JetStream (at least once) when the server has it.
        message_function: the function direct and topic messages go to.
        timeout_s: a call's longest run; a durable message is redelivered after this plus a margin.
        instances: calls that can run at once; a durable pull asks for this many messages.
        body: ``"json"``: a request's body must be JSON (checked before the plugin sees it) and a reply is
            the plugin's JSON; ``"bytes"`` (Extism plugins): a request's body goes to the plugin
            unchanged, whatever its Content-Type, and a successful reply carries ``content_type``.
        content_type: the ``Content-Type`` of a successful reply (a valid media type: the bus copies
            it into headers as it is).
    """

    name: str
    topics: tuple[str, ...] = ()
    durable: bool = False
    message_function: str = DEFAULT_FUNCTION
    timeout_s: float = 30.0
    instances: int = 1
    body: Literal["json", "bytes"] = "json"
    content_type: str = CONTENT_TYPE


class BusHandler(Protocol):
    """What serves the plugins a :class:`~sandbus.bus.PluginBus` routes to (a node, or a test's object)."""

    def serving(self) -> Sequence[Served]:
        """The plugins to serve now; the bus makes its subscriptions match (on start, and on ``sync``)."""
        ...

    def request_now(self, plugin: str, function: str, msg: Msg, reply_headers: dict[str, str]) -> bytes | None:
        """The hot path, on the event loop: a successful reply at once, or None to be served by :meth:`serve`
        in a task. Must not block the loop; raises :class:`SandbusError` for an error reply.

        ``reply_headers``: what the reply (success or error) will carry; a handler that traced the call
        sets ``traceparent`` (and ``tracestate``) to its own span's context there, before returning or
        raising."""
        ...

    async def serve(self, plugin: str, function: str, payload: bytes, msg: Msg, *, arrival: float | None,
                    delivery: int | None = None, reply_headers: dict[str, str] | None = None) -> Reply:
        """Run one call. ``payload``: the request body, or the PluginMessage envelope of a message.
        ``arrival``: ``time.monotonic()`` when its sender started waiting (None for a durable delivery,
        which JetStream redelivers). ``delivery``: the JetStream delivery attempt, for a durable message.
        ``reply_headers``: as for :meth:`request_now` (None: nobody is answered, a durable delivery).
        The headers returned are added to the reply's."""
        ...

    def refused(self, plugin: str, err: RequestError, subject: str) -> None:
        """The bus refused a client's request or message to ``plugin`` before it reached the handler
        (``err`` says why; ``subject``: where it was sent). Counted as the plugin's ``rejected`` and
        audited as ``request.refused``; never as the plugin's error. Runs on the event loop: must not block."""
        ...

    def runs_inline(self, plugin: str) -> bool:
        """Whether the plugin's calls finish on the loop now (a durable pull then asks for larger batches)."""
        ...

    def control(self, verb: str, plugin: str, force: bool) -> Any:
        """``load`` / ``reload`` / ``unload`` a plugin, or ``debug``: its whole state (bus/control.py lists the
        keys; a handler without one raises, answered as an error). Run in a worker thread; returns the
        JSON-able answer."""
        ...

    def describe(self, stats: bool) -> dict[str, Any]:
        """This node's view (run in a worker thread): at least ``plugins``. For ``list`` (``stats``
        False) what it serves, cheap to gather; for ``stats`` that plus every counter."""
        ...

    def audit(self, level: AuditLevel, kind: str, plugin: str, message: str, **details: Any) -> None:
        """Record an audit event the bus raised (dead letters, refused control requests, restarted loops);
        the handler passes it back to :meth:`PluginBus.publish_audit` with its own."""
        ...


class DeliversNow(Protocol):
    """The optional fast path of a :class:`BusHandler` for durable deliveries (the bus looks it up with
    ``getattr``: a handler without it is served through :meth:`BusHandler.serve`)."""

    def deliver_now(self, plugin: str, function: str, envelope: bytes, msg: Msg, delivery: int) -> bool:
        """Run a durable delivery synchronously, on the event loop, now: True when it was handled (the
        bus acks it), False when it must take :meth:`BusHandler.serve` instead (which the bus then calls
        with the same arguments), having done nothing.

        Why: a plugin served inline finishes its call in microseconds, and the half-dozen coroutines
        of ``serve`` cost about as much. The bus calls this only for a plugin whose calls run inline
        (:meth:`BusHandler.runs_inline`) and only while it may run inline work without waiting for its
        turn on the loop (``PluginBus.turns``: it has taken the turn already); everything else goes to
        ``serve``. Must not block the loop, nor hold it beyond what an inline call may. Raises
        :class:`~sandbus.sdk.errors.SandbusError` as ``serve`` does, with the same meaning (a nak, or a
        dead letter when the error is not ``retryable`` or the delivery was the last).

        ``envelope``: the PluginMessage envelope; ``delivery``: the JetStream delivery attempt (1 for
        the first).
        """
        ...
