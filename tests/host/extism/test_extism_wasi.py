"""An Extism plugin that imports WASI gets our WASI wiring unchanged: its output is logged under the log cap,
and what it was not granted (here: random bytes) is denied with an audit event."""

from __future__ import annotations

import logging

import pytest
import wasmtime

from sandbus.host.sandbox import Capabilities, Sandbox
from sandbus.sdk.errors import AbiViolationError, SecurityViolationError
from tests.conftest import AuditLog
from tests.host.extism.guests import plugin

IMPORTS = """
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
"""

FUNCTIONS = """
  (data (i32.const 64) "hello from wasi\\n")
  (func (export "say") (result i32)
    (i32.store (i32.const 100) (i32.const 64))
    (i32.store (i32.const 104) (i32.const 16))
    (drop (call $fd_write (i32.const 1) (i32.const 100) (i32.const 1) (i32.const 108)))
    (i32.const 0))
  (func (export "dice") (result i32)
    (drop (call $random_get (i32.const 200) (i32.const 8)))
    (i32.const 0))
"""


def test_stdout_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    with Sandbox(plugin(FUNCTIONS, imports=IMPORTS), name="wasi") as sb, \
            caplog.at_level(logging.INFO, logger="sandbus.plugin.wasi"):
        assert sb.call_bytes("say", b"") == b""
    assert any("[stdout] hello from wasi" in r.getMessage() for r in caplog.records)


def test_ungranted_wasi_is_denied_and_granted_wasi_works(audit: AuditLog) -> None:
    wasm = plugin(FUNCTIONS, imports=IMPORTS)
    with Sandbox(wasm, name="wasi", on_audit=audit) as sb:
        with pytest.raises(SecurityViolationError, match="random"):
            sb.call_bytes("dice", b"")
        assert "security.capability_denied" in audit.kinds()
        assert sb.call_bytes("echo", b"still") == b"still"
    with Sandbox(wasm, name="wasi", capabilities=Capabilities(random=True)) as sb:
        assert sb.call_bytes("dice", b"") == b""


def test_a_wasi_plugin_must_export_its_memory() -> None:
    bare = wasmtime.wat2wasm('(module (import "extism:host/env" "input_length" (func (result i64)))'
                             ' (import "wasi_snapshot_preview1" "random_get" (func (param i32 i32) (result i32)))'
                             ' (memory 1) (func (export "f") (result i32) (i32.const 0)))')
    with pytest.raises(AbiViolationError, match="memory"):
        Sandbox(bytes(bare), name="bare")
