"""Our Extism kernel: the module that owns an Extism plugin's shared memory, and how it is built.

Extism's own hosts link a plugin's memory imports (``alloc``, ``load_u64``, ``output_set`` ...) to a
kernel written in wasm, so that the many small calls a PDK makes (a 10 KB input is read eight bytes at
a time) stay calls from wasm to wasm. We do the same with a kernel of our own, written for checking:
its WAT source is below, one instance of it lives in each plugin instance's store, and every offset
and length a plugin hands it is checked against its memory and its block table. A check that fails
calls the host's ``sandbus:kernel.fail``, which raises the typed error naming the plugin's function.

It also imports ``sandbus:kernel.room``, asked only when its memory must grow: what the memory limit
leaves it beside the plugin's own memory at that moment.

The kernel is compiled once per engine (a few milliseconds) and kept for the engine's life.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

import wasmtime

from sandbus.sdk.errors import AbiViolationError, MemoryLimitError

if TYPE_CHECKING:
    from sandbus.host.sandbox.instance import CallContext

__all__ = ["FAIL_MODULE", "KERNEL_IMPORTS", "KERNEL_WAT", "kernel_failure", "kernel_module"]

#: Where the kernel imports its one host function from.
FAIL_MODULE = "sandbus:kernel"

#: The kernel exports a plugin may import from ``extism:host/env``, with their wasm types
#: (parameters, results): these are linked to the kernel instance, not to Python.
KERNEL_IMPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alloc": (("i64",), ("i64",)),
    "free": (("i64",), ()),
    "length": (("i64",), ("i64",)),
    "length_unsafe": (("i64",), ("i64",)),
    "load_u8": (("i64",), ("i32",)),
    "load_u64": (("i64",), ("i64",)),
    "store_u8": (("i64", "i32"), ()),
    "store_u64": (("i64", "i64"), ()),
    "input_length": ((), ("i64",)),
    "input_offset": ((), ("i64",)),
    "input_load_u8": (("i64",), ("i32",)),
    "input_load_u64": (("i64",), ("i64",)),
    "output_set": (("i64", "i64"), ()),
    "output_offset": ((), ("i64",)),
    "output_length": ((), ("i64",)),
    "error_set": (("i64",), ()),
    "error_get": ((), ("i64",)),
    "memory_bytes": ((), ("i64",)),
    "reset": ((), ()),
}

#: What each failure code of the kernel's ``fail`` means: (the plugin's import, what was wrong).
_FAILURES = {
    1: ("load_u8", "reads outside the kernel memory"),
    2: ("load_u64", "reads outside the kernel memory"),
    3: ("store_u8", "writes outside the kernel memory"),
    4: ("store_u64", "writes outside the kernel memory"),
    5: ("input_load_u8", "reads past the end of the input"),
    6: ("input_load_u64", "reads past the end of the input"),
    7: ("output_set", "names no live block, or a length past its block"),
    8: ("error_set", "names no live block"),
}
_ALLOC_FAILED = 9

KERNEL_WAT = """
;; The sandbus Extism kernel: the memory an Extism plugin shares with its host, in wasm.
;;
;; An Extism plugin never reads or writes its host's memory: it asks the kernel (imports from
;; "extism:host/env") to allocate blocks, load and store bytes in them, and name the input, the output
;; and the error. Those imports are linked straight to this module's exports, so every small load and
;; store stays a wasm-to-wasm call; only the host-side functions (config, vars, http, log) are Python.
;;
;; Layout of this module's memory: bytes [0, 16) are never handed out (offset 0 is "no block"); from 16
;; on, blocks one after another, each an 8-byte header [length u32][tag u32] followed by its data,
;; padded to 8 bytes. $top is the end of the last block. A block is live when its header's tag is
;; $USED, its data starts 8-aligned at or past 24, and its data ends at or before $top. Everything is
;; freed at once when a call begins (sandbus_begin); free() of the last block also gives its room back.
;;
;; Every offset and length a plugin passes is checked here: a load, store or input read outside its
;; range, an output or error that is not a live block, an allocation past the memory cap, each calls
;; the host's "fail", which raises the typed error that names the function (the call ends there).
(module
  (import "sandbus:kernel" "fail" (func $fail (param i32 i64 i64)))
  ;; what the kernel may grow to now: the memory limit less the plugin's own memory as it is now (the
  ;; plugin may have grown it since the call began); asked only when the kernel memory must grow
  (import "sandbus:kernel" "room" (func $room (result i64)))
  (memory (export "memory") 1)
  (global $USED i32 (i32.const 0x5ab0b10c))
  (global $FREE i32 (i32.const 0x5ab0f4ee))
  (global $top (mut i32) (i32.const 16))
  ;; never above 0xffff0000 ($top, an i32, must not wrap); each call's sandbus_begin lowers it for the
  ;; call, and growing asks the host's "room" in any case
  (global $cap (mut i64) (i64.const 0xffff0000))
  (global $in (mut i64) (i64.const 0))
  (global $in_len (mut i64) (i64.const 0))
  (global $out (mut i64) (i64.const 0))
  (global $out_len (mut i64) (i64.const 0))
  (global $err (mut i64) (i64.const 0))

  (func $size (result i64)
    (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)))

  ;; The length of the live block whose data starts at $p, or -1.
  (func $block (export "sandbus_block") (param $p i64) (result i64)
    (local $len i64)
    (if (i64.lt_u (local.get $p) (i64.const 24)) (then (return (i64.const -1))))
    (if (i64.gt_u (local.get $p) (i64.extend_i32_u (global.get $top))) (then (return (i64.const -1))))
    (if (i64.ne (i64.and (local.get $p) (i64.const 7)) (i64.const 0)) (then (return (i64.const -1))))
    (if (i32.ne (i32.load offset=4 (i32.wrap_i64 (i64.sub (local.get $p) (i64.const 8)))) (global.get $USED))
      (then (return (i64.const -1))))
    (local.set $len (i64.load32_u (i32.wrap_i64 (i64.sub (local.get $p) (i64.const 8)))))
    (if (i64.gt_u (i64.add (local.get $p) (local.get $len)) (i64.extend_i32_u (global.get $top)))
      (then (return (i64.const -1))))
    (local.get $len))

  (func $alloc (export "alloc") (param $n i64) (result i64)
    (local $end i64) (local $size i64) (local $p i64) (local $cap i64)
    (if (i64.gt_u (local.get $n) (i64.const 0xfffffff0))
      (then (call $fail (i32.const 9) (local.get $n) (global.get $cap)) (unreachable)))
    (local.set $end (i64.add (i64.extend_i32_u (global.get $top))
      (i64.add (i64.const 8) (i64.and (i64.add (local.get $n) (i64.const 7)) (i64.const -8)))))
    (local.set $size (call $size))
    (if (i64.gt_u (local.get $end) (local.get $size))
      (then
        (local.set $cap (call $room))
        (if (i64.gt_u (local.get $cap) (global.get $cap)) (then (local.set $cap (global.get $cap))))
        (if (i64.gt_u (local.get $end) (local.get $cap))
          (then (call $fail (i32.const 9) (local.get $n) (local.get $cap)) (unreachable)))
        (if (i32.eq (memory.grow (i32.wrap_i64 (i64.shr_u
              (i64.add (i64.sub (local.get $end) (local.get $size)) (i64.const 65535)) (i64.const 16))))
            (i32.const -1))
          (then (call $fail (i32.const 9) (local.get $n) (global.get $cap)) (unreachable)))))
    (local.set $p (i64.extend_i32_u (global.get $top)))
    (i32.store (i32.wrap_i64 (local.get $p)) (i32.wrap_i64 (local.get $n)))
    (i32.store offset=4 (i32.wrap_i64 (local.get $p)) (global.get $USED))
    (global.set $top (i32.wrap_i64 (local.get $end)))
    (i64.add (local.get $p) (i64.const 8)))

  (func (export "free") (param $p i64)
    (local $len i64)
    (local.set $len (call $block (local.get $p)))
    (if (i64.lt_s (local.get $len) (i64.const 0)) (then (return)))
    (i32.store offset=4 (i32.wrap_i64 (i64.sub (local.get $p) (i64.const 8))) (global.get $FREE))
    (if (i64.eq (i64.add (local.get $p) (i64.and (i64.add (local.get $len) (i64.const 7)) (i64.const -8)))
                (i64.extend_i32_u (global.get $top)))
      (then (global.set $top (i32.wrap_i64 (i64.sub (local.get $p) (i64.const 8)))))))

  (func $length (export "length") (param $p i64) (result i64)
    (local $len i64)
    (local.set $len (call $block (local.get $p)))
    (select (i64.const 0) (local.get $len) (i64.lt_s (local.get $len) (i64.const 0))))

  (func (export "length_unsafe") (param $p i64) (result i64)
    (call $length (local.get $p)))

  ;; Loads and stores: [p, p + width) must lie in the heap, past the reserved bytes and inside memory:
  ;; 16 <= p <= size - width, as one unsigned comparison ((p - 16) wraps above everything when p < 16).
  ;; Written out in each (no call): a PDK makes one of these calls per eight bytes it moves.
  (func (export "load_u8") (param $p i64) (result i32)
    (if (i64.gt_u (i64.sub (local.get $p) (i64.const 16))
                  (i64.sub (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)) (i64.const 17)))
      (then (call $fail (i32.const 1) (local.get $p) (i64.const 1)) (unreachable)))
    (i32.load8_u (i32.wrap_i64 (local.get $p))))

  (func (export "load_u64") (param $p i64) (result i64)
    (if (i64.gt_u (i64.sub (local.get $p) (i64.const 16))
                  (i64.sub (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)) (i64.const 24)))
      (then (call $fail (i32.const 2) (local.get $p) (i64.const 8)) (unreachable)))
    (i64.load (i32.wrap_i64 (local.get $p))))

  (func (export "store_u8") (param $p i64) (param $v i32)
    (if (i64.gt_u (i64.sub (local.get $p) (i64.const 16))
                  (i64.sub (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)) (i64.const 17)))
      (then (call $fail (i32.const 3) (local.get $p) (i64.const 1)) (unreachable)))
    (i32.store8 (i32.wrap_i64 (local.get $p)) (local.get $v)))

  (func (export "store_u64") (param $p i64) (param $v i64)
    (if (i64.gt_u (i64.sub (local.get $p) (i64.const 16))
                  (i64.sub (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)) (i64.const 24)))
      (then (call $fail (i32.const 4) (local.get $p) (i64.const 8)) (unreachable)))
    (i64.store (i32.wrap_i64 (local.get $p)) (local.get $v)))

  (func (export "input_length") (result i64) (global.get $in_len))
  (func (export "input_offset") (result i64) (global.get $in))

  (func (export "input_load_u8") (param $i i64) (result i32)
    (if (i64.ge_u (local.get $i) (global.get $in_len))
      (then (call $fail (i32.const 5) (local.get $i) (global.get $in_len)) (unreachable)))
    (i32.load8_u (i32.wrap_i64 (i64.add (global.get $in) (local.get $i)))))

  (func (export "input_load_u64") (param $i i64) (result i64)
    (if (i32.or (i64.gt_u (local.get $i) (i64.const 0xffffffff))
                (i64.gt_u (i64.add (local.get $i) (i64.const 8)) (global.get $in_len)))
      (then (call $fail (i32.const 6) (local.get $i) (global.get $in_len)) (unreachable)))
    (i64.load (i32.wrap_i64 (i64.add (global.get $in) (local.get $i)))))

  (func (export "output_set") (param $p i64) (param $n i64)
    (local $len i64)
    (if (i64.eqz (i64.or (local.get $p) (local.get $n)))
      (then (global.set $out (i64.const 0)) (global.set $out_len (i64.const 0)) (return)))
    (local.set $len (call $block (local.get $p)))
    (if (i32.or (i64.lt_s (local.get $len) (i64.const 0)) (i64.gt_u (local.get $n) (local.get $len)))
      (then (call $fail (i32.const 7) (local.get $p) (local.get $n)) (unreachable)))
    (global.set $out (local.get $p))
    (global.set $out_len (local.get $n)))

  (func (export "output_offset") (result i64) (global.get $out))
  (func (export "output_length") (result i64) (global.get $out_len))

  (func (export "error_set") (param $p i64)
    (if (i64.eqz (local.get $p)) (then (global.set $err (i64.const 0)) (return)))
    (if (i64.lt_s (call $block (local.get $p)) (i64.const 0))
      (then (call $fail (i32.const 8) (local.get $p) (i64.const 0)) (unreachable)))
    (global.set $err (local.get $p)))

  (func (export "error_get") (result i64) (global.get $err))

  (func (export "memory_bytes") (result i64) (call $size))

  (func $reset (export "reset")
    (global.set $top (i32.const 16))
    (global.set $in (i64.const 0))
    (global.set $in_len (i64.const 0))
    (global.set $out (i64.const 0))
    (global.set $out_len (i64.const 0))
    (global.set $err (i64.const 0)))

  ;; Host side. One call starts a plugin call: everything freed, the memory cap for this call, the
  ;; input block allocated and named (the host copies the input into it).
  (func (export "sandbus_begin") (param $n i64) (param $cap i64) (result i64)
    (call $reset)
    ;; never the whole 4 GiB: $top, an i32, must not wrap
    (global.set $cap (select (local.get $cap) (i64.const 0xffff0000)
                             (i64.lt_u (local.get $cap) (i64.const 0xffff0000))))
    (global.set $in (call $alloc (local.get $n)))
    (global.set $in_len (local.get $n))
    (global.get $in))

  ;; The output as (offset << 32 | length); all ones when the output block was freed after output_set.
  (func (export "sandbus_output") (result i64)
    (if (i64.eqz (global.get $out_len)) (then (return (i64.const 0))))
    (if (i64.lt_s (call $block (global.get $out)) (global.get $out_len)) (then (return (i64.const -1))))
    (i64.or (i64.shl (global.get $out) (i64.const 32)) (global.get $out_len)))

  ;; The error block as (offset << 32 | length); 0 when none was set, all ones when it was freed.
  (func (export "sandbus_error") (result i64)
    (local $len i64)
    (if (i64.eqz (global.get $err)) (then (return (i64.const 0))))
    (local.set $len (call $block (global.get $err)))
    (if (i64.lt_s (local.get $len) (i64.const 0)) (then (return (i64.const -1))))
    (i64.or (i64.shl (global.get $err) (i64.const 32)) (local.get $len)))
)
"""

_lock = threading.Lock()
_modules: weakref.WeakKeyDictionary[wasmtime.Engine, wasmtime.Module] = weakref.WeakKeyDictionary()


def kernel_module(engine: wasmtime.Engine) -> wasmtime.Module:
    """The compiled kernel for ``engine`` (compiled on first use, then kept while the engine lives)."""
    with _lock:
        module = _modules.get(engine)
        if module is None:
            module = _modules[engine] = wasmtime.Module(engine, bytes(wasmtime.wat2wasm(KERNEL_WAT)))
        return module


def kernel_failure(ctx: CallContext, code: int, value: int, extra: int) -> Exception:
    """The typed error for the kernel's ``fail(code, value, extra)``: a failed allocation is the memory
    limit; anything else is the plugin breaking the ABI, named by the import it called."""
    value &= 0xFFFF_FFFF_FFFF_FFFF
    extra &= 0xFFFF_FFFF_FFFF_FFFF
    if code == _ALLOC_FAILED:
        return MemoryLimitError(
            f"extism:host/env.alloc({value}) failed: the kernel memory may grow to {extra} bytes for this call "
            f"(the {ctx.limits.memory_bytes}-byte memory limit, less the plugin's own memory)",
            plugin=ctx.plugin, limit=ctx.limits.memory_bytes, function="alloc", size=value)
    function, what = _FAILURES.get(code, ("kernel", "breaks the kernel's rules"))
    details: dict[str, Any] = {"function": function, "offset": value}
    if code in (5, 6):
        message = f"extism:host/env.{function}({value}) {what} ({extra} bytes)"
        details["input_length"] = extra
    elif code == 7:
        message = f"extism:host/env.{function}({value}, {extra}) {what}"
        details["length"] = extra
    else:
        message = f"extism:host/env.{function}({value}) {what}"
    return AbiViolationError(message, plugin=ctx.plugin, **details)
