"""Background loading: a plugin that must compile in the compile worker loads after the others serve.

A module of 256 KiB or more compiles in a child process (host/sandbox/compiler.py); ``pad`` makes one that
large. While a test holds the manager's lifecycle lock, a background load can compile but cannot put its
plugin in service: the test sees the ``loading`` state without racing the compile, then lets it finish.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sandbus.host.lifecycle import PluginManager
from sandbus.host.lifecycle.models import PluginStatus
from sandbus.host.sandbox import ModuleCache
from sandbus.host.sandbox.compiler import IN_PROCESS_BELOW
from sandbus.sdk.errors import PluginLoadingError, PluginNotFoundError
from tests.conftest import AuditLog
from tests.host.manager.factory import wasm_reply, write_plugin

BIG = IN_PROCESS_BELOW + 4096


def test_slow_plugin_loads_in_background_while_the_fast_one_serves(
        pdir: Path, make_manager: Callable[..., PluginManager], audit: AuditLog) -> None:
    write_plugin(pdir, "fast")
    write_plugin(pdir, "big", pad=BIG)
    manager = make_manager(pdir)
    with manager._lifecycle:  # the background load waits for it to put "big" in service
        report = manager.discover_and_load(background=True)
        assert report.loaded == ("fast",)
        assert report.loading == ("big",)
        assert manager.execute_json("fast", "handle_request") == wasm_reply("fast-1.0.0")
        assert manager.info("big").status is PluginStatus.LOADING
        assert manager.info("big").last_error is None
        assert manager.loading() == ["big"]
        assert "big" not in manager.names()
        with pytest.raises(PluginLoadingError) as exc:
            manager.execute("big", "handle_request", b"{}")
        assert exc.value.code == "plugin.loading"
        assert exc.value.retryable
        assert isinstance(exc.value, PluginNotFoundError)  # callers that handle "not serving" still do
    assert manager.wait_loaded(timeout=120)
    assert manager.info("big").status is PluginStatus.LOADED
    assert manager.execute_json("big", "handle_request") == wasm_reply("big-1.0.0")
    assert manager.loading() == []
    assert [e.plugin for e in audit if e.kind == "lifecycle.load"] == ["fast", "big"]


def test_a_dependent_of_a_loading_plugin_waits_for_it(pdir: Path, make_manager: Callable[..., PluginManager]) -> None:
    write_plugin(pdir, "big", pad=BIG)
    write_plugin(pdir, "user", deps={"big": "^1.0"})
    write_plugin(pdir, "free")
    manager = make_manager(pdir)
    with manager._lifecycle:
        report = manager.discover_and_load(background=True)
        assert report.loaded == ("free",)
        assert report.loading == ("big", "user")
        assert manager.info("user").status is PluginStatus.LOADING
    assert manager.wait_loaded(timeout=120)
    assert manager.names() == ["big", "free", "user"]
    assert manager.execute_json("user", "handle_request") == wasm_reply("user-1.0.0")


def test_compiled_code_in_the_cache_loads_at_once(pdir: Path, tmp_path: Path,
                                                  make_manager: Callable[..., PluginManager]) -> None:
    write_plugin(pdir, "big", pad=BIG)
    cache_dir = tmp_path / "shared-cache"
    first = make_manager(pdir, cache=ModuleCache(cache_dir))
    assert first.discover_and_load(background=True).loading == ("big",)
    assert first.wait_loaded(timeout=120)
    first.close()
    second = make_manager(pdir, cache=ModuleCache(cache_dir))  # a restart: the disk cache has it
    report = second.discover_and_load(background=True)
    assert (report.loaded, report.loading) == (("big",), ())


def test_a_failed_background_load_says_why(pdir: Path, make_manager: Callable[..., PluginManager]) -> None:
    write_plugin(pdir, "big", pad=BIG, init_status=7)  # compiles, then its sandbus_init fails
    manager = make_manager(pdir)
    assert manager.discover_and_load(background=True).loading == ("big",)
    assert manager.wait_loaded(timeout=120)
    info = manager.info("big")
    assert info.status is PluginStatus.FAILED
    assert info.last_error_code == "sandbox.init_failed"
    with pytest.raises(PluginNotFoundError) as exc:
        manager.execute("big", "handle_request", b"{}")
    assert not isinstance(exc.value, PluginLoadingError)


def test_without_background_everything_loads_before_returning(
        pdir: Path, make_manager: Callable[..., PluginManager]) -> None:
    write_plugin(pdir, "big", pad=BIG)
    manager = make_manager(pdir)
    report = manager.discover_and_load()
    assert (report.loaded, report.loading) == (("big",), ())


def test_unload_while_loading_cancels_the_background_load(
        pdir: Path, make_manager: Callable[..., PluginManager]) -> None:
    write_plugin(pdir, "big", pad=BIG)
    manager = make_manager(pdir)
    with manager._lifecycle:
        manager.discover_and_load(background=True)
        manager.unload("big")
    assert manager.wait_loaded(timeout=120)
    assert "big" not in manager.names()
    assert all(i.name != "big" for i in manager.list_plugins())


def test_sync_leaves_a_loading_plugin_to_its_background_load(
        pdir: Path, make_manager: Callable[..., PluginManager]) -> None:
    """What the watcher calls (and ``watch()`` calls for every plugin when it starts) must not compile a
    loading plugin in the caller's thread: the node would not be ready until it ends."""
    write_plugin(pdir, "big", pad=BIG)
    manager = make_manager(pdir)
    with manager._lifecycle:
        manager.discover_and_load(background=True)
        manager.sync("big")
        manager.sync_all()
        assert manager.info("big").status is PluginStatus.LOADING
    assert manager.wait_loaded(timeout=120)
    assert manager.info("big").status is PluginStatus.LOADED


def test_files_changed_while_loading_are_what_serves(pdir: Path, make_manager: Callable[..., PluginManager]) -> None:
    write_plugin(pdir, "big", "first", pad=BIG)
    manager = make_manager(pdir)
    with manager._lifecycle:
        manager.discover_and_load(background=True)
        write_plugin(pdir, "big", "second", pad=BIG)
    assert manager.wait_loaded(timeout=120)
    assert manager.execute_json("big", "handle_request") == wasm_reply("second")


def test_closing_the_manager_stops_its_background_compile(
        pdir: Path, plugins_dir: Path, make_manager: Callable[..., PluginManager]) -> None:
    """A compile worker must not outlive its manager (a node that stops while a plugin compiles would leave
    it running for up to compile_timeout_s)."""
    import shutil

    from sandbus.host.sandbox import compiler
    from tests.host.manager.factory import wait_until

    if not (plugins_dir / "py_echo.wasm").exists():
        pytest.skip("py_echo was not built (componentize-py missing)")
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"py_echo.{ext}", pdir / f"py_echo.{ext}")
    manager = make_manager(pdir)  # its own, empty module cache: the component compiles for seconds
    assert manager.discover_and_load(background=True).loading == ("py_echo",)
    background = manager._background
    assert background is not None
    wait_until(lambda: background in compiler._workers, 60, "the compile worker to start")
    worker = compiler._workers[background]
    manager.close()
    background.join(30)
    assert not background.is_alive()
    assert worker.wait(timeout=10) == -9  # killed, not finished
    assert "py_echo" not in manager.names()
