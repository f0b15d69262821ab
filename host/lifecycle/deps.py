"""Plugin dependencies: in which order to load a set of plugins, and which of them cannot load.

One broken plugin must not keep a node from starting, so :func:`load_order` does not stop at the
first problem: a plugin whose dependency is missing, has an incompatible version, or sits in a cycle
is *refused* (with a :class:`~sandbus.sdk.errors.DependencyError` saying why), every plugin that needs a
refused plugin is refused in turn, and the rest load, dependencies first. An absent optional dependency
is not an error; it is reported in :attr:`LoadPlan.skipped_optional`.

Requirements are npm-style ranges (``^1.2``, ``~1.2.3``, ``>=1.0 <2``) checked with
``semantic_version.NpmSpec``; note that caret ranges below 1.0 are narrow (``^0.2.3`` means
``>=0.2.3 <0.3.0``), as in npm and cargo.
"""

from __future__ import annotations

import difflib
import heapq
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter

from sandbus.host.lifecycle.manifest import DependencySpec, Manifest
from sandbus.sdk.errors import DependencyError

__all__ = ["LoadPlan", "check_unload", "dependents", "load_order"]


@dataclass(slots=True)
class LoadPlan:
    """The outcome of :func:`load_order`.

    Parameters:
        order: plugins to load, each after everything it depends on; ties broken by name, so the same
            input always gives the same order.
        skipped_optional: ``(plugin, dependency)`` pairs of optional dependencies that are absent,
            incompatible or refused; the plugin loads without them.
        refused: plugins that cannot load, with the reason; not in ``order``.
    """

    order: list[str] = field(default_factory=list)
    skipped_optional: list[tuple[str, str]] = field(default_factory=list)
    refused: dict[str, DependencyError] = field(default_factory=dict)


def _problem(dep: str, spec: DependencySpec, manifests: Mapping[str, Manifest]) -> str | None:
    """Why ``dep`` at ``spec`` cannot be satisfied from ``manifests`` (``None``: it can)."""
    available = manifests.get(dep)
    if available is None:
        close = difflib.get_close_matches(dep, list(manifests), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"requires {dep!r} {spec.version}, but no plugin {dep!r} is available{hint}"
    if not spec.allows(available.plugin.version):
        return (
            f"requires {dep!r} {spec.version}, but the available {dep!r} is version "
            f"{available.plugin.version}"
        )
    return None


def _cycle_path(cycle: list[str], edges: Mapping[str, set[str]]) -> list[str]:
    """graphlib's cycle as ``a -> b -> a`` read "a requires b", starting at the smallest name."""
    nodes = cycle[:-1]
    if not all(nodes[(i + 1) % len(nodes)] in edges[n] for i, n in enumerate(nodes)):
        nodes.reverse()
    start = nodes.index(min(nodes))
    nodes = nodes[start:] + nodes[:start]
    return [*nodes, nodes[0]]


def load_order(manifests: Mapping[str, Manifest]) -> LoadPlan:
    """Plan the loading of ``manifests`` (keyed by plugin name).

    Never raises for a dependency problem: each refused plugin gets its :class:`DependencyError` in
    :attr:`LoadPlan.refused` (``details`` carry ``dependency``, ``required`` and ``available``, or
    ``cycle``), so the caller can log them all and load the rest.
    """
    plan = LoadPlan()
    hard: dict[str, set[str]] = {name: set() for name in manifests}
    soft: dict[str, set[str]] = {name: set() for name in manifests}

    for name in sorted(manifests):
        for dep, spec in manifests[name].dependencies.items():
            problem = _problem(dep, spec, manifests)
            if problem is None:
                (soft if spec.optional else hard)[name].add(dep)
            elif spec.optional:
                plan.skipped_optional.append((name, dep))
            elif name not in plan.refused:
                found = manifests.get(dep)
                plan.refused[name] = DependencyError(
                    problem,
                    plugin=name,
                    dependency=dep,
                    required=spec.version,
                    available=None if found is None else found.plugin.version,
                )

    def propagate() -> None:
        """Refuse whoever needs a refused plugin; drop optional edges to refused plugins."""
        changed = True
        while changed:
            changed = False
            for name in sorted(manifests):
                if name in plan.refused:
                    continue
                for dep in sorted(soft[name] & plan.refused.keys()):
                    soft[name].discard(dep)
                    plan.skipped_optional.append((name, dep))
                broken = sorted(hard[name] & plan.refused.keys())
                if broken:
                    dep = broken[0]
                    plan.refused[name] = DependencyError(
                        f"requires {dep!r} {manifests[name].dependencies[dep].version}, which cannot load "
                        f"({plan.refused[dep]})",
                        plugin=name,
                        dependency=dep,
                        required=manifests[name].dependencies[dep].version,
                        available=manifests[dep].plugin.version,
                    )
                    changed = True

    propagate()
    while True:
        live = [n for n in manifests if n not in plan.refused]
        edges = {n: (hard[n] | soft[n]) - plan.refused.keys() for n in live}
        sorter: TopologicalSorter[str] = TopologicalSorter()
        for n in live:
            sorter.add(n, *edges[n])
        try:
            sorter.prepare()
        except CycleError as exc:
            path = _cycle_path(list(exc.args[1]), edges)
            optional = [(a, b) for a, b in itertools.pairwise(path) if b not in hard[a]]
            if optional:
                # An optional dependency only orders loading; drop it to break the cycle.
                soft[optional[0][0]].discard(optional[0][1])
                continue
            text = " -> ".join(path)
            for n in path[:-1]:
                plan.refused[n] = DependencyError(f"dependency cycle: {text}", plugin=n, cycle=path)
            propagate()
            continue
        break

    # Smallest ready name first: a deterministic order whatever the dict order of the input.
    ready = list(sorter.get_ready())
    heapq.heapify(ready)
    while ready:
        name = heapq.heappop(ready)
        plan.order.append(name)
        sorter.done(name)
        for nxt in sorter.get_ready():
            heapq.heappush(ready, nxt)
    return plan


def dependents(name: str, manifests: Mapping[str, Manifest]) -> list[str]:
    """Plugins in ``manifests`` that directly and non-optionally depend on ``name``, sorted."""
    return sorted(
        other
        for other, m in manifests.items()
        if other != name and name in m.dependencies and not m.dependencies[name].optional
    )


def check_unload(name: str, loaded: Mapping[str, Manifest], force: bool = False) -> list[str]:
    """Check that ``name`` can be unloaded from the ``loaded`` plugins; return its dependents.

    With ``force`` the dependents are returned (to be logged, or unloaded too) instead of raising.

    Raises:
        DependencyError: other loaded plugins need ``name`` and ``force`` is false.
    """
    needed_by = dependents(name, loaded)
    if needed_by and not force:
        raise DependencyError(
            f"cannot unload {name!r}: needed by {', '.join(map(repr, needed_by))} "
            "(unload those first, or force)",
            plugin=name,
            dependents=needed_by,
        )
    return needed_by
