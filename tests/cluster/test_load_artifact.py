"""The plugin manager loading plugins from bytes in memory (what a cluster node does with verified artifacts):
the same checks, policy and audit as a file; reloads beside the old version; the directory never touches them."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from sandbus.host.lifecycle import PluginManager
from sandbus.host.lifecycle.policy import Policy
from sandbus.sdk.errors import DeployError, PluginInitError, PluginNotFoundError, SecurityViolationError
from tests.cluster.clusterkit import MANIFEST, versioned_wasm
from tests.conftest import AuditLog


def manifest(name: str, version: str, extra: str = "") -> str:
    return MANIFEST.format(name=name, version=version, description="from memory") + extra


def call(manager: PluginManager, name: str) -> object:
    return orjson.loads(manager.execute(name, "handle_request", b"{}"))


@pytest.fixture
def audit() -> AuditLog:
    return AuditLog()


@pytest.fixture
def memory_manager(tmp_path: Path, audit: AuditLog) -> Iterator[PluginManager]:
    manager = PluginManager(None, data_root=tmp_path / "data", on_audit=audit)
    yield manager
    manager.close()


def test_a_plugin_loads_from_memory_and_reloads_beside_the_old_version(memory_manager: PluginManager,
                                                                        audit: AuditLog) -> None:
    info = memory_manager.load_artifact("greeter", versioned_wasm("1.0.0"), manifest("greeter", "1.0.0"),
                                        origin="registry greeter@1.0.0")
    assert (info.version, info.status.value) == ("1.0.0", "loaded")
    assert "registry greeter@1.0.0" in info.path
    assert call(memory_manager, "greeter") == {"version": "1.0.0"}
    with pytest.raises(PluginInitError):
        memory_manager.load_artifact("greeter", versioned_wasm("1.1.0", broken="health"),
                                     manifest("greeter", "1.1.0"), origin="registry greeter@1.1.0")
    assert call(memory_manager, "greeter") == {"version": "1.0.0"}  # the old version kept serving
    assert memory_manager.info("greeter").status.value == "stale"
    memory_manager.load_artifact("greeter", versioned_wasm("1.1.0"), manifest("greeter", "1.1.0"),
                                 origin="registry greeter@1.1.0")
    assert call(memory_manager, "greeter") == {"version": "1.1.0"}
    assert [k for k in audit.kinds() if k.startswith("lifecycle.")] == [
        "lifecycle.load", "lifecycle.reload_failed", "lifecycle.reload"]
    # the same bytes again: nothing happens
    before = len(audit)
    memory_manager.load_artifact("greeter", versioned_wasm("1.1.0"), manifest("greeter", "1.1.0"),
                                 origin="registry greeter@1.1.0")
    assert len(audit) == before
    # a control reload rebuilds from the bytes in memory, not from a directory that has none
    assert memory_manager.reload("greeter").version == "1.1.0"


def test_the_policy_and_the_manifest_checks_hold_as_for_a_file(memory_manager: PluginManager,
                                                                 audit: AuditLog) -> None:
    needs_net = manifest("netty", "1.0.0").replace('required = ["compute"]', 'required = ["compute", "network"]')
    with pytest.raises(SecurityViolationError):
        memory_manager.load_artifact("netty", versioned_wasm("1.0.0"), needs_net, origin="registry netty@1.0.0")
    assert "policy.refused" in audit.kinds()
    with pytest.raises(Exception, match="name"):  # the manifest names another plugin
        memory_manager.load_artifact("greeter", versioned_wasm("1.0.0"), manifest("other", "1.0.0"),
                                     origin="registry greeter@1.0.0")
    assert memory_manager.names() == []


def test_a_name_a_local_plugin_file_uses_is_refused(tmp_path: Path, plugins_dir: Path) -> None:
    d = tmp_path / "plugins"
    d.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", d / f"echo.{ext}")
    with PluginManager(d) as manager:
        manager.discover_and_load()
        with pytest.raises(DeployError, match="plugin directory"):
            manager.load_artifact("echo", versioned_wasm("2.0.0"), manifest("echo", "2.0.0"), origin="registry")
        assert manager.info("echo").version == "1.0.0"
        assert manager.execute_json("echo", "handle_request", {"x": 1}) == {"x": 1}


def test_the_directory_never_unloads_a_plugin_loaded_from_memory(tmp_path: Path, plugins_dir: Path) -> None:
    d = tmp_path / "plugins"
    d.mkdir()
    for ext in ("wasm", "toml"):
        shutil.copy(plugins_dir / f"echo.{ext}", d / f"echo.{ext}")
    with PluginManager(d, policy=Policy.default()) as manager:
        manager.discover_and_load()
        manager.load_artifact("greeter", versioned_wasm("1.0.0"), manifest("greeter", "1.0.0"), origin="registry")
        manager.discover_and_load()
        manager.sync("greeter")
        manager.sync_all()
        assert manager.names() == ["echo", "greeter"]
        manager.watch(debounce_s=0.05)
        # a file of the same name appears: ignored, the memory plugin keeps serving
        (d / "greeter.toml").write_text(manifest("greeter", "9.0.0"))
        shutil.copy(plugins_dir / "echo.wasm", d / "greeter.wasm")
        (d / "echo.wasm").unlink()  # and a real directory change still works meanwhile
        deadline = time.monotonic() + 5
        while "echo" in manager.names():
            assert time.monotonic() < deadline, "the watcher did not act on the directory"
            time.sleep(0.02)  # the watcher thread acts on its own
        assert manager.info("greeter").version == "1.0.0"
        assert call(manager, "greeter") == {"version": "1.0.0"}
        manager.unload("greeter")
        assert not manager.from_memory("greeter")


def test_a_manager_without_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data_root"):
        PluginManager(None)
    with PluginManager(None, data_root=tmp_path) as manager:
        assert manager.discover_and_load().loaded == ()
        with pytest.raises(PluginNotFoundError):
            manager.load("echo")
        with pytest.raises(PluginNotFoundError, match="no plugin directory"):
            manager.watch()


def test_oversized_modules_and_manifests_that_are_not_text_are_refused(memory_manager: PluginManager) -> None:
    from sandbus.host.lifecycle.loader import MAX_MODULE_FILE_BYTES
    from sandbus.sdk.errors import InvalidModuleError, ManifestError

    with pytest.raises(InvalidModuleError, match="max_module_bytes"):
        memory_manager.load_artifact("big", b"\0" * (MAX_MODULE_FILE_BYTES + 1), manifest("big", "1.0.0"),
                                     origin="registry")
    with pytest.raises(ManifestError, match="UTF-8"):
        memory_manager.load_artifact("odd", versioned_wasm("1.0.0"), manifest("odd", "1.0.0") + "# \udcff\ud800",
                                     origin="registry")
    assert memory_manager.names() == []
