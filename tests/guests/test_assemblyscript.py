"""The AssemblyScript guest SDK (sdk/guest/assemblyscript) and its example plugin plugins/as_echo, built from
source by plugins/build.sh and run in the real sandbox."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import orjson
import pytest
import wasmtime

from sandbus.host.sandbox import Limits, Sandbox, SandboxBuilder
from sandbus.sdk.errors import (
    ExecutionTimeoutError,
    MemoryLimitError,
    OutOfFuelError,
    SecurityViolationError,
    TrapError,
)
from sandbus.sdk.testing import PluginHarness
from tests.conftest import ROOT, AuditLog

ASC = ROOT / "sdk" / "guest" / "assemblyscript" / "node_modules" / ".bin" / "asc"


@pytest.fixture(scope="module")
def as_echo(plugins_dir: Path) -> Path:
    path = plugins_dir / "as_echo.wasm"
    assert path.exists(), "plugins/build.sh did not build as_echo (node/npm missing?)"
    return path


@pytest.fixture(scope="module")
def adversary(plugins_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guests/as/adversary.ts, compiled with the compiler build.sh installed for the SDK."""
    assert ASC.exists(), f"{ASC} is missing: plugins/build.sh installs it (npm ci in sdk/guest/assemblyscript)"
    out = tmp_path_factory.mktemp("as") / "adversary.wasm"
    subprocess.run([str(ASC), "tests/guests/as/adversary.ts", "-o", str(out), "-O3", "--runtime", "minimal",
                    "--use", "abort=sdk/guest/assemblyscript/assembly/index/sandbusAbort"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def requester(plugins_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/guests/as/requester.ts with a manifest granting requests to "pricing" and a policy allowing them."""
    assert ASC.exists(), f"{ASC} is missing: plugins/build.sh installs it (npm ci in sdk/guest/assemblyscript)"
    d = tmp_path_factory.mktemp("as-requester")
    out = d / "requester.wasm"
    subprocess.run([str(ASC), "tests/guests/as/requester.ts", "-o", str(out), "-O3", "--runtime", "minimal",
                    "--use", "abort=sdk/guest/assemblyscript/assembly/index/sandbusAbort"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    (d / "requester.toml").write_text('[plugin]\nname = "requester"\nversion = "1.0.0"\n'
                                      '[capabilities]\nrequired = ["compute", "messaging"]\n'
                                      '[permissions]\nrequest_plugins = ["pricing"]\n')
    (d / "policy.toml").write_text('[capabilities]\nallowed = ["compute", "messaging"]\n'
                                   '[messaging]\nrequest_plugins = ["pricing"]\n')
    return out


def test_module_passes_the_abi_check_and_imports_only_sandbus_v1(as_echo: Path) -> None:
    module = wasmtime.Module(wasmtime.Engine(), as_echo.read_bytes())
    assert {i.module for i in module.imports} == {"sandbus_v1"}  # no env.abort
    exports = {e.name for e in module.exports}
    assert {"memory", "sandbus_abi_version", "sandbus_alloc", "sandbus_dealloc"} <= exports
    with Sandbox(as_echo) as sb:
        assert sb.kind == "module"
        assert sb.functions == ("echo", "env", "handle_request", "now", "spin")


def test_echo_and_envelope(as_echo: Path) -> None:
    with Sandbox(as_echo) as sb:
        assert sb.call_bytes("echo", b'{"a": [1, 2]}') == b'{"a": [1, 2]}'
        request = {"text": 'quote " backslash \\ tab \t nul \u0000 é 😀', "n": [1, 2.5e3, None, True]}
        assert sb.call("handle_request", request) == {"success": True, "result": {"echo": request},
                                                      "error": None}
        bad = orjson.loads(sb.call_bytes("handle_request", b'{"a": '))
        assert bad == {"success": False, "result": None, "error": "invalid JSON: malformed JSON"}
        assert orjson.loads(sb.call_bytes("handle_request", b'{"a": 1} x'))["error"] == \
            "invalid JSON: trailing data after JSON value"
        assert orjson.loads(sb.call_bytes("handle_request", b""))["error"] == "invalid JSON: empty input"


def test_json_reader_decodes_escaped_keys_and_values(as_echo: Path) -> None:
    # env looks up "name" with jsonGetString: the key and the value arrive escaped.
    with SandboxBuilder(as_echo).allow_env("MY_VAR", 'v"1\n😀').build() as sb:
        reply = sb.call_bytes("env", b'{"other": {"name": 1}, "n\\u0061me": "MY_\\u0056AR"}')
        assert orjson.loads(reply)["result"] == {"name": "MY_VAR", "value": 'v"1\n😀'}


def test_memory_stays_bounded_over_many_calls(as_echo: Path) -> None:
    big = orjson.dumps({"x": "y" * 200_000})
    with Sandbox(as_echo, limits=Limits(memory_bytes=16 * 1024 * 1024)) as sb:
        first = sb.call_detailed("handle_request", big).memory_bytes
        for _ in range(200):  # 200 x 400 KB of garbage per call would be 80 MB without the collection
            sb.call_bytes("handle_request", big)
        assert sb.call_detailed("handle_request", big).memory_bytes == first
        assert sb.pool.replaced == 0


def test_fuel_limit(as_echo: Path, audit: AuditLog) -> None:
    with Sandbox(as_echo, limits=Limits(fuel=1_000_000), on_audit=audit) as sb:
        with pytest.raises(OutOfFuelError):
            sb.call("spin", {"iterations": 10**12})
        assert "limit.fuel" in audit.kinds()
        assert sb.call("spin", {"iterations": 10})["result"]["iterations"] == 10  # a fresh instance
        assert sb.pool.replaced == 1


def test_timeout(as_echo: Path, audit: AuditLog) -> None:
    with Sandbox(as_echo, limits=Limits(timeout_s=0.05, fuel=None), on_audit=audit) as sb:
        with pytest.raises(ExecutionTimeoutError):
            sb.call("spin", {"iterations": 10**15})
        assert "limit.timeout" in audit.kinds()


def test_denied_capabilities(as_echo: Path, audit: AuditLog) -> None:
    with Sandbox(as_echo, on_audit=audit) as sb:
        with pytest.raises(SecurityViolationError, match="clock"):
            sb.call("now", {})
        with pytest.raises(SecurityViolationError, match="HOME"):
            sb.call("env", {"name": "HOME"})
    assert audit.kinds() == ["security.capability_denied", "security.env_denied"]
    with SandboxBuilder(as_echo).allow_clock().build() as sb:
        assert sb.call("now", {})["result"]["now_ms"] > 1_600_000_000_000


def test_uncaught_throw_is_logged_and_traps(adversary: Path, caplog: pytest.LogCaptureFixture) -> None:
    with (Sandbox(adversary) as sb, caplog.at_level(logging.ERROR, logger="sandbus.plugin"),
          pytest.raises(TrapError, match="unreachable")):
        sb.call("boom", "why")
    assert any("abort: boom: \"why\" at tests/guests/as/adversary.ts" in r.getMessage() for r in caplog.records)


def test_memory_limit(adversary: Path, audit: AuditLog) -> None:
    with (Sandbox(adversary, limits=Limits(memory_bytes=8 * 1024 * 1024), on_audit=audit) as sb,
          pytest.raises(MemoryLimitError)):
        sb.call("hog", {})
    assert "limit.memory" in audit.kinds()


def test_request_returns_the_reply_or_the_error(requester: Path) -> None:
    with PluginHarness(requester, policy=requester.parent / "policy.toml") as plugin:
        long = {"text": "é" * 2000}  # above the SDK's first 1 KiB buffer: fetched again with take_result
        plugin.on_request("pricing.quote", lambda request: {"quoted": request})
        assert plugin.call("handle_request", {"target": "pricing.quote", "payload": long}) == \
            {"status": 0, "ok": True, "body": {"quoted": long}}
        reply = plugin.call("handle_request", {"target": "pricing.other", "payload": {}})  # no stub
        assert (reply["status"], reply["ok"], reply["body"]["code"]) == (-2, False, "plugin.not_found")
        plugin.expect_error(SecurityViolationError, "handle_request", {"target": "billing", "payload": {}})
        assert plugin.audit.kinds() == ["security.request_denied"]


def test_globals_survive_the_collection_in_sandbus_alloc(adversary: Path) -> None:
    with Sandbox(adversary) as sb:
        replies = [sb.call("count", "x") for _ in range(50)]
    assert [r["result"]["calls"] for r in replies] == list(range(1, 51))
    assert [r["result"]["kept"] for r in replies] == [3 * i for i in range(1, 51)]
