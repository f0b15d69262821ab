"""PluginHarness and the ``request`` host function: stubbed targets, recorded requests, the same permission
check as a node. The plugin is tests/bus/guests/caller.c (see its header for its functions)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbus.host.node.hostfuncs import REQUEST_ENOTFOUND, REQUEST_EREMOTE, REQUEST_ETIMEOUT
from sandbus.sdk.errors import (
    AbiViolationError,
    OutOfFuelError,
    PluginNotFoundError,
    RequestTimeoutError,
    SecurityViolationError,
)
from sandbus.sdk.testing import PluginFactory, PluginHarness, Requested

MANIFEST = """
[plugin]
name = "caller"
version = "1.0.0"
[capabilities]
required = ["compute", "messaging"]
[permissions]
request_plugins = ["text_processor.handle_request", "pricing", "audit.*"]
"""

POLICY = """
[capabilities]
allowed = ["compute", "messaging"]
[messaging]
request_plugins = ["text_processor", "pricing", "audit"]
"""


@pytest.fixture
def caller_dir(tmp_path: Path, c_guest_flags: Callable[..., Path]) -> Path:
    d = tmp_path / "caller"
    d.mkdir()
    (d / "caller.wasm").write_bytes(c_guest_flags("caller", "caller", '-DPLUGIN_NAME="caller"').read_bytes())
    (d / "caller.toml").write_text(MANIFEST)
    (tmp_path / "policy.toml").write_text(POLICY)
    return d


@pytest.fixture
def caller(sandbus_plugin: PluginFactory, caller_dir: Path) -> PluginHarness:
    return sandbus_plugin(caller_dir / "caller.wasm", policy=caller_dir.parent / "policy.toml")


def _ask(plugin: PluginHarness, target: str, payload: Any, function: str = "handle_request") -> Any:
    return plugin.call(function, {"target": target, "payload": payload})


def test_a_stub_answers_and_the_request_is_recorded(caller: PluginHarness) -> None:
    seen: list[Any] = []

    def text_processor(request: Any) -> Any:
        seen.append(request)
        return {"success": True, "result": {"words": len(request["text"].split())}, "error": None}

    caller.on_request("text_processor.handle_request", text_processor)
    reply = _ask(caller, "text_processor", {"text": "a b c"})  # "plugin" means its handle_request
    assert reply == {"status": 0, "body": {"success": True, "result": {"words": 3}, "error": None}}
    assert seen == [{"text": "a b c"}]
    assert caller.requested == [Requested("text_processor.handle_request", {"text": "a b c"})]
    long = "x" * 5000  # above the guest's first buffer: fetched again with take_result
    caller.on_request("pricing.quote", long)  # a value that is not callable is the reply to every request
    assert _ask(caller, "pricing.quote", {}) == {"status": 0, "body": long}
    raw = _ask(caller, "pricing.quote", {}, function="call_raw")
    assert raw == {"status": 0, "body": long, "prefix_ok": True}
    caller.clear()
    assert caller.requested == []


def test_the_most_specific_stub_wins(caller: PluginHarness) -> None:
    caller.on_request("*", "any")
    caller.on_request("audit.*", "audit, any function")
    caller.on_request("audit.write", "audit.write")
    caller.on_request("pricing", b'"pricing raw bytes"')
    assert _ask(caller, "audit.write", {})["body"] == "audit.write"
    assert _ask(caller, "audit.read", {})["body"] == "audit, any function"
    assert _ask(caller, "pricing.handle_request", {})["body"] == "pricing raw bytes"
    assert _ask(caller, "pricing.quote", {})["body"] == "any"


def test_errors_raised_by_stubs_are_the_outcomes_a_node_gives(caller: PluginHarness) -> None:
    def trapping(request: Any) -> Any:
        raise OutOfFuelError("ran out of fuel", plugin="pricing", limit=10)

    caller.on_request("pricing.fuel", trapping)
    reply = _ask(caller, "pricing.fuel", {})
    assert reply["status"] == REQUEST_EREMOTE
    assert reply["body"] == {"code": "limit.fuel", "message": "ran out of fuel", "plugin": "pricing",
                             "details": {"limit": 10}}

    def slow(request: Any) -> Any:
        raise RequestTimeoutError("no reply in time", plugin="pricing")

    caller.on_request("pricing.slow", slow)
    assert _ask(caller, "pricing.slow", {})["status"] == REQUEST_ETIMEOUT

    def gone(request: Any) -> Any:
        raise PluginNotFoundError("not here", plugin="pricing")

    caller.on_request("pricing.gone", gone)
    assert _ask(caller, "pricing.gone", {})["status"] == REQUEST_ENOTFOUND
    # No stub at all: as if no node served the target. The raw import writes nothing then.
    unstubbed = _ask(caller, "pricing.other", {}, function="call_raw")
    assert unstubbed["status"] == REQUEST_ENOTFOUND
    assert unstubbed["body"]["code"] == "plugin.not_found"
    assert unstubbed["prefix_ok"] is True


def test_an_ungranted_target_is_a_security_violation_even_with_a_stub(caller: PluginHarness) -> None:
    caller.on_request("billing", {"ok": True})
    caller.expect_error(SecurityViolationError, "handle_request", {"target": "billing", "payload": {}},
                        match=r"requesting 'billing.handle_request' was not granted")
    caller.expect_error(SecurityViolationError, "handle_request",
                        {"target": "text_processor.other", "payload": {}})
    assert caller.audit.kinds() == ["security.request_denied", "security.request_denied"]
    assert caller.requested == []


def test_without_messaging_the_request_is_denied(sandbus_plugin: PluginFactory, caller_dir: Path,
                                                 tmp_path: Path) -> None:
    (caller_dir / "caller.toml").write_text(MANIFEST.replace('required = ["compute", "messaging"]',
                                                             'required = ["compute"]\noptional = ["messaging"]'))
    plugin = sandbus_plugin(caller_dir / "caller.wasm")  # the default policy: compute only
    assert plugin.request_plugins == ()
    plugin.expect_error(SecurityViolationError, "handle_request", {"target": "pricing", "payload": {}},
                        match="needs the 'messaging' capability")
    assert plugin.audit.kinds() == ["security.capability_denied"]


def test_a_malformed_target_is_an_abi_violation(caller: PluginHarness) -> None:
    caller.on_request("*", {})
    caller.expect_error(AbiViolationError, "handle_request", {"target": "pricing.a.b", "payload": {}},
                        match="must be 'plugin' or 'plugin.function'")
    caller.expect_error(AbiViolationError, "handle_request", {"target": "pricing.", "payload": {}})
    with pytest.raises(ValueError, match="on_request"):
        caller.on_request("not a target", {})
