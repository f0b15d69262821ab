"""Property-based fuzzing of the guest boundary (hypothesis, bounded and reproducible).

The guest (tests/host/wat/fuzz_guest.wat) hands back whatever reply pointer and length the test
chooses, and calls host functions (sandbus ``log``, ``env_get``, ``time_now_ms`` and WASI
``fd_write``, ``random_get``, ``clock_time_get``) with arguments the test chooses. Every input runs
on every call path: the compiled round trip (native), the same steps through ctypes, and
wasmtime-py's public API. The properties:

* every outcome is a reply or a typed :class:`SandbusError` (a pointer or length outside the
  guest's memory: :class:`AbiViolationError`, or :class:`PayloadTooLargeError` past the reply
  cap), never another exception, never a crash of the process;
* the three paths agree on the outcome (the same reply, or the same error class);
* the next ordinary call on the same sandbox works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import orjson
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from sandbus.host.sandbox import Limits, Sandbox
from sandbus.host.sandbox.config import Capabilities
from sandbus.sdk.errors import AbiViolationError, PayloadTooLargeError, SandbusError

#: (fast, native), as in tests/host/test_invoke.py
PATHS = {"native": (True, True), "ctypes": (True, False), "plain": (False, False)}
PAGE = 65536
VALID_REPLY = (64, 11)  # where the guest keeps {"ok":true}

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None, report_multiple_bugs=False,
                phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))

U32 = st.one_of(
    st.integers(0, 2**32 - 1),
    st.integers(0, PAGE + 64),  # near and inside the one page of memory
    st.sampled_from([0, 1, 64, 80, 96, 4096, PAGE - 1, PAGE, PAGE + 1, 2**31 - 1, 2**31, 2**32 - 16, 2**32 - 1]),
)


def request(*fields: int) -> bytes:
    """The guest's request: a JSON string of 8-digit hex fields."""
    return b'"' + b"".join(b"%08x" % f for f in fields) + b'"'


Outcome = tuple[str, object]


def outcome(sb: Sandbox, function: str, payload: bytes) -> Outcome:
    """("ok", reply) or ("error", error class); anything else is not a permitted outcome and propagates."""
    try:
        return "ok", sb.call_bytes(function, payload)
    except SandbusError as e:
        return "error", type(e)


Boxes = dict[str, Sandbox]


@pytest.fixture(scope="module")
def make_boxes(wat: Callable[[str], bytes]) -> Callable[[], Boxes]:
    """One sandbox per call path, each with one instance of the fuzz guest."""
    wasm = wat("fuzz_guest")
    caps = Capabilities(env={"HOME": "/home/fuzz"}, random=True)

    def make() -> Boxes:
        return {path: Sandbox(wasm, name="fuzz", fast=fast, native=native, capabilities=caps,
                              limits=Limits(timeout_s=2.0))
                for path, (fast, native) in PATHS.items()}

    return make


@pytest.fixture(scope="module")
def boxes(make_boxes: Callable[[], Boxes]) -> Iterator[Boxes]:
    made = make_boxes()
    try:
        yield made
    finally:
        for sb in made.values():
            sb.close()


def still_works(boxes: dict[str, Sandbox], n: int) -> None:
    for path, sb in boxes.items():
        assert sb.call("echo", {"n": n}) == {"n": n}, f"{path}: the next ordinary call failed"


def agree(results: dict[str, Outcome]) -> Outcome:
    assert len(set(results.values())) == 1, f"the call paths disagree: {results}"
    kind, value = next(iter(results.values()))
    event(f"{kind}: {value.__name__ if isinstance(value, type) else 'reply'}")  # --hypothesis-show-statistics
    return kind, value


def test_fuzz_guest_reply_pointers(boxes: dict[str, Sandbox]) -> None:
    counter = iter(range(10**6))

    @FUZZ
    @given(ptr=st.one_of(U32, st.just(VALID_REPLY[0])), length=st.one_of(U32, st.just(VALID_REPLY[1])))
    def prop(ptr: int, length: int) -> None:
        results = {path: outcome(sb, "reply_with", request(ptr, length)) for path, sb in boxes.items()}
        kind, value = agree(results)
        if ptr + length > PAGE:  # past the end of memory (or wrapping around): never a reply
            assert kind == "error", results
            assert value in (AbiViolationError, PayloadTooLargeError), results
        elif (ptr, length) == VALID_REPLY:
            assert (kind, value) == ("ok", b'{"ok":true}'), results
        still_works(boxes, next(counter))

    prop()


HOST_CALLS = st.one_of(
    st.tuples(st.integers(0, 6), U32, U32, U32, U32),
    # aimed: a real name or text at a known place, with random buffers and lengths
    st.tuples(st.just(1), st.just(80), st.sampled_from([4, 3, 0, 2**32 - 1]), U32, U32),
    st.tuples(st.just(0), st.integers(-1, 6).map(lambda v: v & 0xFFFFFFFF), st.sampled_from([64, 96]),
              st.sampled_from([11, 13, 0, PAGE, 2**32 - 1]), st.just(0)),
    st.tuples(st.just(3), st.sampled_from([1, 2, 3, 99]), U32, st.integers(0, 4), U32),
)


def test_fuzz_guest_host_function_arguments(boxes: Boxes, make_boxes: Callable[[], Boxes]) -> None:
    counter = iter(range(10**6))

    @FUZZ
    @given(call=HOST_CALLS)
    def prop(call: tuple[int, int, int, int, int]) -> None:
        # random_get writes different bytes into each path's memory: where a later call reads them (a
        # variable name, say) the paths would rightly disagree. So it runs on sandboxes of its own.
        scratch = make_boxes() if call[0] == 4 else None
        try:
            results = {path: outcome(sb, "call_host", request(*call)) for path, sb in (scratch or boxes).items()}
        finally:
            for sb in (scratch or {}).values():
                sb.close()
        kind, value = agree(results)
        if kind == "ok":
            assert value == b'{"ok":true}'
        selector, a1, a2, a3, _ = call
        # sandbus's own host functions check every range before touching memory: a range outside
        # it is an ABI violation. So is one that wasmtime's WASI functions refuse (random_get here).
        if selector == 0 and a2 + a3 > PAGE:
            assert (kind, value) == ("error", AbiViolationError), (call, results)
        if selector == 1 and a1 + a2 > PAGE:
            assert (kind, value) == ("error", AbiViolationError), (call, results)
        if selector == 4 and a2 and a1 + a2 > PAGE:
            assert (kind, value) == ("error", AbiViolationError), (call, results)
        still_works(boxes, next(counter))

    prop()


def test_fuzz_guest_requests(boxes: dict[str, Sandbox]) -> None:
    """Requests that are not what the guest expects (short, odd digits): a typed outcome on every path."""
    counter = iter(range(10**6))

    @FUZZ
    @given(payload=st.one_of(st.binary(max_size=64), st.text(alphabet="0123456789abcdefxyz\"", max_size=60).map(
        lambda t: orjson.dumps(t))), function=st.sampled_from(["reply_with", "call_host", "echo", "nope"]))
    def prop(payload: bytes, function: str) -> None:
        agree({path: outcome(sb, function, payload) for path, sb in boxes.items()})
        still_works(boxes, next(counter))

    prop()
