"""Registering host functions: custom namespace, memory access, capability gating, errors inside them."""

from __future__ import annotations

import pytest
import wasmtime

from sandbus.host.sandbox import CallContext, HostFunctions, Sandbox, SandboxBuilder
from sandbus.sdk.errors import HostError, InvalidModuleError, SecurityViolationError
from tests.conftest import ABI_PRELUDE, AuditLog

GUEST = """
(module
  (import "acme_v1" "shout" (func $shout (param i32 i32) (result i32)))
""" + ABI_PRELUDE + """
  ;; upper-cases the request in place through the host, returns it
  (func (export "handle_request") (param $p i32) (param $n i32) (result i64)
    (drop (call $shout (local.get $p) (local.get $n)))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.extend_i32_u (local.get $n)))))
"""


def shouting(capability: str | None = None, fail: bool = False) -> HostFunctions:
    funcs = HostFunctions()

    @funcs.register("shout", ["i32", "i32"], ["i32"], capability=capability, module="acme_v1")
    def shout(ctx: CallContext, ptr: int, length: int) -> int:
        if fail:
            raise RuntimeError("the host function broke")
        ctx.write(ptr, ctx.read(ptr, length).upper())
        return length

    return funcs


def test_custom_host_function_reads_and_writes_guest_memory() -> None:
    sb = Sandbox(bytes(wasmtime.wat2wasm(GUEST)), name="shouter", host_functions=shouting())
    assert sb.call("handle_request", "quiet please") == "QUIET PLEASE"


def test_capability_gated_host_function(audit: AuditLog) -> None:
    wasm = bytes(wasmtime.wat2wasm(GUEST))
    denied = Sandbox(wasm, name="shouter", host_functions=shouting("loudness"), on_audit=audit)
    with pytest.raises(SecurityViolationError, match="'loudness' capability"):
        denied.call("handle_request", "x")
    assert audit.kinds() == ["security.capability_denied"]
    allowed = SandboxBuilder(wasm, name="shouter").host_functions(shouting("loudness")).grant("loudness").build()
    assert allowed.call("handle_request", "x") == "X"


def test_failing_host_function_fails_the_call_not_the_host() -> None:
    sb = Sandbox(bytes(wasmtime.wat2wasm(GUEST)), name="shouter", host_functions=shouting(fail=True))
    with pytest.raises(HostError, match=r"acme_v1.shout failed: RuntimeError: the host function broke"):
        sb.call("handle_request", "x")
    assert sb.pool.replaced == 1
    assert Sandbox(bytes(wasmtime.wat2wasm(GUEST)), name="ok", host_functions=shouting()).call(
        "handle_request", "y") == "Y"


def test_missing_host_function_refuses_the_module() -> None:
    with pytest.raises(InvalidModuleError, match=r"acme_v1\.shout"):
        Sandbox(bytes(wasmtime.wat2wasm(GUEST)), name="shouter")


def test_wrong_host_function_type_refuses_the_module() -> None:
    funcs = HostFunctions()
    funcs.register("shout", ["i32"], ["i32"], module="acme_v1")(lambda ctx, a: a)
    with pytest.raises(InvalidModuleError, match="has type"):
        Sandbox(bytes(wasmtime.wat2wasm(GUEST)), name="shouter", host_functions=funcs)
