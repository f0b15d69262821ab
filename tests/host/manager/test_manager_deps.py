"""Dependencies at run time: load order, optional ones, refusals that name what is required and available,
unloading what others need, and plugins that load once their dependency arrives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sandbus.host.lifecycle import PluginManager, PluginStatus
from sandbus.sdk.errors import DependencyError
from tests.conftest import AuditLog
from tests.host.manager.factory import wasm_reply, write_plugin

Make = Callable[..., PluginManager]


def test_dependencies_load_first(pdir: Path, make_manager: Make, audit: AuditLog) -> None:
    write_plugin(pdir, "web", deps={"api": "^1.0"})
    write_plugin(pdir, "api", deps={"db": "*", "cache": "~1.2"}, version="1.4.0")
    write_plugin(pdir, "db")
    write_plugin(pdir, "cache", version="1.2.7")
    report = make_manager(pdir).discover_and_load()
    assert report.loaded == ("cache", "db", "api", "web")
    assert [e.plugin for e in audit if e.kind == "lifecycle.load"] == ["cache", "db", "api", "web"]


def test_absent_optional_dependency_is_skipped(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "web", deps={"metrics": ("^1.0", True), "api": "^1"})
    write_plugin(pdir, "api")
    manager = make_manager(pdir)
    assert manager.discover_and_load().loaded == ("api", "web")
    assert manager.info("web").skipped_optional == ("metrics",)


def test_incompatible_version_names_required_and_available(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "orders", deps={"pricing": "^2.1"})
    write_plugin(pdir, "pricing", version="1.9.0")
    manager = make_manager(pdir)
    report = manager.discover_and_load()
    assert report.loaded == ("pricing",)
    assert report.failed["orders"] == (
        "plugin 'orders': requires 'pricing' ^2.1, but the available 'pricing' is version 1.9.0")
    assert manager.info("orders").last_error_code == DependencyError.code


def test_dependency_that_fails_to_load_is_named(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "orders", deps={"pricing": "^1"})
    write_plugin(pdir, "pricing")
    (pdir / "pricing.wasm").write_bytes(b"\0asm\1\0\0\0\xff")
    report = make_manager(pdir).discover_and_load()
    assert report.loaded == ()
    assert "requires 'pricing' ^1, but 'pricing' failed to load: " in report.failed["orders"]
    assert "not a valid WebAssembly module" in report.failed["orders"]


def test_unload_of_a_needed_plugin_is_refused_unless_forced(pdir: Path, make_manager: Make, audit: AuditLog) -> None:
    write_plugin(pdir, "orders", deps={"pricing": "^1"})
    write_plugin(pdir, "audit_log", deps={"pricing": ("^1", True)})  # optional: does not block
    write_plugin(pdir, "pricing")
    manager = make_manager(pdir)
    manager.discover_and_load()
    with pytest.raises(DependencyError, match=r"cannot unload 'pricing': needed by 'orders' \(unload those first"):
        manager.unload("pricing")
    assert "pricing" in manager
    manager.unload("pricing", force=True)
    assert "pricing" not in manager
    event = [e for e in audit if e.kind == "lifecycle.unload"][-1]
    assert event.details["dependents"] == ["orders"]
    assert event.details["forced"] is True
    manager.unload("orders")
    manager.unload("audit_log")
    assert manager.names() == []


def test_new_version_that_breaks_a_dependent_is_refused(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "orders", deps={"pricing": "^1.2"})
    write_plugin(pdir, "pricing", version="1.2.0", reply="p1")
    manager = make_manager(pdir)
    manager.discover_and_load()
    write_plugin(pdir, "pricing", version="2.0.0", reply="p2")
    with pytest.raises(DependencyError, match=r"version 2.0.0 would break 'orders', which requires 'pricing' \^1.2"):
        manager.reload("pricing")
    assert manager.info("pricing").status is PluginStatus.STALE
    assert manager.execute_json("pricing", "handle_request") == wasm_reply("p1")
    write_plugin(pdir, "pricing", version="1.3.0", reply="p3")
    assert manager.reload("pricing").status is PluginStatus.LOADED


def test_waiting_plugin_loads_when_its_dependency_arrives(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "web", deps={"api": "^1"})
    write_plugin(pdir, "site", deps={"web": "^1"})
    manager = make_manager(pdir)
    report = manager.discover_and_load()
    assert set(report.failed) == {"web", "site"}
    write_plugin(pdir, "api")
    manager.load("api")
    assert manager.names() == ["api", "site", "web"]


def test_cycle_introduced_by_a_new_version_is_refused(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "alpha", deps={"beta": "^1"})
    write_plugin(pdir, "beta")
    manager = make_manager(pdir)
    manager.discover_and_load()
    write_plugin(pdir, "beta", version="1.1.0", deps={"alpha": "^1"})
    with pytest.raises(DependencyError, match="dependency cycle: alpha -> beta -> alpha"):
        manager.reload("beta")
    assert manager.info("beta").status is PluginStatus.STALE


def test_close_unloads_dependents_first(pdir: Path, make_manager: Make, audit: AuditLog) -> None:
    write_plugin(pdir, "web", deps={"api": "^1"})
    write_plugin(pdir, "api", deps={"db": "^1"})
    write_plugin(pdir, "db")
    manager = make_manager(pdir)
    manager.discover_and_load()
    manager.close()
    unloads = [e for e in audit if e.kind == "lifecycle.unload"]
    assert [e.plugin for e in unloads] == ["web", "api", "db"]
    assert all(e.details["dependents"] == [] for e in unloads)


def test_stale_plugin_still_counts_as_a_dependency(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "api")
    manager = make_manager(pdir)
    manager.discover_and_load()
    (pdir / "api.wasm").write_bytes(b"broken")
    manager.sync("api")
    assert manager.info("api").status is PluginStatus.STALE
    write_plugin(pdir, "web", deps={"api": "^1"})
    report = manager.discover_and_load()  # api unchanged since it failed: its serving version counts
    assert report.loaded == ("api", "web")
    assert set(report.failed) == {"api"}
