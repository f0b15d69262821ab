"""Compiling an untrusted binary within bounds: size and function count first, then time and memory.

A crafted module costs the host at compile time: a valid 12 MB module of ~1 M tiny functions compiled
for minutes in ~6 GB, and 3 MB of nested blocks in one function takes ~10 s and ~1 GB. So:

* before anything compiles, the binary's size and the function count in its section headers
  (host/sandbox/wasmscan.py) are checked against ``Limits.max_module_bytes`` / ``max_functions``, and a
  module that declares a 64-bit or shared memory is refused by name;
* a binary of :data:`IN_PROCESS_BELOW` bytes or more, or one that defines more than
  :data:`IN_PROCESS_FUNCTIONS` functions, is compiled in a child process (host/sandbox/_compile_worker.py)
  under ``Limits.compile_timeout_s`` (then killed) and an address-space limit of
  ``Limits.compile_memory_bytes``; the host deserializes the child's result, which it reads from a pipe
  (no file that another user could replace). Size alone is not enough: 200 KB of 50,000 empty functions
  compiled in-process for 3.2 s in 360 MB, outside both limits. Within both thresholds the worst code we
  could construct (deep nesting, 50,000 locals, 5,000 functions of straight-line code) compiles in under
  0.4 s in ~150 MB, so small modules (every test's, most plugins') skip the ~0.2 s a child costs.

Every refusal is an :class:`InvalidModuleError` naming the bound (``details["bound"]``) or the wasm
feature (``details["feature"]``) that refused it.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import TypeVar

import wasmtime
from wasmtime.component import Component

from sandbus.host.sandbox.config import Limits
from sandbus.host.sandbox.engine import EngineHandle
from sandbus.host.sandbox.wasmscan import MalformedWasm, WasmFacts, scan_wasm
from sandbus.sdk.errors import InvalidModuleError, SandboxError

__all__ = ["IN_PROCESS_BELOW", "IN_PROCESS_FUNCTIONS", "MAX_SECTIONS", "check_bounds", "check_facts",
           "compile_bounded", "describe_error", "read_wasm", "stop_compile"]

Compiled = TypeVar("Compiled", wasmtime.Module, Component)

#: Binaries at least this large compile in a child process under time and memory limits.
IN_PROCESS_BELOW = 256 * 1024
#: ... and so do binaries defining more functions than this (compile cost grows ~60 us and ~7 KB per function).
IN_PROCESS_FUNCTIONS = 4096
#: Sections in all (a component's embedded modules included): componentize-py emits ~600.
MAX_SECTIONS = 10_000
_WORKER = Path(__file__).with_name("_compile_worker.py")
_INVALID, _BROKEN = 3, 4  # exit statuses of the worker

#: Words in wasmtime's refusal -> the proposal it names (the engine turns these off: engine.py).
_FEATURES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p, re.I), f) for p, f in (
    (r"memory64|64-bit memor", "memory64"),
    (r"threads|shared memor|atomic", "threads"),
    (r"\bgc\b|garbage", "gc"),
    (r"tail call", "tail-call"),
    (r"multiple memories|multi-memory", "multi-memory"),
    (r"exception", "exceptions"),
    (r"function references", "function-references"),
    (r"relaxed simd", "relaxed-simd"),
    (r"wide arithmetic", "wide-arithmetic"),
    (r"custom page", "custom-page-sizes"),
    (r"stack switching", "stack-switching"),
    (r"component model", "component-model"),
))


def _refuse(message: str, plugin: str | None, **details: object) -> InvalidModuleError:
    return InvalidModuleError(message, plugin=plugin, **details)


def read_wasm(path: Path, limits: Limits) -> bytes:
    """The file's bytes, reading at most one byte more than ``limits.max_module_bytes``: a huge file is
    refused by :func:`check_bounds` without ever being held in memory whole. ``OSError`` passes through,
    and anything but a regular file is one: a FIFO would block the open and the read forever, so the file is
    opened non-blocking and checked on its descriptor."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(22, "not a regular file (a directory, FIFO, socket or device)", str(path))
        return f.read(limits.max_module_bytes + 1)


def check_bounds(wasm: bytes, limits: Limits, plugin: str | None) -> WasmFacts:
    """Refuse ``wasm`` (typed, naming the bound) unless it is within ``limits``; cheap: headers only."""
    size = len(wasm)
    _check_size(size, limits, plugin)
    try:
        facts = scan_wasm(wasm, max_sections=MAX_SECTIONS)
    except MalformedWasm as e:
        what = "component" if wasm[4:8] == b"\x0d\x00\x01\x00" else "module"
        raise _refuse(f"not a valid WebAssembly {what} ({size} bytes): {e}", plugin, size=size) from e
    return check_facts(facts, limits, plugin)


def check_facts(facts: WasmFacts, limits: Limits, plugin: str | None) -> WasmFacts:
    """:func:`check_bounds` on headers scanned before (a module file whose digest and facts the
    :class:`~sandbus.host.sandbox.filememo.FileMemo` remembers): the same bounds, the same errors."""
    _check_size(facts.size, limits, plugin)
    if facts.functions > limits.max_functions:
        raise _refuse(f"the binary defines {facts.functions} functions; this host compiles at most "
                      f"{limits.max_functions} (max_functions)", plugin, bound="max_functions",
                      functions=facts.functions, limit=limits.max_functions)
    if facts.memory64:
        raise _refuse("the module declares a 64-bit memory (memory64), which this host does not support: "
                      "the guest ABI's pointers are 32-bit", plugin, feature="memory64")
    if facts.shared_memory:
        raise _refuse("the module declares a shared memory (threads), which this host does not support",
                      plugin, feature="threads")
    return facts


def _check_size(size: int, limits: Limits, plugin: str | None) -> None:
    if size > limits.max_module_bytes:
        raise _refuse(f"the binary is {size} bytes; this host compiles at most {limits.max_module_bytes} "
                      "(max_module_bytes)", plugin, bound="max_module_bytes", size=size,
                      limit=limits.max_module_bytes)


def describe_error(text: str) -> tuple[str, str | None]:
    """wasmtime's error text as one line (what failed: why), and the disabled proposal it names, if any."""
    text = text.strip()
    if not text:
        return "unknown error", None
    first = text.splitlines()[0].strip()
    cause = ""
    if "Caused by:" in text:
        lines = [ln.strip() for ln in text.rsplit("Caused by:", 1)[1].splitlines() if ln.strip()]
        if lines:
            cause = re.sub(r"^\d+:\s*", "", lines[-1])
    feature = next((name for pattern, name in _FEATURES if pattern.search(cause or first)), None)
    line = f"{first}: {cause}" if cause else first
    if feature is not None:
        line += f" (the {feature} proposal is turned off on this host)"
    return line, feature


def compile_bounded(kind: type[Compiled], handle: EngineHandle, wasm: bytes, limits: Limits,
                    plugin: str | None, facts: WasmFacts | None = None) -> Compiled:
    """Compile ``wasm`` for ``handle``'s engine; in a bounded child process when it is large or defines
    many functions. ``facts`` are :func:`check_bounds`'s (scanned again when not given)."""
    what = "component" if kind is Component else "module"
    if facts is None:
        facts = check_bounds(wasm, limits, plugin)
    if len(wasm) < IN_PROCESS_BELOW and facts.functions <= IN_PROCESS_FUNCTIONS:
        try:
            return kind(handle.engine, wasm)
        except wasmtime.WasmtimeError as e:
            raise _invalid(str(e), what, len(wasm), plugin) from e
    data = _compile_in_child(what, handle, wasm, limits, plugin)
    try:
        return kind.deserialize(handle.engine, data)
    except wasmtime.WasmtimeError as e:  # pragma: no cover - the child builds the same engine config
        raise _refuse(f"the compile worker's output does not load: {describe_error(str(e))[0]}", plugin) from e


def _invalid(text: str, what: str, size: int, plugin: str | None) -> InvalidModuleError:
    line, feature = describe_error(text)
    details: dict[str, object] = {"feature": feature} if feature else {}
    return _refuse(f"not a valid WebAssembly {what} ({size} bytes): {line}", plugin, **details)


#: The compile worker each thread waits for, so :func:`stop_compile` can stop it; and the threads stopped,
#: whose next compiles are refused (thread objects, never reused as thread ids are).
_workers: dict[threading.Thread, subprocess.Popen[bytes]] = {}
_stopped: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_workers_lock = threading.Lock()


def stop_compile(thread: threading.Thread) -> bool:
    """Kill the compile worker ``thread`` is waiting for, if any, and refuse every compile in a worker it
    would start next (a typed error). What a plugin manager that closes does to its background load, so no
    worker outlives the node. True if a worker was running."""
    with _workers_lock:
        _stopped.add(thread)
        worker = _workers.get(thread)
    if worker is None:
        return False
    worker.kill()
    return True


def _compile_in_child(what: str, handle: EngineHandle, wasm: bytes, limits: Limits, plugin: str | None) -> bytes:
    args = [sys.executable, "-I", str(_WORKER), str(handle.stack_bytes), "1" if handle.fuel else "0", what,
            str(limits.compile_memory_bytes), "1" if handle.debug else "0"]
    me = threading.current_thread()
    with _workers_lock:  # started and registered in one step: stop_compile sees it or refuses it
        if me in _stopped:
            raise SandboxError(f"compiling the {what} was stopped (its plugin manager closed)", plugin=plugin)
        worker = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _workers[me] = worker
    try:
        try:
            stdout, stderr_bytes = worker.communicate(wasm, timeout=limits.compile_timeout_s)
        except subprocess.TimeoutExpired as e:
            worker.kill()  # by its own handle
            worker.communicate()
            raise _refuse(f"compiling the {what} took longer than {limits.compile_timeout_s:g} s "
                          "(compile_timeout_s); it was stopped", plugin, bound="compile_timeout_s",
                          limit=limits.compile_timeout_s) from e
        except BaseException:
            worker.kill()
            worker.wait()
            raise
    finally:
        with _workers_lock:
            _workers.pop(me, None)
    done = subprocess.CompletedProcess(args, worker.returncode, stdout, stderr_bytes)
    if done.returncode == 0:
        return done.stdout
    stderr = done.stderr.decode(errors="replace")
    if done.returncode == _INVALID:
        raise _invalid(stderr, what, len(wasm), plugin)
    if done.returncode == _BROKEN:
        raise SandboxError(f"the compile worker failed: {stderr.strip()[-500:]}", plugin=plugin)
    how = f"exit status {done.returncode}"
    if done.returncode < 0:
        try:
            how = f"killed by {signal.Signals(-done.returncode).name}"
        except ValueError:
            how = f"killed by signal {-done.returncode}"
    raise _refuse(f"compiling the {what} failed within the {limits.compile_memory_bytes}-byte address-space "
                  f"limit (compile_memory_bytes; {how})", plugin, bound="compile_memory_bytes",
                  limit=limits.compile_memory_bytes)
