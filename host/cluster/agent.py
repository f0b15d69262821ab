"""The cluster agent: makes one running node carry out the cluster's deploys, by itself.

    node = Node(manager, options); await node.start()
    agent = ClusterAgent(node, registry, labels={"region": "eu"}); await agent.start()
    ...
    await agent.stop(); await node.stop()      # the agent first: its share moves before the node drains

Three things run on the node's event loop:

* the heartbeat puts this node's report (:mod:`~sandbus.host.cluster.reports`) every second;
* two watches follow the deploys and everyone's reports into memory;
* the reconciler, on every change and every second, computes for each deploy the version to run (the
  deploy's, or its ``previous`` when a live node reports the new one failed, or every matching node refused
  it: the rollback) and the nodes to run it (:func:`~sandbus.host.cluster.placement.plan`, from the same
  inputs on every node), then makes this node's part true: resolve the version in the registry, fetch it,
  verify the signature against the policy's trusted publishers, load the verified bytes from memory (a
  reload beside the old version, which serves until the new one passed its health check), and report.
  Loads run as tasks of their own, one per plugin and at most :data:`MAX_LOADS` at once: a slow fetch or
  a long compile holds up no other deploy. A node no longer placed keeps serving until the nodes now
  placed report ``serving`` (at most ``drain_s``), then unloads: a rebalance drops no request. An
  undeployed plugin is unloaded at once. A node that leaves on purpose (:meth:`ClusterAgent.stop`)
  withdraws its report and waits, still serving, until others serve its share.

What it does not know, it does not act on: until both watches have read the buckets and this node has seen
its own report come back, and whenever that report stops coming back (NATS unreachable, a server restart
that lost the watch), nothing is loaded or unloaded; the watches are recreated, and the reports go on.

Every refusal (a signature, an untrusted publisher, the node's policy, a local plugin of the same name)
is a ``cluster.refused`` audit event (CRITICAL for a signature, WARNING otherwise) with its code and
reason, and ``refused`` in the report; a load, init or health failure is ``failed``. No exception ends a
loop: each is logged, reported, and tried again on the next turn (a failure for a deploy revision is not
retried until the deploy changes, and then not before a back-off of 2 s doubling with each failure of
that version in a row, up to :data:`MAX_BACKOFF_S`).

Anyone who may write the buckets is bounded, not trusted: the node's report is trimmed to what the bucket
takes; an invalid deploy value is audited once per key a minute; turns come at most ten a second however
fast deploys are rewritten; at most :data:`~sandbus.host.cluster.reports.MAX_NODES` nodes are tracked.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from nats.js.kv import KV_DEL, KV_PURGE

from sandbus.host.cluster.deploys import Deploy, DeployStore, check_labels, parse_deploy
from sandbus.host.cluster.entry import RegistryEntry
from sandbus.host.cluster.kvwatch import BucketWatch
from sandbus.host.cluster.names import DEPLOYS_BUCKET, NODES_BUCKET
from sandbus.host.cluster.placement import plan
from sandbus.host.cluster.reports import (
    HEARTBEAT_S,
    LIVE_S,
    MAX_REPORT_PLUGINS,
    FailedAttempt,
    Membership,
    NodeReport,
    PluginReport,
    ReportStore,
    State,
    parse_report,
)
from sandbus.host.sandbox import AuditLevel
from sandbus.sdk.errors import (
    BusError,
    DeployError,
    PolicyError,
    SandbusError,
    SecurityViolationError,
    SignatureError,
)

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext

    from sandbus.host.node.node import Node

__all__ = ["DRAIN_S", "HANDOFF_S", "MAX_LOADS", "ArtifactSource", "ClusterAgent"]

log = logging.getLogger("sandbus.cluster")

T = TypeVar("T")

#: Longest a node no longer placed keeps serving while it waits for the nodes now placed.
DRAIN_S = 30.0
#: Longest one registry or bucket operation may take before the turn gives up (and tries again later).
OP_TIMEOUT_S = 10.0
#: Longest one JetStream API request of the agent's own (a report, a watch) may take: they answer in
#: milliseconds, and a short bound gets the watches back sooner after a server restart.
JS_TIMEOUT_S = 2.0
#: Longest a node leaving on purpose waits for others to serve its plugins before it drains.
HANDOFF_S = 5.0
#: Longest :meth:`ClusterAgent.start` waits for JetStream to answer (a cluster electing its leader).
OPEN_TIMEOUT_S = 30.0
#: Keys of invalid deploy values remembered as already audited.
MAX_WARNED = 1024
#: An invalid deploy value is audited at most once per key in this many seconds (whatever its revisions),
#: and at most :data:`MAX_INVALID_AUDITS` keys are audited in such a window: a writer rewriting a bad value
#: in a loop, or writing thousands, does not flood the audit stream of every node.
INVALID_AUDIT_S = 60.0
MAX_INVALID_AUDITS = 100
#: After a transient failure (NATS, the registry unreachable), the same plugin is tried again after this.
RETRY_S = 2.0
#: After a failed or refused attempt at a version, the next attempt at that version waits at least RETRY_S,
#: doubling with each failure in a row up to this: a new deploy revision gives every version a new chance,
#: but a writer rewriting a deploy in a loop does not make every node fetch and compile it in a loop. (Another
#: version, say the one to roll back to, is tried at once.)
MAX_BACKOFF_S = 30.0
#: Plugins fetched and loaded at once: each load runs beside the reconcile turns (a slow fetch or a long
#: compile holds up no other deploy), and a few at a time bound the registry's and the CPU's load.
MAX_LOADS = 4


class ArtifactSource(Protocol):
    """Where the agent gets plugins: :class:`sandbus.host.cluster.registry.Registry` (a protocol, so a test
    or another store can stand in)."""

    async def resolve(self, name: str, version_range: str | None = None) -> RegistryEntry: ...

    async def fetch(self, entry: RegistryEntry, trusted: Collection[str] | None = None) -> bytes:
        """The entry's module, verified (:func:`~sandbus.host.cluster.signing.verify_artifact`) with ``trusted``."""
        ...


@dataclass
class _Local:
    """This node's record of one deployed plugin: what it reports, and what it did for which revision."""

    report: PluginReport
    #: attempts that failed or were refused, by version, for ``report.deploy_revision``
    failures: dict[str, FailedAttempt]
    #: monotonic time since when the plugin is no longer placed here (None: placed, or not serving)
    unplaced_since: float | None = None
    #: monotonic time before which a transient failure is not retried
    retry_at: float = 0.0


@dataclass
class _Backoff:
    """When a version of a plugin that failed or was refused may be tried again, and how many attempts of it
    failed in a row."""

    until: float
    streak: int


class ClusterAgent:
    """Carries out the cluster's deploys on one running :class:`~sandbus.host.node.node.Node`.

    Parameters:
        node: a started node (the agent uses its connection, its manager, the manager's policy and auditor).
        registry: where artifacts are resolved and fetched (default: the
            :class:`~sandbus.host.cluster.registry.Registry` on the node's connection).
        labels: this node's labels, matched against the deploys' selectors.
        trusted: the publisher keys whose artifacts load (default: the policy's ``[registry]
            trusted_publishers``; empty: every artifact is refused).
        heartbeat_s / live_s / drain_s: report period, liveness window, longest drain before an unload.
        replicas: replicas of the buckets when the agent creates them (default: as many as the servers the
            connection knows of, at most 3).
    """

    def __init__(self, node: Node, registry: ArtifactSource | None = None, *, labels: Mapping[str, str] | None = None,
                 trusted: Collection[str] | None = None, heartbeat_s: float = HEARTBEAT_S, live_s: float = LIVE_S,
                 drain_s: float = DRAIN_S, replicas: int | None = None) -> None:
        if not 0 < heartbeat_s < live_s:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be above 0 and below live_s ({live_s})")
        self.node = node
        self.node_id = node.node_id
        self._registry = registry
        self.labels = check_labels(dict(labels or {}), "labels")
        self._trusted = None if trusted is None else frozenset(trusted)
        self.heartbeat_s = heartbeat_s
        self.live_s = live_s
        self.drain_s = drain_s
        self.replicas = replicas
        self.membership = Membership(live_s, own=self.node_id)
        #: the valid deploys, by plugin (what the watch last read)
        self.deploys: dict[str, Deploy] = {}
        self._local: dict[str, _Local] = {}
        self._deploys_ready = False
        self._reports_ready = False
        self._watch_started = 0.0
        self._own_put_at: float | None = None  # monotonic time of the oldest report put and not yet seen back
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: list[BucketWatch] = []
        self._restart = asyncio.Event()
        self._stopping = False
        self._deploy_store: DeployStore | None = None
        self._report_store: ReportStore | None = None
        #: reconcile turns run so far (about one a heartbeat when nothing changes)
        self.turns = 0
        #: invalid deploy keys audited, with when (see INVALID_AUDIT_S)
        self._warned: dict[str, float] = {}
        self._audit_window = (float("-inf"), 0)  # (start, invalid deploys audited since)
        self._audits_held = 0
        #: the loads in flight, by plugin (at most MAX_LOADS)
        self._loading: dict[str, asyncio.Task[None]] = {}
        #: by (plugin, version)
        self._backoff: dict[tuple[str, str], _Backoff] = {}

    # -- start / stop ------------------------------------------------------------------------------

    async def start(self, open_timeout_s: float = OPEN_TIMEOUT_S) -> None:
        """Open the buckets (created on first use) and start following the cluster.

        Raises:
            BusError: the node is not connected, or JetStream did not become available within
                ``open_timeout_s``.
        """
        nc = self.node.nc
        if nc is None:
            raise BusError("the cluster agent needs a started node (it uses the node's NATS connection)")
        js: JetStreamContext = nc.jetstream(timeout=JS_TIMEOUT_S)
        deadline = time.monotonic() + open_timeout_s
        for attempt in itertools.count():
            # A NATS cluster that is still electing its JetStream leader (servers started together, one
            # restarting) answers late or "unavailable" for a few seconds: wait for it, boundedly.
            try:
                if self._registry is None:
                    from sandbus.host.cluster.registry import Registry

                    self._registry = await Registry.open(nc, replicas=self.replicas)
                self._deploy_store = await DeployStore.open(js, replicas=self.replicas)
                self._report_store = await ReportStore.open(js, replicas=self.replicas)
                break
            except BusError as e:
                if time.monotonic() + RETRY_S > deadline:
                    raise
                if attempt == 0:
                    log.warning("node %s: %s; retrying for up to %g s", self.node_id, e, open_timeout_s)
                await asyncio.sleep(RETRY_S)  # JetStream not ready yet: try again after a pause
        self._tasks = [asyncio.create_task(self._guard(self._heartbeat), name="sandbus-cluster-heartbeat"),
                       asyncio.create_task(self._guard(self._watch), name="sandbus-cluster-watch"),
                       asyncio.create_task(self._guard(self._reconciler), name="sandbus-cluster-reconcile")]
        log.info("cluster agent of node %s started (labels %s)", self.node_id, self.labels or "none")

    @property
    def running(self) -> bool:
        return bool(self._tasks)

    async def stop(self, *, withdraw: bool = True, handoff_s: float = HANDOFF_S) -> None:
        """Stop following the cluster.

        ``withdraw``: leave on purpose. This node's report is deleted, so the others take its share at once
        instead of after ``live_s``, and the agent waits (at most ``handoff_s``) until the nodes now placed
        serve each plugin it serves: the node, still serving meanwhile, then drains without a request going
        unanswered. Without it, the agent just stops (as a node that dies; a test's tool).

        The plugins it loaded keep serving: the node drains them as it stops.
        """
        self._stopping = True
        tasks, self._tasks = self._tasks, []
        watch = tasks[1] if len(tasks) == 3 else None
        # no more reports (one would bring this node back) and no more loads
        await _cancel([t for t in tasks if t is not watch])
        await _cancel(list(self._loading.values()))
        self._loading.clear()
        if withdraw and self._report_store is not None:
            try:
                await _within(self._report_store.delete(self.node_id), 2.0)
            except Exception as e:  # NATS unreachable: nobody could take over meanwhile anyway
                log.info("node %s: its report could not be withdrawn (%s); the others notice in %g s", self.node_id,
                         e, self.live_s)
            else:
                if watch is not None and handoff_s > 0:
                    await self._handoff(handoff_s)
        if watch is not None:
            await _cancel([watch])
        await self._stop_watchers()

    async def _handoff(self, timeout: float) -> None:
        """Wait until the other live nodes serve what this node serves for the cluster (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = [p for p in self._local if not self._taken_over(p)]
            if not pending:
                return
            await asyncio.sleep(0.05)  # the watch updates the reports meanwhile
        log.warning("node %s leaves before other nodes serve %s", self.node_id,
                    ", ".join(p for p in self._local if not self._taken_over(p)))

    def _taken_over(self, plugin: str) -> bool:
        deploy = self.deploys.get(plugin)
        manager = self.node.manager
        if deploy is None or not (plugin in manager and manager.from_memory(plugin)):
            return True
        live = self.membership.live()
        live.pop(self.node_id, None)
        wanted = plan(deploy, live)
        return all((e := live[n].plugins.get(plugin)) is not None and e.state == "serving" and e.version ==
                   wanted.version and e.deploy_revision == deploy.revision for n in wanted.nodes)

    async def _guard(self, loop_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run one of the agent's loops for as long as the agent runs: an exception is logged and the loop
        starts again a second later; it never ends the agent."""
        while not self._stopping:
            try:
                await loop_fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cluster agent of node %s: %s failed; starting it again", self.node_id,
                              loop_fn.__name__)
                await asyncio.sleep(1.0)

    # -- heartbeat ---------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        assert self._report_store is not None
        while not self._stopping:
            report = self.report()
            try:
                await _within(self._report_store.put(report), OP_TIMEOUT_S)
                if self._own_put_at is None:
                    self._own_put_at = time.monotonic()
            except (TimeoutError, BusError, OSError) as e:
                log.debug("node %s: report not stored: %s", self.node_id, e)
            except Exception as e:  # nats-py's own errors (not connected, no responders...)
                log.debug("node %s: report not stored: %s", self.node_id, e)
            self._check_watch()
            await asyncio.sleep(self.heartbeat_s)

    def _check_watch(self) -> None:
        """The node's own report coming back is the probe of the watches: when one put ``live_s`` ago has
        not been seen, they are recreated (a reconnect or a server restart can leave a watch silent)."""
        put_at = self._own_put_at
        if put_at is not None and time.monotonic() - put_at > self.live_s:
            log.info("node %s: its report did not come back within %g s; watching again", self.node_id,
                     self.live_s)
            self._own_put_at = None
            self._restart.set()

    def report(self) -> NodeReport:
        """This node's report as it is now, as it is put: at most :data:`MAX_REPORT_PLUGINS` plugins, and
        trimmed to the size the bucket takes (:meth:`NodeReport.trimmed`)."""
        # past the bound, plugins that fail or are refused here are left out before those it serves
        names = sorted(self._local, key=lambda n: (self._local[n].report.state in ("failed", "refused"), n))
        return self._own_report(names[:MAX_REPORT_PLUGINS]).trimmed()

    def _own_report(self, names: Collection[str]) -> NodeReport:
        return NodeReport(self.node_id, self.labels, {name: self._plugin_report(name) for name in names})

    def _plugin_report(self, name: str) -> PluginReport:
        local = self._local[name]
        return replace(local.report, failed=self._failed_for_report(name, local))

    def _failed_for_report(self, name: str, local: _Local) -> FailedAttempt | None:
        """The failure that others must see: of the deploy's own version first (it drives the rollback)."""
        deploy = self.deploys.get(name)
        if deploy is not None and deploy.version in local.failures:
            return local.failures[deploy.version]
        return next(iter(local.failures.values()), None)

    # -- watches -----------------------------------------------------------------------------------

    async def _watch(self) -> None:
        assert self._deploy_store is not None
        assert self._report_store is not None
        while not self._stopping:
            self._restart.clear()
            await self._stop_watchers()
            self._deploys_ready = self._reports_ready = False
            self.membership.resume(self.membership.seen_at(self.node_id))
            self._watch_started = time.monotonic()
            try:
                deploys_w = BucketWatch(self._deploy_store.js, DEPLOYS_BUCKET)
                self._watchers.append(deploys_w)
                await _within(deploys_w.start(), OP_TIMEOUT_S)
                reports_w = BucketWatch(self._report_store.js, NODES_BUCKET)
                self._watchers.append(reports_w)
                await _within(reports_w.start(), OP_TIMEOUT_S)
            except Exception as e:  # NATS unreachable, JetStream not answering: try again in a second
                log.warning("node %s: cannot watch the cluster's buckets (%s: %s); trying again", self.node_id,
                            type(e).__name__, e)
                await asyncio.sleep(1.0)
                continue
            followers = [asyncio.create_task(self._follow_deploys(deploys_w)),
                         asyncio.create_task(self._follow_reports(reports_w))]
            restart = asyncio.create_task(self._restart.wait())
            try:
                await asyncio.wait([*followers, restart], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (*followers, restart):
                    task.cancel()
                for task in followers:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            await asyncio.sleep(0.2)  # a watch that ends at once (a closed connection) is not retried in a spin

    async def _stop_watchers(self) -> None:
        watchers, self._watchers = self._watchers, []
        for w in watchers:
            with contextlib.suppress(Exception):
                await _within(w.stop(), 2.0)

    async def _follow_deploys(self, watcher: BucketWatch) -> None:
        initial: dict[str, Deploy] = {}
        async for entry in watcher:
            if entry is None:  # the bucket's current values are all read: they replace what we had
                self.deploys = initial
                self._deploys_ready = True
                self._wake.set()
                continue
            target = initial if not self._deploys_ready else self.deploys
            key = entry.key
            if entry.operation in (KV_DEL, KV_PURGE):
                target.pop(key, None)
            else:
                try:
                    target[key] = parse_deploy(entry.value, key=key, revision=int(entry.revision or 0))
                except DeployError as e:
                    target.pop(key, None)
                    self._refuse_invalid_deploy(key, int(entry.revision or 0), e)
            if self._deploys_ready:
                self._wake.set()

    def _refuse_invalid_deploy(self, key: str, revision: int, error: DeployError) -> None:
        """Audit an invalid deploy value: once per key in :data:`INVALID_AUDIT_S` (not on every turn, every
        revision, nor every restart of the watch), at most :data:`MAX_INVALID_AUDITS` keys in that time;
        the next event counts those held back. The memory of what was said is bounded."""
        now = time.monotonic()
        said = self._warned.get(key)
        start, count = self._audit_window
        if now - start >= INVALID_AUDIT_S:
            start, count = now, 0
        if (said is not None and now - said < INVALID_AUDIT_S) or count >= MAX_INVALID_AUDITS:
            self._audits_held += 1
            return
        self._audit_window = (start, count + 1)
        if len(self._warned) >= MAX_WARNED:
            self._warned = {k: t for k, t in self._warned.items() if now - t < INVALID_AUDIT_S}
            if len(self._warned) >= MAX_WARNED:
                self._warned.clear()
        self._warned[key] = now
        held, self._audits_held = self._audits_held, 0
        shown = key[:63]
        self.node.manager.auditor.emit(AuditLevel.WARNING, "cluster.refused", shown,
                                       f"the deploy under {shown!r} is not valid, not acted on: {error.message}",
                                       code=error.code, reason=error.message[:256], revision=revision,
                                       held_back=held)

    async def _follow_reports(self, watcher: BucketWatch) -> None:
        async for entry in watcher:
            if entry is None:
                self._reports_ready = True
                self._wake.set()
                continue
            key = entry.key
            if entry.operation in (KV_DEL, KV_PURGE):
                if key != self.node_id:
                    self.membership.forget(key)
                    self._wake.set()
                continue
            try:
                report = parse_report(entry.value, key=key)
            except DeployError as e:
                log.debug("skipping the report under %r: %s", key[:80], e)
                continue
            arriving = self._reports_ready
            changed = self.membership.observe(report, arriving=arriving)
            if key == self.node_id and arriving:
                self._own_put_at = None
            if changed and arriving and key != self.node_id:
                self._wake.set()

    # -- reconciling -------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether the agent knows enough to act: both watches read their buckets, a heartbeat's worth of
        reports came in since, and this node's own report came back within ``live_s``."""
        now = time.monotonic()
        own = self.membership.seen_at(self.node_id)
        return (self._deploys_ready and self._reports_ready and now - self._watch_started >= self.heartbeat_s * 1.5
                and own is not None and now - own <= self.live_s)

    async def _reconciler(self) -> None:
        # turns come at most every `spacing` seconds: a deploy rewritten in a loop wakes the reconciler on
        # every revision, and a turn goes over every deploy
        spacing = min(0.1, self.heartbeat_s / 4)
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await self._wake.wait()
            self._wake.clear()
            if self.ready():
                await self.reconcile()
                await asyncio.sleep(spacing)

    async def reconcile(self) -> None:
        """One turn: for every deploy, this node's part made true (see the module's docstring)."""
        self.turns += 1
        self.membership.prune(2 * DRAIN_S)
        live = self.membership.live()
        # our own state as it is now, not as it was last put; kept up to date one plugin at a time (a report
        # built again after every deploy would make a turn quadratic in the deploys)
        own = self._own_report(self._local)
        own_plugins = dict(own.plugins)
        live[self.node_id] = replace(own, plugins=own_plugins)
        for plugin, deploy in sorted(self.deploys.items()):
            if self._adopt(plugin):
                own_plugins[plugin] = self._plugin_report(plugin)
            try:
                await self._reconcile_one(deploy, live)
            except Exception as e:  # a bug of ours must not stop the other deploys
                log.exception("node %s: reconciling %s failed", self.node_id, plugin)
                self._set(plugin, deploy, None, "failed", f"internal error: {type(e).__name__}: {e}"[:256])
            if plugin in self._local:
                own_plugins[plugin] = self._plugin_report(plugin)
            else:
                own_plugins.pop(plugin, None)
        for plugin in sorted(set(self._local) - set(self.deploys) - set(self._loading)):
            await self._undeployed(plugin)  # (a load in flight is seen to on the turn after it ends)
        for key in [k for k in self._backoff if k[0] not in self.deploys]:
            del self._backoff[key]

    def _adopt(self, plugin: str) -> bool:
        """A version whose attempt failed here but that the manager serves since (it loaded it by itself once
        the dependency it waited for arrived) is no failure: placement and the others must see it serving.
        True when the record changed."""
        local = self._local.get(plugin)
        manager = self.node.manager
        if (local is None or not local.failures or plugin in self._loading
                or not (plugin in manager and manager.from_memory(plugin))):
            return False
        serving = manager.info(plugin).version
        if serving not in local.failures:
            return False  # (an older version serving beside a failed newer one: a failure indeed)
        del local.failures[serving]
        self._backoff.pop((plugin, serving), None)
        local.report = PluginReport(serving, "serving", None, local.report.deploy_revision)
        return True

    async def _reconcile_one(self, deploy: Deploy, live: dict[str, NodeReport]) -> None:
        plugin = deploy.plugin
        local = self._local.get(plugin)
        if local is not None and local.report.deploy_revision != deploy.revision and plugin not in self._loading:
            # a new deploy: every version gets a new chance
            if local.report.state in ("failed", "refused", "loading"):
                del self._local[plugin]
            else:
                local.failures = {}
                local.report = replace(local.report, deploy_revision=deploy.revision)
        wanted = plan(deploy, live)
        if self.node_id in wanted.nodes:
            await self._run_here(deploy, wanted.version, wanted.rollback)
        else:
            await self._not_here(deploy, wanted.version, wanted.nodes, live)

    async def _run_here(self, deploy: Deploy, version: str, rollback: str | None) -> None:
        plugin = deploy.plugin
        if plugin in self._loading:
            return  # one load of a plugin at a time; the turn after it ends looks again
        local = self._local.get(plugin)
        manager = self.node.manager
        if local is not None:
            local.unplaced_since = None
            if plugin in manager and manager.from_memory(plugin) and manager.info(plugin).version == version:
                # what the manager serves is the truth: also a version whose attempt failed here and that the
                # manager loaded by itself since (the dependency it waited for arrived)
                local.failures.pop(version, None)
                self._backoff.pop((plugin, version), None)
                self._set(plugin, deploy, version, "serving", rollback)
                return
            if version in local.failures:
                return  # tried for this revision already; placement passes this node over
            if time.monotonic() < local.retry_at:
                return
        backoff = self._backoff.get((plugin, version))
        wait = 0.0 if backoff is None else backoff.until - time.monotonic()
        if wait > 0:
            if local is None or local.report.state not in ("serving", "draining"):
                self._set(plugin, deploy, version, "loading", f"next attempt in {wait:.0f} s (the last one failed)")
            return
        if len(self._loading) >= MAX_LOADS:
            return  # the next turns start it
        previous_state = local.report if local is not None else None
        if previous_state is not None and previous_state.state in ("serving", "draining") and plugin in manager:
            # the old version keeps serving while the new one loads beside it
            self._set(plugin, deploy, version, "loading", f"loading {version} beside {previous_state.version}")
        else:
            self._set(plugin, deploy, version, "loading", None)
        self._loading[plugin] = asyncio.create_task(self._load(deploy, version, rollback, previous_state),
                                                    name=f"sandbus-cluster-load-{plugin}")

    async def _load(self, deploy: Deploy, version: str, rollback: str | None,
                    previous_state: PluginReport | None) -> None:
        """Resolve, fetch, verify and load ``version`` (a task of its own: the reconcile turns go on
        meanwhile), and record the outcome; the reconciler is woken when it ends."""
        plugin = deploy.plugin
        try:
            await self._fetch_and_load(deploy, version, rollback, previous_state)
        except Exception as e:  # a bug of ours must not leave the plugin "loading" for ever, nor retry in a spin
            log.exception("node %s: loading %s@%s failed", self.node_id, plugin, version)
            self._set(plugin, deploy, None, "failed", f"internal error: {type(e).__name__}: {e}"[:256])
            self._backoff[plugin, version] = _Backoff(time.monotonic() + RETRY_S, 1)
        finally:
            self._loading.pop(plugin, None)
            self._wake.set()

    async def _fetch_and_load(self, deploy: Deploy, version: str, rollback: str | None,
                              previous_state: PluginReport | None) -> None:
        plugin = deploy.plugin
        manager = self.node.manager
        try:
            assert self._registry is not None
            entry = await _within(self._registry.resolve(plugin, version), OP_TIMEOUT_S)
            if entry.version != version:
                raise DeployError(f"the registry resolved {plugin}@{version} to {entry.version}", plugin=plugin)
            # verified with the trusted publishers: these very bytes are what loads
            wasm = await _within(self._registry.fetch(entry, self.trusted()), OP_TIMEOUT_S)
            await asyncio.to_thread(manager.load_artifact, plugin, wasm, entry.manifest,
                                    origin=f"registry {entry.ref}")
        except (TimeoutError, BusError) as e:  # transient: NATS or the registry unreachable; tried again later
            self._transient(plugin, deploy, version, previous_state, f"cannot fetch {plugin}@{version}: {e}")
            return
        except (SecurityViolationError, DeployError, PolicyError) as e:
            self._failure(deploy, version, "refused", e, previous_state)
            return
        except SandbusError as e:  # the registry lacks it now, or it failed to load, init or pass health
            self._failure(deploy, version, "failed", e, previous_state)
            return
        except Exception as e:  # nats-py's own errors on a lost connection
            if type(e).__module__.startswith("nats."):
                self._transient(plugin, deploy, version, previous_state, f"cannot fetch {plugin}@{version}: {e}")
                return
            raise
        # "serving" only once the server routes requests here: a node draining it may unload on that word
        with contextlib.suppress(Exception):
            await _within(self.node.bus.sync(), OP_TIMEOUT_S)
        self._backoff.pop((plugin, version), None)
        self._set(plugin, deploy, version, "serving", rollback)
        log.info("node %s serves %s@%s (deploy revision %d)", self.node_id, plugin, version, deploy.revision)

    def trusted(self) -> frozenset[str]:
        """The publishers whose artifacts this node loads."""
        if self._trusted is not None:
            return self._trusted
        return frozenset(self.node.manager.policy.registry.trusted_publishers)

    def _transient(self, plugin: str, deploy: Deploy, version: str, previous: PluginReport | None,
                   reason: str) -> None:
        log.warning("node %s: %s (trying again)", self.node_id, reason)
        local = self._entry(plugin, deploy, version)
        local.retry_at = time.monotonic() + RETRY_S
        if previous is not None and previous.state in ("serving", "draining") and plugin in self.node.manager:
            local.report = replace(previous, reason=reason[:256], deploy_revision=deploy.revision)
        else:
            self._set(plugin, deploy, version, "loading", reason)

    def _failure(self, deploy: Deploy, version: str, state: State, error: SandbusError,
                 previous: PluginReport | None) -> None:
        """Record and audit that ``version`` failed or was refused here (for this deploy revision)."""
        plugin = deploy.plugin
        reason = f"{error.code}: {error.message}"[:512]
        local = self._entry(plugin, deploy, version)
        local.failures[version] = FailedAttempt(version, state, reason)
        before = self._backoff.get((plugin, version))
        streak = 1 if before is None else before.streak + 1
        self._backoff[plugin, version] = _Backoff(time.monotonic() + min(MAX_BACKOFF_S, RETRY_S * 2 ** (streak - 1)),
                                                  streak)
        if state == "refused":
            level = AuditLevel.CRITICAL if isinstance(error, SignatureError) else AuditLevel.WARNING
            self.node.manager.auditor.emit(level, "cluster.refused", plugin,
                                           f"{plugin}@{version} refused on node {self.node_id}: {error.message}",
                                           code=error.code, reason=error.message[:256], version=version,
                                           node=self.node_id, deploy_revision=deploy.revision)
        else:  # the manager audited the load failure itself (lifecycle.load_failed / reload_failed)
            log.warning("node %s: %s@%s failed: %s", self.node_id, plugin, version, reason)
        manager = self.node.manager
        if previous is not None and previous.state in ("serving", "draining") and plugin in manager \
                and manager.from_memory(plugin):
            serving = manager.info(plugin).version
            local.report = PluginReport(serving, previous.state, f"{version} {state}: {reason}"[:512],
                                        deploy.revision)
        else:
            local.report = PluginReport(version, state, reason, deploy.revision)

    def _entry(self, plugin: str, deploy: Deploy, version: str) -> _Local:
        """The plugin's record (made anew when it was dropped while its load ran: undeployed, redeployed)."""
        local = self._local.get(plugin)
        if local is None:
            local = self._local[plugin] = _Local(PluginReport(version, "loading", None, deploy.revision), {})
        return local

    def _set(self, plugin: str, deploy: Deploy, version: str | None, state: State, reason: str | None) -> None:
        local = self._local.get(plugin)
        report = PluginReport(version, state, reason, deploy.revision)
        if local is None:
            self._local[plugin] = _Local(report, {})
        else:
            local.report = report

    async def _not_here(self, deploy: Deploy, version: str, placed: list[str],
                        live: Mapping[str, NodeReport]) -> None:
        plugin = deploy.plugin
        local = self._local.get(plugin)
        manager = self.node.manager
        if local is None or plugin in self._loading:
            return  # (a load in flight is seen to on the turn after it ends)
        if not (plugin in manager and manager.from_memory(plugin)):
            if local.report.state in ("serving", "draining", "loading"):
                if local.failures:  # keep telling the others why this node is passed over
                    failed = self._failed_for_report(plugin, local)
                    assert failed is not None
                    local.report = PluginReport(failed.version, failed.state, failed.reason, deploy.revision)
                else:
                    del self._local[plugin]
            return
        now = time.monotonic()
        if local.unplaced_since is None:
            local.unplaced_since = now
        taken_over = all(
            (p := live[n].plugins.get(plugin)) is not None and p.state == "serving" and p.version == version
            for n in placed if n in live)
        waited = now - local.unplaced_since
        if taken_over or waited >= self.drain_s:
            why = ("the nodes now placed serve it" if placed and taken_over
                   else "no node is placed" if not placed else f"drained for {waited:.0f} s")
            await self.node.withdraw(plugin)  # no new requests here, and the ones routed here answered
            await self._unload(plugin, f"no longer placed on this node ({why})")
            if local.failures:
                failed = self._failed_for_report(plugin, local)
                assert failed is not None
                local.report = PluginReport(failed.version, failed.state, failed.reason, deploy.revision)
            else:
                self._local.pop(plugin, None)
            return
        served = manager.info(plugin).version
        waiting_for = ", ".join(n for n in placed if n != self.node_id)
        local.report = PluginReport(served, "draining", f"serving until {waiting_for} serve {version}"[:512],
                                    deploy.revision)

    async def _undeployed(self, plugin: str) -> None:
        if self.node.manager.from_memory(plugin):  # serving, or kept as failed with its reason: gone either way
            await self.node.withdraw(plugin)
            await self._unload(plugin, "undeployed")
        self._local.pop(plugin, None)

    async def _unload(self, plugin: str, reason: str) -> None:
        manager = self.node.manager
        try:
            await asyncio.to_thread(manager.unload, plugin, force=True)
            log.info("node %s unloaded %s: %s", self.node_id, plugin, reason)
        except SandbusError as e:
            log.warning("node %s: unloading %s failed: %s", self.node_id, plugin, e)


async def _within(aw: Awaitable[T], seconds: float) -> T:
    """``aw``, or ``TimeoutError`` after ``seconds`` (``asyncio.timeout``: unlike 3.11's ``wait_for``, it never
    swallows a cancellation of the caller)."""
    async with asyncio.timeout(seconds):
        return await aw


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until they end. Cancelled again while they run on: in Python 3.11,
    ``asyncio.wait_for`` swallows a cancellation that arrives as its inner awaitable completes, and each loop
    here also ends on its own once the agent is stopping."""
    pending = {t for t in tasks if not t.done()}
    for _ in range(20):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.5)
    log.warning("cluster agent: %d task(s) did not stop", len(pending))
