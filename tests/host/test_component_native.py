"""A component's ``handle-request`` through host/sandbox/_component.c: what it relies on in wasmtime, that it
answers as wasmtime-py's component API does, and hostile input on both sides of the call.

The hostile guest is tests/host/wat/component_adversary.wat, a hand-written component (no toolchain): the first
byte of the function name picks its misbehaviour. The real Python guest is plugins/py_echo (componentize-py).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import random
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from wasmtime import _ffi as ffi

from sandbus.host.sandbox import (
    BudgetExceeded,
    CallContext,
    HostFunction,
    HostFunctions,
    Limits,
    Sandbox,
    SandboxBuilder,
)
from sandbus.host.sandbox import component as component_mod
from sandbus.host.sandbox.component import (
    COMPONENT_NATIVE_REASON,
    VERIFIED_WASMTIME_MAJORS,
    ComponentInstance,
    component_native_available,
    expected_layout,
)
from sandbus.sdk.errors import (
    AbiViolationError,
    ExecutionTimeoutError,
    PayloadTooLargeError,
    SandboxError,
    SandbusError,
    TrapError,
)
from tests.conftest import AuditLog

MIB = 1024 * 1024


# ---------------------------------------------------------------------------
# What _component.c relies on
# ---------------------------------------------------------------------------


def test_the_native_component_call_is_built_and_bound() -> None:
    # setup.py builds it optionally; our own installs have a compiler, so missing it here is a broken build.
    assert component_native_available(), COMPONENT_NATIVE_REASON


def test_the_installed_wasmtime_is_one_the_c_side_was_checked_against() -> None:
    """Before adding a major to VERIFIED_WASMTIME_MAJORS, check in wasmtime's crates/c-api (component/func.rs,
    component/val.rs) that ``wasmtime_component_func_call`` still only reads its arguments and assigns its
    results (dropping the slot's old value), that ``wasmtime_component_val_delete`` drops in place, and that a
    string argument is still converted with an unwrap (the reason for the UTF-8 check in C)."""
    major = int(importlib.metadata.version("wasmtime").split(".")[0])
    assert major in VERIFIED_WASMTIME_MAJORS


def test_value_layout_matches_the_installed_wasmtime() -> None:
    from sandbus.host.sandbox import _component

    # (sizeof value, union offset, string size / data, result is_ok / val, kinds STRING / RESULT / U32)
    assert _component.layout() == expected_layout() == (32, 8, 0, 8, 0, 8, 12, 19, 6)
    # A host function's callback: (env, context, function type, args, nargs, results, nresults) -> error
    assert len(ffi.wasmtime_component_func_callback_t._argtypes_) == 7
    assert ctypes.sizeof(ffi.wasm_name_t) == 16


# ---------------------------------------------------------------------------
# The UTF-8 check in C: a bad string reaching wasmtime aborts the process
# ---------------------------------------------------------------------------


def _samples() -> Iterator[bytes]:
    for a in range(256):
        yield bytes([a])
        for b in range(256):
            yield bytes([a, b])
    leads = [0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xC0, 0xC1, 0xFF]
    seconds = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF]
    for lead in leads:
        for b in seconds:
            for c in seconds:
                yield bytes([lead, b, c])
                for d in seconds:
                    yield bytes([lead, b, c, d])
    rng = random.Random(15)
    chars = ["a", "\x00", "é", "\u07ff", "\u0800", "\ud7ff", "\ue000", "\uffff", "😀", "\U0010ffff"]
    for _ in range(3000):
        text = "".join(rng.choice(chars) for _ in range(rng.randrange(1, 24))).encode()
        cut = rng.randrange(len(text) + 1)
        yield text
        yield text[:cut]  # may end inside a character
        yield text[:cut] + bytes([rng.randrange(256)]) + text[cut:]


def test_utf8_check_agrees_with_a_strict_decoder() -> None:
    """Python's strict decoder and Rust's String::from_utf8 accept the same bytes (RFC 3629): the C check
    must accept exactly those, and point at the same first bad byte."""
    from sandbus.host.sandbox import _component

    checked = 0
    for data in _samples():
        try:
            data.decode()
            expected = -1
        except UnicodeDecodeError as e:
            expected = e.start
        assert _component.utf8_error_at(data) == expected, data
        checked += 1
    assert checked > 90_000
    assert _component.utf8_error_at(b"x" * 1000 + "é".encode() + b"y" * 7) == -1
    assert _component.utf8_error_at(b"x" * 1000 + b"\xed\xa0\x80") == 1000  # an encoded surrogate


# ---------------------------------------------------------------------------
# The hostile component, through both paths
# ---------------------------------------------------------------------------

PATHS = ("native", "wasmtime-py")


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Instances built under this fixture call through the C extension, or through wasmtime-py's API."""
    if request.param == "wasmtime-py":
        monkeypatch.setattr(component_mod, "_native", None)
    return str(request.param)


@pytest.fixture
def adversary(wat: Callable[[str], bytes], path: str, audit: AuditLog) -> Iterator[Sandbox]:
    with Sandbox(wat("component_adversary"), name="adv", limits=Limits(timeout_s=0.5, max_output_bytes=MIB),
                 on_audit=audit) as sb:
        inst = sb.pool.acquire()
        assert isinstance(inst, ComponentInstance)
        assert inst.native == (path == "native")
        sb.pool.release(inst)
        yield sb


def test_echo(adversary: Sandbox) -> None:
    for payload in (b"{}", b'"\\u00e9t\\u00e9"', '{"t": "é 😀 \\u0000"}'.encode(), orjson.dumps({"k": "v" * 100_000})):
        assert adversary.call_bytes("echo", payload) == payload
    assert adversary.call_bytes("none", b"{}", validate=False) == b""  # ok("")
    assert adversary.pool.replaced == 0


def test_a_request_that_is_not_utf8_is_refused_before_the_guest_runs(adversary: Sandbox, audit: AuditLog) -> None:
    for payload in (b'{"a": "\xff"}', b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'"\xf4\x90\x80\x80"', b'"\xe2\x82'):
        with pytest.raises(AbiViolationError, match="request is not valid UTF-8"):
            adversary.call_bytes("echo", payload)
    assert adversary.pool.replaced == 0  # nothing ran: the instance is as good as before
    assert adversary.call_bytes("echo", b"[1]") == b"[1]"


def test_a_function_name_that_is_not_utf8_is_refused(adversary: Sandbox) -> None:
    for name in ("\udcff", "echo\ud800", "\udce9t\udce9"):  # lone surrogates (e.g. bytes decoded with surrogateescape)
        with pytest.raises(AbiViolationError, match="function name is not valid UTF-8"):
            adversary.call_bytes(name, b"{}")
    assert adversary.pool.replaced == 0
    assert adversary.call_bytes("e\x00\u00e9", b"{}") == b"{}"  # NUL and non-ASCII are valid UTF-8


@pytest.mark.parametrize("function", ["huge", "gerr"])  # ok(2 MiB), err(2 MiB)
def test_a_reply_over_max_output_is_refused(adversary: Sandbox, audit: AuditLog, function: str) -> None:
    with pytest.raises(PayloadTooLargeError, match=r"reply of \d+ bytes exceeds the 1048576-byte output limit"):
        adversary.call_bytes(function, b"{}")
    assert audit.kinds() == ["limit.output_size"]
    assert adversary.call_bytes("echo", b"{}") == b"{}"
    assert adversary.pool.replaced == 1


@pytest.mark.parametrize(("function", "message"), [
    ("bad", "invalid utf-8"),          # ok(invalid UTF-8): wasmtime checks what it lifts from the guest
    ("rbad", "invalid utf-8"),         # err(invalid UTF-8)
    ("oob", "out of bounds"),          # a string past the end of memory
    ("disc", "discriminant 7"),        # a result that is neither ok nor err
    ("trap", "unreachable"),
    ("Bad", "invalid utf-8"),          # log(invalid UTF-8): checked by wasmtime before the host sees it
    ("OOB", "out of bounds"),          # log(a range past the end of memory)
])
def test_a_guest_that_lies_traps_and_the_pool_replaces_it(adversary: Sandbox, function: str, message: str) -> None:
    with pytest.raises(TrapError, match=message):
        adversary.call_bytes(function, b"{}")
    assert adversary.call_bytes("echo", b'{"after": 1}') == b'{"after": 1}'
    assert adversary.pool.replaced == 1


def test_a_trapped_instance_called_again_fails_typed(adversary: Sandbox) -> None:
    """The pool never hands out a poisoned instance; called directly anyway, wasmtime refuses to enter it,
    and that is an error for the caller, not a crash."""
    inst = adversary.pool.acquire()
    try:
        with pytest.raises(TrapError):
            inst.call("trap", b"{}")
        assert inst.poisoned
        with pytest.raises(SandbusError):
            inst.call("echo", b"{}")
    finally:
        adversary.pool.release(inst)
    assert adversary.call_bytes("echo", b"{}") == b"{}"


def test_the_guest_logs_through_the_host_interface(adversary: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    message = '{"note": "é 😀"}'
    with caplog.at_level("INFO", logger="sandbus.plugin.adv"):
        assert adversary.call_bytes("Log", message.encode()) == message.encode()
    assert [r.getMessage() for r in caplog.records if r.name == "sandbus.plugin.adv"] == [message]


def test_the_log_cap_holds_for_a_component(wat: Callable[[str], bytes], path: str, audit: AuditLog) -> None:
    with Sandbox(wat("component_adversary"), name="adv", limits=Limits(log_bytes=1000), on_audit=audit) as sb:
        request = orjson.dumps({"pad": "x" * 90})
        assert sb.call_bytes("Log", request) == request  # ~100 bytes: under the cap
        with pytest.raises(PayloadTooLargeError, match="log"):
            sb.call_bytes("many", request)  # 100 times that
        assert audit.kinds() == ["limit.log"]
        assert sb.call_bytes("Log", request) == request  # the cap is per call


def test_two_threads_each_get_their_own_outcome(wat: Callable[[str], bytes], path: str) -> None:
    """The GIL is released while a guest runs and taken back by ``log``: under two threads, every call gets
    its own reply or its own error."""
    with Sandbox(wat("component_adversary"), name="adv", limits=Limits(max_instances=2)) as sb:
        wrong: list[str] = []

        def logger() -> None:
            for i in range(200):
                request = orjson.dumps({"i": i})
                if sb.call_bytes("Log", request) != request:
                    wrong.append(f"Log {i}")

        def trapper() -> None:
            for i in range(200):
                try:
                    sb.call_bytes("trap" if i % 2 else "echo", b"[0]")
                except TrapError as e:
                    if "unreachable" not in e.message:
                        wrong.append(e.message)
                else:
                    if i % 2:
                        wrong.append(f"trap {i} returned")

        threads = [threading.Thread(target=logger), threading.Thread(target=trapper)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert wrong == []


def test_timeout_and_budget(adversary: Sandbox, audit: AuditLog) -> None:
    with pytest.raises(ExecutionTimeoutError):
        adversary.call_bytes("loop", b"{}")
    assert audit.kinds() == ["limit.timeout"]
    inst = adversary.pool.acquire()
    try:
        with pytest.raises(BudgetExceeded):
            inst.call("loop", b"{}", budget_s=0.05)
        assert inst.poisoned
    finally:
        adversary.pool.release(inst)
    assert adversary.call_bytes("echo", b"{}") == b"{}"


def test_both_paths_fail_alike(wat: Callable[[str], bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    wasm = wat("component_adversary")
    seen: dict[str, list[str]] = {}
    for which in PATHS:
        if which == "wasmtime-py":
            monkeypatch.setattr(component_mod, "_native", None)
        with Sandbox(wasm, name="adv", limits=Limits(timeout_s=0.3)) as sb:
            outcomes = []
            for function, payload in [("bad", b"{}"), ("rbad", b"{}"), ("huge", b"{}"), ("oob", b"{}"),
                                      ("disc", b"{}"), ("trap", b"{}"), ("loop", b"{}"), ("echo", b'"\xff"'),
                                      ("Bad", b"{}"), ("OOB", b"{}"), ("Log", b"[1]"),
                                      ("\udcff", b"{}"), ("", b"{}"), ("echo", b"[2]")]:
                try:
                    outcomes.append(sb.call_bytes(function, payload).decode())
                except SandbusError as e:
                    outcomes.append(f"{type(e).__name__}: {e.message}")
            seen[which] = outcomes
    assert seen["native"] == seen["wasmtime-py"]
    assert seen["native"][-1] == "[2]"


# ---------------------------------------------------------------------------
# The Python guest
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def py_echo(plugins_dir: Path) -> Iterator[Sandbox]:
    path = plugins_dir / "py_echo.wasm"
    if not path.exists():
        pytest.fail("plugins/build.sh did not build py_echo: install componentize-py into the venv")
    with SandboxBuilder(path).instances(1).allow_env("GREETING", "hej").build() as sb:
        yield sb


def test_python_guest_native_and_wasmtime_py_agree(py_echo: Sandbox) -> None:
    """The same instance, the same calls, one path then the other: the same replies (envelopes, plugin-level
    errors and host functions included) and fuel counted on both."""
    requests = [("echo", b"{}"), ("echo", '{"t": "quote \\" é 😀"}'.encode()), ("handle_request", b"[1, 2.5, null]"),
                ("handle_request", b'{"a": '), ("fly", b"{}"), ("env", b'{"name": "GREETING"}'),
                ("echo", orjson.dumps({"k": "v" * 50_000}))]
    inst = py_echo.pool.acquire()
    assert isinstance(inst, ComponentInstance)
    try:
        assert inst.native
        replies: dict[bool, list[bytes]] = {}
        for native in (True, False):
            inst.native = native
            replies[native] = []
            for function, payload in requests:
                replies[native].append(inst.call(function, payload))
                assert inst.ctx.stats.fuel_used > 0
        assert replies[True] == replies[False]
        assert orjson.loads(replies[True][4])["error"].startswith("unknown function 'fly'")
        assert orjson.loads(replies[True][5])["result"] == {"name": "GREETING", "value": "hej"}
    finally:
        inst.native = True
        py_echo.pool.release(inst)


def test_python_guest_host_function_on_the_native_path(py_echo: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    """handle_request logs a line through the host interface's ``log``, a wasmtime-py callback reached from
    inside the native call (which released the GIL). What a guest writes to stdout / stderr is read only
    when the C side saw something in the pipes: tests/guests/test_hardening_component.py's spew and trap
    tests show it arrives."""
    with caplog.at_level("DEBUG", logger="sandbus.plugin.py_echo"):
        py_echo.call("handle_request", {"a": 1})
    assert any("one request" in r.getMessage() for r in caplog.records)


def _failing_log(exc: BaseException) -> HostFunctions:
    def log(ctx: CallContext, level: int, ptr: int, length: int) -> None:
        raise exc

    funcs = HostFunctions()
    funcs.add(HostFunction("log", ("i32",) * 3, (), log))
    return funcs


@pytest.mark.parametrize("which", PATHS)
def test_python_guest_log_failures_and_cap(plugins_dir: Path, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """``log`` through the trampoline (native) or wasmtime-py's wrapper: a host function's error fails the
    call with that error, a KeyboardInterrupt in it reaches the caller (it does not unwind through wasmtime),
    and the log cap holds."""
    if which == "wasmtime-py":
        monkeypatch.setattr(component_mod, "_native", None)
    path = plugins_dir / "py_echo.wasm"
    refused = SandboxError("log refused by the test")
    with SandboxBuilder(path).host_functions(_failing_log(refused)).build() as sb:
        with pytest.raises(SandboxError, match="log refused by the test"):
            sb.call("handle_request", {"a": 1})
        assert sb.pool.replaced == 1
        assert sb.call_bytes("echo", b"[3]") == b"[3]"  # echo does not log
    with (SandboxBuilder(path).host_functions(_failing_log(KeyboardInterrupt())).build() as sb,
          pytest.raises(KeyboardInterrupt)):
        sb.call("handle_request", {"a": 1})
    with SandboxBuilder(path).log_cap(8).build() as sb:  # "py_echo: one request" is 20 bytes
        with pytest.raises(PayloadTooLargeError, match="log"):
            sb.call("handle_request", {"a": 1})
        assert sb.call("echo", {"b": 2}) == {"b": 2}


@pytest.mark.parametrize("which", PATHS)
def test_linked_host_functions_go_with_the_instance(plugins_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                    which: str) -> None:
    """The trampoline holds the Python side of ``log`` until wasmtime drops the function (with the store
    and linker): once the sandbox is closed and its instances collected, nothing of theirs is left."""
    if which == "wasmtime-py":
        monkeypatch.setattr(component_mod, "_native", None)
    sb = Sandbox(plugins_dir / "py_echo.wasm")
    inst = sb.pool.acquire()
    ctx = weakref.ref(inst.ctx)
    sb.pool.release(inst)
    sb.call("handle_request", {"a": 1})  # the guest logs through the linked function
    sb.close()
    del inst, sb
    gc.collect()
    assert ctx() is None
