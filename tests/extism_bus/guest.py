"""A real Extism plugin in WAT: it imports Extism's kernel and host functions from ``extism:host/env``
and exports ``() -> i32`` functions, as every Extism PDK's output does. Written by hand so that each
function does one thing a test can name:

    echo             output = input, byte for byte (any bytes: NULs, invalid UTF-8)
    fail             error_set("vowels went missing\\r\\nX-Forged: 1"), return 1
    handle_message   keep the input (the PluginMessage envelope as JSON) in the var "last"; output = input
    last             output = the var "last" (what the latest message delivered), or nothing
"""

from __future__ import annotations

import wasmtime

__all__ = ["EXTISM_WAT", "FAIL_MESSAGE", "extism_wasm"]

#: what ``fail`` reports (a CR/LF in it: the error header must not carry it raw)
FAIL_MESSAGE = "vowels went missing\r\nX-Forged: 1"  # 32 bytes

EXTISM_WAT = r"""
(module
  (import "extism:host/env" "input_length" (func $input_length (result i64)))
  (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "length" (func $length (param i64) (result i64)))
  (import "extism:host/env" "load_u8" (func $load_u8 (param i64) (result i32)))
  (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
  (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
  (import "extism:host/env" "error_set" (func $error_set (param i64)))
  (import "extism:host/env" "var_get" (func $var_get (param i64) (result i64)))
  (import "extism:host/env" "var_set" (func $var_set (param i64 i64)))
  (memory (export "memory") 1)
  (data (i32.const 0) "vowels went missing\0d\0aX-Forged: 1")
  (data (i32.const 64) "last")

  ;; a kernel block holding bytes [src, src+len) of this module's memory
  (func $from_memory (param $src i32) (param $len i32) (result i64)
    (local $off i64) (local $i i32)
    (local.set $off (call $alloc (i64.extend_i32_u (local.get $len))))
    (block $done
      (loop $copy
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (call $store_u8 (i64.add (local.get $off) (i64.extend_i32_u (local.get $i)))
                        (i32.load8_u (i32.add (local.get $src) (local.get $i))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $copy)))
    (local.get $off))

  ;; a kernel block holding the input
  (func $input_block (result i64)
    (local $n i64) (local $off i64) (local $i i64)
    (local.set $n (call $input_length))
    (local.set $off (call $alloc (local.get $n)))
    (block $done
      (loop $copy
        (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
        (call $store_u8 (i64.add (local.get $off) (local.get $i)) (call $input_load_u8 (local.get $i)))
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (br $copy)))
    (local.get $off))

  (func (export "echo") (result i32)
    (call $output_set (call $input_block) (call $input_length))
    (i32.const 0))

  (func (export "fail") (result i32)
    (call $error_set (call $from_memory (i32.const 0) (i32.const 32)))
    (i32.const 1))

  (func (export "handle_message") (result i32)
    (local $off i64)
    (local.set $off (call $input_block))
    (call $var_set (call $from_memory (i32.const 64) (i32.const 4)) (local.get $off))
    (call $output_set (local.get $off) (call $input_length))
    (i32.const 0))

  (func (export "last") (result i32)
    (local $off i64)
    (local.set $off (call $var_get (call $from_memory (i32.const 64) (i32.const 4))))
    (if (i64.ne (local.get $off) (i64.const 0))
      (then (call $output_set (local.get $off) (call $length (local.get $off)))))
    (i32.const 0))
)
"""


def extism_wasm() -> bytes:
    """The plugin's binary."""
    return bytes(wasmtime.wat2wasm(EXTISM_WAT))
