"""Discovery and control: each node is a NATS micro service.

``$SRV.PING|INFO|STATS[.sandbus-node]`` find every node (micro answers them; ``$SRV`` has no queue
group, so a client gathers answers until a timeout), and ``sandbus.node.<node>.<verb>`` controls one:
``list`` (what the node serves: cheap), ``stats`` (``list`` plus every counter), ``load``, ``unload``
and ``reload`` (``{"plugin": "<name>"}``, plus ``"force": bool`` for unload). A control body is
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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from sandbus.sdk.errors import InvalidControlError, PayloadTooLargeError, SandbusError
from sandbus.sdk.subjects import NODE_SERVICE

if TYPE_CHECKING:
    from sandbus.bus.plugin_bus import PluginBus

__all__ = ["MAX_CONTROL_BODY", "VERBS", "Control"]

log = logging.getLogger("sandbus.bus")

#: Longest body a control request (load / unload / reload) may have.
MAX_CONTROL_BODY = 4096
VERBS = ("list", "stats", "load", "unload", "reload")


class Control:
    """The micro service of one bus: discovery, the node's view, and load / unload / reload."""

    def __init__(self, bus: PluginBus, handler: BusHandler) -> None:
        self.bus = bus
        self.handler = handler
        # Control work only (load, reload, unload, list): calls never wait behind it.
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sandbus-control")
        self._service: Service | None = None

    async def start(self) -> None:
        assert self.bus.nc is not None
        self._service = await add_service(
            self.bus.nc, name=NODE_SERVICE, version=self.bus.version,
            description="sandbus host node", metadata={"node_id": self.bus.node_id},
        )
        group = self._service.add_group(name=f"sandbus.node.{self.bus.node_id}")
        for verb, handler in (("list", self._list), ("stats", self._stats), ("load", self._load),
                              ("unload", self._unload), ("reload", self._reload)):
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
        await self._reply(req, lambda: self.handler.control(verb, name, forced), then_sync=verb != "unload")

    async def _load(self, req: Request) -> None:
        await self._verb(req, "load")

    async def _reload(self, req: Request) -> None:
        await self._verb(req, "reload")

    async def _unload(self, req: Request) -> None:
        await self._verb(req, "unload")
