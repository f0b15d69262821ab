"""The dashboard's one view of the cluster, gathered on a fixed schedule whatever the number of pages.

Per ``interval`` seconds the collector asks each known node for its ``stats`` (one control request per node);
every ``discover_every`` rounds it finds the nodes again with the client's
:meth:`~sandbus.sdk.client.Client.node_ids` (a ``$SRV.PING``), so new nodes appear and stopped ones leave. It follows
``sandbus.audit.>`` (from the ``SANDBUS_AUDIT`` stream's last events when JetStream has it, then live) and
``sandbus.log.>``, and reads the cluster's deploy and node-report buckets every ``deploys_every`` rounds. A
plugin's ``debug`` state is fetched when a page asks, at most once per interval per (node, plugin) however many
pages ask (concurrent asks share one request).

The load the dashboard puts on the nodes is therefore ``nodes / interval`` stats requests per second, plus the
debug requests of plugins someone is looking at: bench/bench_dashboard.py measures it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from sandbus.host.dashboard import validate
from sandbus.sdk.errors import SandbusError
from sandbus.sdk.subjects import AUDIT_PREFIX, check_token

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg

    from sandbus.host.dashboard.hub import Hub
    from sandbus.sdk.client import Client

__all__ = ["LOG_SUBJECTS", "Busy", "Collector", "ControlVerb", "NotShown"]

log = logging.getLogger("sandbus.dashboard")

#: Every plugin log line of every node (``sandbus.log.<node>.<plugin>``).
LOG_SUBJECTS = "sandbus.log.>"
AUDIT_SUBJECTS = f"{AUDIT_PREFIX}.>"
AUDIT_STREAM = "SANDBUS_AUDIT"
#: How often batched log lines and audit events go out to the pages.
FLUSH_S = 0.25
#: Debug states kept (by node and plugin).
DEBUG_CACHE = 256
#: Messages and bytes a subscription may hold before nats-py drops (slow consumer): bounded memory.
PENDING_MSGS = 10_000
PENDING_BYTES = 16 * 1024 * 1024

#: Debug fetches waiting for their node at once (each distinct (node, plugin) is one; more are refused).
MAX_DEBUG_INFLIGHT = 32

ControlVerb = str  # "reload" | "unload"
CONTROL_VERBS = ("reload", "unload")


class NotShown(LookupError):
    """A node or plugin the dashboard does not show: nothing is asked of the bus for it.

    The pages only ever ask about what they show; a request naming anything else comes from elsewhere (a tool, a
    script) and would otherwise make the dashboard send requests to subjects of the caller's choosing with the
    dashboard's credentials.
    """

    code = "dashboard.not_shown"


class Busy(Exception):
    """Too many debug fetches are waiting for their nodes already (:data:`MAX_DEBUG_INFLIGHT`)."""

    code = "dashboard.busy"


class Collector:
    """Gathers the cluster's state into ``hub``.

    Parameters:
        client: a connected client (its NATS connection should reconnect on its own: the dashboard runs long).
        hub: where the view goes.
        interval: seconds between two ``stats`` rounds.
        audit_history: audit events read back from the stream at start.
        discover_every: rounds between two discoveries.
        deploys_every: rounds between two reads of the deploy buckets.
    """

    def __init__(self, client: Client, hub: Hub, *, interval: float = 2.0, audit_history: int = 200,
                 discover_every: int = 5, deploys_every: int = 3, timeout: float = 2.0) -> None:
        self.client = client
        self.nc: NatsClient = client.nc
        self.hub = hub
        self.interval = interval
        self.audit_history = audit_history
        self.discover_every = max(1, discover_every)
        self.deploys_every = max(1, deploys_every)
        self.timeout = timeout
        self._tasks: list[asyncio.Task[None]] = []
        self._subs: list[Any] = []
        self._debug: OrderedDict[tuple[str, str], tuple[float, dict[str, Any] | SandbusError]] = OrderedDict()
        self._debug_inflight: dict[tuple[str, str], asyncio.Task[dict[str, Any]]] = {}
        self._missed: dict[str, int] = {}
        #: control requests sent to nodes (stats, debug, reload, unload), for the curious and the benchmark
        self.requests_sent = 0
        #: where the audit trail comes from: "stream" (JetStream history, then live) or "live"
        self.audit_source = "live"
        self.rounds = 0
        #: why the last round failed (None: it did not)
        self.failing: str | None = None

    # -- life ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe and start the loops; the first round of nodes is in the hub when this returns."""
        self._subs.append(await self.nc.subscribe(LOG_SUBJECTS, cb=self._on_log, pending_msgs_limit=PENDING_MSGS,
                                                  pending_bytes_limit=PENDING_BYTES))
        await self._follow_audit()
        try:
            await self._round()
        except Exception as e:  # shown on the pages; the loop tries again
            self._failed(e)
        self._tasks = [asyncio.create_task(self._poll_loop(), name="dashboard-poll"),
                       asyncio.create_task(self._flush_loop(), name="dashboard-flush")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []
        self.hub.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                self.hub.flush()
            except Exception:  # a bug must not stop the logs reaching the pages for good
                log.exception("dashboard: sending a batch to the pages failed")

    async def _poll_loop(self) -> None:
        """One round every ``interval`` on a fixed schedule (a slow round, such as a discovery that waits for
        answers, does not stretch the period; rounds that fall behind are skipped, never run back to back)."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self.interval
            now = loop.time()
            if due < now:
                due = now + self.interval - (now - due) % self.interval
            await asyncio.sleep(due - now)
            try:
                await self._round()
            except Exception as e:  # one bad round (a disconnect) must not end the dashboard
                self._failed(e)
            else:
                if self.failing is not None:
                    log.warning("dashboard: polling the nodes again")
                    self.failing = None
                    self.hub.set_status(True, "")

    def _failed(self, e: Exception) -> None:
        """Said once per outage (not once per round), and shown on the pages until a round succeeds."""
        message = f"{type(e).__name__}: {str(e)[:300]}" if str(e) else type(e).__name__
        if self.failing is None:
            log.warning("dashboard: polling the nodes failed (%s); trying again every %g s", message, self.interval)
        self.failing = message
        self.hub.set_status(False, f"cannot poll the nodes: {message}")
        if any(n.get("reachable") for n in self.hub.nodes.values()):
            self.hub.set_nodes({k: {**v, "reachable": False} for k, v in self.hub.nodes.items()})

    # -- nodes ---------------------------------------------------------------------------------------------

    async def _round(self) -> None:
        if not self.nc.is_connected:  # requests would only time out: the nodes are kept as last seen
            raise ConnectionError("not connected to NATS (reconnecting)")
        discover = self.rounds % self.discover_every == 0
        self.rounds += 1
        ids = set(self.hub.nodes)
        if discover:
            # answers to the discovery are awaited a bounded while (a node that answers later is still asked by
            # name: it is known from the rounds before)
            ids |= set(await self.client.node_ids(timeout=min(self.timeout, max(0.25, self.interval / 2))))
        # each node asked by name, and its answer kept only under that name: whoever answers a discovery (anyone
        # on the account may) cannot put its answer in another node's row
        asked = sorted(ids)
        results = await asyncio.gather(*(self._stats(n) for n in asked), return_exceptions=True)
        self.requests_sent += len(asked)
        nodes: dict[str, dict[str, Any]] = {}
        now = time.time()
        for node_id, result in zip(asked, results, strict=True):
            view = validate.node_view(result) if not isinstance(result, BaseException) else None
            if view is not None and view["node_id"] == node_id:
                nodes[node_id] = {**view, "reachable": True, "seen_at": now}
                self._missed.pop(node_id, None)
                continue
            if not isinstance(result, BaseException):  # an answer, but not this node's stats
                self.hub.malformed["nodes"] += 1
            if node_id not in self.hub.nodes:  # never shown: nothing to keep
                continue
            missed = self._missed[node_id] = self._missed.get(node_id, 0) + 1
            if missed <= 3:  # shown as unreachable a while, then forgotten
                nodes[node_id] = {**self.hub.nodes[node_id], "reachable": False}
            else:
                self._missed.pop(node_id, None)
        self.hub.set_nodes(nodes)
        if (self.rounds - 1) % self.deploys_every == 0:
            await self._read_deploys()

    async def _stats(self, node_id: str) -> Any:
        return await self.client.control(node_id, "stats", timeout=self.timeout)

    # -- deploys -------------------------------------------------------------------------------------------

    async def _read_deploys(self) -> None:
        """The deploy bucket and the node reports, read only (never created: a cluster without them shows
        none)."""
        from sandbus.host.cluster.deploys import parse_deploy
        from sandbus.host.cluster.kvwatch import current_values
        from sandbus.host.cluster.names import DEPLOYS_BUCKET, NODES_BUCKET
        from sandbus.host.cluster.reports import parse_report
        from sandbus.sdk.errors import DeployError

        js = self.nc.jetstream()
        try:
            await js.stream_info(f"KV_{DEPLOYS_BUCKET}")
        except Exception:
            self.hub.set_deploys({"available": False, "deploys": [], "reports": {}, "invalid": {}})
            return
        deploys: list[dict[str, Any]] = []
        invalid: dict[str, str] = {}
        reports: dict[str, Any] = {}
        try:
            for entry in sorted(await current_values(js, DEPLOYS_BUCKET, self.timeout), key=lambda e: e.key)[:1024]:
                try:
                    d = parse_deploy(entry.value, key=entry.key, revision=entry.revision)
                except DeployError as e:
                    invalid[entry.key[:80]] = e.message[:512]
                    continue
                deploys.append({"plugin": d.plugin, "version": d.version, "range": d.range, "previous": d.previous,
                                "replicas": d.replicas, "labels": dict(d.labels), "deployed_at": d.deployed_at,
                                "revision": d.revision})
            with contextlib.suppress(Exception):  # reports are optional (nodes started without --cluster)
                for entry in (await current_values(js, NODES_BUCKET, self.timeout))[:1024]:
                    with contextlib.suppress(DeployError):
                        report = parse_report(entry.value, key=entry.key)
                        reports[report.node] = {"at": report.at, "labels": dict(report.labels),
                                                "plugins": {n: p.to_dict() for n, p in report.plugins.items()}}
        except Exception as e:
            log.warning("dashboard: reading the deploy bucket failed: %s", e)
            return
        self.hub.set_deploys({"available": True, "deploys": deploys, "reports": reports, "invalid": invalid})

    # -- audit and logs ------------------------------------------------------------------------------------

    async def _follow_audit(self) -> None:
        """Live events from a core subscription (it survives reconnects by itself), preceded by the stream's last
        ``audit_history`` events when JetStream has the stream and lets us read it.

        The live subscription starts first and holds what arrives while the history is read (by sequence: a
        plain read, no consumer to create or to flow-control); an event both in the history and held is shown
        once.
        """
        held: list[tuple[str, bytes]] = []
        holding = True

        async def on_live(msg: Msg) -> None:
            if not holding or len(msg.data) > validate.MAX_AUDIT_BYTES:  # judged now (an oversized one refused)
                self._audit(msg.subject, msg.data)
            elif len(held) < PENDING_MSGS:
                held.append((msg.subject, msg.data))

        self._subs.append(await self.nc.subscribe(AUDIT_SUBJECTS, cb=on_live, pending_msgs_limit=PENDING_MSGS,
                                                  pending_bytes_limit=PENDING_BYTES))
        await self.nc.flush()
        seen: set[bytes] = set()
        if self.audit_history > 0:
            try:
                for subject, data in await self._audit_history():
                    self._audit(subject, data)
                    seen.add(data)
                self.audit_source = "stream"
            except Exception as e:  # no JetStream, no stream, or not allowed to read it
                log.info("dashboard: the audit stream is not readable (%s); following live events only", e)
        holding = False
        for subject, data in held:
            if data not in seen:
                self._audit(subject, data)

    async def _audit_history(self) -> list[tuple[str, bytes]]:
        """The last ``audit_history`` messages of the audit stream, oldest first (deleted ones skipped; oversized
        ones counted as refused and not kept: anyone who may publish audit events may make each one a megabyte)."""
        from nats.js.errors import NotFoundError

        js = self.nc.jetstream()
        state = (await js.stream_info(AUDIT_STREAM)).state
        last, first = int(state.last_seq or 0), int(state.first_seq or 0)
        if last == 0:
            return []
        out: list[tuple[str, bytes]] = []

        async def get(seq: int) -> tuple[str, bytes] | None:
            try:
                raw = await js.get_msg(AUDIT_STREAM, seq)
            except NotFoundError:  # deleted, or aged out meanwhile
                return None
            data = raw.data or b""
            if len(data) > validate.MAX_AUDIT_BYTES:
                self.hub.malformed["audit"] += 1
                return None
            return (raw.subject or "", data)

        seqs = list(range(max(first, last - self.audit_history + 1, 1), last + 1))
        for i in range(0, len(seqs), 32):  # a few at a time: the server answers each one
            out += [m for m in await asyncio.gather(*(get(q) for q in seqs[i:i + 32])) if m is not None]
        return out

    def _audit(self, subject: str, data: bytes) -> None:
        event = validate.audit_event(subject, data)
        if event is None:
            self.hub.malformed["audit"] += 1
        else:
            self.hub.add_audit(event)

    async def _on_log(self, msg: Msg) -> None:
        line = validate.log_line(msg.subject, msg.data)
        if line is None:
            self.hub.malformed["logs"] += 1
        else:
            self.hub.add_log(line)

    def lost(self, subject: str) -> None:
        """A message NATS dropped before it reached us (our subscription's bound: a flood faster than we read):
        counted with the lines and events the batches could not carry, so the pages say how many they miss."""
        if subject.startswith(LOG_SUBJECTS[:-1]):
            self.hub.dropped["logs"] += 1
        elif subject.startswith(AUDIT_SUBJECTS[:-1]):
            self.hub.dropped["audit"] += 1

    def note(self, level: str, kind: str, message: str, **details: Any) -> None:
        """An event of the dashboard's own (a control action) in its audit view."""
        self.hub.add_audit({"node": "dashboard", "timestamp": time.time(), "level": level, "kind": kind,
                            "plugin": str(details.get("plugin", "")), "message": message, "count": 1,
                            "trace_id": None, "details": None})

    # -- on demand -----------------------------------------------------------------------------------------

    async def debug(self, node_id: str, plugin: str) -> dict[str, Any]:
        """The plugin's debug state on the node, at most one request per interval per (node, plugin).

        Raises:
            ValueError: a node id or plugin name that is not a subject token.
            NotShown: the plugin is not shown on that node (nothing is sent).
            Busy: too many debug requests are in flight.
            SandbusError: the node's error reply (plugin not found...), or no answer.
        """
        key = self._shown(node_id, plugin)
        cached = self._debug.get(key)
        if cached is not None and time.monotonic() - cached[0] < self.interval:
            if isinstance(cached[1], SandbusError):  # a refusal is remembered as long as an answer
                raise cached[1]
            return cached[1]
        fetch = self._debug_inflight.get(key)
        if fetch is None:
            if len(self._debug_inflight) >= MAX_DEBUG_INFLIGHT:
                raise Busy(f"{len(self._debug_inflight)} debug requests are waiting for their nodes already")
            # its own task: a page that goes away while it runs cancels its wait, not the fetch others share
            fetch = self._debug_inflight[key] = asyncio.create_task(self._fetch_debug(key))
            fetch.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved even if nobody waits
        return await asyncio.shield(fetch)

    def _shown(self, node_id: str, plugin: str) -> tuple[str, str]:
        """``(node_id, plugin)`` when the last round showed ``plugin`` on ``node_id``.

        Raises:
            ValueError: names that are not subject tokens.
            NotShown: the node, or the plugin on that node, is not on the pages.
        """
        check_token(node_id, "node id")
        check_token(plugin, "plugin")
        node = self.hub.nodes.get(node_id)
        if node is None:
            raise NotShown(f"node {node_id[:64]!r} is not one the dashboard shows")
        if not any(p.get("name") == plugin for p in node.get("plugins", ())):
            raise NotShown(f"plugin {plugin[:64]!r} is not shown on node {node_id[:64]!r}")
        return node_id, plugin

    def _remember(self, key: tuple[str, str], result: dict[str, Any] | SandbusError) -> None:
        self._debug[key] = (time.monotonic(), result)
        self._debug.move_to_end(key)
        while len(self._debug) > DEBUG_CACHE:
            self._debug.popitem(last=False)

    async def _fetch_debug(self, key: tuple[str, str]) -> dict[str, Any]:
        node_id, plugin = key
        try:
            self.requests_sent += 1
            try:
                reply = await self.client.control(node_id, "debug", {"plugin": plugin}, timeout=self.timeout)
            except SandbusError as e:
                self._remember(key, e)
                raise
            state = validate.debug_state(reply)
            if state is None:
                raise SandbusError(f"node {node_id!r} answered debug with something that is not an object")
            self._remember(key, state)
            return state
        finally:
            del self._debug_inflight[key]

    async def control(self, verb: ControlVerb, node_id: str, plugin: str) -> Any:
        """Reload or unload ``plugin`` on ``node_id`` (the node's permissions for our NATS user decide).

        Raises:
            ValueError: an unknown verb, or names that are not subject tokens.
            NotShown: the plugin is not shown on that node (nothing is sent).
            SandbusError: the node's error reply, or no answer.
        """
        if verb not in CONTROL_VERBS:
            raise ValueError(f"unknown control verb {verb[:32]!r} (reload or unload)")
        self._shown(node_id, plugin)
        self.requests_sent += 1
        return await self.client.control(node_id, verb, {"plugin": plugin}, timeout=max(self.timeout, 10.0))
