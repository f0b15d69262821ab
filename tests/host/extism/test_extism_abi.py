"""Extism plugins in the sandbox: the kernel ABI, config, variables, errors and logs, then every lie a
plugin can tell, each a typed error (with its audit event) after which the same Sandbox serves again."""

from __future__ import annotations

import gc
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import wasmtime

from sandbus.host.sandbox import CallContext, Capabilities, HostFunction, HostFunctions, Limits, Sandbox
from sandbus.host.sandbox.extism import ExtismInstance
from sandbus.host.sandbox.extism.hostfuncs import extism_invoker
from sandbus.host.sandbox.extism.kernel import KERNEL_IMPORTS
from sandbus.sdk.errors import (
    AbiViolationError,
    ExecutionTimeoutError,
    GuestError,
    InvalidModuleError,
    MemoryLimitError,
    OutOfFuelError,
    PayloadTooLargeError,
    SandbusError,
    SecurityViolationError,
)
from tests.conftest import AuditLog
from tests.host.extism.guests import FUNCTIONS, plugin


@pytest.fixture(scope="module")
def wasm() -> bytes:
    return plugin()


@pytest.fixture
def sandbox(wasm: bytes, audit: AuditLog) -> Iterator[Sandbox]:
    sb = Sandbox(wasm, name="ext", on_audit=audit, config={"greeting": "hello", "n": 3, "list": [1, "x"]},
                 limits=Limits(max_instances=1, max_var_bytes=64, timeout_s=2, memory_bytes=8 * 1024 * 1024))
    yield sb
    sb.close()


def still_serves(sb: Sandbox) -> None:
    assert sb.call_bytes("echo", b"after") == b"after"


# -- what works --------------------------------------------------------------------------------------


def test_an_extism_module_is_recognised_and_lists_its_callable_exports(sandbox: Sandbox) -> None:
    assert sandbox.kind == "extism"
    assert sandbox.body == "bytes"
    assert "echo" in sandbox.functions
    # reserved names and exports of another type are not callable functions
    for hidden in ("_start", "sandbus_hidden", "takes_args", "memory"):
        assert hidden not in sandbox.functions


@pytest.mark.parametrize("size", [0, 1, 7, 8, 100, 10_000, 300_000])
@pytest.mark.parametrize("function", ["echo", "copy_echo"])
def test_echo_returns_the_input_bytes(sandbox: Sandbox, function: str, size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    assert sandbox.call_bytes(function, data) == data


def test_replies_are_bytes_not_json(sandbox: Sandbox) -> None:
    assert sandbox.call_bytes("echo", b"\xff\x00not json") == b"\xff\x00not json"
    result = sandbox.call_detailed("echo", b"abc")
    assert result.reply == b"abc"
    assert result.memory_bytes >= 2 * 65536  # the plugin's memory and the kernel's


def test_every_path_agrees(wasm: bytes) -> None:
    """The compiled round trip, the ctypes path and the ordinary API give the same replies and errors."""
    for fast, native in ((True, True), (True, False), (False, False)):
        with Sandbox(wasm, name="ext", fast=fast, native=native, config={"greeting": "hi"}) as sb:
            assert sb.call_bytes("copy_echo", b"x" * 1001) == b"x" * 1001
            assert sb.call_bytes("config", b"greeting") == b"hi"
            with pytest.raises(GuestError, match="boom"):
                sb.call_bytes("fail", b"boom")
            with pytest.raises(AbiViolationError, match="output_set"):
                sb.call_bytes("output_freed", b"")
            with pytest.raises(PayloadTooLargeError):
                Sandbox(wasm, name="small", fast=fast, native=native,
                        limits=Limits(max_output_bytes=10)).call_bytes("echo", b"y" * 11)


def test_config_values_strings_as_is_others_as_json_absent_as_nothing(sandbox: Sandbox) -> None:
    assert sandbox.call_bytes("config", b"greeting") == b"hello"
    assert sandbox.call_bytes("config", b"n") == b"3"
    assert sandbox.call_bytes("config", b"list") == b'[1,"x"]'
    assert sandbox.call_bytes("config", b"absent") == b""


def test_vars_live_per_instance_across_calls(sandbox: Sandbox) -> None:
    assert sandbox.call_bytes("swap_var", b"one") == b""
    assert sandbox.call_bytes("swap_var", b"two") == b"one"
    assert sandbox.call_bytes("swap_var", b"three") == b"two"
    sandbox.call_bytes("clear_var", b"")
    assert sandbox.call_bytes("swap_var", b"four") == b""


def test_var_set_over_the_size_cap_is_a_typed_error_and_the_old_value_stays(sandbox: Sandbox,
                                                                             audit: AuditLog) -> None:
    assert sandbox.call_bytes("swap_var", b"small") == b""
    with pytest.raises(PayloadTooLargeError, match="max_var_bytes") as info:
        sandbox.call_bytes("swap_var", b"v" * 60)  # "count" + 60 bytes > 64
    assert info.value.details["limit"] == 64
    assert "limit.payload" in audit.kinds()
    still_serves(sandbox)


def test_vars_are_capped_in_total_not_per_value(wasm: bytes) -> None:
    with Sandbox(wasm, name="ext", limits=Limits(max_var_bytes=5 + 10)) as sb:
        sb.call_bytes("swap_var", b"0123456789")  # exactly at the cap
        assert sb.call_bytes("swap_var", b"abcdefghij") == b"0123456789"  # replacing frees the old value
        with pytest.raises(PayloadTooLargeError):
            sb.call_bytes("swap_var", b"abcdefghijk")


def test_a_non_zero_return_is_a_guest_error_with_the_plugins_message(sandbox: Sandbox) -> None:
    sandbox.call_bytes("swap_var", b"kept")
    with pytest.raises(GuestError) as info:
        sandbox.call_bytes("fail", b"it went wrong")
    err = info.value
    assert err.code == "sandbox.guest_error"
    assert err.message == "it went wrong"
    assert err.details == {"function": "fail", "return_code": 7}
    assert err.plugin == "ext"
    # The plugin finished: its instance (and its variables) stay in service.
    assert sandbox.call_bytes("swap_var", b"next") == b"kept"


def test_a_guest_error_message_is_escaped_and_bounded(sandbox: Sandbox) -> None:
    with pytest.raises(GuestError) as info:
        sandbox.call_bytes("fail", b"red \x1b[31m\nline")
    assert "\x1b" not in info.value.message
    assert "\n" not in info.value.message
    with pytest.raises(GuestError) as info:
        sandbox.call_bytes("fail", b"e" * 100_000)
    assert len(info.value.message) < 5000
    with pytest.raises(GuestError, match="returned -2 without setting an error") as info:
        sandbox.call_bytes("fail_silently", b"")
    assert info.value.details["return_code"] == -2


def test_log_lines_go_to_the_plugin_logger(sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sandbus.plugin.ext"):
        sandbox.call_bytes("log", b"hello\x1b[2J log")
    records = [r for r in caplog.records if r.name == "sandbus.plugin.ext"]
    assert [r.levelno for r in records] == [logging.INFO, logging.WARNING]
    assert all("hello" in r.getMessage() and "\x1b" not in r.getMessage() for r in records)


def test_log_lines_share_the_per_call_log_cap(wasm: bytes) -> None:
    with Sandbox(wasm, name="ext", limits=Limits(log_bytes=10)) as sb:
        with pytest.raises(PayloadTooLargeError, match="log"):
            sb.call_bytes("log", b"x" * 11)
        still_serves(sb)


def test_get_log_level_numbers_levels_as_extism_does(sandbox: Sandbox) -> None:
    logger = logging.getLogger("sandbus.plugin.ext")
    old = logger.level
    try:
        for level, number in ((5, b"0"), (logging.DEBUG, b"1"), (logging.INFO, b"2"), (logging.WARNING, b"3"),
                              (logging.ERROR, b"4")):
            logger.setLevel(level)
            assert sandbox.call_bytes("log_level", b"") == number
    finally:
        logger.setLevel(old)


def test_an_empty_output_is_empty(sandbox: Sandbox) -> None:
    assert sandbox.call_bytes("empty", b"ignored") == b""


# -- lies, each a typed error; the same sandbox serves the next call ------------------------------------


@pytest.mark.parametrize(("function", "import_name"), [
    ("load_far", "load_u64"),
    ("load_edge", "load_u64"),
    ("store_null", "store_u8"),
    ("store_far", "store_u64"),
    ("input_past_end", "input_load_u64"),
    ("output_too_long", "output_set"),
    ("output_nowhere", "output_set"),
    ("output_freed", "output_set"),
    ("free_after_output", "output_set"),
    ("error_nowhere", "error_set"),
    ("config_nowhere", "config_get"),
    ("var_set_nowhere", "var_set"),
    ("log_nowhere", "log_info"),
])
def test_a_lie_about_the_kernel_memory_is_an_abi_violation(sandbox: Sandbox, audit: AuditLog, function: str,
                                                          import_name: str) -> None:
    with pytest.raises(AbiViolationError, match=import_name) as info:
        sandbox.call_bytes(function, b"12345678abc")
    assert info.value.plugin == "ext"
    assert "abi.violation" in audit.kinds()
    still_serves(sandbox)


def test_the_output_cap_holds_before_the_output_is_read(wasm: bytes, audit: AuditLog) -> None:
    with Sandbox(wasm, name="ext", limits=Limits(max_output_bytes=100), on_audit=audit) as sb:
        assert sb.call_bytes("echo", b"z" * 100) == b"z" * 100
        with pytest.raises(PayloadTooLargeError):
            sb.call_bytes("echo", b"z" * 101)
        assert "limit.output_size" in audit.kinds()
        still_serves(sb)


@pytest.mark.parametrize("function", ["alloc_huge", "alloc_bomb"])
def test_allocating_past_the_memory_limit_is_a_memory_limit_error(sandbox: Sandbox, audit: AuditLog,
                                                                  function: str) -> None:
    with pytest.raises(MemoryLimitError, match="alloc"):
        sandbox.call_bytes(function, b"")
    assert "limit.memory" in audit.kinds()
    still_serves(sandbox)


def test_the_kernel_and_the_plugin_share_the_memory_limit(wasm: bytes) -> None:
    """An input the kernel cannot hold next to the plugin's own memory is refused at the limit."""
    limit = 1024 * 1024
    with Sandbox(wasm, name="ext", limits=Limits(memory_bytes=limit, max_input_bytes=limit)) as sb:
        with pytest.raises(MemoryLimitError):
            sb.call_bytes("echo", b"m" * (limit - 65536))  # plus the plugin's own 64 KiB page and headers
        assert sb.call_bytes("echo", b"m" * (limit // 2)) == b"m" * (limit // 2)


def test_an_endless_loop_ends_at_the_timeout(wasm: bytes, audit: AuditLog) -> None:
    with Sandbox(wasm, name="ext", limits=Limits(timeout_s=0.2, fuel=None), on_audit=audit) as sb:
        with pytest.raises(ExecutionTimeoutError):
            sb.call_bytes("spin", b"")
        assert "limit.timeout" in audit.kinds()
        still_serves(sb)


def test_fuel_runs_out(wasm: bytes, audit: AuditLog) -> None:
    with Sandbox(wasm, name="ext", limits=Limits(fuel=100_000), on_audit=audit) as sb:
        with pytest.raises(OutOfFuelError):
            sb.call_bytes("spin", b"")
        assert "limit.fuel" in audit.kinds()
        still_serves(sb)


def test_http_is_denied_without_the_network_capability(sandbox: Sandbox, audit: AuditLog) -> None:
    with pytest.raises(SecurityViolationError, match="network"):
        sandbox.call_bytes("http", b'{"url": "http://example.com"}')
    assert "security.capability_denied" in audit.kinds()
    still_serves(sandbox)


def test_http_in_a_plain_sandbox_is_denied_even_when_granted(wasm: bytes) -> None:
    with Sandbox(wasm, name="ext", capabilities=Capabilities(extra=frozenset({"network"}))) as sb:
        with pytest.raises(SecurityViolationError, match="no HTTP"):
            sb.call_bytes("http", b'{"url": "http://example.com"}')
        assert sb.rerun_safe is False
        still_serves(sb)


def test_an_unknown_function_is_the_same_error_as_for_our_own_plugins(sandbox: Sandbox) -> None:
    with pytest.raises(AbiViolationError, match="no function 'nope'"):
        sandbox.call_bytes("nope", b"")
    with pytest.raises(AbiViolationError, match="no function '_start'"):
        sandbox.call_bytes("_start", b"")


# -- refused at load ------------------------------------------------------------------------------------


def test_an_unknown_extism_import_is_refused_at_load_by_name(audit: AuditLog) -> None:
    bad = plugin(FUNCTIONS, imports='(import "extism:host/env" "frobnicate" (func (param i64)))')
    with pytest.raises(InvalidModuleError, match=r"extism:host/env\.frobnicate") as info:
        Sandbox(bad, name="bad", on_audit=audit)
    assert info.value.details["missing_import"] == "extism:host/env.frobnicate"
    assert "module.refused" in audit.kinds()


def test_an_extism_import_of_the_wrong_type_is_refused_at_load() -> None:
    bad = plugin(FUNCTIONS, imports='(import "extism:host/env" "var_get" (func (param i32) (result i32)))')
    with pytest.raises(InvalidModuleError, match="var_get"):
        Sandbox(bad, name="bad")


def test_an_unknown_import_elsewhere_is_refused_at_load() -> None:
    bad = plugin(FUNCTIONS, imports='(import "env" "abort" (func (param i32 i32 i32 i32)))')
    with pytest.raises(InvalidModuleError, match=r"env\.abort"):
        Sandbox(bad, name="bad")


def test_a_plugin_without_callable_exports_is_refused() -> None:
    bad = wasmtime.wat2wasm('(module (import "extism:host/env" "input_length" (func (result i64)))'
                            ' (func (export "run") (param i32) (result i32) (i32.const 0)))')
    with pytest.raises(AbiViolationError, match=r"\(\) -> i32"):
        Sandbox(bytes(bad), name="bad")


def test_per_call_isolation_gives_every_call_a_fresh_instance(wasm: bytes) -> None:
    with Sandbox(wasm, name="ext", limits=Limits(isolation="per-call", max_instances=1)) as sb:
        assert sb.call_bytes("swap_var", b"one") == b""
        assert sb.call_bytes("swap_var", b"two") == b""  # the variable went with the first call's instance
        assert sb.call_bytes("copy_echo", b"x" * 5000) == b"x" * 5000
        with pytest.raises(GuestError):
            sb.call_bytes("fail", b"no")
        still_serves(sb)
    with Sandbox(wasm, name="ext", limits=Limits(max_instances=1)) as pooled:
        pooled.call_bytes("swap_var", b"one")
        assert pooled.call_bytes("swap_var", b"two") == b"one"  # pooled: the same instance keeps it


def test_the_kernel_import_list_matches_the_kernel_exports() -> None:
    from sandbus.host.sandbox.engine import get_engine
    from sandbus.host.sandbox.extism.kernel import kernel_module

    module = kernel_module(get_engine(Limits().stack_bytes, fuel=True).engine)
    exports = {e.name: e.type for e in module.exports}
    for name, (params, results) in KERNEL_IMPORTS.items():
        ty = exports[name]
        assert isinstance(ty, wasmtime.FuncType)
        assert (tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results)) == (params, results), name


def test_every_error_is_a_sandbus_error(sandbox: Sandbox) -> None:
    for function in ("load_far", "fail", "alloc_huge", "output_freed"):
        with pytest.raises(SandbusError):
            sandbox.call_bytes(function, b"x")
    still_serves(sandbox)


# -- host functions an embedder adds --------------------------------------------------------------------

SHOUT_IMPORT = '(import "extism:host/user" "shout" (func $shout (param i64) (result i64)))'
SHOUT = FUNCTIONS + """
  (func (export "shout") (result i32)
    (local $p i64)
    (local.set $p (call $shout (call $ioff)))
    (call $oset (local.get $p) (call $len (local.get $p)))
    (i32.const 0))
"""


def test_an_embedders_host_function_in_extism_host_user_reads_and_returns_blocks() -> None:
    def shout(ctx: CallContext, off: int) -> int:
        inv = extism_invoker(ctx)
        return inv.alloc_bytes(inv.block(off, 1024, "shout").upper())

    funcs = HostFunctions()
    funcs.add(HostFunction("shout", ("i64",), ("i64",), shout, module="extism:host/user"))
    wasm = plugin(SHOUT, imports=SHOUT_IMPORT)
    with Sandbox(wasm, name="user", host_functions=funcs) as sb:
        assert sb.call_bytes("shout", b"quiet") == b"QUIET"
        with pytest.raises(PayloadTooLargeError, match="shout"):
            sb.call_bytes("shout", b"q" * 1025)
        assert sb.rerun_safe is False  # what an embedder's function does is unknown
        still_serves(sb)
    with pytest.raises(InvalidModuleError, match=r"extism:host/user\.shout"):
        Sandbox(wasm, name="user")


def test_retired_instances_are_freed(wasm: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing links an instance to itself through native code: a retired one (per call) is collected."""
    refs: list[weakref.ref[ExtismInstance]] = []
    original = ExtismInstance.__init__

    def tracked(self: ExtismInstance, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        refs.append(weakref.ref(self))

    monkeypatch.setattr(ExtismInstance, "__init__", tracked)
    with Sandbox(wasm, name="ext", limits=Limits(isolation="per-call", max_instances=1)) as sb:
        for _ in range(50):
            sb.call_bytes("swap_var", b"v" * 10)
    gc.collect()
    assert len(refs) >= 50
    assert [r for r in refs if r() is not None] == []


def test_calls_on_several_threads_each_get_their_own_output(wasm: bytes) -> None:
    errors: list[BaseException] = []
    with Sandbox(wasm, name="ext", limits=Limits(max_instances=3)) as sb:

        def work(tag: int) -> None:
            try:
                for i in range(200):
                    data = f"{tag}:{i}:".encode() * (1 + i % 50)
                    assert sb.call_bytes("copy_echo", data) == data
            except BaseException as e:  # reported below, on the test's thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert errors == []
