"""Hot reload through a real watchdog observer: create, modify, atomic replace, delete, manifest edits,
debouncing, failed new versions, half-written files, deletion under running calls, and a client that
never sees a failed call while the file is replaced under it."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbus.host.lifecycle import PluginManager, PluginStatus, PluginWatcher
from sandbus.sdk.errors import PluginNotFoundError
from tests.conftest import AuditLog
from tests.host.manager.factory import (
    Gate,
    plugin_manifest,
    plugin_wasm,
    replace_atomically,
    wait_until,
    wasm_reply,
    write_plugin,
)

Make = Callable[..., PluginManager]


def reply_of(manager: PluginManager, name: str = "alpha") -> Any:
    try:
        return manager.execute_json(name, "handle_request")["reply"]
    except PluginNotFoundError:
        return None


def answers(manager: PluginManager, reply: str, name: str = "alpha") -> Callable[[], bool]:
    return lambda: reply_of(manager, name) == reply


@pytest.fixture
def watched(pdir: Path, make_manager: Make) -> Callable[..., PluginManager]:
    """A manager over ``pdir``, loaded and watching (stopped by the manager's close at teardown)."""

    def start(**kwargs: Any) -> PluginManager:
        debounce = kwargs.pop("debounce_s", 0.05)
        max_wait = kwargs.pop("max_wait_s", 2.0)
        manager = make_manager(pdir, **kwargs)
        manager.discover_and_load()
        manager.watch(debounce_s=debounce, max_wait_s=max_wait)
        return manager

    return start


def test_create_loads_a_new_plugin(pdir: Path, watched: Callable[..., PluginManager]) -> None:
    manager = watched()
    write_plugin(pdir, "alpha", reply="hello")
    wait_until(answers(manager, "hello"), what="the new plugin to answer")
    assert manager.info("alpha").status is PluginStatus.LOADED


def test_modify_in_place_reloads(pdir: Path, watched: Callable[..., PluginManager], audit: AuditLog) -> None:
    write_plugin(pdir, "alpha", reply="v1")
    manager = watched()
    with (pdir / "alpha.wasm").open("wb") as f:
        f.write(plugin_wasm("v2"))
    wait_until(answers(manager, "v2"), what="v2")
    wait_until(lambda: "lifecycle.reload" in audit.kinds(), what="the audit event")  # emitted after the swap
    event = next(e for e in audit if e.kind == "lifecycle.reload")
    assert event.plugin == "alpha"
    assert event.details["previous_sha256"] != event.details["sha256"]


def test_atomic_replace_is_an_update(pdir: Path, watched: Callable[..., PluginManager]) -> None:
    write_plugin(pdir, "alpha", reply="v1")
    manager = watched()
    replace_atomically(pdir / "alpha.wasm", plugin_wasm("v2"))
    wait_until(answers(manager, "v2"), what="v2 after os.replace")
    assert manager.info("alpha").reloads == 1


def test_moved_in_from_another_directory(pdir: Path, tmp_path: Path, watched: Callable[..., PluginManager]) -> None:
    manager = watched()
    staging = tmp_path / "staging"
    staging.mkdir()
    write_plugin(staging, "alpha", reply="moved")
    os.replace(staging / "alpha.toml", pdir / "alpha.toml")
    os.replace(staging / "alpha.wasm", pdir / "alpha.wasm")
    wait_until(answers(manager, "moved"), what="the plugin moved in")


def test_delete_unloads(pdir: Path, watched: Callable[..., PluginManager], audit: AuditLog) -> None:
    write_plugin(pdir, "alpha")
    manager = watched()
    (pdir / "alpha.wasm").unlink()
    (pdir / "alpha.toml").unlink()
    wait_until(lambda: manager.list_plugins() == [], what="the plugin to leave the listing")
    with pytest.raises(PluginNotFoundError):
        manager.execute("alpha", "handle_request", b"{}")
    wait_until(lambda: "lifecycle.unload" in audit.kinds(), what="the audit event")
    assert next(e for e in audit if e.kind == "lifecycle.unload").details["reason"] == "module deleted"


def test_renamed_away_is_a_deletion(pdir: Path, watched: Callable[..., PluginManager]) -> None:
    write_plugin(pdir, "alpha")
    manager = watched()
    os.replace(pdir / "alpha.wasm", pdir / "alpha.wasm.disabled")
    wait_until(lambda: "alpha" not in manager, what="the plugin to unload")
    info = manager.info("alpha")  # the manifest is still there: listed, with the reason
    assert info.status is PluginStatus.FAILED
    assert info.last_error is not None
    assert "module missing" in info.last_error


def test_manifest_edit_reloads_with_new_settings(pdir: Path, watched: Callable[..., PluginManager]) -> None:
    write_plugin(pdir, "alpha", config={"mode": "fast"})
    manager = watched()
    assert manager.execute_json("alpha", "config") == {"mode": "fast"}
    replace_atomically(pdir / "alpha.toml",
                       plugin_manifest("alpha", "1.0.1", config={"mode": "careful"}).encode())
    wait_until(lambda: manager.info("alpha").version == "1.0.1", what="the manifest edit")
    assert manager.execute_json("alpha", "config") == {"mode": "careful"}  # init ran with the new [config]


def test_burst_of_writes_gives_one_reload(pdir: Path, watched: Callable[..., PluginManager],
                                          audit: AuditLog) -> None:
    write_plugin(pdir, "alpha", reply="v0")
    manager = watched(debounce_s=0.3)
    for i in range(1, 6):
        replace_atomically(pdir / "alpha.wasm", plugin_wasm(f"v{i}"))
    wait_until(answers(manager, "v5"), what="the last write")
    wait_until(lambda: "lifecycle.reload" in audit.kinds(), what="the audit event")
    assert manager.watch().pending() == []
    assert audit.kinds().count("lifecycle.reload") == 1


@pytest.mark.parametrize(
    ("breakage", "needle"),
    [
        ("bad wasm", "not a valid WebAssembly module"),
        ("bad manifest", "expected a string, found 2 (int)"),
        ("init fails", "sandbus_init returned 3"),
        ("sha256 mismatch", "wasm sha256 mismatch"),
    ],
)
def test_failed_new_version_leaves_the_old_serving(
    pdir: Path, watched: Callable[..., PluginManager], audit: AuditLog, breakage: str, needle: str
) -> None:
    write_plugin(pdir, "alpha", reply="v1")
    manager = watched()
    wasm = pdir / "alpha.wasm"
    if breakage == "bad wasm":
        replace_atomically(wasm, b"\0asm\1\0\0\0garbage")
    elif breakage == "bad manifest":
        replace_atomically(pdir / "alpha.toml", b'[plugin]\nname = "alpha"\nversion = 2\n')
    elif breakage == "init fails":
        replace_atomically(wasm, plugin_wasm("v2", init_status=3))
    else:
        replace_atomically(pdir / "alpha.toml", plugin_manifest("alpha", sha256="0" * 64).encode())
    wait_until(lambda: "lifecycle.reload_failed" in audit.kinds(), what="the refusal")
    info = manager.info("alpha")
    assert info.status is PluginStatus.STALE
    assert info.last_error is not None
    assert needle in info.last_error
    assert reply_of(manager) == "v1"
    event = next(e for e in audit if e.kind == "lifecycle.reload_failed")
    assert needle in event.details["reason"]
    assert event.details["serving_version"] == "1.0.0"
    write_plugin(pdir, "alpha", reply="fixed", version="1.0.2")
    wait_until(answers(manager, "fixed"), what="the fixed version")
    assert manager.info("alpha").status is PluginStatus.LOADED


def test_half_written_file_is_not_loaded_until_closed(
    pdir: Path, watched: Callable[..., PluginManager], audit: AuditLog
) -> None:
    write_plugin(pdir, "alpha", reply="v1")
    manager = watched(max_wait_s=30)
    watcher = manager.watch()
    new = plugin_wasm("v2", pad=64 * 1024)
    with (pdir / "alpha.wasm").open("wb") as f:
        f.write(new[: len(new) // 2])
        f.flush()
        os.fsync(f.fileno())
        # The quiet period passes with the file still open: the watcher holds the change back.
        wait_until(lambda: watcher.deferred > 0, what="the watcher to defer the open file")
        assert reply_of(manager) == "v1"
        f.write(new[len(new) // 2:])
    wait_until(answers(manager, "v2"), what="the completed file")
    assert "lifecycle.reload_failed" not in audit.kinds()  # never tried the half-written module


def test_truncated_copy_is_refused_then_completed(pdir: Path, watched: Callable[..., PluginManager]) -> None:
    write_plugin(pdir, "alpha", reply="v1")
    manager = watched()
    new = plugin_wasm("v2", pad=64 * 1024)
    (pdir / "alpha.wasm").write_bytes(new[: len(new) // 3])  # a copy that stopped mid-way, file closed
    wait_until(lambda: manager.info("alpha").status is PluginStatus.STALE, what="the refusal")
    assert "not a valid WebAssembly module" in (manager.info("alpha").last_error or "")
    assert reply_of(manager) == "v1"
    (pdir / "alpha.wasm").write_bytes(new)  # the copy is retried and finishes
    wait_until(answers(manager, "v2"), what="the complete module")


def test_delete_while_calls_are_in_flight(
    pdir: Path, watched: Callable[..., PluginManager], gate: Gate, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sandbus.plugin")
    write_plugin(pdir, "alpha", reply="v1", block=True)
    manager = watched(host_functions=gate.functions)
    results: list[object] = []
    caller = threading.Thread(target=lambda: results.append(manager.execute_json("alpha", "slow")))
    caller.start()
    try:
        assert gate.entered.wait(10)
        (pdir / "alpha.wasm").unlink()
        (pdir / "alpha.toml").unlink()
        wait_until(lambda: [(i.name, i.status) for i in manager.list_plugins()]
                   == [("alpha", PluginStatus.UNLOADING)], what="the plugin to be unloading")
        with pytest.raises(PluginNotFoundError):
            manager.execute("alpha", "handle_request", b"{}")
        assert manager.info("alpha").in_flight == 1
        assert "shutdown v1" not in caplog.messages
    finally:
        gate.release.set()
        caller.join(10)
    assert results == [wasm_reply("v1")]  # the running call finished normally
    wait_until(lambda: manager.list_plugins() == [], what="the drained version to close")
    assert "shutdown v1" in caplog.messages


@pytest.fixture
def client_loop() -> Iterator[Callable[[PluginManager], tuple[list[str], list[BaseException], threading.Event]]]:
    """Start threads calling ``alpha`` in a loop; they are stopped and joined at teardown."""
    threads: list[threading.Thread] = []
    stops: list[threading.Event] = []

    def start(manager: PluginManager) -> tuple[list[str], list[BaseException], threading.Event]:
        replies: list[str] = []
        failures: list[BaseException] = []
        stop = threading.Event()

        def run() -> None:
            while not stop.is_set():
                try:
                    replies.append(manager.execute_json("alpha", "handle_request")["reply"])
                except BaseException as e:
                    failures.append(e)

        thread = threading.Thread(target=run, name="client-loop")
        thread.start()
        threads.append(thread)
        stops.append(stop)
        return replies, failures, stop

    yield start
    for stop in stops:
        stop.set()
    for thread in threads:
        thread.join(10)


def test_client_loop_sees_no_failed_call_across_reloads(
    pdir: Path, watched: Callable[..., PluginManager], client_loop: Callable[..., Any], audit: AuditLog
) -> None:
    write_plugin(pdir, "alpha", reply="v0")
    manager = watched()
    replies, failures, stop = client_loop(manager)
    for i in range(1, 6):
        replace_atomically(pdir / "alpha.wasm", plugin_wasm(f"v{i}"))
        wait_until(lambda i=i: bool(replies) and replies[-1] == f"v{i}", what=f"v{i} in the client loop")
    stop.set()
    assert failures == []
    wait_until(lambda: audit.kinds().count("lifecycle.reload") == 5, what="five reload events")
    seen = list(dict.fromkeys(replies))
    assert seen == ["v0", "v1", "v2", "v3", "v4", "v5"]  # versions never interleave: each swap is atomic


def test_watcher_lifecycle(pdir: Path, make_manager: Make) -> None:
    manager = make_manager(pdir)
    watcher = PluginWatcher(manager, debounce_s=0.01)
    with watcher:
        assert watcher.running
        write_plugin(pdir, "alpha", reply="w")
        wait_until(answers(manager, "w"), what="the watcher")
        assert watcher.syncs >= 1
    assert not watcher.running
    assert watcher.pending() == []


def test_ignores_unrelated_and_hidden_files(pdir: Path, watched: Callable[..., PluginManager]) -> None:
    manager = watched()
    watcher = manager.watch()
    (pdir / "README.md").write_text("hello")
    (pdir / ".alpha.wasm.swp").write_bytes(b"x")
    (pdir / "sub").mkdir()
    write_plugin(pdir, "alpha", reply="real")
    wait_until(answers(manager, "real"), what="the real plugin")
    assert [i.name for i in manager.list_plugins()] == ["alpha"]
    assert watcher.pending() == []
