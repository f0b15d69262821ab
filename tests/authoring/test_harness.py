"""sandbus.sdk.testing.PluginHarness, tested with its own fixture: typed errors, audit, logs, policy, publish."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from sandbus.host.lifecycle.policy import Policy
from sandbus.host.sandbox import Capabilities, Limits
from sandbus.sdk.errors import (
    ExecutionTimeoutError,
    ManifestError,
    OutOfFuelError,
    PayloadTooLargeError,
    PluginNotFoundError,
    SecurityViolationError,
)
from sandbus.sdk.testing import PluginFactory, PluginHarness

CLOCK_AND_MESSAGING = Policy.model_validate({"capabilities": {"allowed": ["compute", "clock", "messaging"]},
                                             "messaging": {"publish_topics": ["probe.>"]}})


def test_calls_and_envelope(sandbus_plugin: PluginFactory, probe_project: Path) -> None:
    probe = sandbus_plugin(probe_project)
    assert probe.functions == ("announce", "chatty", "fail", "handle_request", "now", "spin")
    assert probe.call("handle_request", {"a": [1, 2]}) == {"success": True, "result": {"a": [1, 2]}, "error": None}
    assert probe.call_ok("handle_request", "x") == "x"
    assert probe.call_bytes("handle_request", b'{"raw":true}') == b'{"success":true,"result":{"raw":true},"error":null}'
    detailed = probe.call_detailed("handle_request", 1)
    assert detailed.json()["result"] == 1
    assert detailed.fuel_used > 0
    with pytest.raises(AssertionError, match="asked to fail"):
        probe.call_ok("fail")
    assert probe.health()


def test_manifest_resolved_against_the_default_policy(sandbus_plugin: PluginFactory, probe_project: Path) -> None:
    probe = sandbus_plugin(probe_project)
    assert probe.manifest is not None
    assert probe.manifest.name == "probe"
    # [resources] of the manifest, as a default node grants them
    assert probe.limits.fuel == 50_000_000
    assert probe.limits.timeout_s == 2.0
    assert probe.limits.max_instances == 2
    # optional clock and messaging: refused by the default policy, so not granted
    assert not probe.capabilities.clock
    assert not probe.capabilities.allows("messaging")


def test_denied_capability_is_a_security_violation(sandbus_plugin: PluginFactory, probe_project: Path) -> None:
    probe = sandbus_plugin(probe_project)
    err = probe.expect_error(SecurityViolationError, "now", match="clock")
    assert err.plugin == "probe"
    assert probe.audit.kinds() == ["security.capability_denied"]
    assert probe.audit[0].details["capability"] == "clock"


def test_policy_grants_what_it_allows(sandbus_plugin: PluginFactory, probe_project: Path, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text('[capabilities]\nallowed = ["compute", "clock"]\n')
    probe = sandbus_plugin(probe_project, policy=policy_file)
    assert isinstance(probe.call_ok("now"), int)
    assert probe.audit == []


def test_required_capability_refused_at_load(sandbus_plugin: PluginFactory, probe_project: Path,
                                             tmp_path: Path) -> None:
    manifest = tmp_path / "probe.toml"
    manifest.write_text((probe_project / "probe.toml").read_text().replace(
        'required = ["compute"]\noptional = ["clock", "messaging"]', 'required = ["compute", "clock", "messaging"]'))
    with pytest.raises(SecurityViolationError, match="requires capability 'clock'"):
        sandbus_plugin(probe_project, manifest=manifest)


def test_resource_limits_are_typed_errors(sandbus_plugin: PluginFactory, probe_project: Path) -> None:
    probe = sandbus_plugin(probe_project)
    err = probe.expect_error(OutOfFuelError, "spin")
    assert err.details["limit"] == 50_000_000
    unmetered = sandbus_plugin(probe_project, limits={"fuel": None, "timeout_s": 0.2})
    unmetered.expect_error(ExecutionTimeoutError, "spin")
    small = sandbus_plugin(probe_project, limits={"max_input_bytes": 16})
    small.expect_error(PayloadTooLargeError, "handle_request", "x" * 32)
    assert probe.audit.kinds() == ["limit.fuel"]
    assert unmetered.audit.kinds() == ["limit.timeout"]
    assert small.audit.kinds() == ["limit.input_size"]


def test_limits_and_capabilities_objects_replace_the_grant(sandbus_plugin: PluginFactory,
                                                           probe_project: Path) -> None:
    probe = sandbus_plugin(probe_project, limits=Limits(fuel=1_000_000), capabilities=Capabilities(clock=True))
    assert probe.limits.timeout_s == 5.0  # Limits() defaults, not the manifest's 2 s
    assert isinstance(probe.call_ok("now"), int)
    probe.expect_error(OutOfFuelError, "spin")


def test_expect_error_fails_the_test_when_the_error_differs(sandbus_plugin: PluginFactory,
                                                            probe_project: Path) -> None:
    probe = sandbus_plugin(probe_project)
    with pytest.raises(AssertionError, match="but it replied"):
        probe.expect_error(OutOfFuelError, "handle_request", {})
    with pytest.raises(AssertionError, match="got SecurityViolationError"):
        probe.expect_error(OutOfFuelError, "now")
    with pytest.raises(AssertionError, match="does not match"):
        probe.expect_error(SecurityViolationError, "now", match="nothing like this")


def test_logs_are_collected(sandbus_plugin: PluginFactory, probe_project: Path) -> None:
    probe = sandbus_plugin(probe_project)
    probe.call_ok("chatty")
    assert probe.log_messages() == ["probe: debug line", "probe: info line", "probe: warning line"]
    assert probe.log_messages(logging.WARNING) == ["probe: warning line"]
    assert [line.level_name for line in probe.logs] == ["DEBUG", "INFO", "WARNING"]
    probe.clear()
    assert probe.logs == []
    probe.close()
    assert logging.getLogger("sandbus.plugin.probe").level == logging.NOTSET  # restored


def test_publish_is_recorded_and_checked(sandbus_plugin: PluginFactory, probe_project: Path) -> None:
    denied = sandbus_plugin(probe_project)
    denied.expect_error(SecurityViolationError, "announce", {"topic": "probe.hello"}, match="messaging")
    probe = sandbus_plugin(probe_project, policy=CLOCK_AND_MESSAGING)
    assert probe.call_ok("announce", {"topic": "probe.hello"}) == "published"
    assert [(p.topic, p.payload) for p in probe.published] == [("probe.hello", {"from": "probe"})]
    probe.expect_error(SecurityViolationError, "announce", {"topic": "other.hello"}, match="not granted")
    assert probe.audit.kinds() == ["security.publish_denied"]


def test_config_reaches_init(sandbus_plugin: PluginFactory, tmp_path: Path) -> None:
    # text_processor logs the config it was started with
    from tests.conftest import PLUGINS_BUILD

    tp = sandbus_plugin(PLUGINS_BUILD / "text_processor.wasm", config={"mode": "test"})
    assert 'text_processor: init with config {"mode":"test"}' in tp.log_messages()


def test_without_manifest_defaults_apply(sandbus_plugin: PluginFactory, tmp_path: Path,
                                         plugins_dir: Path) -> None:
    lone = tmp_path / "lone.wasm"
    lone.write_bytes((plugins_dir / "echo.wasm").read_bytes())
    echo = sandbus_plugin(lone)
    assert echo.manifest is None
    assert echo.limits == Limits()
    assert echo.call("handle_request", {"x": 1}) == {"x": 1}
    with pytest.raises(ValueError, match="has none"):
        sandbus_plugin(lone, policy=Policy.default())
    assert sandbus_plugin(plugins_dir / "echo.wasm", manifest=False).manifest is None


def test_plugin_directory_with_one_module(sandbus_plugin: PluginFactory, tmp_path: Path, plugins_dir: Path) -> None:
    d = tmp_path / "one"
    d.mkdir()
    for ext in ("wasm", "toml"):
        (d / f"echo.{ext}").write_bytes((plugins_dir / f"echo.{ext}").read_bytes())
    echo = sandbus_plugin(d)
    assert echo.manifest is not None
    assert echo.limits.max_instances == 8
    with pytest.raises(PluginNotFoundError, match="exactly one"):
        sandbus_plugin(plugins_dir)


def test_load_errors(sandbus_plugin: PluginFactory, tmp_path: Path, plugins_dir: Path) -> None:
    with pytest.raises(PluginNotFoundError, match="no plugin file"):
        sandbus_plugin(tmp_path / "missing.wasm")
    bad = tmp_path / "echo.wasm"
    bad.write_bytes((plugins_dir / "echo.wasm").read_bytes())
    (tmp_path / "echo.toml").write_text('[plugin]\nname = "echo"\nversoin = "1.0.0"\n')
    with pytest.raises(ManifestError, match=r"\[plugin.version\]: required key 'version' is missing"):
        sandbus_plugin(bad)
    (tmp_path / "echo.toml").write_text('[plugin]\nname = "echo"\nversion = "1.0.0"\nsha256 = "' + "0" * 64 + '"\n')
    with pytest.raises(SecurityViolationError, match="sha256 mismatch"):
        sandbus_plugin(bad)


def test_unbuilt_project_without_build(sandbus_plugin: PluginFactory, tmp_path: Path, probe_project: Path) -> None:
    fresh = tmp_path / "probe"
    fresh.mkdir()
    for name in ("probe.c", "probe.toml"):
        (fresh / name).write_bytes((probe_project / name).read_bytes())
    with pytest.raises(PluginNotFoundError, match="run `sandbus build"):
        sandbus_plugin(fresh, build=False)


def test_context_manager_closes(probe_project: Path) -> None:
    with PluginHarness(probe_project) as probe:
        assert probe.call_ok("handle_request", 1) == 1
    assert "probe" in repr(probe)
    probe.close()  # idempotent


def test_importing_sdk_testing_does_not_load_wasmtime() -> None:
    code = ("import sys, sandbus, sandbus.sdk, sandbus.sdk.testing, sandbus.sdk.testing.pytest_plugin; "
            "assert 'wasmtime' not in sys.modules and 'sandbus.host' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
