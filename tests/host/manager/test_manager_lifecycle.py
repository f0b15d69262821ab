"""The manager without a watcher: discover, execute, list, health, load / unload / reload, limits."""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbus.host.lifecycle import PluginInfo, PluginManager, PluginStatus
from sandbus.host.lifecycle.policy import Policy, load_policy
from sandbus.host.sandbox import ModuleCache
from sandbus.sdk.errors import (
    PluginInitError,
    PluginNotFoundError,
    ResourceLimitError,
    SandbusError,
    UnknownFunctionError,
)
from tests.conftest import AuditLog
from tests.host.manager.factory import Gate, plugin_wasm, wasm_reply, write_plugin

Make = Callable[..., PluginManager]


def test_real_plugins_load_and_serve(plugins_dir: Path, pdir: Path, make_manager: Make, audit: AuditLog) -> None:
    for f in plugins_dir.iterdir():
        shutil.copy(f, pdir / f.name)
    # The examples' own policy (what `make run` uses): order_logger's subscription needs its ceiling.
    manager = make_manager(pdir, policy=load_policy(plugins_dir.parent / "policy.toml"))
    report = manager.discover_and_load()
    expected = tuple(sorted(p.stem for p in plugins_dir.glob("*.wasm")))
    assert {"echo", "text_processor"} <= set(expected)
    assert report.loaded == expected
    assert report.ok
    assert manager.execute("echo", "handle_request", b'{"a":1}') == b'{"a":1}'
    reply = manager.execute_json("text_processor", "handle_request",
                                 {"action": "process_data", "data": {"input": "hi"}})
    assert reply == {"success": True, "result": {"processed": {"input": "hi"}}, "error": None}
    assert audit.kinds().count("lifecycle.load") == len(expected)
    info = manager.info("text_processor")
    assert info.status is PluginStatus.LOADED
    assert info.version == "1.0.0"
    assert info.executions == 1
    assert info.errors == 0
    assert info.p50_ms is not None
    assert info.p99_ms is not None
    assert 0 < info.p50_ms <= info.p99_ms
    assert info.fuel_used > 0
    assert info.memory_bytes >= 65536
    assert info.last_loaded is not None
    assert info.functions == ("handle_request",)


def test_list_plugins_is_serialisable_and_sorted(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "zeta")
    write_plugin(pdir, "alpha")
    (pdir / "broken.wasm").write_bytes(b"\0asm")
    manager = make_manager(pdir)
    manager.discover_and_load()
    infos = manager.list_plugins()
    assert [i.name for i in infos] == ["alpha", "broken", "zeta"]
    for info in infos:
        again = PluginInfo.model_validate_json(info.model_dump_json())
        assert again == info
    assert json.loads(infos[1].model_dump_json())["status"] == "failed"


def test_call_errors_are_counted_and_typed(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "alpha")
    manager = make_manager(pdir)
    manager.discover_and_load()
    with pytest.raises(UnknownFunctionError, match='no function "nope"'):
        manager.execute("alpha", "nope", b"{}")
    assert manager.execute_json("alpha", "handle_request", {}) == wasm_reply("alpha-1.0.0")
    info = manager.info("alpha")
    # A function the module does not export is the caller's mistake: typed, counted as rejected, not an error.
    assert (info.executions, info.errors, info.rejected) == (1, 0, 1)
    assert info.last_error is None
    assert manager.list_plugins()[0].rejected == 1


def test_unknown_and_failed_plugins_are_not_found(pdir: Path, make_manager: Make) -> None:
    (pdir / "broken.wasm").write_bytes(b"not wasm")
    manager = make_manager(pdir)
    manager.discover_and_load()
    with pytest.raises(PluginNotFoundError, match="no plugin 'ghost'"):
        manager.execute("ghost", "handle_request", b"{}")
    with pytest.raises(PluginNotFoundError, match=r"failed to load: .*manifest missing"):
        manager.execute("broken", "handle_request", b"{}")


def test_lifecycle_exports_called_at_the_right_moments(
    pdir: Path, make_manager: Make, audit: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sandbus.plugin")
    write_plugin(pdir, "alpha", reply="a1", config={"greeting": "hello", "level": 3},
                 extra='[capabilities]\nrequired = ["environment"]\n[permissions]\nenvironment_vars = ["GREETING"]')
    policy = Policy.model_validate({"capabilities": {"allowed": ["compute", "environment"]},
                                    "environment": {"allowed_vars": ["GREETING"]}})
    manager = make_manager(pdir, policy=policy, host_env={"GREETING": "from the host", "SECRET": "x"})
    manager.discover_and_load()

    def plugin_logs() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "sandbus.plugin.alpha"]

    assert plugin_logs() == ["init a1"]  # init ran at load, before any call
    assert manager.execute_json("alpha", "config") == {"greeting": "hello", "level": 3}  # the [config] table
    assert manager.execute_json("alpha", "greeting") == "from the host"  # the granted environment
    assert manager.health_check() == {"alpha": True}
    manager.execute_json("alpha", "sicken")
    assert manager.health_check() == {"alpha": False}
    assert "lifecycle.unhealthy" in audit.kinds()
    manager.unload("alpha")
    assert plugin_logs() == ["init a1", "shutdown a1"]


def test_init_failure_refuses_the_plugin(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "alpha", init_status=7)
    write_plugin(pdir, "beta", health=1)
    write_plugin(pdir, "gamma")
    manager = make_manager(pdir)
    report = manager.discover_and_load()
    assert report.loaded == ("gamma",)
    assert "sandbus_init returned 7" in report.failed["alpha"]
    assert "sandbus_health reported failure" in report.failed["beta"]
    assert manager.info("alpha").last_error_code == PluginInitError.code


def test_health_check_reports_failed_plugins(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "alpha")
    (pdir / "broken.wasm").write_bytes(b"")
    manager = make_manager(pdir)
    manager.discover_and_load()
    assert manager.health_check() == {"alpha": True, "broken": False}


def test_load_unload_reload(pdir: Path, make_manager: Make, audit: AuditLog) -> None:
    manager = make_manager(pdir)
    write_plugin(pdir, "alpha", reply="v1")
    info = manager.load("alpha")
    assert info.status is PluginStatus.LOADED
    assert "alpha" in manager
    assert manager.load("alpha").last_loaded == info.last_loaded  # unchanged files: a no-op
    write_plugin(pdir, "alpha", reply="v2", version="1.1.0")
    assert manager.execute_json("alpha", "handle_request") == wasm_reply("v1")  # no watcher: nothing moves
    info = manager.reload("alpha")
    assert (info.version, info.reloads) == ("1.1.0", 1)
    assert manager.execute_json("alpha", "handle_request") == wasm_reply("v2")
    reload_event = next(e for e in audit if e.kind == "lifecycle.reload")
    assert reload_event.details["previous_version"] == "1.0.0"
    assert reload_event.details["version"] == "1.1.0"
    manager.unload("alpha")
    assert "alpha" not in manager
    assert manager.list_plugins() == []
    with pytest.raises(PluginNotFoundError):
        manager.execute("alpha", "handle_request", b"{}")
    with pytest.raises(PluginNotFoundError):
        manager.unload("alpha")
    with pytest.raises(PluginNotFoundError, match="no plugin 'ghost'"):
        manager.load("ghost")


def test_failed_reload_keeps_the_old_version(pdir: Path, make_manager: Make, audit: AuditLog) -> None:
    write_plugin(pdir, "alpha", reply="v1")
    manager = make_manager(pdir)
    manager.discover_and_load()
    (pdir / "alpha.wasm").write_bytes(plugin_wasm("v2")[:40])
    with pytest.raises(SandbusError, match="not a valid WebAssembly module"):
        manager.reload("alpha")
    info = manager.info("alpha")
    assert info.status is PluginStatus.STALE
    assert info.last_error is not None
    assert "not a valid WebAssembly module" in info.last_error
    assert manager.execute_json("alpha", "handle_request") == wasm_reply("v1")
    assert audit.kinds()[-1] == "lifecycle.reload_failed"
    (pdir / "alpha.wasm").write_bytes(plugin_wasm("v2"))
    assert manager.reload("alpha").status is PluginStatus.LOADED
    assert manager.execute_json("alpha", "handle_request") == wasm_reply("v2")


def test_reverting_files_clears_a_stale_status(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "alpha", reply="v1")
    manager = make_manager(pdir)
    manager.discover_and_load()
    good = (pdir / "alpha.wasm").read_bytes()
    (pdir / "alpha.wasm").write_bytes(b"junk")
    manager.sync("alpha")
    assert manager.info("alpha").status is PluginStatus.STALE
    (pdir / "alpha.wasm").write_bytes(good)
    manager.sync("alpha")
    assert manager.info("alpha").status is PluginStatus.LOADED


def test_max_plugins(pdir: Path, make_manager: Make) -> None:
    for name in ("a", "b", "c"):
        write_plugin(pdir, name)
    manager = make_manager(pdir, max_plugins=2)
    report = manager.discover_and_load()
    assert report.loaded == ("a", "b")
    assert "max_plugins" in report.failed["c"]
    assert manager.info("c").last_error_code == ResourceLimitError.code
    write_plugin(pdir, "a", version="2.0.0")
    assert manager.reload("a").version == "2.0.0"  # a reload does not count against the limit
    manager.unload("b")
    assert manager.load("c").status is PluginStatus.LOADED


def test_calls_during_reloads_never_fail(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "alpha", reply="v0")
    manager = make_manager(pdir)
    manager.discover_and_load()
    stop = threading.Event()
    failures: list[BaseException] = []
    replies: set[str] = set()

    def client() -> None:
        while not stop.is_set():
            try:
                replies.add(manager.execute_json("alpha", "handle_request")["reply"])
            except BaseException as e:
                failures.append(e)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 21):
            (pdir / "alpha.wasm").write_bytes(plugin_wasm(f"v{i}"))
            manager.reload("alpha")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert manager.execute_json("alpha", "handle_request") == wasm_reply("v20")
    assert len(replies) > 1
    assert manager.info("alpha").reloads == 20


def test_in_flight_call_finishes_on_the_old_version(
    pdir: Path, make_manager: Make, gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sandbus.plugin")
    write_plugin(pdir, "alpha", reply="old", block=True)
    manager = make_manager(pdir, host_functions=gate.functions)
    manager.discover_and_load()
    result: list[object] = []
    caller = threading.Thread(target=lambda: result.append(manager.execute_json("alpha", "slow")))
    caller.start()
    assert gate.entered.wait(10)
    write_plugin(pdir, "alpha", reply="new")
    manager.reload("alpha")
    assert manager.execute_json("alpha", "handle_request") == wasm_reply("new")
    assert manager.info("alpha").in_flight == 0  # the new version has none; the old one still runs
    assert "shutdown old" not in caplog.messages  # not shut down under a running call
    gate.release.set()
    caller.join(10)
    assert result == [wasm_reply("old")]
    assert "shutdown old" in caplog.messages


def test_module_cache_is_shared_across_restarts(pdir: Path, tmp_path: Path, make_manager: Make) -> None:
    for i in range(5):
        write_plugin(pdir, f"p{i}")
    first = ModuleCache(tmp_path / "shared")
    make_manager(pdir, cache=first).discover_and_load()
    assert first.compiles == 5
    second = ModuleCache(tmp_path / "shared")  # a restart: a fresh process's cache over the same directory
    assert len(make_manager(pdir, cache=second).discover_and_load().loaded) == 5
    assert (second.compiles, second.hits_disk) == (0, 5)


def test_close_unloads_everything_and_refuses_more(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "alpha")
    manager = make_manager(pdir)
    manager.discover_and_load()
    manager.close()
    assert manager.list_plugins() == []
    with pytest.raises(PluginNotFoundError, match="closed"):
        manager.load("alpha")


def test_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PluginNotFoundError, match="does not exist"):
        PluginManager(tmp_path / "nowhere")


def test_call_racing_a_swap_is_retried_on_the_new_version(
    pdir: Path, make_manager: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window between picking a version and calling it: if the version was retired and its pool
    closed in between, the call goes to the current version instead of failing."""
    write_plugin(pdir, "alpha", reply="old")
    manager = make_manager(pdir)
    manager.discover_and_load()
    old_version, _ = manager._checkout("alpha")
    manager._checkin(old_version)
    write_plugin(pdir, "alpha", reply="new")
    manager.reload("alpha")
    assert old_version.retired
    assert old_version.closed.is_set()
    real_checkout = manager._table.checkout
    handed_out: list[object] = []

    def racing_checkout(name: str) -> tuple[Any, Any]:
        version, stats = real_checkout(name)
        if not handed_out:  # the first attempt gets the stale, closed version
            manager._checkin(version)
            with manager._table.lock:
                old_version.in_flight += 1
            version = old_version
        handed_out.append(version)
        return version, stats

    monkeypatch.setattr(manager._table, "checkout", racing_checkout)
    assert manager.execute_json("alpha", "handle_request") == wasm_reply("new")
    assert handed_out[0] is old_version
    assert len(handed_out) == 2
    assert manager.info("alpha").errors == 0


def test_accessors_of_the_serving_version(pdir: Path, make_manager: Make) -> None:
    write_plugin(pdir, "alpha", extra="[resources]\nmax_instances = 3\nmemory_mb = 8")
    manager = make_manager(pdir)
    manager.discover_and_load()
    assert manager.limits("alpha").max_instances == 3
    assert manager.grant("alpha").granted == frozenset()
    assert manager.manifest("alpha").plugin.version == "1.0.0"
    info = manager.module_info("alpha")
    assert {"handle_request", "slow", "config"} <= set(info.functions)
    assert ("sandbus_v1", "log") in info.imports
    assert len(manager) == 1
    assert manager.names() == ["alpha"]
    with pytest.raises(PluginNotFoundError):
        manager.limits("ghost")
