"""The files ``sandbus new`` writes. Placeholders are ``{{name}}`` and friends (plain replacement:
C, JSON, TOML and Makefiles are full of braces and dollars that a format language would trip on).

Every scaffold implements the same contract, so one generated test fits all languages:

    request: any JSON            reply: {"success": true, "result": <the request>, "error": null}

The templates are kept in Python strings rather than data files so they ship inside the package
whatever the packaging configuration says.
"""

from __future__ import annotations

__all__ = [
    "AS_INDEX",
    "AS_PACKAGE_JSON",
    "C_SOURCE",
    "CONFTEST",
    "EXTISM_AS_INDEX",
    "EXTISM_AS_PACKAGE_JSON",
    "EXTISM_AS_README",
    "GITIGNORE",
    "MAKEFILE",
    "MANIFEST",
    "PYTEST_INI",
    "PYTHON_APP",
    "README",
    "TEST",
    "WAT_SOURCE",
    "render",
]


def render(template: str, **values: str) -> str:
    """Replace each ``{{key}}`` with its value; an unknown placeholder left over is a bug."""
    out = template
    for key, value in values.items():
        out = out.replace("{{" + key + "}}", value)
    if "{{" in out:
        start = out.index("{{")
        raise KeyError(f"template placeholder left unfilled: {out[start:start + 30]!r}")
    return out


MANIFEST = """\
# {{name}}: what this plugin asks for. The node's operator policy decides what it gets:
# a required capability the policy refuses, or a resource above its ceiling, keeps it from loading.
# Reference: docs/guide.md, "Manifest reference".
[plugin]
name = "{{name}}"
version = "0.1.0"
description = "{{description}}"
author = ""
license = "Apache-2.0"
min_runtime_version = "0.1.0"

[capabilities]
required = ["compute"]
optional = []

[resources]
memory_mb = {{memory_mb}}
timeout_seconds = 5.0
max_fuel = {{max_fuel}}
max_instances = 4

[metadata]
category = "example"
tags = ["{{language}}"]
"""

MAKEFILE = """\
# {{name}}: `make` builds, `make test` builds and tests, `make run` calls the plugin once.
# They use the sandbus installed for PYTHON: `python3` on PATH (with the virtualenv that has sandbus
# activated), or name that virtualenv's interpreter: make test PYTHON=path/to/venv/bin/python
PYTHON ?= python3
SANDBUS ?= $(PYTHON) -m sandbus

.PHONY: build test run clean sandbus
build: sandbus
\t$(SANDBUS) build .

test: build
\t$(PYTHON) -m pytest -q

run: build
\t$(SANDBUS) run build/{{name}}.wasm --input '{"hello": "world"}'

clean:
\trm -rf build

sandbus:
\t@$(PYTHON) -c "import sandbus" 2>/dev/null \\
\t  || { echo "$(PYTHON) cannot import sandbus: activate its virtualenv, or make PYTHON=path/to/venv/bin/python" >&2; \\
\t       exit 1; }
"""

GITIGNORE = """\
build/
__pycache__/
.pytest_cache/
node_modules/
"""

PYTEST_INI = """\
# pytest settings of this project (having one also keeps pytest from using a parent directory's).
[pytest]
asyncio_default_fixture_loop_scope = function
"""

CONFTEST = '''\
"""Loads the sandbus pytest plugin, which provides the ``sandbus_plugin`` fixture."""

pytest_plugins = ["sandbus.sdk.testing.pytest_plugin"]
'''

TEST = '''\
"""Tests of the {{name}} plugin. Run them with `python -m pytest` in this directory.

The ``sandbus_plugin`` fixture (from ``sandbus.sdk.testing``) builds the project when its sources are newer
than ``build/{{name}}.wasm``, loads it the way a node would (the manifest resolved against the
default operator policy: nothing but compute is granted), and closes it after the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbus import errors
from sandbus.sdk.testing import PluginFactory, PluginHarness

PROJECT = Path(__file__).resolve().parent


@pytest.fixture
def plugin(sandbus_plugin: PluginFactory) -> PluginHarness:
    return sandbus_plugin(PROJECT)


def test_replies_with_the_request(plugin: PluginHarness) -> None:
    reply = plugin.call("handle_request", {"hello": "world", "n": [1, 2, 3]})
    assert reply == {"success": True, "result": {"hello": "world", "n": [1, 2, 3]}, "error": None}


def test_needs_no_privileges(plugin: PluginHarness) -> None:
    assert plugin.call_ok("handle_request", "ping") == "ping"
    assert plugin.audit == []  # no limit was hit and no permission was asked for


def test_oversized_requests_are_refused(sandbus_plugin: PluginFactory) -> None:
    small = sandbus_plugin(PROJECT, limits={"max_input_bytes": 64})
    error = small.expect_error(errors.PayloadTooLargeError, "handle_request", {"data": "x" * 100})
    assert error.plugin == "{{name}}"
    assert small.audit.kinds() == ["limit.input_size"]
'''

README = """\
# {{name}}

A sandbus plugin in {{language_title}}.

```bash
sandbus build .                        # -> build/{{name}}.wasm + build/{{name}}.toml
python -m pytest                       # test_{{name}}.py
sandbus run build/{{name}}.wasm --input '{"hello": "world"}'
sandbus node --plugins build           # serve it over NATS
```

`sandbus` and `python` are those of a sandbus installation: a virtualenv with `pip install 'sandbus[host]'`
(activate it, or call its `bin/sandbus` and `bin/python`); `python -m sandbus` works as well as `sandbus`.
`make`, `make test` and `make run` do the same with `python3` on PATH, or with
`make PYTHON=path/to/venv/bin/python`. `sandbus build` finds the guest SDK of the installation it runs from,
so nothing in this directory depends on where sandbus is installed: commit it and share it.

The plugin author's guide is docs/guide.md in the sandbus repository.
"""

C_SOURCE = r"""/*
 * {{name}}: a sandbus plugin in C, using the single-header SDK sandbus.h
 * (Guest ABI v1: docs/abi.md; the author's guide: docs/guide.md).
 *
 *   request:  any JSON
 *   reply:    {"success":true,"result":<the request>,"error":null}
 *   not JSON: {"success":false,"result":null,"error":"invalid request: <reason>"}
 *
 * `sandbus build .` compiles it with clang for wasm32-wasi into build/{{name}}.wasm.
 */
#include "sandbus.h" /* defines sandbus_abi_version, sandbus_alloc and sandbus_dealloc */

SANDBUS_EXPORT(handle_request)
uint64_t handle_request(const uint8_t *in, uint32_t len)
{
    /* `in` belongs to the host: read it, never free it. The reply is a fresh block. */
    sandbus_buf out;
    int rc = sandbus_json_validate(in, len, NULL);

    sandbus_buf_init(&out);
    if (rc != SANDBUS_JSON_OK) {
        sandbus_buf_cstr(&out, "{\"success\":false,\"result\":null,\"error\":\"invalid request: ");
        sandbus_buf_json_chars(&out, sandbus_json_strerror(rc), strlen(sandbus_json_strerror(rc)));
        sandbus_buf_cstr(&out, "\"}");
    } else {
        sandbus_log(SANDBUS_LOG_DEBUG, "{{name}}: replying");
        sandbus_buf_cstr(&out, "{\"success\":true,\"result\":");
        sandbus_buf_raw(&out, in, len); /* validated above, so safe to copy verbatim */
        sandbus_buf_cstr(&out, ",\"error\":null}");
    }
    return sandbus_buf_reply(&out); /* hands the malloc'd buffer to the host, which frees it */
}

/* Optional: the manifest's [config] table arrives here as JSON, once per instance. */
SANDBUS_EXPORT(sandbus_init)
int32_t sandbus_init(const uint8_t *config, uint32_t len)
{
    (void)config;
    (void)len;
    return 0; /* anything else refuses to start */
}
"""

WAT_SOURCE = r""";; {{name}}: a sandbus plugin in WebAssembly text (Guest ABI v1: docs/abi.md).
;;
;;   request: any JSON (the host hands the guest JSON)
;;   reply:   {"success":true,"result":<the request>,"error":null}
;;
;; `sandbus build .` assembles it with wasmtime.wat2wasm: no toolchain needed.
;; Allocator: a bump allocator counting live blocks; when the host has freed every block of a
;; call the heap starts over, so memory stays bounded by the largest single call.
(module
  (memory (export "memory") 1)

  ;; The envelope around the request: 25 bytes before it, 14 after.
  (data (i32.const 16) "{\"success\":true,\"result\":")
  (data (i32.const 48) ",\"error\":null}")

  (global $heap_base i32 (i32.const 1024))
  (global $bump (mut i32) (i32.const 1024))
  (global $live (mut i32) (i32.const 0))

  (func (export "sandbus_abi_version") (result i32)
    (i32.const 1))

  ;; (size) -> pointer to size writable bytes (8-byte aligned), or 0 when memory cannot grow.
  (func $alloc (export "sandbus_alloc") (param $size i32) (result i32)
    (local $ptr i32)
    (local $end i64)
    (local $have i64)
    (if (i32.eqz (local.get $size))
      (then (return (global.get $heap_base))))
    (local.set $ptr (global.get $bump))
    (local.set $end
      (i64.add
        (i64.extend_i32_u (local.get $ptr))
        (i64.and (i64.add (i64.extend_i32_u (local.get $size)) (i64.const 7)) (i64.const -8))))
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

  ;; (ptr, size): the host frees the request and the reply after each call.
  (func (export "sandbus_dealloc") (param $ptr i32) (param $size i32)
    (if (i32.or
          (i32.or (i32.eqz (local.get $ptr)) (i32.eqz (local.get $size)))
          (i32.eqz (global.get $live)))
      (then (return)))
    (global.set $live (i32.sub (global.get $live) (i32.const 1)))
    (if (i32.eqz (global.get $live))
      (then (global.set $bump (global.get $heap_base)))))

  ;; (ptr, len) -> (reply_ptr << 32) | reply_len
  (func (export "handle_request") (param $ptr i32) (param $len i32) (result i64)
    (local $out i32)
    (local $total i32)
    (local.set $total (i32.add (local.get $len) (i32.const 39)))
    (local.set $out (call $alloc (local.get $total)))
    (if (i32.eqz (local.get $out))
      (then (unreachable)))  ;; out of memory: the call fails, the host reports it
    (memory.copy (local.get $out) (i32.const 16) (i32.const 25))
    (memory.copy (i32.add (local.get $out) (i32.const 25)) (local.get $ptr) (local.get $len))
    (memory.copy (i32.add (i32.add (local.get $out) (i32.const 25)) (local.get $len)) (i32.const 48) (i32.const 14))
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
      (i64.extend_i32_u (local.get $total))))
)
"""

AS_PACKAGE_JSON = """\
{
  "name": "{{name}}",
  "version": "0.1.0",
  "private": true,
  "description": "{{description}}",
  "scripts": {
    "build": "sandbus build ."
  },
  "devDependencies": {
    "assemblyscript": "{{asc_version}}"
  }
}
"""

AS_INDEX = """\
// {{name}}: a sandbus plugin in AssemblyScript, using the SDK @sandbus/guest
// (Guest ABI v1: docs/abi.md; the author's guide: docs/guide.md).
//
//   request:  any JSON
//   reply:    {"success":true,"result":<the request>,"error":null}
//   not JSON: {"success":false,"result":null,"error":"invalid request: <reason>"}
//
// `sandbus build .` compiles it with asc (--runtime minimal) into build/{{name}}.wasm.
import { jsonStrerror, jsonValidate, JSON_OK, log, LogLevel, replyError, replyOk, requestText } from "@sandbus/guest";

// Only the entry file's exports become wasm exports: re-export the ABI's required three.
export { sandbus_abi_version, sandbus_alloc, sandbus_dealloc } from "@sandbus/guest";

export function handle_request(ptr: usize, len: u32): u64 {
  // The request buffer belongs to the host: decode it, never free it.
  const request = requestText(ptr, len);
  const rc = jsonValidate(request);
  if (rc != JSON_OK) return replyError("invalid request: " + jsonStrerror(rc));
  log(LogLevel.Debug, "{{name}}: replying");
  return replyOk(request); // validated above, so safe to embed verbatim
}

/** Optional: the manifest's [config] table as JSON, once per instance. 0 = success. */
export function sandbus_init(ptr: usize, len: u32): i32 {
  return 0;
}
"""

EXTISM_AS_PACKAGE_JSON = """\
{
  "name": "{{name}}",
  "version": "0.1.0",
  "private": true,
  "description": "{{description}}",
  "scripts": {
    "build": "sandbus build ."
  },
  "devDependencies": {
    "@extism/as-pdk": "{{pdk_version}}",
    "assemblyscript": "{{asc_version}}"
  }
}
"""

EXTISM_AS_README = """
This is an Extism plugin: `assembly/index.ts` uses Extism's AssemblyScript PDK (`@extism/as-pdk`, pinned in
`package.json` with the compiler; `sandbus build` runs `npm install` the first time). The same
`build/{{name}}.wasm` runs in any Extism host (`extism call build/{{name}}.wasm handle_request --input '{}'`).
Its input and output are bytes, not necessarily JSON (this one wraps whatever it gets in the reply envelope):
`sandbus run build/{{name}}.wasm --raw --input 'any bytes'`.
"""

EXTISM_AS_INDEX = """\
// {{name}}: an Extism plugin in AssemblyScript, on Extism's PDK @extism/as-pdk. It runs in sandbus and in
// any Extism host alike (the author's guide: docs/guide.md, "Extism plugins").
//
//   input:   a JSON request (an Extism plugin's input and output are bytes: sandbus checks neither)
//   output:  {"success":true,"result":<the input>,"error":null}
//   empty input: a failure with a message (error_set, then a non-zero return)
//
// Every exported `(): i32` function is callable; 0 means success. `sandbus build .` compiles this file with
// asc into build/{{name}}.wasm.
import { Host, Memory } from "@extism/as-pdk";
import { error_set } from "@extism/as-pdk/lib/env";

const BEFORE = Uint8Array.wrap(String.UTF8.encode('{"success":true,"result":'));
const AFTER = Uint8Array.wrap(String.UTF8.encode(',"error":null}'));

export function handle_request(): i32 {
  const input = Host.input();
  if (input.length == 0) {
    error_set(Memory.allocateString("{{name}}: empty request").offset);
    return 1;
  }
  const out = new Uint8Array(BEFORE.length + input.length + AFTER.length);
  out.set(BEFORE, 0);
  out.set(input, BEFORE.length);
  out.set(AFTER, BEFORE.length + input.length);
  Host.output(out);
  return 0;
}
"""

PYTHON_APP = '''\
"""{{name}}: a sandbus plugin in Python, compiled to a WebAssembly component by componentize-py
against the sandbus WIT world (sdk/guest/python/wit), with the helper module sandbus_guest
(sdk/guest/python/sandbus_guest.py). The author's guide: docs/guide.md.

    request:  any JSON
    reply:    {"success": true, "result": <the request>, "error": null}
    not JSON: {"success": false, "result": null, "error": "JSONDecodeError: ..."}

`sandbus build .` compiles it into build/{{name}}.wasm (a component of ~20 MB: it carries CPython).
"""

from typing import Any

from sandbus_guest import Plugin, debug, function


class WitWorld(Plugin):  # componentize-py looks the class up by this name
    @function("handle_request")
    def handle(self, request: Any) -> Any:
        """The decoded request in, a JSON-able result out (wrapped in the envelope by Plugin).
        Raise sandbus_guest.PluginError for a plugin-level failure."""
        debug("{{name}}: replying")
        return request

    def setup(self, config: Any) -> None:
        """Optional: the manifest's [config] table, once per instance; raise to refuse to start."""
'''
