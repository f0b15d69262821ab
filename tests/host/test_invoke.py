"""The fast call path relies on wasmtime-py internals (pinned major): check the reliance and that
both paths give the same answers and the same errors."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from host.sandbox import Limits, Sandbox
from host.sandbox.invoke import FAST_PATH_REASON, FastInvoker, PlainInvoker, fast_path_available
from sdk.errors import AbiViolationError, ExecutionTimeoutError, SandbusError, TrapError

PAYLOADS = [b"{}", b"[]", b"null", b'"\\u00e9t\\u00e9"', orjson.dumps({"k": "v" * 10_000}),
            orjson.dumps(list(range(2000))), orjson.dumps({"nested": {"a": [1, 2.5, True, None]}})]


def test_pinned_wasmtime_major_has_the_internals_we_use() -> None:
    major = int(importlib.metadata.version("wasmtime").split(".")[0])
    assert major == 50, "the fast path was written against wasmtime-py 50; re-check invoke.py before bumping"
    assert fast_path_available(), FAST_PATH_REASON


@pytest.fixture(params=["echo.wasm", "text_processor.wasm"])
def plugin(request: pytest.FixtureRequest, plugins_dir: Path) -> Path:
    return plugins_dir / str(request.param)


def test_fast_and_plain_paths_agree(plugin: Path) -> None:
    fast = Sandbox(plugin, fast=True)
    plain = Sandbox(plugin, fast=False)
    for sb, kind in ((fast, FastInvoker), (plain, PlainInvoker)):
        inst = sb.pool.acquire()
        assert isinstance(inst._invoker, kind)
        sb.pool.release(inst)
    for payload in PAYLOADS * 3:
        a = fast.call_detailed("handle_request", payload)
        b = plain.call_detailed("handle_request", payload)
        assert a.reply == b.reply
        assert a.fuel_used == b.fuel_used
        assert a.memory_bytes == b.memory_bytes


@pytest.mark.parametrize(("function", "error"), [("trap", TrapError), ("bad_ptr", AbiViolationError),
                                                  ("loop_forever", ExecutionTimeoutError)])
def test_fast_and_plain_paths_fail_alike(wat: Callable[[str], bytes], function: str,
                                         error: type[SandbusError]) -> None:
    messages = []
    for fast in (True, False):
        sb = Sandbox(wat("adversary"), name="adv", limits=Limits(timeout_s=0.1, fuel=10**12), fast=fast)
        with pytest.raises(error) as info:
            sb.call(function, {})
        messages.append(info.value.message)
        assert sb.call("echo", 1) == 1
    assert messages[0] == messages[1]
