"""The fast call path relies on wasmtime-py internals (pinned major): check the reliance and that
both paths give the same answers and the same errors."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from sandbus.host.sandbox import Limits, Sandbox
from sandbus.host.sandbox.invoke import (
    FAST_PATH_REASON,
    NATIVE_REASON,
    FastInvoker,
    PlainInvoker,
    fast_path_available,
    native_available,
)
from sandbus.sdk.errors import (
    AbiViolationError,
    ExecutionTimeoutError,
    MemoryLimitError,
    PayloadTooLargeError,
    SandbusError,
    StackLimitError,
    TrapError,
)

PAYLOADS = [b"{}", b"[]", b"null", b'"\\u00e9t\\u00e9"', orjson.dumps({"k": "v" * 10_000}),
            orjson.dumps(list(range(2000))), orjson.dumps({"nested": {"a": [1, 2.5, True, None]}})]


def test_pinned_wasmtime_major_has_the_internals_we_use() -> None:
    major = int(importlib.metadata.version("wasmtime").split(".")[0])
    assert major == 50, "the fast path was written against wasmtime-py 50; re-check invoke.py before bumping"
    assert fast_path_available(), FAST_PATH_REASON


def test_native_round_trip_is_built() -> None:
    # setup.py builds it optionally (a machine without a compiler falls back to ctypes); our own
    # installs have a compiler, so a missing build here is a broken build, not a fallback.
    assert native_available(), NATIVE_REASON


#: (fast, native): the compiled round trip, the same steps through ctypes, the public API.
PATHS = {"native": (True, True), "ctypes": (True, False), "plain": (False, False)}


def _sandbox(wasm: Path | bytes, path: str, **kwargs: object) -> Sandbox:
    fast, native = PATHS[path]
    return Sandbox(wasm, fast=fast, native=native, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(params=["echo.wasm", "text_processor.wasm"])
def plugin(request: pytest.FixtureRequest, plugins_dir: Path) -> Path:
    return plugins_dir / str(request.param)


def test_native_ctypes_and_plain_paths_agree(plugin: Path) -> None:
    boxes = {path: _sandbox(plugin, path) for path in PATHS}
    for path, sb in boxes.items():
        inst = sb.pool.acquire()
        assert isinstance(inst._invoker, PlainInvoker if path == "plain" else FastInvoker)
        if isinstance(inst._invoker, FastInvoker):
            assert inst._invoker.native == (path == "native")
        sb.pool.release(inst)
    for payload in PAYLOADS * 3:
        results = [sb.call_detailed("handle_request", payload) for sb in boxes.values()]
        assert len({r.reply for r in results}) == 1
        assert len({r.fuel_used for r in results}) == 1
        assert results[0].fuel_used > 0
        assert len({r.memory_bytes for r in results}) == 1


@pytest.mark.parametrize(("function", "error"), [
    ("trap", TrapError), ("bad_ptr", AbiViolationError), ("loop_forever", ExecutionTimeoutError),
    ("huge_len", PayloadTooLargeError), ("grow_bomb", MemoryLimitError), ("recurse", StackLimitError),
    ("log_oob", AbiViolationError),  # raised inside a host function, during the call
])
def test_fast_and_plain_paths_fail_alike(wat: Callable[[str], bytes], function: str,
                                         error: type[SandbusError]) -> None:
    messages = []
    for path in PATHS:
        sb = _sandbox(wat("adversary"), path, name="adv", limits=Limits(timeout_s=0.1, fuel=10**12))
        with pytest.raises(error) as info:
            sb.call(function, {})
        messages.append(info.value.message)
        assert sb.call("echo", 1) == 1
    assert len(set(messages)) == 1, messages


def test_any_bytes_like_payload_is_accepted(plugins_dir: Path) -> None:
    with Sandbox(plugins_dir / "echo.wasm") as sb:
        data = orjson.dumps({"k": [1, 2]})
        for payload in (data, bytearray(data), memoryview(data)):
            assert sb.call_bytes("handle_request", payload) == data  # type: ignore[arg-type]
