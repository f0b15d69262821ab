"""The example plugins through every level of the Python API."""

from __future__ import annotations

import threading
from pathlib import Path

import orjson
import pytest

from sandbus.host.sandbox import Limits, Sandbox, SandboxBuilder, run_plugin
from sandbus.sdk.errors import AbiViolationError, PluginNotFoundError


def test_one_liner_runs_text_processor(plugins_dir: Path) -> None:
    reply = run_plugin(plugins_dir / "text_processor.wasm",
                       {"action": "process_data", "data": {"input": "hello world"}})
    assert reply == {"success": True, "result": {"processed": {"input": "hello world"}}, "error": None}


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        ({"action": "get_status"}, {"success": True, "result": {"status": "running"}, "error": None}),
        ({"action": "explode"}, {"success": False, "result": None, "error": "Unknown action: explode"}),
        ({"action": "process_data", "data": [1, "a\"b}", {"x": None}]},
         {"success": True, "result": {"processed": [1, "a\"b}", {"x": None}]}, "error": None}),
    ],
)
def test_text_processor_actions(plugins_dir: Path, request_: object, expected: object) -> None:
    with Sandbox(plugins_dir / "text_processor.wasm") as sb:
        assert sb.call("handle_request", request_) == expected


def test_builder_configures_limits_and_config(plugins_dir: Path) -> None:
    sb = (SandboxBuilder(plugins_dir / "text_processor.wasm").memory_mb(8).fuel(5_000_000).timeout(1.5)
          .instances(2).config(greeting="hi").build())
    with sb:
        assert sb.limits == Limits(memory_bytes=8 * 1024 * 1024, fuel=5_000_000, timeout_s=1.5, max_instances=2)
        assert sb.call("handle_request", {"action": "get_status"})["result"] == {"status": "running"}
        assert sb.health()


def test_echo_round_trips_large_payload_and_reports_stats(plugins_dir: Path) -> None:
    payload = orjson.dumps({"blob": "x" * 10_000, "n": list(range(100))})
    with Sandbox(plugins_dir / "echo.wasm") as sb:
        result = sb.call_detailed("handle_request", payload)
        assert result.reply == payload
        assert result.fuel_used > 0
        assert result.memory_bytes >= 65536


def test_pool_serves_concurrent_callers(plugins_dir: Path) -> None:
    errors: list[BaseException] = []
    with Sandbox(plugins_dir / "echo.wasm", limits=Limits(max_instances=3)) as sb:
        def worker(i: int) -> None:
            try:
                for j in range(200):
                    assert sb.call("handle_request", {"i": i, "j": j}) == {"i": i, "j": j}
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors
        assert sb.pool.size <= 3


def test_unknown_function_is_an_abi_error_and_lists_exports(plugins_dir: Path) -> None:
    with Sandbox(plugins_dir / "echo.wasm") as sb, pytest.raises(AbiViolationError, match="handle_request"):
        sb.call("nope", {})


def test_missing_file_is_plugin_not_found(tmp_path: Path) -> None:
    with pytest.raises(PluginNotFoundError, match="no plugin file"):
        Sandbox(tmp_path / "missing.wasm")


def test_an_instance_busy_at_close_is_shut_down_when_released(plugins_dir: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    sb = Sandbox(plugins_dir / "text_processor.wasm", limits=Limits(max_instances=2))
    busy = sb.pool.acquire()
    with caplog.at_level("INFO", logger="sandbus.plugin.text_processor"):
        sb.close()
        idle_shutdowns = sum("shutting down" in r.getMessage() for r in caplog.records)
        sb.pool.release(busy)
        all_shutdowns = sum("shutting down" in r.getMessage() for r in caplog.records)
    assert idle_shutdowns == 0  # the one warm instance was busy
    assert all_shutdowns == 1
    assert sb.pool.size == 0
