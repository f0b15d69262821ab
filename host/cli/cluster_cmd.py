"""Deploys on the command line: ``deploy``, ``status``, ``undeploy``.

A deploy is desired state written to the cluster's ``sandbus-deploys`` bucket; the nodes started with
``sandbus node --cluster`` carry it out themselves (:mod:`sandbus.host.cluster.agent`). ``deploy`` resolves
the version in the registry first, so every node loads the same one, and refuses what the registry does not
have. Everything typed is checked before anything connects.

Exit codes: a bad argument, an unknown plugin or version, a range matching nothing: 2; ``--wait`` that ends
with a node reporting the version failed: 1, refused: 4; no live node to run it: 6; not serving in time: 7;
NATS unreachable: 5.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from sandbus.host.cli.connect import Connection, run_on_nats, with_connection
from sandbus.host.cli.extras import require_host
from sandbus.host.cli.main import (
    EXIT_NO_NODE,
    EXIT_PLUGIN,
    EXIT_SECURITY,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    exit_code_for,
    fail,
    finite_positive,
)
from sandbus.host.cli.trust import PolicyOpt, TrustOpt, note_unchecked, trusted_publishers
from sandbus.sdk.errors import DeployError, RegistryError, SandbusError

if TYPE_CHECKING:
    from collections.abc import Callable

    from nats.aio.client import Client as NatsClient

    from sandbus.host.cluster.deploys import Deploy, DeployStore
    from sandbus.host.cluster.reports import NodeReport

__all__ = ["deploy", "register", "status", "undeploy"]

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output (JSON on stdout).")]
#: How often ``--wait`` reads the nodes' reports.
POLL_S = 0.2


def exit_code(err: SandbusError) -> int:
    """A deploy's errors and the registry's are the caller's input (usage); the rest map as everywhere."""
    if isinstance(err, RegistryError | DeployError):
        return EXIT_USAGE
    return exit_code_for(err)


def _checked(action: Callable[[], T]) -> T:
    try:
        return action()
    except SandbusError as e:
        fail(str(e), exit_code(e))


def _print_json(value: Any) -> None:
    import orjson

    from sandbus.host.cli.output import terminal_json

    sys.stdout.buffer.write(terminal_json(orjson.dumps(value, option=orjson.OPT_INDENT_2)) + b"\n")


# -- deploy ------------------------------------------------------------------------------------------------------

@with_connection
def deploy(
    ref: Annotated[str, typer.Argument(help="name, or name@range (e.g. greeter@^1.2, greeter@1.3.0).",
                                       metavar="NAME[@RANGE]", show_default=False)],
    replicas: Annotated[int | None, typer.Option(help="How many nodes run it (default 1).")] = None,
    every_node: Annotated[bool, typer.Option("--every-node", help="Run it on every matching node.")] = False,
    label: Annotated[list[str] | None, typer.Option(
        "--label", metavar="KEY=VALUE", help="Only on nodes with this label; repeatable (all must match).")] = None,
    wait: Annotated[float | None, typer.Option(
        help="Wait up to this many seconds until the replicas serve it, or a node reports it failed.",
        callback=finite_positive)] = None,
    trust: TrustOpt = None,
    policy: PolicyOpt = None,
    *,
    conn: Connection,
) -> None:
    """Deploy a plugin from the registry onto the cluster's nodes (a new version: a rolling upgrade).

    The version is resolved now (the highest in the range whose signature holds; with --trust/--policy,
    of those publishers only, so that another publisher's higher version is never picked); the one it
    replaces is kept as the version to roll back to should the new one fail on a node.
    """
    require_host("deploy")
    from sandbus.host.cluster.deploys import check_replicas, parse_label_args
    from sandbus.host.cluster.names import parse_ref

    plugin_ref = _checked(lambda: parse_ref(ref))
    if every_node and replicas is not None:
        fail("--replicas and --every-node exclude each other", EXIT_USAGE)
    count = None if every_node else _checked(lambda: check_replicas(1 if replicas is None else replicas))
    selector = _checked(lambda: parse_label_args(label or ()))
    trusted = _checked(lambda: trusted_publishers(trust, policy))

    async def go(nc: NatsClient) -> tuple[Deploy, list[str]]:
        from sandbus.host.cluster.deploys import Deploy, DeployStore
        from sandbus.host.cluster.registry import Registry

        registry = await Registry.open(nc)
        entry = await registry.resolve(plugin_ref.name, plugin_ref.range, trusted=trusted)
        store = await DeployStore.open(nc.jetstream())
        previous = await _previous(nc, store, plugin_ref.name, entry.version)
        wanted = Deploy(plugin=plugin_ref.name, range=plugin_ref.range or entry.version, version=entry.version,
                        previous=previous, replicas=count, labels=selector)
        revision = await store.put(wanted)
        from dataclasses import replace

        stored = replace(wanted, revision=revision)
        notes = await _selector_notes(nc, stored)
        return stored, notes

    stored, notes = run_on_nats(go, conn, exit_code)
    note_unchecked(trusted, "deployed")
    where = f" on nodes with {_labels(stored.labels)}" if stored.labels else ""
    count_text = "every matching node" if stored.replicas is None else f"{stored.replicas} node(s)"
    typer.echo(f"deployed {stored.plugin}@{stored.version} (range {stored.range}) to {count_text}{where}, "
               f"revision {stored.revision}"
               + (f"; previous version {stored.previous}" if stored.previous else ""))
    for note in notes:
        typer.echo(f"note: {note}")
    if wait is not None:
        _wait(stored, wait, conn)


async def _previous(nc: NatsClient, store: DeployStore, plugin: str, version: str) -> str | None:
    """The version the new deploy replaces: what the current deploy runs (its ``previous`` when it is rolled
    back, as a rolled-back version never served); a redeploy of the same version keeps its ``previous``."""
    from sandbus.host.cluster.placement import target_version

    try:
        current = await store.get(plugin)
    except DeployError:
        return None  # not a valid deploy: nothing that ran to go back to
    if current is None:
        return None
    if current.version == version:
        return current.previous
    live = await _live_reports(nc)
    target, _ = target_version(current, live)
    served = any((e := r.plugins.get(plugin)) is not None and e.state in ("serving", "draining")
                 and e.version == target for r in live.values())
    # a deploy that never ran (no matching node, a failed rollout): what ran before it is what to go back to
    running = target if served else current.previous
    return running if running != version else current.previous


async def _live_reports(nc: NatsClient) -> dict[str, NodeReport]:
    from sandbus.host.cluster.reports import LIVE_S, ReportStore

    reports, ages = await (await ReportStore.open(nc.jetstream())).all()
    return {n: r for n, r in reports.items() if ages.get(n, float("inf")) <= LIVE_S}


async def _selector_notes(nc: NatsClient, stored: Deploy) -> list[str]:
    from sandbus.host.cluster.placement import labels_match

    live = await _live_reports(nc)
    matching = [n for n, r in live.items() if labels_match(stored.labels, r.labels)]
    if not live:
        return ["no cluster node is live now (start nodes with `sandbus node --cluster`): it runs once they are"]
    if not matching:
        return [f"no live node has the labels {_labels(stored.labels)}: nothing runs it until one does"]
    if stored.replicas is not None and stored.replicas > len(matching):
        return [f"{stored.replicas} replicas asked, {len(matching)} matching node(s) live: it runs on "
                f"{len(matching)}"]
    return []


def _labels(labels: Any) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _wait(stored: Deploy, timeout: float, conn: Connection) -> None:
    """Until the deploy's replicas serve it, or a node reports it failed or refused; print the outcome."""

    async def go(nc: NatsClient) -> tuple[str, dict[str, Any]]:
        import asyncio

        deadline = time.monotonic() + timeout
        while True:
            view = await _view(nc, stored.plugin)
            item = next((d for d in view["deploys"] if d["plugin"] == stored.plugin), None)
            if item is None or item["revision"] != stored.revision:
                return "replaced", view  # undeployed or deployed again meanwhile
            failures = [n for n in item["nodes"]
                        if n["failed"] is not None and n["failed"]["version"] == stored.version]
            settled = item["actual"] >= item["desired"]
            if stored.replicas == 0:
                if not any(n["state"] in ("serving", "draining") and n["live"] for n in item["nodes"]):
                    return "serving", item
            elif item["desired"] == 0:
                return "no node", item
            elif item["target"] == stored.version and settled:
                return "serving", item
            if item["rollback"] is not None and settled:
                return "rolled back", item  # the previous version serves again
            if failures and not item["placed"] and item["rollback"] is None:
                return "failed", item
            if time.monotonic() >= deadline:
                return "timeout", item
            await asyncio.sleep(POLL_S)

    outcome, item = run_on_nats(go, conn, exit_code)
    if outcome == "serving":
        typer.echo(f"{stored.plugin}@{stored.version} serves on {item['actual']} node(s): "
                   + ", ".join(n["node"] for n in item["nodes"] if n["state"] == "serving"))
        return
    if outcome == "no node":
        _print_deploy(item)
        fail(f"no live node can run {stored.plugin}: {'; '.join(item['problems'])}", EXIT_NO_NODE)
    if outcome == "replaced":
        fail(f"the deploy of {stored.plugin} changed while waiting (undeployed or deployed again)", EXIT_USAGE)
    _print_deploy(item)
    if outcome == "timeout":
        fail(f"{stored.plugin}@{stored.version}: {item['actual']} of {item['desired']} replica(s) serve it after "
             f"{timeout:g} s", EXIT_TIMEOUT)
    refused = all(n["failed"]["state"] == "refused" for n in item["nodes"] if n["failed"] is not None)
    reason = item["rollback"] or "every placed node reported it failed"
    fail(f"{stored.plugin}@{stored.version} did not roll out: {reason}", EXIT_SECURITY if refused else EXIT_PLUGIN)


# -- status ------------------------------------------------------------------------------------------------------

async def _view(nc: NatsClient, only: str | None) -> dict[str, Any]:
    """Every deploy (or ``only``'s) with its plan and each node's state, and the nodes: what ``status`` shows."""
    from sandbus.host.cluster.deploys import DeployStore
    from sandbus.host.cluster.placement import labels_match, plan
    from sandbus.host.cluster.reports import LIVE_S, ReportStore

    deploys, invalid = await (await DeployStore.open(nc.jetstream())).list()
    reports, ages = await (await ReportStore.open(nc.jetstream())).all()
    live = {n: r for n, r in reports.items() if ages.get(n, float("inf")) <= LIVE_S}
    items = []
    for d in deploys:
        if only is not None and d.plugin != only:
            continue
        wanted = plan(d, live)
        matching = [n for n, r in live.items() if labels_match(d.labels, r.labels)]
        nodes = []
        for node, report in sorted(reports.items()):
            entry = report.plugins.get(d.plugin)
            if entry is None:
                continue
            nodes.append({"node": node, "live": node in live, "state": entry.state, "version": entry.version,
                          "reason": entry.reason, "deploy_revision": entry.deploy_revision,
                          "failed": None if entry.failed is None else entry.failed.to_dict()})
        actual = sum(1 for n in nodes if n["live"] and n["state"] == "serving" and n["version"] == wanted.version
                     and n["deploy_revision"] == d.revision)  # acting on this deploy, not the one before
        desired = len(matching) if d.replicas is None else min(d.replicas, len(matching))
        problems = []
        if not live:
            problems.append("no cluster node is live")
        elif not matching:
            problems.append(f"no live node has the labels {_labels(d.labels)}")
        elif d.replicas is not None and d.replicas > len(matching):
            problems.append(f"{d.replicas} replicas asked, only {len(matching)} matching node(s) live")
        items.append({"plugin": d.plugin, "range": d.range, "version": d.version, "previous": d.previous,
                      "replicas": d.replicas, "labels": dict(d.labels), "revision": d.revision,
                      "deployed_at": d.deployed_at, "target": wanted.version, "rollback": wanted.rollback,
                      "placed": wanted.nodes, "desired": desired, "asked": d.replicas, "actual": actual,
                      "nodes": nodes, "problems": problems})
    return {"deploys": items, "invalid": invalid if only is None else {k: v for k, v in invalid.items() if k == only},
            "nodes": [{"node": n, "labels": dict(r.labels), "live": n in live,
                       "age_s": None if ages.get(n) == float("inf") else round(ages.get(n, 0.0), 3)}
                      for n, r in sorted(reports.items())]}


@with_connection
def status(
    plugin: Annotated[str | None, typer.Argument(help="Only this plugin's deploy.", show_default=False)] = None,
    as_json: JsonOpt = False,
    *,
    conn: Connection,
) -> None:
    """Per deploy: desired and actual replicas, the version, every node with its state and reason, rollbacks."""
    require_host("status")
    if plugin is not None:
        from sandbus.host.cluster.deploys import check_plugin

        _checked(lambda: check_plugin(plugin))
    view = run_on_nats(lambda nc: _view(nc, plugin), conn, exit_code)
    if plugin is not None and not view["deploys"] and plugin not in view["invalid"]:
        if as_json:
            _print_json(view)
        fail(f"no deploy of {plugin!r}", EXIT_USAGE)
    if as_json:
        _print_json(view)
        return
    live = [n for n in view["nodes"] if n["live"]]
    typer.echo(f"{len(view['deploys'])} deploy(s); {len(live)} live node(s)"
               + (f": {', '.join(_node_line(n) for n in live)}" if live else ""))
    for item in view["deploys"]:
        _print_deploy(item)
    for key, why in sorted(view["invalid"].items()):
        typer.echo(f"\n{_safe(key)}: INVALID deploy value, not acted on: {_safe(why)}")


def _node_line(node: dict[str, Any]) -> str:
    labels = node["labels"]
    return _safe(node["node"]) + (f" ({_safe(_labels(labels))})" if labels else "")


def _safe(text: object) -> str:
    from sandbus.host.cli.output import terminal_text

    return terminal_text(str(text))[:300]


def _print_deploy(item: dict[str, Any]) -> None:
    asked = "every matching node" if item["asked"] is None else str(item["asked"])
    where = f" on {_labels(item['labels'])}" if item["labels"] else ""
    typer.echo(f"\n{item['plugin']}  {_safe(item['range'])} -> {item['version']}"
               + (f" (previous {item['previous']})" if item["previous"] else "")
               + f"  replicas {item['actual']}/{item['desired']} ({asked}{where})  revision {item['revision']}")
    if item["rollback"]:
        typer.echo(f"  ROLLED BACK to {item['target']}: {_safe(item['rollback'])}")
    for problem in item["problems"]:
        typer.echo(f"  ! {_safe(problem)}")
    for n in item["nodes"]:
        line = f"  {_safe(n['node']):20s} {n['state']:9s} {_safe(n['version'] or '-'):12s}"
        if not n["live"]:
            line += " (not live)"
        if n["reason"]:
            line += f"  {_safe(n['reason'])}"
        elif n["failed"] is not None:
            failed = n["failed"]
            line += f"  {_safe(failed['version'])} {_safe(failed['state'])}: {_safe(failed['reason'])}"
        typer.echo(line)
    missing = [p for p in item["placed"] if p not in {n["node"] for n in item["nodes"]}]
    for node in missing:
        typer.echo(f"  {_safe(node):20s} placed    (not started yet)")


# -- undeploy ----------------------------------------------------------------------------------------------------

@with_connection
def undeploy(
    plugin: Annotated[str, typer.Argument(help="The plugin whose deploy to remove.", show_default=False)],
    *,
    conn: Connection,
) -> None:
    """Remove a plugin's deploy: every node unloads it."""
    require_host("undeploy")
    from sandbus.host.cluster.deploys import check_plugin

    _checked(lambda: check_plugin(plugin))

    async def go(nc: NatsClient) -> bool:
        from sandbus.host.cluster.deploys import DeployStore

        return await (await DeployStore.open(nc.jetstream())).delete(plugin)

    if not run_on_nats(go, conn, exit_code):
        fail(f"no deploy of {plugin!r}", EXIT_USAGE)
    typer.echo(f"undeployed {plugin}: the nodes unload it")


def register(app: typer.Typer, only: str | None = None) -> None:
    """Add ``deploy``, ``status`` and ``undeploy`` to ``app``, or only the one named ``only``."""
    for command in (deploy, status, undeploy):
        if only is None or command.__name__ == only:
            app.command()(command)
