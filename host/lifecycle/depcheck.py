"""Can this manifest join the plugins already serving? The run-time side of :mod:`sandbus.host.lifecycle.deps`.

:func:`sandbus.host.lifecycle.deps.load_order` plans a whole directory at once; a running node also needs the
question for one plugin at a time (a file appears, a new version lands): are its dependencies
serving at compatible versions, and would a new version break a plugin that depends on the old one?
"""

from __future__ import annotations

from collections.abc import Mapping

from sandbus.host.lifecycle.deps import load_order
from sandbus.host.lifecycle.manifest import Manifest
from sandbus.sdk.errors import DependencyError, SandbusError

__all__ = ["check_dependencies", "explain_refusal"]


def explain_refusal(error: DependencyError, failures: Mapping[str, SandbusError]) -> DependencyError:
    """Say "failed to load: why" instead of "not available" when the missing dependency is a plugin
    that is present but broken: the operator should fix that one, not go looking for it."""
    dep = error.details.get("dependency")
    failure = failures.get(dep) if isinstance(dep, str) else None
    if failure is None or error.details.get("available") is not None:
        return error
    required = error.details.get("required")
    return DependencyError(f"requires {dep!r} {required}, but {dep!r} failed to load: {failure}",
                           plugin=error.plugin, dependency=dep, required=required, available=None)


def _component(name: str, manifests: Mapping[str, Manifest]) -> set[str]:
    """``name`` and every plugin linked to it by dependencies, in either direction, transitively:
    the only plugins whose plan can change when ``name`` arrives or changes."""
    needed_by: dict[str, set[str]] = {}
    for other, m in manifests.items():
        for dep in m.dependencies:
            needed_by.setdefault(dep, set()).add(other)
    seen, todo = {name}, [name]
    while todo:
        current = todo.pop()
        found = manifests.get(current)
        linked = set(found.dependencies) if found is not None else set()
        linked |= needed_by.get(current, set())
        for nxt in linked - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def check_dependencies(
    manifest: Manifest,
    serving: Mapping[str, Manifest],
    failures: Mapping[str, SandbusError] | None = None,
) -> tuple[str, ...]:
    """Check ``manifest`` against the ``serving`` plugins (by name; a serving version of the same
    plugin is the one being replaced). Returns the optional dependencies it will go without.

    Raises:
        DependencyError: a required dependency is not serving or has an incompatible version, the
            manifest closes a cycle, or (for a new version) a serving plugin requires a version range
            the new version is outside of -- each naming what was required and what is available.
    """
    combined = {**serving, manifest.name: manifest}
    related = _component(manifest.name, combined)
    if related == {manifest.name}:
        return ()  # no dependencies, no dependents: nothing to check (the common case, and O(n) not O(n^2))
    before = load_order({n: m for n, m in serving.items() if n in related})
    after = load_order({n: m for n, m in combined.items() if n in related})
    refused = after.refused.get(manifest.name)
    if refused is not None:
        raise explain_refusal(refused, failures or {})
    broken = sorted(n for n in after.refused if n not in before.refused)
    if broken:
        first = after.refused[broken[0]]
        spec = serving[broken[0]].dependencies.get(manifest.name)
        needed = f" {spec.version}" if spec is not None else ""
        raise DependencyError(
            f"version {manifest.plugin.version} would break {', '.join(map(repr, broken))}, which require"
            f"{'s' if len(broken) == 1 else ''} {manifest.name!r}{needed} ({first.message})",
            plugin=manifest.name, dependents=broken, available=manifest.plugin.version,
            required=None if spec is None else spec.version,
        )
    return tuple(dep for name, dep in after.skipped_optional if name == manifest.name)
