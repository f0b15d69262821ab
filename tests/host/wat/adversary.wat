;; A hostile plugin: every export misbehaves in one way. Used by tests/host/test_bad_input.py.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "sandbus_v1" "env_get" (func $env_get (param i32 i32 i32 i32) (result i32)))
  (import "sandbus_v1" "time_now_ms" (func $time_now_ms (result i64)))
  (import "sandbus_v1" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 3)
  (data (i32.const 16) "not json{")          ;; 9 bytes
  (data (i32.const 32) "etc/passwd")         ;; 10 bytes
  (data (i32.const 48) "HOME")               ;; 4 bytes
  (data (i32.const 64) "{\"ok\":true}")      ;; 11 bytes
  (global $heap (mut i32) (i32.const 4096))
  (func $pack (param $p i32) (param $n i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.extend_i32_u (local.get $n))))
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func $alloc (export "sandbus_alloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "sandbus_dealloc") (param i32 i32) (global.set $heap (i32.const 4096)))
  (func $ok (result i64) (call $pack (i32.const 64) (i32.const 11)))
  (func (export "echo") (param $p i32) (param $n i32) (result i64)
    (call $pack (local.get $p) (local.get $n)))
  (func (export "loop_forever") (param i32 i32) (result i64)
    (loop $l (br $l)) (unreachable))
  (func (export "grow_bomb") (param i32 i32) (result i64)
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    (unreachable))
  (func $recurse (export "recurse") (param $p i32) (param $n i32) (result i64)
    (i64.add (call $recurse (local.get $p) (local.get $n)) (i64.const 1)))
  (func (export "bad_ptr") (param i32 i32) (result i64) (call $pack (i32.const 0xFFFF0000) (i32.const 16)))
  (func (export "huge_len") (param i32 i32) (result i64) (call $pack (i32.const 1024) (i32.const 0xFFFFFFF0)))
  (func (export "bad_json") (param i32 i32) (result i64) (call $pack (i32.const 16) (i32.const 9)))
  (func (export "trap") (param i32 i32) (result i64) (unreachable))
  ;; writes 64 KiB chunks to stdout, 100 times (6.4 MB), ignoring errors
  (func (export "spam_stdout") (param i32 i32) (result i64)
    (local $i i32) (local $buf i32)
    (local.set $buf (call $alloc (i32.const 65536)))
    (i32.store (i32.const 0) (local.get $buf))        ;; iovec.buf
    (i32.store (i32.const 4) (i32.const 65536))       ;; iovec.len
    (loop $l
      (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 100))))
    (call $ok))
  ;; opens /etc/passwd through the root preopen (fd 3), as wasi-libc would
  (func (export "open_file") (param i32 i32) (result i64)
    (drop (call $path_open (i32.const 3) (i32.const 0) (i32.const 32) (i32.const 10) (i32.const 0)
      (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 8)))
    (call $ok))
  (func (export "get_env") (param i32 i32) (result i64)
    (drop (call $env_get (i32.const 48) (i32.const 4) (i32.const 128) (i32.const 64)))
    (call $ok))
  (func (export "read_clock") (param i32 i32) (result i64)
    (drop (call $time_now_ms))
    (call $ok))
  (func (export "log_oob") (param i32 i32) (result i64)
    (call $log (i32.const 2) (i32.const 0x7FFFFFF0) (i32.const 100))
    (call $ok))
)
