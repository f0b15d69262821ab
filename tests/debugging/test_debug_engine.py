"""Debug info as an engine of its own: separate engines and compiled code, the fast call paths on it, the
compile worker, and the operator's policy (never the manifest) choosing it on a node, audited."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from sandbus.host.lifecycle import PluginManager
from sandbus.host.lifecycle.policy import Policy, load_policy
from sandbus.host.sandbox import Limits, ModuleCache, Sandbox
from sandbus.host.sandbox import compiler as compiler_mod
from sandbus.host.sandbox.engine import engine_for, get_engine
from sandbus.host.sandbox.sandbox import debug_cache
from sandbus.sdk.errors import InvalidModuleError, ManifestError, PolicyError
from tests.conftest import AuditLog
from tests.host.manager.factory import write_plugin

DEBUG = Limits(debug_info=True)


def test_debug_engine_is_its_own() -> None:
    plain, debug = engine_for(Limits()), engine_for(DEBUG)
    assert debug is not plain
    assert debug.engine is not plain.engine
    assert debug.debug
    assert not plain.debug
    assert debug.fingerprint != plain.fingerprint
    assert "debug" in debug.fingerprint
    assert engine_for(Limits(debug_info=True)) is debug  # shared, like every engine of the process
    assert get_engine(DEBUG.stack_bytes, True, debug=True) is debug


def test_code_compiled_for_one_does_not_load_in_the_other(debug_guest: Path) -> None:
    """Why the fingerprints differ: wasmtime refuses code compiled under the other setting."""
    wasm = debug_guest.read_bytes()
    debug_code = wasmtime.Module(engine_for(DEBUG).engine, wasm).serialize()
    with pytest.raises(wasmtime.WasmtimeError):
        wasmtime.Module.deserialize(engine_for(Limits()).engine, debug_code)


def test_debug_code_stays_out_of_the_disk_cache(debug_guest: Path, tmp_path: Path) -> None:
    cache = ModuleCache(tmp_path / "cache")
    before = debug_cache().compiles
    with Sandbox(debug_guest, limits=DEBUG, cache=cache) as sandbox:
        assert sandbox.call("handle_request", 1) == {"n": 21}
    assert cache.compiles == 0
    assert list((tmp_path / "cache").glob("*.cwasm")) == []
    assert debug_cache().directory is None
    assert debug_cache().compiles >= before
    with Sandbox(debug_guest, cache=cache) as plain:  # the ordinary code is cached as always
        assert plain.call("handle_request", 1) == {"n": 21}
    assert [p.name for p in (tmp_path / "cache").glob("*.cwasm")] == [
        f"{plain.digest}-{engine_for(Limits()).fingerprint}.cwasm"]


@pytest.mark.parametrize(("fast", "native"), [(True, True), (True, False), (False, False)])
def test_call_paths_agree_with_debug_info(debug_guest: Path, fast: bool, native: bool) -> None:
    """The fast (compiled and ctypes) call paths run code with debug info, or fall back: same replies."""
    with Sandbox(debug_guest, limits=DEBUG, fast=fast, native=native) as sandbox:
        for n in range(3):
            payload = b"1" * (n + 1)
            result = sandbox.call_detailed("handle_request", payload)
            assert result.json() == {"n": 20 + len(payload)}
            assert result.fuel_used > 0


def test_compile_worker_compiles_with_debug_info(debug_guest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module over the in-process thresholds compiles in the child process for the debug engine."""
    monkeypatch.setattr(compiler_mod, "IN_PROCESS_BELOW", 0)
    wasm = debug_guest.read_bytes()
    module = compiler_mod.compile_bounded(wasmtime.Module, engine_for(DEBUG), wasm, DEBUG, "debug_me")
    # Deserialized on the debug engine (which refuses code of another config): it was compiled for it.
    assert {e.name for e in module.exports} >= {"handle_request", "memory"}


def test_per_call_isolation_with_debug_info_is_refused(debug_guest: Path, audit: AuditLog) -> None:
    with pytest.raises(InvalidModuleError, match="pooled") as info:
        Sandbox(debug_guest, limits=Limits(debug_info=True, isolation="per-call"), on_audit=audit)
    assert info.value.details["debug_info"] is True
    assert audit.kinds() == ["module.refused"]


def test_policy_names_the_plugins(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[debug]\nplugins = ["pricing", "orders"]\n')
    assert load_policy(path).debug.plugins == ("pricing", "orders")
    assert Policy.default().debug.plugins == ()
    path.write_text('[debug]\nplugins = ["../x"]\n')
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.details["key"] == "debug.plugins[0]"
    path.write_text('[debug]\nplugin = ["pricing"]\n')
    with pytest.raises(PolicyError, match="plugins"):
        load_policy(path)


def test_a_node_compiles_listed_plugins_with_debug_info(tmp_path: Path, audit: AuditLog) -> None:
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    write_plugin(pdir, "listed")
    write_plugin(pdir, "other")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('[debug]\nplugins = ["listed"]\n')
    manager = PluginManager(pdir, policy=load_policy(policy_file), on_audit=audit,
                            cache=ModuleCache(tmp_path / "cache"))
    try:
        manager.load("listed")
        manager.load("other")
        assert manager.execute_json("listed", "handle_request", {}) == {"reply": "listed-1.0.0"}
        assert manager.grant("listed").limits.debug_info
        assert not manager.grant("other").limits.debug_info
        events = [e for e in audit if e.kind == "plugin.debug_info"]
        assert [e.plugin for e in events] == ["listed"]
        assert events[0].details["version"] == "1.0.0"
    finally:
        manager.close(timeout=10)


def test_a_manifest_cannot_ask_for_debug_info(tmp_path: Path, audit: AuditLog) -> None:
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    write_plugin(pdir, "sneaky", extra="[resources]\ndebug_info = true\n")
    manager = PluginManager(pdir, on_audit=audit, cache=ModuleCache(tmp_path / "cache"))
    try:
        with pytest.raises(ManifestError, match="debug_info"):
            manager.load("sneaky")
        assert "plugin.debug_info" not in audit.kinds()
    finally:
        manager.close(timeout=10)


def test_a_planted_debug_entry_in_the_disk_cache_is_never_read(debug_guest: Path, tmp_path: Path,
                                                               audit: AuditLog) -> None:
    """Someone writes a file under the name a debug entry would have in the node's cache directory: code
    with debug info never comes from disk, so it is neither read nor removed nor audited."""
    cache = ModuleCache(tmp_path / "cache")
    with Sandbox(debug_guest, cache=cache) as plain:
        digest = plain.digest
    planted = tmp_path / "cache" / f"{digest}-{engine_for(DEBUG).fingerprint}.cwasm"
    planted.write_bytes(b"\x00not code")
    planted.chmod(0o600)
    with Sandbox(debug_guest, limits=DEBUG, cache=cache, on_audit=audit) as sandbox:
        assert sandbox.call("handle_request", 1) == {"n": 21}
    assert planted.read_bytes() == b"\x00not code"
    assert "security.cache_untrusted" not in audit.kinds()
    assert cache.compiles == 1  # the plain one only


def test_a_listed_plugin_keeps_debug_info_across_reloads_and_off_the_disk(tmp_path: Path, audit: AuditLog) -> None:
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    write_plugin(pdir, "listed")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('[debug]\nplugins = ["listed", "absent"]\n')  # "absent": no such plugin, no harm
    cache = ModuleCache(tmp_path / "cache")
    manager = PluginManager(pdir, policy=load_policy(policy_file), on_audit=audit, cache=cache)
    try:
        manager.load("listed")
        write_plugin(pdir, "listed", version="1.1.0")
        manager.reload("listed")
        assert manager.execute_json("listed", "handle_request", {}) == {"reply": "listed-1.1.0"}
        assert manager.grant("listed").limits.debug_info
        events = [e for e in audit if e.kind == "plugin.debug_info"]
        assert [e.details["version"] for e in events] == ["1.0.0", "1.1.0"]  # audited at every version
    finally:
        manager.close(timeout=10)
    debug_fp = engine_for(DEBUG).fingerprint
    assert [p for p in (tmp_path / "cache").glob("*.cwasm") if debug_fp in p.name] == []


def test_a_listed_plugins_background_load_writes_nothing_to_the_disk_cache(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's first load of a large module compiles in the background through its cache; for a plugin
    listed under [debug] that compile must stay in memory like every debug compile (a serialized copy
    would hold the breakpoints gdb patched in when the code was registered)."""
    from sandbus.host.sandbox import cache as cache_mod
    from tests.host.manager.factory import wait_until

    monkeypatch.setattr(cache_mod, "IN_PROCESS_BELOW", 0)  # every module counts as large: the background path
    monkeypatch.setattr(compiler_mod, "IN_PROCESS_BELOW", 0)
    pdir = tmp_path / "plugins"
    pdir.mkdir()
    write_plugin(pdir, "listed")
    (tmp_path / "policy.toml").write_text('[debug]\nplugins = ["listed"]\n')
    manager = PluginManager(pdir, policy=load_policy(tmp_path / "policy.toml"), cache=ModuleCache(tmp_path / "cache"))
    try:
        manager.discover_and_load(background=True)
        wait_until(lambda: not manager.loading(), timeout=60, what="the background load")
        assert manager.execute_json("listed", "handle_request", {}) == {"reply": "listed-1.0.0"}
        assert manager.grant("listed").limits.debug_info
    finally:
        manager.close(timeout=10)
    debug_fp = engine_for(DEBUG).fingerprint
    assert [p.name for p in (tmp_path / "cache").glob("*.cwasm") if debug_fp in p.name] == []


def unique_module(wasm: Path, tmp_path: Path) -> Path:
    """``wasm`` with a custom section of random bytes: the same code under a digest no other test loaded."""
    import os

    payload = b"\x05probe" + os.urandom(16)
    out = tmp_path / "unique.wasm"
    out.write_bytes(wasm.read_bytes() + b"\x00" + bytes([len(payload)]) + payload)
    return out


def test_debug_code_leaves_memory_with_its_last_sandbox(debug_guest: Path, tmp_path: Path) -> None:
    """The process-wide debug cache lets go of a module's code when no sandbox uses it any more: a node
    reloading a [debug] plugin (each version compiled with debug info) does not keep every version."""
    wasm = unique_module(debug_guest, tmp_path)
    cache = debug_cache()
    compiles = cache.compiles
    first = Sandbox(wasm, limits=DEBUG)
    second = Sandbox(wasm, limits=DEBUG)  # while the first lives: from memory
    assert cache.compiles == compiles + 1
    first.close()
    third = Sandbox(wasm, limits=DEBUG)  # the second still holds it: still from memory
    assert cache.compiles == compiles + 1
    second.close()
    third.close()
    again = Sandbox(wasm, limits=DEBUG)  # nobody held it: it was dropped, so compiled again
    assert cache.compiles == compiles + 2
    again.close()
