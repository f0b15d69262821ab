"""Node reports: each cluster node says, every second, that it is alive, its labels, and what it runs.

One JSON value per node in the ``sandbus-nodes`` bucket, keyed by node id::

    {"format": 1, "node": "web-1", "labels": {"region": "eu"}, "at": "2026-12-02T16:00:00.000Z",
     "plugins": {"greeter": {"version": "1.2.0", "state": "serving", "reason": null, "deploy_revision": 7,
                             "failed": null}}}

``state`` is what the node does with the plugin now: ``serving``, ``loading``, ``draining`` (no longer
placed here, serving until the nodes now placed serve), or ``failed`` / ``refused`` (nothing serves
here; ``reason`` says why). ``failed`` records an attempt at a version that failed for this deploy
revision, also while an older version keeps serving: ``{"version", "state": "failed"|"refused",
"reason"}``. It is what makes a rollback stick: a node that sees it targets the deploy's previous
version until a new deploy (a new revision) comes.

Liveness is judged by the reader's own monotonic clock: a node is live while its report was seen
change within :data:`LIVE_S`. Reports in the bucket expire after 30 s, but a report read back when a
watch starts says nothing about when it was written, so only reports seen arriving count
(:class:`Membership`). Every value is bounded and validated: any member of the account can write the
bucket.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from sandbus.host.cluster.buckets import MAX_STATE_VALUE_BYTES, ensure_nodes
from sandbus.host.cluster.deploys import check_labels, check_plugin, check_version
from sandbus.host.cluster.entry import now_rfc3339
from sandbus.host.cluster.kvwatch import current_values
from sandbus.host.cluster.names import NODES_BUCKET
from sandbus.sdk.errors import DeployError
from sandbus.sdk.subjects import check_token

__all__ = [
    "HEARTBEAT_S",
    "LIVE_S",
    "MAX_REPORT_BYTES",
    "MAX_REPORT_PLUGINS",
    "STATES",
    "FailedAttempt",
    "Membership",
    "NodeReport",
    "PluginReport",
    "ReportStore",
    "parse_report",
]

log = logging.getLogger("sandbus.cluster")

#: Seconds between a node's reports.
HEARTBEAT_S = 1.0
#: A node is live while its report was seen within this many seconds (three missed heartbeats).
LIVE_S = 3.0
#: The largest report read back, and the largest a node puts: what the bucket takes
#: (:meth:`NodeReport.trimmed` makes a node's report fit).
MAX_REPORT_BYTES = MAX_STATE_VALUE_BYTES
#: Plugins one report may list, and the longest reason kept.
MAX_REPORT_PLUGINS = 2000
MAX_REASON_CHARS = 512
#: Reasons are cut to this length in a report that would not fit otherwise.
SHORT_REASON_CHARS = 64
#: Nodes one node keeps track of: anyone who can write the bucket can invent nodes, and each costs memory.
MAX_NODES = 4096

State = Literal["serving", "loading", "failed", "refused", "draining"]
STATES: tuple[State, ...] = ("serving", "loading", "failed", "refused", "draining")


def _reason(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise DeployError("a reason must be a string")
    return value if len(value) <= MAX_REASON_CHARS else value[:MAX_REASON_CHARS - 3] + "..."


def _state(value: object, allowed: tuple[str, ...] = STATES) -> State:
    if value not in allowed:
        raise DeployError(f"unknown state {str(value)[:40]!r}")
    return value  # type: ignore[return-value]  # checked against the literal's values just above


def _field(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    """A field of an untrusted object, of whatever type it has (the caller checks it)."""
    return fields.get(key, default)


def _short_str(value: object, what: str, limit: int = 128) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise DeployError(f"{what} must be a string of at most {limit} characters")
    return value


@dataclass(frozen=True)
class FailedAttempt:
    """A version that failed (``failed``: load, init or health) or was refused (``refused``: signature,
    trust, policy) on a node, for one deploy revision."""

    version: str
    state: State
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "state": self.state, "reason": self.reason}


@dataclass(frozen=True)
class PluginReport:
    """What a node does with one deployed plugin (see the module's docstring)."""

    version: str | None
    state: State
    reason: str | None = None
    deploy_revision: int = 0
    failed: FailedAttempt | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "state": self.state, "reason": _reason(self.reason),
                "deploy_revision": self.deploy_revision,
                "failed": None if self.failed is None else self.failed.to_dict()}

    def shortened(self, chars: int) -> PluginReport:
        """This report with its reasons cut to ``chars`` characters."""
        def cut(text: str) -> str:
            return text if len(text) <= chars else text[:chars - 3] + "..."

        failed = None if self.failed is None else replace(self.failed, reason=cut(self.failed.reason))
        return replace(self, reason=None if self.reason is None else cut(self.reason), failed=failed)

    def failed_version(self, version: str, revision: int, *, only: str | None = None) -> bool:
        """Whether this node failed (or, ``only="refused"``/``"failed"``, failed in that way) ``version``
        for deploy ``revision``."""
        f = self.failed
        return (f is not None and self.deploy_revision == revision and f.version == version
                and (only is None or f.state == only))


@dataclass(frozen=True)
class NodeReport:
    """One node's report: who, its labels, when, and its deployed plugins."""

    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    plugins: Mapping[str, PluginReport] = field(default_factory=dict)
    at: str = field(default_factory=now_rfc3339)

    def to_json(self) -> bytes:
        return orjson.dumps({"format": 1, "node": self.node, "labels": dict(self.labels), "at": self.at,
                             "plugins": {n: p.to_dict() for n, p in sorted(self.plugins.items())}})

    def trimmed(self, limit: int = MAX_REPORT_BYTES) -> NodeReport:
        """This report, made to fit in ``limit`` bytes of JSON: a report the bucket refuses is no report, and a
        node whose reports stop is dead to every node, itself included. Reasons are shortened first; then
        entries are left out, those of plugins that fail or are refused here before those it serves."""
        if len(self.to_json()) <= limit:
            return self
        short = {n: p.shortened(SHORT_REASON_CHARS) for n, p in self.plugins.items()}
        candidate = replace(self, plugins=short)
        if len(candidate.to_json()) <= limit:
            return candidate
        size = len(replace(self, plugins={}).to_json())
        kept: dict[str, PluginReport] = {}
        for name, entry in sorted(short.items(), key=lambda item: (item[1].state in ("failed", "refused"), item[0])):
            item_size = len(orjson.dumps({name: entry.to_dict()}))  # "{...}" stands in for the "," between items
            if size + item_size <= limit:
                kept[name] = entry
                size += item_size
        return replace(self, plugins=kept)


def _parse_plugin(data: object) -> PluginReport:
    if not isinstance(data, dict):
        raise DeployError("a plugin's report is not an object")
    version = data.get("version")
    if version is not None:
        check_version(version)
    revision = data.get("deploy_revision", 0)
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        raise DeployError("deploy_revision must be a whole number")
    failed: FailedAttempt | None = None
    raw_failed = data.get("failed")
    if raw_failed is not None:
        if not isinstance(raw_failed, dict):
            raise DeployError("failed must be an object")
        failed = FailedAttempt(check_version(raw_failed.get("version"), "failed.version"),
                               _state(raw_failed.get("state"), ("failed", "refused")),
                               _reason(raw_failed.get("reason")) or "")
    return PluginReport(version, _state(data.get("state")), _reason(data.get("reason")), revision, failed)


def parse_report(raw: bytes | None, *, key: str | None = None) -> NodeReport:
    """A report read from the bucket, bounded and validated.

    Raises:
        DeployError: too large, not JSON, a wrong type, too many plugins, or a node that is not its key.
    """
    if raw is None or len(raw) > MAX_REPORT_BYTES:
        raise DeployError(f"a node report must be 1 to {MAX_REPORT_BYTES} bytes")
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise DeployError(f"a node report is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != 1:
        raise DeployError("a node report must be a JSON object of format 1")
    fields: dict[str, Any] = data
    node = _field(fields, "node")
    try:
        check_token(node, "node id")  # any type may arrive: check_token refuses what is not a string
    except ValueError as e:
        raise DeployError(str(e)) from None
    if key is not None and node != key:
        raise DeployError(f"the report under key {key[:80]!r} names node {node!r}")
    plugins = _field(fields, "plugins", {})
    if not isinstance(plugins, dict) or len(plugins) > MAX_REPORT_PLUGINS:
        raise DeployError(f"plugins must be an object of at most {MAX_REPORT_PLUGINS} entries")
    parsed: dict[str, PluginReport] = {}
    for name, item in plugins.items():
        parsed[check_plugin(name)] = _parse_plugin(item)
    return NodeReport(check_token(node, "node id"), check_labels(_field(fields, "labels", {}), "labels"), parsed,
                      _short_str(_field(fields, "at", ""), "at", 64))


class ReportStore:
    """The node report bucket: put one's own report, read everyone's."""

    def __init__(self, kv: KeyValue, js: JetStreamContext) -> None:
        self.kv = kv
        self.js = js

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int | None = None) -> ReportStore:
        return cls(await ensure_nodes(js, replicas=replicas), js)

    async def put(self, report: NodeReport) -> int:
        return int(await self.kv.put(report.node, report.to_json()))

    async def delete(self, node: str) -> None:
        """Take a node's report out (a node leaving on purpose: the others need not wait for it to age)."""
        await self.kv.delete(node)

    async def all(self, timeout: float = 5.0) -> tuple[dict[str, NodeReport], dict[str, float]]:
        """Every report in the bucket, and each one's age in seconds: the time since the server stored it, by
        this machine's clock (a clock off by more than a second or two makes live nodes look dead, or the
        reverse). A report that is not valid is skipped with a warning.

        Raises:
            TimeoutError: the bucket did not list its values within ``timeout``.
        """
        reports: dict[str, NodeReport] = {}
        ages: dict[str, float] = {}
        for entry in await current_values(self.js, NODES_BUCKET, timeout):
            try:
                reports[entry.key] = parse_report(entry.value, key=entry.key)
            except DeployError as e:
                log.warning("skipping the node report under %r: %s", entry.key[:80], e)
                continue
            created = entry.created
            ages[entry.key] = (max(0.0, (datetime.now(UTC) - created).total_seconds())
                               if isinstance(created, datetime) else float("inf"))
        return reports, ages


@dataclass
class _Seen:
    report: NodeReport
    at: float | None  # monotonic time it was last seen arriving; None: only read back, never seen arrive
    recorded: float  # monotonic time it was last recorded, either way


class Membership:
    """The cluster as one node sees it: the latest report of every node and when each was seen arriving.

    ``observe(..., arriving=False)`` records a report read back when a watch (re)starts: it updates what
    the node runs (for placement's exclusions and status), but not its liveness, since it may be the
    last words of a node that died 29 s ago.

    At most ``max_nodes`` nodes are kept: when that many are known, nodes not live are forgotten to make
    room, and a new node is ignored while every known one is live. A flood of invented nodes then cannot
    grow the memory of every node, nor push out a node that was there before it. The node ``own`` (the
    reader itself) is always kept: its own report coming back is how it knows it may act.
    """

    max_nodes: int = MAX_NODES

    def __init__(self, live_s: float = LIVE_S, *, max_nodes: int = MAX_NODES, own: str | None = None) -> None:
        self.live_s = live_s
        self.max_nodes = max_nodes
        self.own = own
        self._nodes: dict[str, _Seen] = {}
        self._pruned_at = float("-inf")
        self._ignored = 0

    def observe(self, report: NodeReport, *, arriving: bool, now: float | None = None) -> bool:
        """Record ``report``; True when it changes what placement sees: a node that was not live, or new
        labels or plugin states (a heartbeat that repeats the last report changes nothing)."""
        t = time.monotonic() if now is None else now
        seen = self._nodes.get(report.node)
        if seen is None and len(self._nodes) >= self.max_nodes and report.node != self.own and not self._make_room(t):
            return False
        self._nodes[report.node] = _Seen(report, t if arriving else (seen.at if seen else None), t)
        return (seen is None or seen.at is None or t - seen.at > self.live_s
                or seen.report.labels != report.labels or seen.report.plugins != report.plugins)

    def _make_room(self, t: float) -> bool:
        """Forget the nodes not live (at most once a second: the scan is over every node); whether there is
        room now."""
        if t - self._pruned_at >= 1.0:
            self._pruned_at = t
            self.prune(self.live_s, t)
        if len(self._nodes) < self.max_nodes:
            return True
        if self._ignored % 10_000 == 0:
            log.warning("%d live nodes known already: ignoring the reports of nodes beyond them (invented by a "
                        "writer of the nodes bucket?)", len(self._nodes))
        self._ignored += 1
        return False

    def forget(self, node: str) -> None:
        self._nodes.pop(node, None)

    def resume(self, last_heard: float | None, now: float | None = None) -> None:
        """The reader's own view of the bus was cut (a reconnect, a server restart: its watch restarts).
        The nodes that were live when it last heard from the bus (``last_heard``: when its own report last
        came back) count as live for :attr:`live_s` more from ``now``: their reports could not arrive
        meanwhile, and the outage says nothing about them. Without this, the first node back would find
        every other one dead and take their deploys for a moment."""
        if last_heard is None:
            return
        t = time.monotonic() if now is None else now
        for seen in self._nodes.values():
            if seen.at is not None and last_heard - seen.at <= self.live_s:
                seen.at = max(seen.at, t)

    def seen_at(self, node: str) -> float | None:
        seen = self._nodes.get(node)
        return None if seen is None else seen.at

    def live(self, now: float | None = None) -> dict[str, NodeReport]:
        """The reports of the nodes seen within :attr:`live_s`."""
        t = time.monotonic() if now is None else now
        return {n: s.report for n, s in self._nodes.items() if s.at is not None and t - s.at <= self.live_s}

    def prune(self, older_than_s: float, now: float | None = None) -> None:
        """Forget nodes not seen for ``older_than_s`` (their reports have expired from the bucket too)."""
        t = time.monotonic() if now is None else now
        for node in [n for n, s in self._nodes.items() if t - (s.recorded if s.at is None else s.at) > older_than_s]:
            del self._nodes[node]
