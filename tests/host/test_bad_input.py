"""A hostile plugin, one misbehaviour per export: each ends in its typed error and an audit event,
the host survives, and the next call on the same sandbox works."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import wasmtime

from sandbus.host.sandbox import MIB, AuditLevel, Limits, Sandbox
from sandbus.sdk.errors import (
    AbiViolationError,
    ExecutionTimeoutError,
    InvalidModuleError,
    MemoryLimitError,
    OutOfFuelError,
    PayloadTooLargeError,
    SandbusError,
    SecurityViolationError,
    StackLimitError,
    TrapError,
)
from tests.conftest import AuditLog

LIMITS = Limits(timeout_s=0.3, fuel=10**12, memory_bytes=4 * MIB, max_instances=1)


@pytest.fixture
def adversary(wat: Callable[[str], bytes], audit: AuditLog) -> Sandbox:
    return Sandbox(wat("adversary"), name="adversary", limits=LIMITS, on_audit=audit)


@pytest.mark.parametrize(
    ("function", "error", "kind", "level"),
    [
        ("loop_forever", ExecutionTimeoutError, "limit.timeout", AuditLevel.WARNING),
        ("grow_bomb", MemoryLimitError, "limit.memory", AuditLevel.WARNING),
        ("recurse", StackLimitError, "limit.stack", AuditLevel.WARNING),
        ("bad_ptr", AbiViolationError, "abi.violation", AuditLevel.WARNING),
        ("huge_len", PayloadTooLargeError, "limit.output_size", AuditLevel.WARNING),
        ("bad_json", AbiViolationError, "abi.bad_reply", AuditLevel.WARNING),
        ("spam_stdout", PayloadTooLargeError, "limit.log", AuditLevel.WARNING),
        ("open_file", SecurityViolationError, "security.fs_denied", AuditLevel.CRITICAL),
        ("get_env", SecurityViolationError, "security.env_denied", AuditLevel.CRITICAL),
        ("read_clock", SecurityViolationError, "security.capability_denied", AuditLevel.CRITICAL),
        ("log_oob", AbiViolationError, "abi.violation", AuditLevel.WARNING),
    ],
)
def test_misbehaviour_is_typed_audited_and_survivable(
    adversary: Sandbox, audit: AuditLog, function: str, error: type[SandbusError], kind: str, level: AuditLevel
) -> None:
    with pytest.raises(error) as info:
        adversary.call(function, {"x": 1})
    assert info.value.plugin == "adversary"
    assert kind in audit.kinds()
    event = next(e for e in audit if e.kind == kind)
    assert event.level == level
    assert event.plugin == "adversary"
    # The same sandbox (one instance at most) keeps serving.
    assert adversary.call("echo", {"after": function}) == {"after": function}


def test_trap_carries_backtrace(adversary: Sandbox) -> None:
    with pytest.raises(TrapError, match="unreachable") as info:
        adversary.call("trap", {})
    assert info.value.backtrace, "a trap should name the wasm frames"


def test_trapped_instance_is_replaced(adversary: Sandbox) -> None:
    with pytest.raises(TrapError):
        adversary.call("trap", {})
    assert adversary.pool.replaced == 1
    assert adversary.call("echo", [1]) == [1]


def test_huge_length_within_output_cap_is_a_bounds_error(wat: Callable[[str], bytes]) -> None:
    sb = Sandbox(wat("adversary"), name="adversary", limits=Limits(max_output_bytes=2**32))
    with pytest.raises(AbiViolationError, match="outside guest memory"):
        sb.call("huge_len", {})


def test_out_of_fuel(wat: Callable[[str], bytes], audit: AuditLog) -> None:
    sb = Sandbox(wat("adversary"), name="adversary", limits=Limits(fuel=100_000, timeout_s=10), on_audit=audit)
    with pytest.raises(OutOfFuelError, match="100000"):
        sb.call("loop_forever", {})
    assert "limit.fuel" in audit.kinds()
    assert sb.call("echo", 7) == 7


def test_input_above_limit_is_refused_before_the_guest_runs(wat: Callable[[str], bytes], audit: AuditLog) -> None:
    sb = Sandbox(wat("adversary"), name="adversary", limits=Limits(max_input_bytes=64), on_audit=audit)
    with pytest.raises(PayloadTooLargeError, match="input") as caught:
        sb.call("echo", "y" * 100)
    assert audit.kinds() == ["limit.input_size"]
    assert sb.pool.replaced == 0
    assert not caught.value.retryable  # a durable message this large is dead-lettered, not redelivered


def test_malformed_wasm_is_invalid_module() -> None:
    with pytest.raises(InvalidModuleError, match="not a valid WebAssembly module"):
        Sandbox(b"\x00asm\x01\x00\x00\x00garbage", name="broken")


def test_truncated_wasm_is_invalid_module(wat: Callable[[str], bytes]) -> None:
    wasm = wat("adversary")
    with pytest.raises(InvalidModuleError):
        Sandbox(wasm[: len(wasm) // 2], name="half")


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ('(module (memory (export "memory") 1) (func (export "sandbus_alloc") (param i32) (result i32) i32.const 0)'
         ' (func (export "f") (param i32 i32) (result i64) i64.const 0))',
         AbiViolationError, "sandbus_abi_version"),
        ('(module (func (export "sandbus_abi_version") (result i32) i32.const 1))', AbiViolationError, "memory"),
        ('(module (memory (export "memory") 1) (func (export "sandbus_abi_version") (result i32) i32.const 1)'
         ' (func (export "sandbus_alloc") (param i32) (result i32) i32.const 0))',
         AbiViolationError, "no callable function"),
        ('(module (memory (export "memory") 1) (func (export "sandbus_abi_version") (result i64) i64.const 1)'
         ' (func (export "sandbus_alloc") (param i32) (result i32) i32.const 0)'
         ' (func (export "f") (param i32 i32) (result i64) i64.const 0))',
         AbiViolationError, "signature"),
        ('(module (memory (export "memory") 1) (func (export "sandbus_abi_version") (result i32) i32.const 2)'
         ' (func (export "sandbus_alloc") (param i32) (result i32) i32.const 0)'
         ' (func (export "f") (param i32 i32) (result i64) i64.const 0))',
         InvalidModuleError, "ABI version 2"),
        ('(module (import "sandbus_v1" "teleport" (func)) (memory (export "memory") 1)'
         ' (func (export "sandbus_abi_version") (result i32) i32.const 1)'
         ' (func (export "sandbus_alloc") (param i32) (result i32) i32.const 0)'
         ' (func (export "f") (param i32 i32) (result i64) i64.const 0))',
         InvalidModuleError, "sandbus_v1.teleport"),
        ('(module (memory (export "memory") 1000) (func (export "sandbus_abi_version") (result i32) i32.const 1)'
         ' (func (export "sandbus_alloc") (param i32) (result i32) i32.const 0)'
         ' (func (export "f") (param i32 i32) (result i64) i64.const 0))',
         MemoryLimitError, "initial memory"),
    ],
    ids=["no-version", "no-memory", "no-function", "bad-signature", "abi-v2", "unknown-import", "memory-too-big"],
)
def test_module_shape_errors(text: str, error: type[SandbusError], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        Sandbox(bytes(wasmtime.wat2wasm(text)), name="shape", limits=Limits(memory_bytes=16 * MIB))
    assert info.value.plugin == "shape"


def test_plugin_file_that_is_a_directory(tmp_path: Path) -> None:
    d = tmp_path / "dir.wasm"
    d.mkdir()
    with pytest.raises(InvalidModuleError, match="cannot read"):
        Sandbox(d)
