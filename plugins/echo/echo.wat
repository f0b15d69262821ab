;; echo - a hand-written sandbus plugin (Guest ABI v1, see docs/abi.md).
;;
;; handle_request returns its input unchanged, in a NEW buffer: the host frees
;; both the request buffer and the reply after the call.
;;
;; No imports, no optional exports: the smallest module the ABI accepts.
;;
;; Allocator: a bump allocator with a count of live blocks. sandbus_alloc hands
;; out 8-byte aligned blocks from $bump upward, growing memory as needed;
;; sandbus_dealloc only decrements the count, and when no block is live any
;; more the bump pointer goes back to the heap base. The host frees every block
;; after each call, so memory stays bounded by the largest single call
;; (request + reply), however many calls run.
(module
  (memory (export "memory") 1)

  ;; Address 0 means "allocation failed", so the heap starts above it.
  (global $heap_base i32 (i32.const 16))
  (global $bump (mut i32) (i32.const 16))
  (global $live (mut i32) (i32.const 0))

  (func (export "sandbus_abi_version") (result i32)
    (i32.const 1))

  ;; (size) -> ptr to size writable bytes, or 0 if memory cannot grow enough.
  ;; A zero-size block needs no storage: it is the (non-zero) heap base and is
  ;; not counted, so it stays harmless whether or not the host frees it.
  (func $alloc (export "sandbus_alloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local $end i64)
    (local $have i64)
    (if (i32.eqz (local.get $size))
      (then (return (global.get $heap_base))))
    (local.set $ptr (global.get $bump))
    ;; end = ptr + round_up(size, 8), computed in 64 bits (no wrap).
    (local.set $end
      (i64.add
        (i64.extend_i32_u (local.get $ptr))
        (i64.and
          (i64.add (i64.extend_i32_u (local.get $size)) (i64.const 7))
          (i64.const -8))))
    ;; Beyond the 4 GiB address space: cannot be satisfied.
    (if (i64.ge_u (local.get $end) (i64.const 0x1_0000_0000))
      (then (return (i32.const 0))))
    (local.set $have (i64.shl (i64.extend_i32_u (memory.size)) (i64.const 16)))
    (if (i64.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow
                (i32.wrap_i64
                  (i64.shr_u
                    (i64.add (i64.sub (local.get $end) (local.get $have)) (i64.const 0xFFFF))
                    (i64.const 16))))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $bump (i32.wrap_i64 (local.get $end)))
    (global.set $live (i32.add (global.get $live) (i32.const 1)))
    (local.get $ptr))

  ;; (ptr, size) -> (). Null pointers, zero-size blocks and frees with nothing
  ;; live are ignored.
  (func (export "sandbus_dealloc") (param $ptr i32) (param $size i32)
    (if (i32.or
          (i32.or (i32.eqz (local.get $ptr)) (i32.eqz (local.get $size)))
          (i32.eqz (global.get $live)))
      (then (return)))
    (global.set $live (i32.sub (global.get $live) (i32.const 1)))
    (if (i32.eqz (global.get $live))
      (then (global.set $bump (global.get $heap_base)))))

  ;; (ptr, len) -> (reply_ptr << 32) | reply_len, the reply being a copy of the input.
  (func (export "handle_request") (param $ptr i32) (param $len i32) (result i64)
    (local $out i32)
    (local.set $out (call $alloc (local.get $len)))
    ;; Out of memory: trap, the host reports the failed call.
    (if (i32.eqz (local.get $out))
      (then (unreachable)))
    (memory.copy (local.get $out) (local.get $ptr) (local.get $len))
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
      (i64.extend_i32_u (local.get $len))))
)
