"""Test plugins made to order: a WAT module whose reply names its version, and its manifest.

Every generated module exports the lifecycle functions, so tests can see them being called:

* ``sandbus_init`` stores the config JSON (``config`` returns it) and logs ``init <reply>``; it
  returns ``init_status`` (non-zero: init fails);
* ``sandbus_health`` returns ``health`` (``sicken`` sets it to 1);
* ``sandbus_shutdown`` logs ``shutdown <reply>``;
* ``handle_request`` returns ``{"reply": "<reply>"}``; ``greeting`` returns the env var ``GREETING``
  as a JSON string; ``slow`` first calls the host function ``test.block`` (only with ``block``),
  which a test holds to keep a call in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
import wasmtime

from sandbus.host.sandbox import HostFunction, HostFunctions

__all__ = ["Gate", "plugin_manifest", "plugin_wasm", "replace_atomically", "wait_until", "wasm_reply", "write_plugin"]


def _wat_string(data: bytes) -> str:
    return '"' + "".join(f"\\{b:02x}" for b in data) + '"'


def wasm_reply(reply: str) -> dict[str, str]:
    """What ``handle_request`` of a plugin built with ``reply`` answers, decoded."""
    return {"reply": reply}


def plugin_wasm(reply: str, *, init_status: int = 0, health: int = 0, block: bool = False,
                pad: int = 0) -> bytes:
    """The module. ``pad`` appends a custom section of that many bytes (distinct digests, bigger files)."""
    answer = json.dumps(wasm_reply(reply), separators=(",", ":")).encode()
    init_msg, shutdown_msg = f"init {reply}".encode(), f"shutdown {reply}".encode()
    name = b"GREETING"
    packed = (16 << 32) | len(answer)
    block_import = '(import "test" "block" (func $block))' if block else ""
    block_call = "(call $block)" if block else ""
    wat = f"""
(module
  (import "sandbus_v1" "log" (func $log (param i32 i32 i32)))
  (import "sandbus_v1" "env_get" (func $env_get (param i32 i32 i32 i32) (result i32)))
  {block_import}
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 16384))
  (global $cfg_len (mut i32) (i32.const 0))
  (global $sick (mut i32) (i32.const {health}))
  (data (i32.const 16) {_wat_string(answer)})
  (data (i32.const 1024) {_wat_string(init_msg)})
  (data (i32.const 2048) {_wat_string(shutdown_msg)})
  (data (i32.const 3072) {_wat_string(name)})
  (data (i32.const 3199) "\\22")
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "sandbus_dealloc") (param i32 i32) (global.set $heap (i32.const 16384)))
  (func (export "handle_request") (param i32 i32) (result i64) (i64.const {packed}))
  (func (export "slow") (param i32 i32) (result i64) {block_call} (i64.const {packed}))
  (func (export "config") (param i32 i32) (result i64)
    (i64.or (i64.const {4096 << 32}) (i64.extend_i32_u (global.get $cfg_len))))
  (func (export "sicken") (param i32 i32) (result i64)
    (global.set $sick (i32.const 1)) (i64.const {packed}))
  (func (export "greeting") (param i32 i32) (result i64)
    (local $n i32)
    (local.set $n (call $env_get (i32.const 3072) (i32.const {len(name)}) (i32.const 3200) (i32.const 512)))
    (i32.store8 (i32.add (i32.const 3200) (local.get $n)) (i32.const 34))
    (i64.or (i64.const {3199 << 32}) (i64.extend_i32_u (i32.add (local.get $n) (i32.const 2)))))
  (func (export "sandbus_init") (param $p i32) (param $n i32) (result i32)
    (memory.copy (i32.const 4096) (local.get $p) (local.get $n))
    (global.set $cfg_len (local.get $n))
    (call $log (i32.const 2) (i32.const 1024) (i32.const {len(init_msg)}))
    (i32.const {init_status}))
  (func (export "sandbus_health") (result i32) (global.get $sick))
  (func (export "sandbus_shutdown")
    (call $log (i32.const 2) (i32.const 2048) (i32.const {len(shutdown_msg)})))
)
"""
    wasm = bytes(wasmtime.wat2wasm(wat))
    if pad:
        name_bytes = b"pad"
        body = bytes([len(name_bytes)]) + name_bytes + b"\0" * pad
        wasm += b"\x00" + _leb128(len(body)) + body
    return wasm


def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def plugin_manifest(name: str, version: str = "1.0.0", *, deps: Mapping[str, str | tuple[str, bool]] | None = None,
                    config: Mapping[str, object] | None = None, sha256: str | None = None, extra: str = "") -> str:
    """The manifest text; ``deps`` values are a range, or ``(range, optional)``."""
    lines = ["[plugin]", f'name = "{name}"', f'version = "{version}"', 'description = "test plugin"']
    if sha256:
        lines.append(f'sha256 = "{sha256}"')
    lines.append(extra)
    if deps:
        lines.append("[dependencies]")
        for dep, spec in deps.items():
            if isinstance(spec, tuple):
                lines.append(f'{dep} = {{ version = "{spec[0]}", optional = {str(spec[1]).lower()} }}')
            else:
                lines.append(f'{dep} = "{spec}"')
    if config:
        lines.append("[config]")
        lines.extend(f"{k} = {json.dumps(v)}" for k, v in config.items())
    return "\n".join(lines) + "\n"


def write_plugin(directory: Path, name: str, reply: str | None = None, *, version: str = "1.0.0",
                 deps: Mapping[str, str | tuple[str, bool]] | None = None, config: Mapping[str, object] | None = None,
                 pin_sha256: bool = False, extra: str = "", init_status: int = 0, health: int = 0,
                 block: bool = False, pad: int = 0) -> Path:
    """Write ``<name>.toml`` then ``<name>.wasm`` into ``directory``; returns the wasm path.
    ``reply`` defaults to ``<name>-<version>``."""
    wasm = plugin_wasm(reply if reply is not None else f"{name}-{version}", init_status=init_status,
                       health=health, block=block, pad=pad)
    digest = hashlib.sha256(wasm).hexdigest() if pin_sha256 else None
    (directory / f"{name}.toml").write_text(
        plugin_manifest(name, version, deps=deps, config=config, sha256=digest, extra=extra), encoding="utf-8")
    path = directory / f"{name}.wasm"
    path.write_bytes(wasm)
    return path


def replace_atomically(path: Path, data: bytes) -> None:
    """Write beside ``path`` then ``os.replace`` onto it: what editors and deploy tools do."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def wait_until(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Gate:
    """A host function ``test.block`` that holds a guest call until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.functions = HostFunctions()
        self.functions.add(HostFunction("block", (), (), self._block, module="test"))

    def _block(self, _ctx: object) -> None:
        self.entered.set()
        if not self.release.wait(10):
            raise TimeoutError("the test never opened the gate")
