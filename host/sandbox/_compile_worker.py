"""Child process that compiles one untrusted wasm binary under an address-space limit.

Run as a script (never imported by the host): ``python _compile_worker.py STACK FUEL KIND MEMORY_BYTES DEBUG``,
the wasm on stdin, the serialized module on stdout. It imports nothing of the package (whose
``__init__`` pulls in far more than a compile needs): the engine configuration comes from engine.py
loaded on its own, so the code is valid for the host's engine. Exit status 3 with the engine's message on
stderr: the binary is not a valid module; 4: the worker itself failed (message on stderr); 5 (a Python
MemoryError) or killed by a signal (SIGABRT: Rust's failed allocation): the compile broke its memory bound.
"""

from __future__ import annotations

import importlib.util
import resource
import sys
from pathlib import Path

INVALID = 3
#: The worker itself failed (could not load wasmtime...): the host's problem, not the module's.
BROKEN = 4
#: Python ran out of memory under the limit (Rust aborts instead: SIGABRT).
OUT_OF_MEMORY = 5


def main(argv: list[str]) -> int:
    stack_bytes, fuel, kind, memory_bytes = int(argv[1]), argv[2] == "1", argv[3], int(argv[4])
    debug = len(argv) > 5 and argv[5] == "1"
    # Before wasmtime is loaded: every allocation the compile makes counts against the limit.
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    if hard != resource.RLIM_INFINITY:
        memory_bytes = min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    wasm = sys.stdin.buffer.read()
    spec = importlib.util.spec_from_file_location("_sandbus_engine", Path(__file__).with_name("engine.py"))
    assert spec is not None
    assert spec.loader is not None
    engine_mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = engine_mod  # its dataclass looks itself up there
    spec.loader.exec_module(engine_mod)
    import wasmtime
    from wasmtime.component import Component

    engine = wasmtime.Engine(engine_mod.make_config(stack_bytes, fuel, debug))
    try:
        compiled = Component(engine, wasm) if kind == "component" else wasmtime.Module(engine, wasm)
    except wasmtime.WasmtimeError as e:
        sys.stderr.write(str(e))
        return INVALID
    sys.stdout.buffer.write(compiled.serialize())
    return 0


if __name__ == "__main__":
    try:
        status = main(sys.argv)
    except MemoryError:
        status = OUT_OF_MEMORY
    except BaseException as e:  # reported to the parent, whatever it is
        sys.stderr.write(f"{type(e).__name__}: {e}")
        status = BROKEN
    sys.exit(status)
