"""Per-plugin overrides of every limit, the instance ceiling, and limits isolating plugins."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from sandbus.host.sandbox import MIB, Limits, Sandbox
from sandbus.sdk.errors import ExecutionTimeoutError, InstanceLimitError, StackLimitError
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
