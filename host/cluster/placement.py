"""Which nodes run a deploy: rendezvous hashing, computed the same way by every node.

No scheduler decides: every cluster node sees the same deploys and the same node reports, and computes
from them, with this pure function, the same answer. Rendezvous (highest-random-weight) hashing gives
each (plugin, node) pair a score; a deploy of ``replicas`` runs on the ``replicas`` eligible nodes with
the highest scores. A node that joins takes over only the deploys where it outscores one of the
chosen nodes, and a node that leaves hands over only its own share: nothing else moves.

:func:`plan` adds what the nodes' reports say: the version to run (the deploy's own, or its previous one
when the new one failed: the rollback), and which nodes are passed over because that version failed or
was refused on them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandbus.host.cluster.deploys import Deploy
    from sandbus.host.cluster.reports import NodeReport

__all__ = ["Candidate", "Plan", "candidates", "labels_match", "place", "plan", "score", "target_version"]


@dataclass(frozen=True)
class Candidate:
    """A live node as placement sees it: its id, its labels, and the versions it cannot run.

    ``excluded`` holds the versions of the deploy being placed that the node reported ``failed`` or
    ``refused`` for the deploy's current revision: placing it again would only fail again.
    """

    node: str
    labels: Mapping[str, str] = field(default_factory=dict)
    excluded: Collection[str] = ()


def score(plugin: str, node: str) -> int:
    """The node's rendezvous weight for ``plugin`` (the same on every machine and every run)."""
    return int.from_bytes(hashlib.sha256(f"{plugin}\n{node}".encode()).digest())


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Whether a node's ``labels`` satisfy the ``selector``: every key present with the same value."""
    return all(labels.get(k) == v for k, v in selector.items())


def place(plugin: str, version: str, replicas: int | None, selector: Mapping[str, str],
          candidates: Iterable[Candidate]) -> list[str]:
    """The node ids that should run ``plugin`` at ``version``, best first.

    Eligible: candidates whose labels match ``selector`` and that have not excluded ``version``.
    ``replicas`` of them (all of them when ``None``; fewer when fewer are eligible; none for 0).
    Ties of the score (practically impossible with sha256) are broken by node id, so the answer never
    depends on the order of ``candidates``.
    """
    if replicas is not None and replicas <= 0:
        return []
    eligible = {c.node for c in candidates if labels_match(selector, c.labels) and version not in c.excluded}
    ranked = sorted(eligible, key=lambda n: (-score(plugin, n), n))
    return ranked if replicas is None else ranked[:replicas]


@dataclass(frozen=True)
class Plan:
    """What the cluster should run for one deploy: the version (the deploy's, or its ``previous`` when
    rolled back, with why), and the nodes."""

    version: str
    rollback: str | None
    nodes: list[str]


def target_version(deploy: Deploy, live: Mapping[str, NodeReport]) -> tuple[str, str | None]:
    """The version to run for ``deploy`` and, when it is the ``previous`` one, why.

    Rolled back when a live node matching the selector reports the deploy's version ``failed`` (load, init
    or health) for this deploy revision, or when every matching live node refused it (signature, trust,
    policy): a version that cannot run anywhere leaves the previous one serving.
    """
    version, revision, plugin = deploy.version, deploy.revision, deploy.plugin
    if deploy.previous is None or deploy.previous == version:
        return version, None
    matching = [r for _, r in sorted(live.items()) if labels_match(deploy.labels, r.labels)]
    for report in matching:
        entry = report.plugins.get(plugin)
        if entry is not None and entry.failed_version(version, revision, only="failed"):
            assert entry.failed is not None
            return deploy.previous, f"{version} failed on {report.node}: {entry.failed.reason}"
    refused = [r for r in matching
               if (e := r.plugins.get(plugin)) is not None and e.failed_version(version, revision)]
    if matching and len(refused) == len(matching):
        return deploy.previous, f"{version} was refused by every matching node"
    return version, None


def candidates(plugin: str, version: str, revision: int, live: Mapping[str, NodeReport]) -> list[Candidate]:
    """The live nodes as placement sees them: a node that failed or refused ``version`` for this deploy
    revision excludes it."""
    out = []
    for node, report in live.items():
        entry = report.plugins.get(plugin)
        excluded: tuple[str, ...] = ()
        if entry is not None and entry.deploy_revision == revision and (
                entry.failed_version(version, revision)
                or (entry.state in ("failed", "refused") and entry.version == version)):
            excluded = (version,)
        out.append(Candidate(node, report.labels, excluded))
    return out


def plan(deploy: Deploy, live: Mapping[str, NodeReport]) -> Plan:
    """The version and the nodes for ``deploy``, from the live nodes' reports (the same on every node)."""
    version, rollback = target_version(deploy, live)
    nodes = place(deploy.plugin, version, deploy.replicas, deploy.labels,
                  candidates(deploy.plugin, version, deploy.revision, live))
    return Plan(version, rollback, nodes)
