"""Hostile Extism plugins against the sandbox: the kernel's block table forged, host functions made to read
it, fuel and the clock ending a call inside a host function's kernel call, the kernel's own helpers imported,
and what a plugin may hold in the host's memory through its variables.

Every test names the behaviour it holds the host to; the plugins are WAT, built with the test prelude."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import pytest
import wasmtime

from sandbus.host.sandbox import Limits, Sandbox
from sandbus.host.sandbox.extism.hostfuncs import MAX_VARS
from sandbus.host.sandbox.instance import BudgetExceeded
from sandbus.sdk.errors import (
    AbiViolationError,
    ExecutionTimeoutError,
    GuestError,
    HostError,
    InvalidModuleError,
    MemoryLimitError,
    OutOfFuelError,
    PayloadTooLargeError,
    SandbusError,
)
from tests.conftest import AuditLog
from tests.host.extism.guests import plugin

ATTACKS = """
  ;; a forged header: the input block claims 4 GiB - 1 bytes, then the host is asked to read it
  (func $forge_input
    (call $store64 (i64.sub (call $ioff) (i64.const 8))
                   (i64.or (i64.const 0xffffffff) (i64.shl (i64.const 0x5ab0b10c) (i64.const 32)))))
  (func (export "forged_config") (result i32)
    (call $forge_input) (drop (call $config_get (call $ioff))) (i32.const 0))
  (func (export "forged_var") (result i32)
    (call $forge_input) (call $var_set (call $ioff) (call $ioff)) (i32.const 0))
  (func (export "forged_log") (result i32)
    (call $forge_input) (call $log_info (call $ioff)) (i32.const 0))
  (func (export "forged_error") (result i32)
    (call $forge_input) (call $eset (call $ioff)) (i32.const 1))
  (func (export "forged_output") (result i32)
    (call $forge_input) (call $oset (call $ioff) (i64.const 0xffffffff)) (i32.const 0))
  ;; the error block's header rewritten after error_set, before returning
  (func (export "error_then_forged") (result i32)
    (call $eset (call $ioff)) (call $forge_input) (i32.const 1))
  ;; the output's header rewritten after output_set: its length grows past the block
  (func (export "output_then_forged") (result i32)
    (call $oset (call $ioff) (call $ilen)) (call $forge_input) (i32.const 0))
  ;; a block header forged at the end of the heap, then freed: the kernel's top moves into a live block
  (func (export "forged_free") (result i32)
    (local $p i64)
    (local.set $p (call $alloc (i64.const 64)))
    (call $store64 (i64.add (local.get $p) (i64.const 24))
                   (i64.or (i64.const 32) (i64.shl (i64.const 0x5ab0b10c) (i64.const 32))))
    (call $free (i64.add (local.get $p) (i64.const 32)))
    (call $oset (call $ioff) (call $ilen)) (i32.const 0))
  ;; i64 offsets with high bits set: the same low 32 bits as a real block
  (func (export "high_bits_config") (result i32)
    (drop (call $config_get (i64.or (call $ioff) (i64.const 0x100000000)))) (i32.const 0))
  (func (export "high_bits_output") (result i32)
    (call $oset (i64.or (call $ioff) (i64.const 0x8000000000000000)) (call $ilen)) (i32.const 0))
  (func (export "negative_length") (result i32)
    (call $oset (call $ioff) (i64.const -1)) (i32.const 0))
  ;; config_get over and over: most of the fuel or time goes in the kernel calls the host makes
  (func (export "config_spin") (result i32)
    (local $k i64)
    (local.set $k (call $kstr (i32.const 0) (i32.const 5)))
    (loop $more (drop (call $config_get (local.get $k))) (br $more)) (i32.const 0))
  (func (export "var_get_spin") (result i32)
    (local $k i64)
    (local.set $k (call $kstr (i32.const 0) (i32.const 5)))
    (call $var_set (local.get $k) (local.get $k))
    (loop $more (drop (call $var_get (local.get $k))) (br $more)) (i32.const 0))
  (func $digit (param $i i64) (param $shift i64) (result i32)
    (i32.add (i32.const 48) (i32.wrap_i64 (i64.and (i64.shr_u (local.get $i) (local.get $shift)) (i64.const 63)))))
  ;; as many distinct one- to four-byte keys with empty values as the plugin can set
  (func (export "many_vars") (result i32)
    (local $k i64) (local $v i64) (local $i i64)
    (local.set $k (call $alloc (i64.const 4)))
    (local.set $v (call $alloc (i64.const 0)))
    (loop $more
      (call $store64 (i64.sub (local.get $k) (i64.const 8))
                     (i64.or (i64.const 4) (i64.shl (i64.const 0x5ab0b10c) (i64.const 32))))
      (call $store8 (local.get $k) (call $digit (local.get $i) (i64.const 0)))
      (call $store8 (i64.add (local.get $k) (i64.const 1)) (call $digit (local.get $i) (i64.const 6)))
      (call $store8 (i64.add (local.get $k) (i64.const 2)) (call $digit (local.get $i) (i64.const 12)))
      (call $store8 (i64.add (local.get $k) (i64.const 3)) (i32.const 65))
      (call $var_set (local.get $k) (local.get $v))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $more))
    (i32.const 0))
  ;; the kernel memory filled to the limit, then a config value asked for
  (func (export "full_then_config") (result i32)
    (local $k i64)
    (local.set $k (call $kstr (i32.const 0) (i32.const 5)))
    (block $full (loop $more
      (br_if $full (i64.eqz (call $alloc (i64.const 65536))))
      (br $more)))
    (i32.const 0))
  ;; the plugin's own memory grown to near the limit during the call, then a kernel block of 1 MiB; and
  ;; the other way round
  (func (export "grow_then_alloc") (result i32)
    (drop (memory.grow (i32.const 30))) (drop (call $alloc (i64.const 1048576))) (i32.const 0))
  (func (export "alloc_then_grow") (result i32)
    (drop (call $alloc (i64.const 1048576)))
    (if (i32.eq (memory.grow (i32.const 30)) (i32.const -1)) (then (return (i32.const 0))))
    (i32.const 0))
  (func (export "alloc_then_grow_then_fail") (result i32)
    (drop (call $alloc (i64.const 1048576))) (drop (memory.grow (i32.const 30))) (i32.const 1))
  (func (export "http_state_first") (result i32)
    (local $p i64)
    (local.set $p (call $alloc (i64.const 1)))
    (call $store8 (local.get $p) (i32.add (i32.const 48) (call $http_status)))
    (call $oset (local.get $p) (i64.const 1)) (i32.const 0))
  ;; a million tiny blocks: the allocator's time per block must not grow with their number
  (func (export "tiny_allocs") (result i32)
    (local $i i32)
    (loop $more
      (drop (call $alloc (i64.const 1)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 1000000))))
    (i32.const 0))
"""


@pytest.fixture(scope="module")
def wasm() -> bytes:
    return plugin(ATTACKS)


@pytest.fixture
def sandbox(wasm: bytes, audit: AuditLog) -> Iterator[Sandbox]:
    sb = Sandbox(wasm, name="att", on_audit=audit, config={"count": "aeiou"},
                 limits=Limits(max_instances=1, max_var_bytes=1024, timeout_s=2, memory_bytes=8 * 1024 * 1024))
    yield sb
    sb.close()


def still_serves(sb: Sandbox) -> None:
    assert sb.call_bytes("echo", b"after") == b"after"


# -- a forged block table: the host never trusts a length past the kernel's top ------------------------


@pytest.mark.parametrize("function", ["forged_config", "forged_var", "forged_log", "forged_error",
                                      "forged_output", "high_bits_config", "high_bits_output",
                                      "negative_length"])
def test_a_forged_or_out_of_range_block_is_an_abi_violation(sandbox: Sandbox, audit: AuditLog,
                                                            function: str) -> None:
    with pytest.raises(AbiViolationError):
        sandbox.call_bytes(function, b"count")
    assert "abi.violation" in audit.kinds()
    still_serves(sandbox)


def test_an_error_block_forged_after_error_set_reads_as_freed(sandbox: Sandbox) -> None:
    with pytest.raises(GuestError, match="freed"):
        sandbox.call_bytes("error_then_forged", b"count")
    still_serves(sandbox)


def test_an_output_forged_after_output_set_keeps_its_set_length(sandbox: Sandbox) -> None:
    """output_set's length was checked when it was set; a longer header afterwards names no live block."""
    with pytest.raises(AbiViolationError, match="freed"):
        sandbox.call_bytes("output_then_forged", b"count")
    still_serves(sandbox)


def test_freeing_a_forged_block_only_moves_the_plugins_own_heap(sandbox: Sandbox) -> None:
    assert sandbox.call_bytes("forged_free", b"input") == b"input"
    still_serves(sandbox)


# -- the call's limits end a call inside a host function's kernel call as anywhere else --------------


PATHS = [(True, True), (True, False), (False, False)]


@pytest.mark.parametrize("fuel", range(20_000, 20_400, 37))
@pytest.mark.parametrize("function", ["config_spin", "var_get_spin"])
@pytest.mark.parametrize(("fast", "native"), PATHS)
def test_fuel_running_out_inside_a_host_functions_kernel_call_is_out_of_fuel(
        wasm: bytes, audit: AuditLog, caplog: pytest.LogCaptureFixture, function: str, fuel: int, fast: bool,
        native: bool) -> None:
    """Fuel is spent in the kernel calls a host function makes too: running out there is the fuel limit
    (audited as one), never a host function's failure logged with a traceback."""
    with Sandbox(wasm, name="att", on_audit=audit, config={"count": "aeiou"}, fast=fast, native=native,
                 limits=Limits(fuel=fuel, max_instances=1)) as sb:
        with pytest.raises(OutOfFuelError):
            sb.call_bytes(function, b"")
        assert "limit.fuel" in audit.kinds()
        still_serves(sb)
    assert not [r for r in caplog.records if "host function" in r.getMessage()]


def test_the_timeout_inside_a_host_functions_kernel_call_is_a_timeout(wasm: bytes, audit: AuditLog,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    with Sandbox(wasm, name="att", on_audit=audit, config={"count": "aeiou"},
                 limits=Limits(fuel=None, timeout_s=0.05, max_instances=1)) as sb:
        for _ in range(5):
            with pytest.raises(ExecutionTimeoutError):
                sb.call_bytes("config_spin", b"")
        still_serves(sb)
    assert not [r for r in caplog.records if "host function" in r.getMessage()]


def test_a_budget_ending_inside_a_host_functions_kernel_call_is_budget_exceeded(wasm: bytes) -> None:
    """The node runs short calls on its loop with a budget and reruns the call elsewhere past it: the
    budget ending in a kernel call made by a host function must say so, not fail the call."""
    with Sandbox(wasm, name="att", config={"count": "aeiou"},
                 limits=Limits(fuel=None, timeout_s=5, max_instances=1)) as sb:
        if not sb.rerun_safe:
            pytest.skip("not rerun-safe")
        for _ in range(20):
            with pytest.raises(BudgetExceeded):
                sb.call_detailed("config_spin", b"", budget_s=0.02)


# -- memory and time a plugin can make the host spend -----------------------------------------------


def test_a_full_kernel_memory_refuses_a_host_written_block_with_the_memory_limit(sandbox: Sandbox,
                                                                                 audit: AuditLog) -> None:
    with pytest.raises(MemoryLimitError):
        sandbox.call_bytes("full_then_config", b"")
    still_serves(sandbox)


def test_many_tiny_variables_are_bounded_in_number(wasm: bytes) -> None:
    """A key of a few bytes with an empty value costs max_var_bytes four bytes but the host a dict entry, a
    str and a bytes object (~150 bytes): their number is capped as well as their bytes."""
    cap = 1024 * 1024
    with Sandbox(wasm, name="att", limits=Limits(max_var_bytes=cap, max_instances=1, fuel=None)) as sb:
        with pytest.raises(PayloadTooLargeError, match="variables") as info:
            sb.call_bytes("many_vars", b"")
        assert info.value.details["limit"] == MAX_VARS
        still_serves(sb)


@pytest.mark.parametrize(("fast", "native"), PATHS)
@pytest.mark.parametrize("function", ["grow_then_alloc", "alloc_then_grow", "alloc_then_grow_then_fail"])
def test_the_kernel_and_a_plugin_growing_its_memory_mid_call_stay_within_one_limit(
        wasm: bytes, audit: AuditLog, function: str, fast: bool, native: bool) -> None:
    """memory_bytes is the instance's: the plugin's memory and the kernel's together. A plugin that grows its
    own memory during a call cannot then take the limit again in kernel blocks (the allocation fails), and a
    call that grew its memory past what the kernel already holds fails at its end (the instance, holding
    more than the limit, is dropped)."""
    limit = 2 * 1024 * 1024
    with Sandbox(wasm, name="att", on_audit=audit, fast=fast, native=native,
                 limits=Limits(memory_bytes=limit, max_instances=1)) as sb:
        with pytest.raises(MemoryLimitError):
            sb.call_bytes(function, b"")
        assert "limit.memory" in audit.kinds()
        still_serves(sb)


def test_a_million_tiny_blocks_take_constant_time_each(wasm: bytes) -> None:
    with Sandbox(wasm, name="att", limits=Limits(fuel=None, timeout_s=5, memory_bytes=64 * 1024 * 1024)) as sb:
        sb.call_bytes("tiny_allocs", b"")


def test_http_state_before_any_request_is_zero(sandbox: Sandbox) -> None:
    assert sandbox.call_bytes("http_state_first", b"") == b"0"


# -- the kernel's own helpers and memory are not the plugin's to import ------------------------------


@pytest.mark.parametrize("imp", [
    '(import "extism:host/env" "sandbus_begin" (func (param i64 i64) (result i64)))',
    '(import "extism:host/env" "sandbus_block" (func (param i64) (result i64)))',
    '(import "extism:host/env" "sandbus_output" (func (result i64)))',
    '(import "extism:host/env" "memory" (memory 1))',
    '(import "sandbus:kernel" "fail" (func (param i32 i64 i64)))',
    '(import "sandbus:kernel" "room" (func (result i64)))',
    '(import "extism:host/env" "reset" (func (param i64)))',
    '(import "extism:host/env" "var_get" (func (param i32) (result i64)))',
    '(import "extism:host/env" "http_status_code" (func (result i64)))',
    '(import "sandbus:extism-plugin" "echo" (func (result i32)))',
    '(import "extism:host/env" "alloc" (memory 1))',
    '(import "extism:host/env" "alloc" (func (param i32) (result i32)))',
    '(import "extism:host/env" "config_get" (global i64))',
])
def test_the_kernels_helpers_and_memory_cannot_be_imported(imp: str) -> None:
    with pytest.raises(InvalidModuleError):
        Sandbox(plugin("", imports=imp), name="att").close()


def test_a_memory64_plugin_is_refused_at_load() -> None:
    wat = """(module
      (import "extism:host/env" "output_set" (func $oset (param i64 i64)))
      (memory (export "memory") i64 1)
      (func (export "empty") (result i32) (i32.const 0)))"""
    with pytest.raises(InvalidModuleError, match="memory64"):
        Sandbox(bytes(wasmtime.wat2wasm(wat)), name="att").close()


def test_a_plugin_memory_of_zero_pages_serves(audit: AuditLog) -> None:
    wat = """(module
      (import "extism:host/env" "input_offset" (func $ioff (result i64)))
      (import "extism:host/env" "input_length" (func $ilen (result i64)))
      (import "extism:host/env" "output_set" (func $oset (param i64 i64)))
      (memory (export "memory") 0)
      (func (export "echo") (result i32) (call $oset (call $ioff) (call $ilen)) (i32.const 0)))"""
    with Sandbox(bytes(wasmtime.wat2wasm(wat)), name="att", on_audit=audit) as sb:
        assert sb.call_bytes("echo", b"zero") == b"zero"


@pytest.mark.parametrize(("export", "start"), [('(export "_initialize")', ""), ("", "(start $init)")])
def test_code_before_the_first_call_allocates_within_the_limit_less_the_plugins_memory(audit: AuditLog,
                                                                                       export: str, start: str) -> None:
    """Before any call, the kernel's cap is already the memory limit less the plugin's own memory (nothing
    at all in a start function, before the instance is set up): code that runs before the first call cannot
    take the limit twice over (nor, at a 4 GiB limit, wrap the heap)."""
    limit = 1024 * 1024
    wat = f"""(module
      (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
      (import "extism:host/env" "output_set" (func $oset (param i64 i64)))
      (memory (export "memory") 1)
      (func $init {export} (drop (call $alloc (i64.const {limit - 32 * 1024}))))
      {start}
      (func (export "empty") (result i32) (i32.const 0)))"""
    with pytest.raises(MemoryLimitError), \
            Sandbox(bytes(wasmtime.wat2wasm(wat)), name="att", on_audit=audit,
                    limits=Limits(memory_bytes=limit)) as sb:
        sb.call_bytes("empty", b"")


# -- the node's http_request: what a plugin sends is bounded as a whole -------------------------------------


def test_an_extism_http_request_and_its_body_share_one_request_cap() -> None:
    """The request JSON and the body are two blocks, bounded together by the node's HTTP request cap (as
    ``sandbus_v1.http_request``'s one buffer is), before any of it is sent."""
    from sandbus.host.node.hostfuncs import BusBridge
    from sandbus.host.sandbox import Capabilities

    cap = 4096
    bridge = BusBridge(http_max_request=cap)
    wat = """
      (func (export "post") (result i32)
        (local $body i64)
        (local.set $body (call $alloc (i64.const 4000)))
        (drop (call $http (call $ioff) (local.get $body))) (i32.const 0))"""
    request = b'{"url": "http://example.com/", "method": "POST", "headers": {"x": "' + b"y" * 200 + b'"}}'
    with Sandbox(plugin(wat), name="att", host_functions=bridge.host_functions(),
                 capabilities=Capabilities(extra=frozenset({"network"}))) as sb:
        with pytest.raises(PayloadTooLargeError) as caught:
            sb.call_bytes("post", request)
        assert caught.value.details["limit"] == cap


def test_at_a_4_gib_limit_the_kernel_heap_ends_below_4_gib_and_never_wraps(audit: AuditLog) -> None:
    """The kernel's top is an i32: at a 4 GiB memory limit the heap fills to 0xffff0000 exactly (the input's
    header, then 2 GiB, then the rest) and the next block, even an empty one, is the memory limit -- not a
    top wrapped to 0 that hands out blocks over the reserved bytes. (Untouched pages cost no memory.)"""
    wat = """
      (func (export "fill") (result i32)
        (drop (call $alloc (i64.const 0x80000000)))
        (drop (call $alloc (i64.const 0x7ffeffd8)))
        (call $store64 (i64.const 0xfffefff8) (i64.const 7))
        (drop (call $alloc (i64.const 0)))
        (i32.const 0))"""
    with Sandbox(plugin(wat), name="att", on_audit=audit, limits=Limits(memory_bytes=1 << 32, max_instances=1)) as sb:
        with pytest.raises(MemoryLimitError, match=r"alloc\(0\)"):
            sb.call_bytes("fill", b"")
        still_serves(sb)


# -- random programs against the kernel and the host functions ----------------------------------------------

#: A plugin that runs its input as a program: 17-byte steps [op u8][a i64][b i64], where a or b of -1 is the
#: last result and a of -2 is the last result plus b (so that real blocks, and bytes next to them, are hit).
INTERPRETER = """
  (func (export "run") (result i32)
    (local $pc i64) (local $n i64) (local $op i32) (local $a i64) (local $b i64) (local $r i64)
    (local.set $n (call $ilen))
    (block $done (loop $next
      (br_if $done (i64.gt_u (i64.add (local.get $pc) (i64.const 17)) (local.get $n)))
      (local.set $op (call $iload8 (local.get $pc)))
      (local.set $a (call $iload64 (i64.add (local.get $pc) (i64.const 1))))
      (local.set $b (call $iload64 (i64.add (local.get $pc) (i64.const 9))))
      (local.set $pc (i64.add (local.get $pc) (i64.const 17)))
      (if (i64.eq (local.get $b) (i64.const -1)) (then (local.set $b (local.get $r))))
      (if (i64.eq (local.get $a) (i64.const -1)) (then (local.set $a (local.get $r))))
      (if (i64.eq (local.get $a) (i64.const -2)) (then (local.set $a (i64.add (local.get $r) (local.get $b)))))
      (block $step
        (block $c13 (block $c12 (block $c11 (block $c10 (block $c9 (block $c8 (block $c7 (block $c6
        (block $c5 (block $c4 (block $c3 (block $c2 (block $c1 (block $c0
          (br_table $c0 $c1 $c2 $c3 $c4 $c5 $c6 $c7 $c8 $c9 $c10 $c11 $c12 $c13 $step (local.get $op)))
          (local.set $r (call $alloc (i64.and (local.get $a) (i64.const 0xfffff)))) (br $step))
          (call $free (local.get $a)) (br $step))
          (call $store64 (local.get $a) (local.get $b)) (br $step))
          (call $store8 (local.get $a) (i32.wrap_i64 (local.get $b))) (br $step))
          (call $oset (local.get $a) (local.get $b)) (br $step))
          (call $eset (local.get $a)) (br $step))
          (local.set $r (call $config_get (local.get $a))) (br $step))
          (call $var_set (local.get $a) (local.get $b)) (br $step))
          (local.set $r (call $var_get (local.get $a))) (br $step))
          (call $log_info (local.get $a)) (br $step))
          (local.set $r (call $len (local.get $a))) (br $step))
          (local.set $r (call $load64 (local.get $a))) (br $step))
          (call $reset) (br $step))
        (return (i32.wrap_i64 (local.get $b))))
      (br $next)))
    (i32.const 0))
"""

_USED_TAG = 0x5AB0B10C << 32


def _program(rng: random.Random, steps: int) -> bytes:
    def value() -> int:
        kind = rng.randrange(9)
        if kind == 0:
            return -1
        if kind == 1:
            return rng.randrange(0, 4096)
        if kind == 2:
            return rng.randrange(16, 200_000) & ~7
        if kind == 3:
            return _USED_TAG | rng.choice([0, 1, 8, 4096, 0xFFFF, 0xFFFFFFFF, rng.randrange(1 << 32)])
        if kind == 4:
            return rng.choice([0, 1 << 32, (1 << 63) - 1, -(1 << 63), -8, 0xFFFFFFF0, 0xFFFF0000])
        if kind == 5:
            return rng.randrange(-(1 << 63), 1 << 63)
        return rng.randrange(0, 64)

    out = bytearray()
    for _ in range(steps):
        op = rng.choice([0, 0, 0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14])
        a = -2 if rng.random() < 0.3 else value()
        b = rng.choice([-8, -16, 0, 8, 16, 24]) if a == -2 else value()
        out += struct.pack("<Bqq", op, a, b)
    return bytes(out)


@pytest.mark.parametrize(("fast", "native"), PATHS)
def test_random_programs_end_in_a_reply_or_a_typed_error_and_the_sandbox_serves_on(audit: AuditLog, fast: bool,
                                                                                   native: bool) -> None:
    """Hundreds of random step sequences -- blocks allocated, freed, forged, overwritten, named as output,
    error, key, value or log line -- each end with a reply or a sandbus error of the plugin's making (never a
    HostError, never another exception), and the sandbox answers the next call."""
    rng = random.Random(20261203 + 10 * fast + native)
    wasm = plugin(INTERPRETER, imports='(import "extism:host/env" "reset" (func $reset))')
    outcomes: dict[str, int] = {}
    with Sandbox(wasm, name="att", on_audit=audit, config={"count": "aeiou"}, fast=fast, native=native,
                 limits=Limits(max_instances=1, max_var_bytes=4096, memory_bytes=4 * 1024 * 1024,
                               log_bytes=4096, timeout_s=5)) as sb:
        for _ in range(300):
            try:
                sb.call_bytes("run", _program(rng, rng.randrange(1, 40)))
                kind = "ok"
            except HostError:
                raise
            except SandbusError as e:
                kind = type(e).__name__
            outcomes[kind] = outcomes.get(kind, 0) + 1
            assert sb.call_bytes("echo", b"after") == b"after"
    assert outcomes.get("ok", 0) >= 5, outcomes
    assert outcomes.get("AbiViolationError", 0) > 10, outcomes


def test_fuel_running_out_in_a_kernel_call_during_initialize_is_out_of_fuel(audit: AuditLog) -> None:
    """Every fuel budget over a stretch of the loop: some end in the plugin, some in the kernel call its
    host function makes; all are the fuel limit."""
    wasm = plugin("""
      (func (export "_initialize")
        (local $k i64)
        (local.set $k (call $kstr (i32.const 0) (i32.const 5)))
        (loop $more (drop (call $var_get (local.get $k))) (br $more)))""")
    for fuel in range(20_030, 20_080):
        with pytest.raises(OutOfFuelError), \
                Sandbox(wasm, name="att", on_audit=audit, limits=Limits(fuel=fuel)) as sb:
            sb.call_bytes("echo", b"")
    assert "limit.fuel" in audit.kinds()
