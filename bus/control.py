"""Discovery and control: each node is a NATS micro service.

``$SRV.PING|INFO|STATS[.sandbus-node]`` find every node (micro answers them; ``$SRV`` has no queue
group, so a client gathers answers until a timeout), and ``sandbus.node.<node>.<verb>`` controls one:
``list`` (what the node serves: cheap), ``stats`` (``list`` plus every counter), ``load``, ``unload``
and ``reload`` (``{"plugin": "<name>"}``, plus ``"force": bool`` for unload), and ``debug``
(``{"plugin": "<name>"}``: one plugin's whole state, read-only). A control body is
bounded and validated before use; a malformed one is refused with a ``request.invalid_control``
error reply and a ``control.refused`` audit event. The work itself runs off the event loop (the
handler's :meth:`~sandbus.bus.handler.BusHandler.control` and ``describe`` may build instances or
read stats), and a ``load`` or ``reload`` is answered only once the server has the new
subscriptions, so a request sent after the answer is routed to the plugin.

Every control reply carries ``Content-Type: application/json`` and ``Sandbus-Node: <node id>``; an
error reply adds ``Sandbus-Error-Code`` and ``Sandbus-Error`` and its body is
``{"error": {"code", "message", "plugin", "details"}}``.

The ``list`` and ``stats`` replies (a JSON object; every key is always present, ``null`` where a
value is unknown). ``list``:

    node_id            string   the node's id (one subject token)
    version            string   the node's software version (semver)
    durable_topics     bool     durable topics go through JetStream (false: core NATS, at most once)
    plugins            array    one object per plugin the node knows, by name:
      name             string   the plugin (one subject token)
      version          string|null  the serving version (for a failed plugin: the declared one, if read)
      status           string   "loaded" | "stale" (an older version serves; newest files failed) |
                                "loading" (not serving yet: its first load compiles in the background) |
                                "failed" (not serving) | "unloading" (finishing its calls)
      description      string   from the manifest
      sha256           string|null  digest of the serving module
      functions        [string] exported functions that requests may name
      topics           [string] topic patterns it subscribes to
      durable          bool     its topics are delivered through JetStream when the bus has it
      last_loaded      string|null  when the serving version was put in service (ISO 8601, UTC)
      reloads          int      successful reloads since first loaded
      last_error       string|null  the latest failure (a call's, a load's or a reload's): for a
                                "failed" or "stale" plugin, why
      last_error_code  string|null  its error code
      last_error_at    string|null  when (ISO 8601, UTC)

``stats`` has every key of ``list``, and the node's own counters:

    inline_budget_ms   number|null  how long a request may run on the event loop before moving to a
                                thread, in milliseconds (null: every call runs in a thread)
    request_spans      string   how requests served inline are traced: "fast" | "sdk" | "off"
    spans_dropped      int      spans the node could not hand to its exporter (0: none lost)

and in each plugin object:

    executions         int      calls that ran (failed ones included), across reloads
    errors             int      calls that failed through the plugin's fault
    host_errors        int      calls that failed because the host or the bus did (not the plugin's)
    rejected           int      requests and messages refused as the caller's mistake (request.*
                                errors, an input above the plugin's cap): never in ``errors``
    p50_ms / p99_ms    number|null  call latency percentiles over the recent calls, milliseconds
    fuel_used          int      fuel burnt by all calls; ``last_fuel_used``: by the latest one
    memory_bytes       int      linear memory held by the plugin's instances, bytes (an upper estimate)
    instances          int      live pooled instances
    in_flight          int      calls running now
    queue_depth        int      calls waiting for an instance on this node
    max_open_files     int|null files one instance may have open at once

``debug`` (one plugin; a plugin the node does not know is a ``plugin.not_found`` error reply):

    node_id            string   the node's id
    plugin             string   the plugin
    status             string   as in ``list``
    version            string|null  the serving version (for a failed plugin: the declared one, if read)
    kind               string|null  "module" | "component" | "extism" (null when not serving)
    isolation          string|null  "pooled" | "per-call" (null when not serving)
    sha256             string|null  digest of the serving module
    last_loaded        string|null  when the serving version was put in service (ISO 8601, UTC)
    reloads            int      successful reloads since first loaded
    limits             object|null  the limits enforced on the serving version (memory_bytes, fuel,
                                timeout_s, max_instances, log_bytes, ...; null when not serving)
    instances          array    the live instances of the serving version, by id:
      id               int      the instance's number in its pool (1, 2, ...; a replaced one gets a new one)
      memory_bytes     int      its linear memory after its latest call (its initial memory before one)
      busy             bool     a call holds it now
      calls            int      calls into the guest it served (requests, messages, health checks)
    in_flight          int      calls running now
    queue_depth        int      calls waiting for an instance on this node
    counters           object   executions, errors, host_errors, rejected, fuel_used, last_fuel_used
                                (int), p50_ms, p99_ms (number|null): as in ``stats``
    latency_ms         object   {"bounds": [number], "counts": [int]}: every call since first loaded;
                                counts[i] calls took at most bounds[i] ms and more than bounds[i-1];
                                the last count (len(bounds) + 1 counts) is the calls above every bound
    fuel               object   the same shape, fuel per call that returned
    recent_errors      array    the latest failures, oldest first, at most 32: {"at" (ISO 8601),
                                "code", "message", "function" (null for a load or reload)}
                                (an ``unloading`` plugin: instances, histograms and errors are empty,
                                its counters are not)
    recent_logs        array    the plugin's latest log lines on this node, oldest first, at most 200
                                and 256 KiB of text, each a log record as published on
                                ``sandbus.log.<node>.<plugin>`` (docs/protocol.md); fewer when the reply
                                would exceed the NATS max payload
    recent_audit       array    its latest audit events, oldest first, at most 50, shaped as on
                                ``sandbus.audit.<node>``
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import orjson
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from sandbus.bus.handler import BusHandler
from sandbus.bus.requests import internal_error, with_error
from sandbus.bus.wire import nats_size
from sandbus.sdk.audit import AuditLevel
from sandbus.sdk.envelope import CONTENT_TYPE, H_CONTENT_TYPE, H_NODE
from sandbus.sdk.errors import InvalidControlError, PayloadTooLargeError, RateLimitError, SandbusError
from sandbus.sdk.subjects import NODE_SERVICE

if TYPE_CHECKING:
    from sandbus.bus.plugin_bus import PluginBus

__all__ = ["MAX_CONTROL_BODY", "VERBS", "Control"]

log = logging.getLogger("sandbus.bus")

#: Longest body a control request (load / unload / reload) may have.
MAX_CONTROL_BODY = 4096
VERBS = ("list", "stats", "load", "unload", "reload", "debug")
#: Lists of a ``debug`` reply cut (oldest first) when it would exceed the max payload, in this order.
_TRIMMABLE = ("recent_logs", "recent_audit", "recent_errors")
#: ``debug`` answers a node builds per second, every plugin and caller together (the burst allowed is one
#: second's worth). One answer is up to ~0.5 MB to build, encode and send on the node's own loop and
#: connection: anyone allowed ``debug`` (the read-only viewer role too) asking without end would otherwise
#: take the node's time from its plugins' requests. Over it: a ``limit.rate`` error reply.
DEBUG_RATE = 20.0
#: Seconds between two ``control.refused`` audit events for debug requests over the rate.
DEBUG_AUDIT_INTERVAL_S = 1.0


class Control:
    """The micro service of one bus: discovery, the node's view, and load / unload / reload."""

    def __init__(self, bus: PluginBus, handler: BusHandler) -> None:
        self.bus = bus
        self.handler = handler
        # Control work only (load, reload, unload, list): calls never wait behind it.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbus-control")
        #: the debug rate's token bucket (loop thread only), and refusals not yet audited
        self._debug_tokens = DEBUG_RATE
        self._debug_at = time.monotonic()
        self._debug_refused = 0
        self._debug_audited_at = -DEBUG_AUDIT_INTERVAL_S
        self._service: Service | None = None

    async def start(self) -> None:
        assert self.bus.nc is not None
        self._service = await add_service(
            self.bus.nc, name=NODE_SERVICE, version=self.bus.version,
            description="sandbus host node", metadata={"node_id": self.bus.node_id},
        )
        group = self._service.add_group(name=f"sandbus.node.{self.bus.node_id}")
        for verb, handler in (("list", self._list), ("stats", self._stats), ("load", self._load),
                              ("unload", self._unload), ("reload", self._reload), ("debug", self._debug)):
            await group.add_endpoint(name=verb, handler=handler)

    async def stop(self) -> None:
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()

    def shutdown(self) -> None:
        """After the connection is closed: the control threads end once their work is done."""
        self._executor.shutdown(wait=True, cancel_futures=False)

    def view(self, stats: bool = False) -> dict[str, Any]:
        """The node's view: the bus's facts, then the handler's (its plugins; with ``stats``, every count)."""
        return {"node_id": self.bus.node_id, "version": self.bus.version,
                "durable_topics": self.bus.durable_topics, **self.handler.describe(stats)}

    def _headers(self) -> dict[str, str]:
        return {H_CONTENT_TYPE: CONTENT_TYPE, H_NODE: self.bus.node_id}

    async def _reply(self, req: Request, work: Callable[[], Any], *, then_sync: bool = False) -> None:
        """Run ``work`` off the loop and answer: its JSON, or an error reply -- whatever went wrong.

        An exception escaping a micro handler would make nats-py answer a bare
        ``Nats-Service-Error-Code: 500`` with an empty body, which a sandbus client cannot read.
        ``then_sync``: subscribe to what ``work`` loaded before answering.
        """
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, work)
            if then_sync:
                await self.bus.sync()
            data = orjson.dumps(result, default=str)
            headers = self._headers()
            if nats_size(data, headers) > self.bus.max_payload and isinstance(result, dict):
                data = self._trimmed(result, headers)
        except SandbusError as e:
            data, headers = with_error(self._headers(), e)
        except Exception as e:  # a bug must still answer
            log.exception("control request on %s failed", req.subject)
            data, headers = with_error(self._headers(), internal_error(e, None))
        max_payload = self.bus.max_payload
        if (size := nats_size(data, headers)) > max_payload:  # a listing of very many plugins
            data, headers = with_error(self._headers(), PayloadTooLargeError(
                f"answer of {size} bytes exceeds the NATS max payload of {max_payload} bytes",
                size=size, limit=max_payload))
        await req.respond(data, headers=headers)

    def _trimmed(self, result: dict[str, Any], headers: dict[str, str]) -> bytes:
        """``result`` with its recent lists (:data:`_TRIMMABLE`) cut, oldest entries first, until it fits
        the max payload (a chatty plugin's ``debug``); as it was when nothing can be cut."""
        limit = self.bus.max_payload
        result = dict(result)
        data = orjson.dumps(result, default=str)
        for key in _TRIMMABLE:
            items = result.get(key)
            if not isinstance(items, list):
                continue
            while items and nats_size(data, headers) > limit:
                items = items[len(items) // 2 + 1:] if len(items) > 1 else []
                result[key] = items
                data = orjson.dumps(result, default=str)
            if nats_size(data, headers) <= limit:
                break
        return data

    async def _list(self, req: Request) -> None:
        await self._reply(req, self.view)

    async def _stats(self, req: Request) -> None:
        await self._reply(req, lambda: self.view(stats=True))

    def _args(self, req: Request, verb: str, *, force: bool = False) -> tuple[str, bool]:
        """``{"plugin": "<name>"}`` (plus ``"force": bool`` for unload), checked before any use.

        Raises:
            InvalidControlError: anything else (too long, not JSON, not an object, a missing, unknown or
                mistyped field); audited as ``control.refused``.
        """
        shape = '{"plugin": "<name>", "force": false}' if force else '{"plugin": "<name>"}'
        data = req.data or b""
        try:
            if len(data) > MAX_CONTROL_BODY:
                raise ValueError(f"body of {len(data)} bytes (at most {MAX_CONTROL_BODY})")
            body = orjson.loads(data or b"{}")
            if not isinstance(body, dict):
                raise ValueError(f"a JSON {type(body).__name__}, not an object")
            extra = set(body) - ({"plugin", "force"} if force else {"plugin"})
            if extra:
                shown = ", ".join(orjson.dumps(key[:64]).decode() for key in sorted(extra)[:8])
                raise ValueError(f"unknown field(s) {shown}")
            name, forced = body.get("plugin"), body.get("force", False)
            if not isinstance(name, str):
                raise ValueError('"plugin" must be a string')
            if not isinstance(forced, bool):
                raise ValueError('"force" must be true or false')
            return name, forced
        except (orjson.JSONDecodeError, ValueError) as e:
            message = f"control request {verb} must be {shape}: {e}"
            self.handler.audit(AuditLevel.WARNING, "control.refused", "", message, verb=verb, size=len(data))
            raise InvalidControlError(message, verb=verb) from None

    async def _verb(self, req: Request, verb: str) -> None:
        try:
            name, forced = self._args(req, verb, force=verb == "unload")
        except SandbusError as e:
            await req.respond(*with_error(self._headers(), e))
            return
        await self._reply(req, lambda: self.handler.control(verb, name, forced),
                          then_sync=verb in ("load", "reload"))

    async def _load(self, req: Request) -> None:
        await self._verb(req, "load")

    async def _reload(self, req: Request) -> None:
        await self._verb(req, "reload")

    async def _unload(self, req: Request) -> None:
        await self._verb(req, "unload")

    async def _debug(self, req: Request) -> None:
        now = time.monotonic()
        self._debug_tokens = min(DEBUG_RATE, self._debug_tokens + (now - self._debug_at) * DEBUG_RATE)
        self._debug_at = now
        if self._debug_tokens < 1.0:
            await req.respond(*with_error(self._headers(), self._debug_over_rate(now)))
            return
        self._debug_tokens -= 1.0
        await self._verb(req, "debug")

    def _debug_over_rate(self, now: float) -> RateLimitError:
        """The refusal of a debug request over :data:`DEBUG_RATE`; audited at most once an interval, with
        the count of refusals since the last event."""
        message = (f"node {self.bus.node_id} answers at most {DEBUG_RATE:g} debug requests a second; "
                   "try again shortly")
        self._debug_refused += 1
        if now - self._debug_audited_at >= DEBUG_AUDIT_INTERVAL_S:
            self.handler.audit(AuditLevel.WARNING, "control.refused", "", message, verb="debug",
                               refused=self._debug_refused, rate=DEBUG_RATE)
            self._debug_refused, self._debug_audited_at = 0, now
        return RateLimitError(message, verb="debug", rate=DEBUG_RATE)
