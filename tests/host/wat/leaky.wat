;; A plugin that keeps what one caller sent for the next caller: the tenant-A-to-B leak that
;; isolation = "per-call" closes. Used by tests/host/test_isolation.py.
;;
;; handle_request replies with the previous request (memory), or null before the first; calls counts
;; the calls this instance has served (a global, one digit); table_seen tells whether an earlier call
;; of this instance stored a function in its table (table state).
(module
  (memory (export "memory") 1)
  (table $t 1 funcref)
  (elem declare func $marker)
  (global $calls (mut i32) (i32.const 0))
  (global $last_len (mut i32) (i32.const 0))
  ;; [0, 4) "null"; [64, 68) "true"; [80, 85) "false"; [1024, 9216) the last request;
  ;; [16384, 24576) the input buffer; [32768, 40960) the reply buffer
  (data (i32.const 0) "null")
  (data (i32.const 64) "true")
  (data (i32.const 80) "false")
  (func $marker)
  (func $pack (param $p i32) (param $n i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.extend_i32_u (local.get $n))))
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param $n i32) (result i32)
    (if (i32.gt_u (local.get $n) (i32.const 8192)) (then (return (i32.const 0))))
    (i32.const 16384))
  (func (export "handle_request") (param $p i32) (param $n i32) (result i64)
    (local $out i64)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (if (i32.eqz (global.get $last_len))
      (then (local.set $out (call $pack (i32.const 0) (i32.const 4))))
      (else
        (memory.copy (i32.const 32768) (i32.const 1024) (global.get $last_len))
        (local.set $out (call $pack (i32.const 32768) (global.get $last_len)))))
    (memory.copy (i32.const 1024) (local.get $p) (local.get $n))
    (global.set $last_len (local.get $n))
    (local.get $out))
  (func (export "calls") (param i32 i32) (result i64)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.store8 (i32.const 32768) (i32.add (i32.const 48) (i32.rem_u (global.get $calls) (i32.const 10))))
    (call $pack (i32.const 32768) (i32.const 1)))
  (func (export "table_seen") (param i32 i32) (result i64)
    (local $seen i32)
    (local.set $seen (i32.eqz (ref.is_null (table.get $t (i32.const 0)))))
    (table.set $t (i32.const 0) (ref.func $marker))
    (if (result i64) (local.get $seen)
      (then (call $pack (i32.const 64) (i32.const 4)))
      (else (call $pack (i32.const 80) (i32.const 5)))))
)
