"""Dependency planning: load order, version ranges, missing / incompatible / cyclic dependencies."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbus.host.lifecycle.deps import LoadPlan, check_unload, dependents, load_order
from sandbus.host.lifecycle.manifest import Manifest, load_manifest
from sandbus.sdk.errors import DependencyError


def plugin(tmp_path: Path, name: str, version: str = "1.0.0", **deps: str | tuple[str, bool]) -> Manifest:
    """Write ``<name>.toml`` with the given dependencies (``(range, optional)`` for a table) and load it."""
    lines = [f'[plugin]\nname = "{name}"\nversion = "{version}"\n[dependencies]']
    for dep, spec in deps.items():
        if isinstance(spec, tuple):
            lines.append(f'{dep} = {{ version = "{spec[0]}", optional = {str(spec[1]).lower()} }}')
        else:
            lines.append(f'{dep} = "{spec}"')
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return load_manifest(path)


def plan_of(*manifests: Manifest) -> LoadPlan:
    return load_order({m.name: m for m in manifests})


def test_dependencies_load_first_ties_by_name(tmp_path: Path) -> None:
    plan = plan_of(
        plugin(tmp_path, "web", api="^1.0"),
        plugin(tmp_path, "api", db="*", cache="*"),
        plugin(tmp_path, "db"),
        plugin(tmp_path, "cache"),
        plugin(tmp_path, "zeta"),
        plugin(tmp_path, "alpha"),
    )
    assert plan.order == ["alpha", "cache", "db", "api", "web", "zeta"]
    assert plan.refused == {}
    assert plan.skipped_optional == []


def test_order_does_not_depend_on_input_order(tmp_path: Path) -> None:
    ms = [plugin(tmp_path, n) for n in ("c", "a", "b")] + [plugin(tmp_path, "d", c="1")]
    forward = load_order({m.name: m for m in ms}).order
    backward = load_order({m.name: m for m in reversed(ms)}).order
    assert forward == backward == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("requirement", "available", "ok"),
    [
        ("^1.2", "1.2.0", True),
        ("^1.2", "1.9.3", True),
        ("^1.2", "2.0.0", False),
        ("^1.2", "1.1.9", False),
        ("^0.2.3", "0.2.9", True),
        ("^0.2.3", "0.3.0", False),  # caret below 1.0 only admits patch updates
        ("~1.2.3", "1.2.9", True),
        ("~1.2.3", "1.3.0", False),
        ("~1.2", "1.2.0", True),
        (">=1.0 <2", "1.5.0", True),
        (">=1.0 <2", "2.0.0", False),
        ("1.x", "1.7.0", True),
        ("^1.0.0 || ^3.0.0", "3.1.0", True),
        ("*", "0.0.1", True),
    ],
)
def test_caret_tilde_and_ranges(tmp_path: Path, requirement: str, available: str, ok: bool) -> None:
    plan = plan_of(plugin(tmp_path, "app", lib=requirement), plugin(tmp_path, "lib", version=available))
    if ok:
        assert plan.order == ["lib", "app"]
    else:
        assert list(plan.refused) == ["app"]
        assert plan.order == ["lib"]


def test_missing_dependency_refuses_only_that_plugin(tmp_path: Path) -> None:
    plan = plan_of(
        plugin(tmp_path, "app", pricing="^2.1"), plugin(tmp_path, "other"), plugin(tmp_path, "pricer")
    )
    assert plan.order == ["other", "pricer"]
    err = plan.refused["app"]
    assert isinstance(err, DependencyError)
    assert err.plugin == "app"
    assert str(err) == (
        "plugin 'app': requires 'pricing' ^2.1, but no plugin 'pricing' is available; did you mean 'pricer'?"
    )
    assert err.details == {"dependency": "pricing", "required": "^2.1", "available": None}


def test_incompatible_version_names_required_and_available(tmp_path: Path) -> None:
    plan = plan_of(plugin(tmp_path, "app", pricing="^2.1"), plugin(tmp_path, "pricing", version="1.4.0"))
    err = plan.refused["app"]
    assert "requires 'pricing' ^2.1, but the available 'pricing' is version 1.4.0" in str(err)
    assert err.details["required"] == "^2.1"
    assert err.details["available"] == "1.4.0"
    assert plan.order == ["pricing"]


def test_cycle_reports_path_and_others_still_load(tmp_path: Path) -> None:
    plan = plan_of(
        plugin(tmp_path, "b", c="*"),
        plugin(tmp_path, "a", b="*"),
        plugin(tmp_path, "c", a="*"),
        plugin(tmp_path, "free"),
    )
    assert plan.order == ["free"]
    assert sorted(plan.refused) == ["a", "b", "c"]
    for name in "abc":
        assert "dependency cycle: a -> b -> c -> a" in str(plan.refused[name])
    assert plan.refused["a"].details["cycle"] == ["a", "b", "c", "a"]


def test_two_node_cycle(tmp_path: Path) -> None:
    plan = plan_of(plugin(tmp_path, "a", b="1"), plugin(tmp_path, "b", a="1"))
    assert str(plan.refused["b"]) == "plugin 'b': dependency cycle: a -> b -> a"


def test_cycle_through_an_optional_dependency_is_broken(tmp_path: Path) -> None:
    plan = plan_of(plugin(tmp_path, "a", b="*"), plugin(tmp_path, "b", a=("*", True)))
    assert plan.refused == {}
    assert plan.order == ["b", "a"]


def test_optional_absent_is_skipped(tmp_path: Path) -> None:
    plan = plan_of(
        plugin(tmp_path, "app", audit=("~1.0", True), metrics=("^2", True)),
        plugin(tmp_path, "metrics", version="1.0.0"),  # present but incompatible: skipped as well
    )
    assert plan.order == ["app", "metrics"]
    assert plan.skipped_optional == [("app", "audit"), ("app", "metrics")]
    assert plan.refused == {}


def test_optional_present_orders_loading(tmp_path: Path) -> None:
    plan = plan_of(plugin(tmp_path, "app", zlog=("~1.0", True)), plugin(tmp_path, "zlog", version="1.0.5"))
    assert plan.order == ["zlog", "app"]
    assert plan.skipped_optional == []


def test_refusal_is_transitive(tmp_path: Path) -> None:
    plan = plan_of(
        plugin(tmp_path, "web", api="*"),
        plugin(tmp_path, "api", db="^2"),
        plugin(tmp_path, "db", version="1.0.0"),
        plugin(tmp_path, "report", web=("*", True)),
        plugin(tmp_path, "admin", web="*"),
    )
    assert plan.order == ["db", "report"]
    assert sorted(plan.refused) == ["admin", "api", "web"]
    assert "requires 'db' ^2, but the available 'db' is version 1.0.0" in str(plan.refused["api"])
    web = str(plan.refused["web"])
    assert web.startswith("plugin 'web': requires 'api' *, which cannot load (plugin 'api': requires 'db'")
    assert plan.refused["admin"].details["dependency"] == "web"
    assert plan.skipped_optional == [("report", "web")]


def test_dependents_of_a_cycle_are_refused(tmp_path: Path) -> None:
    plan = plan_of(plugin(tmp_path, "a", b="*"), plugin(tmp_path, "b", a="*"), plugin(tmp_path, "c", a="*"))
    assert sorted(plan.refused) == ["a", "b", "c"]
    assert "which cannot load (plugin 'a': dependency cycle: a -> b -> a)" in str(plan.refused["c"])


def test_dependents_ignores_optional(tmp_path: Path) -> None:
    loaded = {
        m.name: m
        for m in (
            plugin(tmp_path, "db"),
            plugin(tmp_path, "api", db="*"),
            plugin(tmp_path, "batch", db="1"),
            plugin(tmp_path, "report", db=("*", True)),
        )
    }
    assert dependents("db", loaded) == ["api", "batch"]
    assert dependents("api", loaded) == []


def test_check_unload_refused_and_forced(tmp_path: Path) -> None:
    loaded = {m.name: m for m in (plugin(tmp_path, "db"), plugin(tmp_path, "api", db="*"))}
    with pytest.raises(DependencyError) as info:
        check_unload("db", loaded)
    assert (
        str(info.value) == "plugin 'db': cannot unload 'db': needed by 'api' (unload those first, or force)"
    )
    assert info.value.details["dependents"] == ["api"]
    assert check_unload("db", loaded, force=True) == ["api"]
    assert check_unload("api", loaded) == []
