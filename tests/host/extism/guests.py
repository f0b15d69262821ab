"""Extism-ABI test plugins written in WAT: every import of ``extism:host/env`` this host provides, the
small helpers a PDK would have, and one export per behaviour (well-behaved ones and liars)."""

from __future__ import annotations

import wasmtime

#: Imports and helpers every test plugin starts with.
PRELUDE = """
  (import "extism:host/env" "input_length" (func $ilen (result i64)))
  (import "extism:host/env" "input_offset" (func $ioff (result i64)))
  (import "extism:host/env" "input_load_u8" (func $iload8 (param i64) (result i32)))
  (import "extism:host/env" "input_load_u64" (func $iload64 (param i64) (result i64)))
  (import "extism:host/env" "output_set" (func $oset (param i64 i64)))
  (import "extism:host/env" "error_set" (func $eset (param i64)))
  (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
  (import "extism:host/env" "free" (func $free (param i64)))
  (import "extism:host/env" "length" (func $len (param i64) (result i64)))
  (import "extism:host/env" "load_u8" (func $load8 (param i64) (result i32)))
  (import "extism:host/env" "load_u64" (func $load64 (param i64) (result i64)))
  (import "extism:host/env" "store_u8" (func $store8 (param i64 i32)))
  (import "extism:host/env" "store_u64" (func $store64 (param i64 i64)))
  (import "extism:host/env" "config_get" (func $config_get (param i64) (result i64)))
  (import "extism:host/env" "var_get" (func $var_get (param i64) (result i64)))
  (import "extism:host/env" "var_set" (func $var_set (param i64 i64)))
  (import "extism:host/env" "log_info" (func $log_info (param i64)))
  (import "extism:host/env" "log_warn" (func $log_warn (param i64)))
  (import "extism:host/env" "get_log_level" (func $log_level (result i32)))
  (import "extism:host/env" "http_request" (func $http (param i64 i64) (result i64)))
  (import "extism:host/env" "http_status_code" (func $http_status (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "count")
  ;; a new kernel block holding plugin memory [src, src + n), copied a byte at a time as a PDK would
  (func $kstr (param $src i32) (param $n i32) (result i64)
    (local $p i64) (local $i i32)
    (local.set $p (call $alloc (i64.extend_i32_u (local.get $n))))
    (block $done (loop $next
      (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
      (call $store8 (i64.add (local.get $p) (i64.extend_i32_u (local.get $i)))
                    (i32.load8_u (i32.add (local.get $src) (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br $next)))
    (local.get $p))
  ;; a copy of the input in a new kernel block, read eight bytes at a time as the PDKs do
  (func $input_copy (result i64)
    (local $p i64) (local $i i64) (local $n i64)
    (local.set $n (call $ilen))
    (local.set $p (call $alloc (local.get $n)))
    (block $done (loop $next
      (br_if $done (i64.gt_u (i64.add (local.get $i) (i64.const 8)) (local.get $n)))
      (call $store64 (i64.add (local.get $p) (local.get $i)) (call $iload64 (local.get $i)))
      (local.set $i (i64.add (local.get $i) (i64.const 8)))
      (br $next)))
    (block $done (loop $next
      (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
      (call $store8 (i64.add (local.get $p) (local.get $i)) (call $iload8 (local.get $i)))
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br $next)))
    (local.get $p))
  (func (export "echo") (result i32)
    (call $oset (call $ioff) (call $ilen)) (i32.const 0))
"""

#: The exports under test. Names say what each one does (or which lie it tells).
FUNCTIONS = """
  (func (export "copy_echo") (result i32)
    (call $oset (call $input_copy) (call $ilen)) (i32.const 0))
  ;; the config value named by the input, or an empty output when there is none
  (func (export "config") (result i32)
    (local $v i64)
    (local.set $v (call $config_get (call $ioff)))
    (if (i64.ne (local.get $v) (i64.const 0))
      (then (call $oset (local.get $v) (call $len (local.get $v)))))
    (i32.const 0))
  ;; replies with the variable "count" as it was, then sets it to the input
  (func (export "swap_var") (result i32)
    (local $old i64) (local $key i64)
    (local.set $key (call $kstr (i32.const 0) (i32.const 5)))
    (local.set $old (call $var_get (local.get $key)))
    (call $var_set (local.get $key) (call $ioff))
    (if (i64.ne (local.get $old) (i64.const 0))
      (then (call $oset (local.get $old) (call $len (local.get $old)))))
    (i32.const 0))
  (func (export "clear_var") (result i32)
    (call $var_set (call $kstr (i32.const 0) (i32.const 5)) (i64.const 0)) (i32.const 0))
  ;; the input as the error, return code 7
  (func (export "fail") (result i32)
    (call $eset (call $ioff)) (i32.const 7))
  (func (export "fail_silently") (result i32) (i32.const -2))
  (func (export "log") (result i32)
    (call $log_info (call $ioff))
    (call $log_warn (call $ioff))
    (i32.const 0))
  (func (export "log_level") (result i32)
    (local $p i64)
    (local.set $p (call $alloc (i64.const 1)))
    (call $store8 (local.get $p) (i32.add (i32.const 48) (call $log_level)))
    (call $oset (local.get $p) (i64.const 1))
    (i32.const 0))
  (func (export "http") (result i32)
    (drop (call $http (call $ioff) (i64.const 0))) (i32.const 0))
  (func (export "empty") (result i32) (i32.const 0))
  ;; lies about memory
  (func (export "load_far") (result i32) (drop (call $load64 (i64.const 0x10000000000))) (i32.const 0))
  (func (export "load_edge") (result i32) (drop (call $load64 (i64.sub (i64.const 65536) (i64.const 4)))) (i32.const 0))
  (func (export "store_null") (result i32) (call $store8 (i64.const 0) (i32.const 1)) (i32.const 0))
  (func (export "store_far") (result i32) (call $store64 (i64.const 0xffffffffffffff00) (i64.const 1)) (i32.const 0))
  (func (export "input_past_end") (result i32) (drop (call $iload64 (call $ilen))) (i32.const 0))
  (func (export "output_too_long") (result i32)
    (call $oset (call $ioff) (i64.const 0x7fffffffffffffff)) (i32.const 0))
  (func (export "output_nowhere") (result i32) (call $oset (i64.const 40000) (i64.const 8)) (i32.const 0))
  (func (export "output_freed") (result i32)
    (local $p i64)
    (local.set $p (call $alloc (i64.const 8)))
    (call $free (local.get $p))
    (call $oset (local.get $p) (i64.const 8)) (i32.const 0))
  (func (export "free_after_output") (result i32)
    (local $p i64)
    (local.set $p (call $input_copy))
    (call $oset (local.get $p) (call $ilen))
    (call $free (local.get $p)) (i32.const 0))
  (func (export "error_nowhere") (result i32) (call $eset (i64.const 12345)) (i32.const 1))
  (func (export "config_nowhere") (result i32) (drop (call $config_get (i64.const 0xfffffff0))) (i32.const 0))
  (func (export "var_set_nowhere") (result i32)
    (call $var_set (call $ioff) (i64.const 0x7ffffffffffffff8)) (i32.const 0))
  (func (export "log_nowhere") (result i32) (call $log_info (i64.const 999999999)) (i32.const 0))
  (func (export "alloc_huge") (result i32) (drop (call $alloc (i64.const 0x10000000000))) (i32.const 0))
  (func (export "alloc_bomb") (result i32)
    (loop $more (drop (call $alloc (i64.const 1048576))) (br $more)) (i32.const 0))
  (func (export "spin") (result i32) (loop $more (br $more)) (i32.const 0))
  ;; not callable: reserved names and other types
  (func (export "sandbus_hidden") (result i32) (i32.const 0))
  (func (export "_start"))
  (func (export "takes_args") (param i32) (result i32) (i32.const 0))
"""


def plugin_wat(extra: str = FUNCTIONS, *, imports: str = "") -> str:
    return f"(module {imports}\n{PRELUDE}\n{extra}\n)"


def plugin(extra: str = FUNCTIONS, *, imports: str = "") -> bytes:
    """The test plugin's bytes (``extra``: its exports, ``imports``: imports before the prelude's)."""
    return bytes(wasmtime.wat2wasm(plugin_wat(extra, imports=imports)))
