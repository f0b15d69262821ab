;; A hostile component (world sandbus:plugin/plugin, no imports): what `handle-request` answers depends on the
;; first byte of the function name. Used by tests/host/test_component_native.py.
;;   e...  ok(request)                       an echo
;;   b...  ok(3 bytes of invalid UTF-8)      r...  err(3 bytes of invalid UTF-8)
;;   h...  ok(2 MiB of NULs)                 g...  err(2 MiB of NULs)
;;   n...  ok("")                            o...  ok(a range past the end of memory)
;;   d...  a result discriminant of 7        t...  a trap (unreachable)
;;   l...  a loop that never ends
;; and through the host interface's log (level 2):
;;   L...  logs the request, then echoes it      m...  logs the request 100 times, then echoes it
;;   B...  logs 3 bytes of invalid UTF-8         O...  logs a range past the end of memory
(component
  (import "sandbus:plugin/host@1.0.0" (instance $host
    (export "log" (func (param "level" u32) (param "message" string)))))
  (core module $mem (memory (export "memory") 40))
  (core instance $mi (instantiate $mem))
  (core func $log (canon lower (func $host "log") (memory (core memory $mi "memory"))))
  (core module $m
    (import "env" "memory" (memory 40))
    (import "host" "log" (func $log (param i32 i32 i32)))
    (export "memory" (memory 0))
    (data (i32.const 16) "\ff\fe\fd")
    (global $bump (mut i32) (i32.const 4096))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and (i32.add (global.get $bump) (i32.const 7)) (i32.const -8)))
      (global.set $bump (i32.add (local.get $p) (local.get 3)))
      (local.get $p))
    ;; (function ptr, len, request ptr, len) -> the return area at 64: the case (u8), then (ptr, len) at 68 / 72
    (func $answer (param $case i32) (param $p i32) (param $n i32) (result i32)
      (i32.store8 (i32.const 64) (local.get $case))
      (i32.store (i32.const 68) (local.get $p))
      (i32.store (i32.const 72) (local.get $n))
      (i32.const 64))
    (func (export "handle") (param i32 i32 i32 i32) (result i32)
      (local $c i32)
      (global.set $bump (i32.const 4096))
      (local.set $c (if (result i32) (local.get 1) (then (i32.load8_u (local.get 0))) (else (i32.const 0))))
      (if (i32.eq (local.get $c) (i32.const 98)) (then (return (call $answer (i32.const 0) (i32.const 16) (i32.const 3)))))
      (if (i32.eq (local.get $c) (i32.const 114)) (then (return (call $answer (i32.const 1) (i32.const 16) (i32.const 3)))))
      (if (i32.eq (local.get $c) (i32.const 104)) (then (return (call $answer (i32.const 0) (i32.const 65536) (i32.const 2097152)))))
      (if (i32.eq (local.get $c) (i32.const 103)) (then (return (call $answer (i32.const 1) (i32.const 65536) (i32.const 2097152)))))
      (if (i32.eq (local.get $c) (i32.const 110)) (then (return (call $answer (i32.const 0) (i32.const 0) (i32.const 0)))))
      (if (i32.eq (local.get $c) (i32.const 111)) (then (return (call $answer (i32.const 0) (i32.const 2621000) (i32.const 4096)))))
      (if (i32.eq (local.get $c) (i32.const 100)) (then (return (call $answer (i32.const 7) (local.get 2) (local.get 3)))))
      (if (i32.eq (local.get $c) (i32.const 116)) (then unreachable))
      (if (i32.eq (local.get $c) (i32.const 108)) (then (loop $forever (br $forever))))
      (if (i32.eq (local.get $c) (i32.const 76)) (then (call $log (i32.const 2) (local.get 2) (local.get 3))))
      (if (i32.eq (local.get $c) (i32.const 109)) (then
        (local.set $c (i32.const 100))
        (loop $again
          (call $log (i32.const 2) (local.get 2) (local.get 3))
          (local.set $c (i32.sub (local.get $c) (i32.const 1)))
          (br_if $again (local.get $c)))))
      (if (i32.eq (local.get $c) (i32.const 66)) (then (call $log (i32.const 2) (i32.const 16) (i32.const 3))))
      (if (i32.eq (local.get $c) (i32.const 79)) (then (call $log (i32.const 2) (i32.const 2621000) (i32.const 4096))))
      (call $answer (i32.const 0) (local.get 2) (local.get 3)))
  )
  (core instance $i (instantiate $m (with "env" (instance $mi))
                                    (with "host" (instance (export "log" (func $log))))))
  (func (export "handle-request") (param "function" string) (param "request" string)
    (result (result string (error string)))
    (canon lift (core func $i "handle") (memory (core memory $i "memory")) (realloc (core func $i "realloc"))))
)
