"""Per-plugin overrides of every limit, the instance ceiling, and limits isolating plugins."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from sandbus.host.lifecycle.manifest import parse_manifest
from sandbus.host.lifecycle.policy import load_policy
from sandbus.host.sandbox import MIB, Limits, Sandbox
from sandbus.host.sandbox.config import MAX_WASM_STACK
from sandbus.sdk.errors import (
    ExecutionTimeoutError,
    InstanceLimitError,
    ManifestError,
    PolicyError,
    StackLimitError,
)
from tests.conftest import AuditLog


def test_defaults_are_sane() -> None:
    d = Limits()
    assert d.memory_bytes == 64 * MIB
    assert d.timeout_s == 5.0
    assert d.max_instances == 4


def test_timeout_override_is_honoured(wat: Callable[[str], bytes]) -> None:
    for timeout in (0.05, 0.4):
        sb = Sandbox(wat("adversary"), name="adv", limits=Limits(timeout_s=timeout, fuel=10**15))
        start = time.monotonic()
        with pytest.raises(ExecutionTimeoutError):
            sb.call("loop_forever", {})
        elapsed = time.monotonic() - start
        assert timeout <= elapsed < timeout + 0.5


def test_stack_override_changes_recursion_depth(wat: Callable[[str], bytes]) -> None:
    # Both overflow; a bigger stack burns more fuel before it does.
    used = []
    for stack in (128 * 1024, 1024 * 1024):
        sb = Sandbox(wat("adversary"), name="adv", limits=Limits(stack_bytes=stack, fuel=10**12))
        inst = sb.pool.acquire()
        with pytest.raises(StackLimitError, match=str(stack)):
            inst.call("recurse", b"{}")
        used.append(inst.ctx.stats.fuel_used)
        sb.pool.release(inst)
    assert used[1] > used[0] * 4


def test_instance_ceiling_refuses_when_all_busy(wat: Callable[[str], bytes], audit: AuditLog) -> None:
    sb = Sandbox(wat("adversary"), name="adv", on_audit=audit,
                 limits=Limits(timeout_s=2, fuel=10**15, max_instances=1), acquire_timeout_s=0.05)
    outcome: list[BaseException] = []

    def hog() -> None:
        try:
            sb.call("loop_forever", {})
        except ExecutionTimeoutError as e:
            outcome.append(e)

    t = threading.Thread(target=hog)
    t.start()
    deadline = time.monotonic() + 5
    while sb.pool.in_use == 0 and time.monotonic() < deadline:
        time.sleep(0.001)  # polling a condition with a bound, not a sleep standing in for one
    assert sb.pool.in_use == 1
    with pytest.raises(InstanceLimitError, match="1 instances stayed busy"):
        sb.call("echo", {})
    t.join(timeout=10)
    assert len(outcome) == 1
    assert sb.call("echo", {"free": True}) == {"free": True}


def test_a_looping_plugin_does_not_stall_another_plugin(wat: Callable[[str], bytes]) -> None:
    """ctypes releases the GIL inside wasm: a plugin burning its timeout on one thread leaves others running."""
    slow = Sandbox(wat("adversary"), name="slow", limits=Limits(timeout_s=1.5, fuel=10**15))
    fast = Sandbox(wat("adversary"), name="fast")
    outcome: list[BaseException] = []

    def hog() -> None:
        try:
            slow.call("loop_forever", {})
        except ExecutionTimeoutError as e:
            outcome.append(e)

    t = threading.Thread(target=hog)
    t.start()
    deadline = time.monotonic() + 5
    while slow.pool.in_use == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    for i in range(200):
        assert fast.call("echo", i) == i
    assert slow.pool.in_use == 1, "200 calls finished while the slow call was still running"
    t.join(timeout=10)
    assert len(outcome) == 1


def test_fuel_metering_can_be_turned_off_and_the_timeout_still_holds(wat: Callable[[str], bytes]) -> None:
    sb = Sandbox(wat("adversary"), name="adv", limits=Limits(fuel=None, timeout_s=0.1))
    result = sb.call_detailed("echo", b"[1]")
    assert result.reply == b"[1]"
    assert result.fuel_used == 0
    with pytest.raises(ExecutionTimeoutError):
        sb.call("loop_forever", {})
    metered = Sandbox(wat("adversary"), name="adv")
    assert metered.call_detailed("echo", b"[1]").fuel_used > 0


def test_a_short_budget_interrupts_without_a_timeout_error(wat: Callable[[str], bytes], audit: AuditLog) -> None:
    from sandbus.host.sandbox import BudgetExceeded

    sb = Sandbox(wat("adversary"), name="adv", limits=Limits(timeout_s=5, fuel=10**15), on_audit=audit)
    start = time.monotonic()
    with pytest.raises(BudgetExceeded):
        sb.call_detailed("loop_forever", b"{}", budget_s=0.02)
    assert time.monotonic() - start < 1.0, "interrupted at the budget, not at the 5 s timeout"
    assert audit.kinds() == [], "a budget interrupt is not a limit hit"
    assert sb.call_detailed("echo", b"[3]", budget_s=0.02).reply == b"[3]"


@pytest.mark.parametrize(("field", "above"), [
    ("memory_bytes", 4096 * MIB + 1), ("max_input_bytes", 2**64), ("max_output_bytes", 2**64),
    ("stack_bytes", MAX_WASM_STACK + 1), ("max_instances", 2**64), ("log_bytes", 2**64),
    ("table_elements", 2**32), ("max_module_bytes", 2**64), ("max_functions", 2**64),
    ("compile_timeout_s", float("inf")), ("compile_timeout_s", float("nan")), ("compile_memory_bytes", 2**64),
    ("fuel", 2**63), ("timeout_s", float("inf")),
])
def test_a_limit_beyond_what_the_host_can_hold_is_refused(field: str, above: float) -> None:
    """Above these, a value wrapped in the compiled helpers (a 2**64-byte output cap refused a 7-byte
    reply) or made wasmtime panic, which aborts the process (a stack above 2 MiB)."""
    with pytest.raises(ValidationError, match=field):
        Limits(**{field: above})


def test_the_largest_limits_still_run_a_call(plugins_dir: Path) -> None:
    limits = Limits(stack_bytes=MAX_WASM_STACK, memory_bytes=4096 * MIB, max_output_bytes=4096 * MIB,
                    max_input_bytes=4096 * MIB, fuel=2**63 - 1, timeout_s=1e9)
    with Sandbox(plugins_dir / "echo.wasm", limits=limits) as sb:
        assert sb.call("handle_request", {"a": 1}) == {"a": 1}


@pytest.mark.parametrize("line", ["timeout_seconds = nan", "timeout_seconds = inf", "max_fuel = 9223372036854775808",
                                  "memory_mb = 4097", "max_instances = 65537"])
def test_manifest_and_policy_values_beyond_the_limits_are_their_own_typed_errors(tmp_path: Path, line: str) -> None:
    """Never a pydantic error out of the policy's resolution: each file is bounded where it is read."""
    with pytest.raises(ManifestError, match=line.split()[0]):
        parse_manifest(f'[plugin]\nname = "x"\nversion = "1.0.0"\n[resources]\n{line}\n', expected_name="x")
    (tmp_path / "policy.toml").write_text(f"[limits]\n{line}\n")
    with pytest.raises(PolicyError, match=line.split()[0]):
        load_policy(tmp_path / "policy.toml")
