"""isolation = "per-call": a fresh instance for every call, so nothing one caller leaves reaches the next.

The leak these tests close is real under "pooled" (the first tests show it), and gone under "per-call" on
both ways a per-call instance is built: the compiled path (no WASI) and the general one (WASI plugins).
Limits, typed errors and audit events hold per call as they do pooled.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import wasmtime

from sandbus.host.lifecycle.manifest import parse_manifest
from sandbus.host.lifecycle.policy import Policy, load_policy, resolve
from sandbus.host.sandbox import engine, percall
from sandbus.host.sandbox.audit import AuditLevel
from sandbus.host.sandbox.cache import ModuleCache
from sandbus.host.sandbox.config import MIB, Limits
from sandbus.host.sandbox.hostfuncs import HostFunctions
from sandbus.host.sandbox.instance import BudgetExceeded, CallContext
from sandbus.host.sandbox.pool import NotInline
from sandbus.host.sandbox.sandbox import Sandbox
from sandbus.sdk.errors import (
    AbiViolationError,
    ExecutionTimeoutError,
    InstanceLimitError,
    InvalidModuleError,
    MemoryLimitError,
    OutOfFuelError,
    PayloadTooLargeError,
    PluginInitError,
    PolicyError,
    SandbusError,
    SecurityViolationError,
    StackLimitError,
    TrapError,
)
from tests.conftest import ABI_PRELUDE, WAT, AuditLog

PER_CALL = Limits(isolation="per-call", max_instances=1, timeout_s=2.0)
POOLED = Limits(isolation="pooled", max_instances=1, timeout_s=2.0)
#: The leaky plugin with one (unused) WASI import: a per-call sandbox builds it on the general path.
WASI_IMPORT = '(module\n  (import "wasi_snapshot_preview1" "sched_yield" (func (result i32)))'


def leaky(wasi: bool = False) -> bytes:
    text = (WAT / "leaky.wat").read_text()
    if wasi:
        text = text.replace("(module", WASI_IMPORT, 1)
    return bytes(wasmtime.wat2wasm(text))


def tenants(sb: Sandbox) -> list[Any]:
    """Three callers in turn; what each one got back."""
    return [sb.call("handle_request", {"tenant": t, "card": f"4111-{t}"}) for t in "ABC"]


# -- the leak, and its absence -------------------------------------------------------------------------


def test_pooled_instance_hands_one_callers_request_to_the_next() -> None:
    with Sandbox(leaky(), name="leaky", limits=POOLED) as sb:
        assert tenants(sb) == [None, {"tenant": "A", "card": "4111-A"}, {"tenant": "B", "card": "4111-B"}]
        assert [sb.call("calls") for _ in range(3)] == [4, 5, 6]  # a global: counts every call so far
        assert [sb.call("table_seen") for _ in range(2)] == [False, True]


@pytest.mark.parametrize("wasi", [False, True], ids=["compiled", "general"])
def test_per_call_instance_keeps_nothing_between_callers(wasi: bool) -> None:
    with Sandbox(leaky(wasi), name="leaky", limits=PER_CALL) as sb:
        assert sb.percall is not None
        assert sb.percall.fresh is (not wasi)
        assert tenants(sb) == [None, None, None]  # memory
        assert [sb.call("calls") for _ in range(3)] == [1, 1, 1]  # globals
        assert [sb.call("table_seen") for _ in range(2)] == [False, False]  # tables
        assert sb.health()  # on a fresh instance too


def test_per_call_with_many_instances_at_once_keeps_nothing(wat: Callable[[str], bytes]) -> None:
    """Calls from several threads at once each see a fresh instance, whichever slot they get."""
    from concurrent.futures import ThreadPoolExecutor

    with Sandbox(leaky(), name="leaky", limits=PER_CALL.model_copy(update={"max_instances": 4})) as sb:
        assert sb.pool.size == 4  # every slot ready: an event loop finds an idle one
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda i: sb.call("handle_request", {"n": i}), range(200)))
        assert got == [None] * 200


def test_host_state_of_one_call_does_not_reach_the_next() -> None:
    """What a host function keeps in the call context (the bus keeps ``take_result``'s data there) is the
    call's own: the next call on the same slot does not find it."""
    funcs = HostFunctions()

    @funcs.register("time_now_ms", results=["i64"])
    def stash_or_peek(ctx: CallContext) -> int:
        seen = int("stash" in ctx.extra)
        ctx.extra["stash"] = b"tenant A's result"
        return seen

    wasm = bytes(wasmtime.wat2wasm(f"""(module
      (import "sandbus_v1" "time_now_ms" (func $stash (result i64)))
    {ABI_PRELUDE}
      (func (export "handle_request") (param i32 i32) (result i64)
        (i32.store8 (i32.const 512) (i32.add (i32.const 48) (i32.wrap_i64 (call $stash))))
        (i64.or (i64.shl (i64.const 512) (i64.const 32)) (i64.const 1))))"""))
    with Sandbox(wasm, name="stash", limits=PER_CALL, host_functions=funcs) as sb:
        assert [sb.call("handle_request") for _ in range(3)] == [0, 0, 0]
    with Sandbox(wasm, name="stash", limits=POOLED, host_functions=funcs) as sb:
        assert [sb.call("handle_request") for _ in range(3)] == [0, 1, 1]


# -- the compiled path and the general one agree -------------------------------------------------------


def test_compiled_path_is_taken_here() -> None:
    """The compiled fresh call must be in use where _native.c is built: a layout change in wasmtime-py
    (the extern struct it reads) would otherwise fall back silently to the slow path."""
    assert percall.fresh_available(), percall.FRESH_REASON


def test_pooling_engine_runs_code_compiled_for_the_plain_engine() -> None:
    """The per-call engine takes the module cache's code as it is (a wasmtime reliance, checked)."""
    plain = engine.get_engine(512 * 1024, True)
    pooling = engine.get_pooling_engine(512 * 1024, True)
    module = wasmtime.Module(plain.engine, leaky())
    moved = wasmtime.Module.deserialize(pooling.engine, module.serialize())
    store = wasmtime.Store(pooling.engine)
    store.set_fuel(10_000)
    store.set_epoch_deadline(100)
    version = wasmtime.Linker(pooling.engine).instantiate(store, moved).exports(store)["sandbus_abi_version"]
    assert isinstance(version, wasmtime.Func)
    assert version(store) == 1


def test_per_call_reply_fuel_and_memory_match_pooled(plugins_dir: Path) -> None:
    wasm = (plugins_dir / "echo.wasm").read_bytes()
    payload = orjson.dumps({"hello": "world", "n": list(range(50))})
    with (Sandbox(wasm, name="echo", limits=POOLED) as pooled,
          Sandbox(wasm, name="echo", limits=PER_CALL) as fresh,
          Sandbox(wasm, name="echo", limits=PER_CALL, native=False) as general):
        assert general.percall is not None
        assert not general.percall.fresh
        results = [sb.call_detailed("handle_request", payload) for sb in (pooled, fresh, general)]
    assert {r.reply for r in results} == {payload}
    assert len({r.fuel_used for r in results}) == 1
    assert results[0].fuel_used > 0
    assert len({r.memory_bytes for r in results}) == 1


# -- limits, errors and audit events hold per call -------------------------------------------------------


@pytest.fixture(params=["compiled", "general"])
def adversary(request: pytest.FixtureRequest, wat: Callable[[str], bytes], audit: AuditLog) -> Iterator[Sandbox]:
    """adversary_core.wat per call: on the compiled path, or forced onto the general one."""
    limits = Limits(isolation="per-call", timeout_s=0.3, fuel=10**12, memory_bytes=4 * MIB, max_instances=1)
    with Sandbox(wat("adversary_core"), name="adversary", limits=limits, on_audit=audit,
                 native=request.param == "compiled") as sb:
        yield sb


@pytest.mark.parametrize(
    ("function", "error", "kind", "level"),
    [
        ("loop_forever", ExecutionTimeoutError, "limit.timeout", AuditLevel.WARNING),
        ("grow_bomb", MemoryLimitError, "limit.memory", AuditLevel.WARNING),
        ("recurse", StackLimitError, "limit.stack", AuditLevel.WARNING),
        ("bad_ptr", AbiViolationError, "abi.violation", AuditLevel.WARNING),
        ("huge_len", PayloadTooLargeError, "limit.output_size", AuditLevel.WARNING),
        ("bad_json", AbiViolationError, "abi.bad_reply", AuditLevel.WARNING),
        ("get_env", SecurityViolationError, "security.env_denied", AuditLevel.CRITICAL),
        ("read_clock", SecurityViolationError, "security.capability_denied", AuditLevel.CRITICAL),
        ("log_oob", AbiViolationError, "abi.violation", AuditLevel.WARNING),
    ],
)
def test_misbehaviour_per_call_is_typed_audited_and_survivable(
    adversary: Sandbox, audit: AuditLog, function: str, error: type[SandbusError], kind: str, level: AuditLevel
) -> None:
    with pytest.raises(error) as info:
        adversary.call(function, {"x": 1})
    assert info.value.plugin == "adversary"
    event = next(e for e in audit if e.kind == kind)
    assert (event.level, event.plugin) == (level, "adversary")
    assert adversary.call("echo", {"after": function}) == {"after": function}
    assert adversary.pool.replaced == 0  # nothing to replace: the failed call's instance is gone with it


def test_trap_per_call_carries_backtrace(adversary: Sandbox) -> None:
    with pytest.raises(TrapError, match="unreachable") as info:
        adversary.call("trap", {})
    assert info.value.backtrace
    assert adversary.call("echo", [1]) == [1]


def test_out_of_fuel_per_call(wat: Callable[[str], bytes], audit: AuditLog) -> None:
    limits = Limits(isolation="per-call", fuel=100_000, timeout_s=10)
    with Sandbox(wat("adversary_core"), name="adversary", limits=limits, on_audit=audit) as sb:
        with pytest.raises(OutOfFuelError, match="100000"):
            sb.call("loop_forever", {})
        assert "limit.fuel" in audit.kinds()
        assert sb.call("echo", 7) == 7


def test_input_and_log_caps_per_call(plugins_dir: Path, audit: AuditLog) -> None:
    """text_processor logs through the log host function, which reads the fresh instance's memory."""
    limits = Limits(isolation="per-call", max_input_bytes=256, log_bytes=0)
    with Sandbox(plugins_dir / "text_processor.wasm", limits=limits, on_audit=audit) as sb:
        assert sb.percall is not None
        assert sb.percall.fresh
        with pytest.raises(PayloadTooLargeError, match="input"):
            sb.call("handle_request", {"text": "x" * 300})
        with pytest.raises(PayloadTooLargeError, match="log"):
            sb.call("handle_request", {"action": "get_status"})
    assert "limit.input_size" in audit.kinds()
    assert "limit.log" in audit.kinds()


def test_log_host_function_reads_the_fresh_instance(plugins_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with (Sandbox(plugins_dir / "text_processor.wasm", limits=PER_CALL) as sb,
          caplog.at_level("DEBUG", logger="sandbus.plugin.text_processor")):
        reply = sb.call("handle_request", {"action": "get_status"})
    assert reply
    assert [r for r in caplog.records if r.name == "sandbus.plugin.text_processor"]


def test_initial_memory_above_the_limit_per_call(wat: Callable[[str], bytes]) -> None:
    with pytest.raises(MemoryLimitError, match="initial memory"):
        Sandbox(wat("adversary_core"), name="adversary", limits=Limits(isolation="per-call", memory_bytes=65536))


INIT_WAT = """(module
  (global $ready (mut i32) (i32.const 0))
{prelude}
  (func (export "sandbus_init") (param $p i32) (param $n i32) (result i32)
    (global.set $ready (i32.add (global.get $ready) (i32.const 1)))
    ;; a config whose second byte is a quote (an object with a key) is accepted, an empty one refused
    (if (result i32) (i32.eq (i32.load8_u offset=1 (local.get $p)) (i32.const 34))
      (then (i32.const 0)) (else (i32.const 7))))
  (func (export "handle_request") (param i32 i32) (result i64)
    (i32.store8 (i32.const 512) (i32.add (i32.const 48) (global.get $ready)))
    (i64.or (i64.shl (i64.const 512) (i64.const 32)) (i64.const 1))))"""


def test_init_runs_on_every_fresh_instance() -> None:
    wasm = bytes(wasmtime.wat2wasm(INIT_WAT.format(prelude=ABI_PRELUDE)))
    with Sandbox(wasm, name="init", limits=PER_CALL, config={"k": 1}) as sb:
        assert [sb.call("handle_request") for _ in range(3)] == [1, 1, 1]  # init ran once on each
    with Sandbox(wasm, name="init", limits=POOLED, config={"k": 1}) as sb:
        assert [sb.call("handle_request") for _ in range(3)] == [1, 1, 1]  # once, on the one instance


def test_init_failure_refuses_the_load_per_call() -> None:
    """A config the plugin refuses fails at load (the check instance), as pooled."""
    wasm = bytes(wasmtime.wat2wasm(INIT_WAT.format(prelude=ABI_PRELUDE)))
    with pytest.raises(PluginInitError, match="returned 7"):
        Sandbox(wasm, name="init", limits=PER_CALL)


# -- budgets, inline calls, concurrency -----------------------------------------------------------------


def test_budget_interrupts_a_per_call_call(wat: Callable[[str], bytes]) -> None:
    limits = Limits(isolation="per-call", timeout_s=5.0, fuel=None)
    with Sandbox(wat("adversary_core"), name="adversary", limits=limits) as sb:
        with pytest.raises(BudgetExceeded):
            sb.call_detailed("loop_forever", b"{}", budget_s=0.02)
        assert sb.call("echo", 3) == 3


def test_event_loop_runs_compiled_per_call_inline_but_not_the_general_path() -> None:
    async def inline(sb: Sandbox) -> Any:
        return sb.call_detailed("handle_request", b'{"a":1}', budget_s=0.05, wait=False).reply

    with Sandbox(leaky(), name="leaky", limits=PER_CALL) as sb:
        assert asyncio.run(inline(sb)) == b"null"
    with Sandbox(leaky(wasi=True), name="leaky", limits=PER_CALL) as sb, pytest.raises(NotInline):
        asyncio.run(inline(sb))  # building a WASI instance is not for an event loop


@pytest.mark.parametrize(("wasi", "stack_kib"), [(False, 704), (True, 768)], ids=["compiled", "general"])
def test_full_slot_pool_is_an_instance_limit_error(monkeypatch: pytest.MonkeyPatch, audit: AuditLog, wasi: bool,
                                                   stack_kib: int) -> None:
    """With one slot in the process, a call made while another per-call call runs gets a typed error.

    A host function of plugin A calls plugin B while A's instance holds the only slot. A stack size no
    other test uses gives this test its own one-slot engine.
    """
    monkeypatch.setattr(engine, "PERCALL_SLOTS", 1)
    limits = PER_CALL.model_copy(update={"stack_bytes": stack_kib * 1024})
    seen: list[BaseException] = []
    inner = Sandbox(leaky(wasi), name="inner", limits=limits, on_audit=audit)  # its load check freed the slot
    funcs = HostFunctions()

    @funcs.register("time_now_ms", results=["i64"])
    def nested(ctx: CallContext) -> int:
        try:
            inner.call("handle_request", {})
        except InstanceLimitError as e:
            seen.append(e)
        return 0

    wasm = bytes(wasmtime.wat2wasm(textwrap.dedent(f"""(module
      (import "sandbus_v1" "time_now_ms" (func $now (result i64)))
    {ABI_PRELUDE}
      (func (export "handle_request") (param $p i32) (param $n i32) (result i64)
        (drop (call $now))
        (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.extend_i32_u (local.get $n)))))""")))
    with Sandbox(wasm, name="outer", limits=limits, host_functions=funcs) as outer, inner:
        assert outer.call("handle_request", {"ok": 1}) == {"ok": 1}
        assert len(seen) == 1
        assert seen[0].plugin == "inner"
        assert [(e.kind, e.plugin) for e in audit] == [("limit.instances", "inner")]
        assert inner.call("handle_request", {}) is None  # the slot is free again


def test_components_are_refused_per_call_before_they_compile(plugins_dir: Path, tmp_path: Path,
                                                              audit: AuditLog) -> None:
    cache_dir = tmp_path / "cache"
    with pytest.raises(InvalidModuleError, match="per-call") as info:
        Sandbox(plugins_dir / "py_echo.wasm", limits=PER_CALL, on_audit=audit, cache=ModuleCache(cache_dir))
    assert info.value.details["isolation"] == "per-call"
    assert "module.refused" in audit.kinds()
    # nothing compiled: seconds of a node's CPU are not spent on a module it then refuses
    assert not cache_dir.exists() or not [p for p in cache_dir.rglob("*") if p.is_file()]


def test_fresh_calls_leave_no_descriptors_behind(plugins_dir: Path) -> None:
    """The general path builds a whole instance (WASI pipes) per call: all of it goes with the call."""
    with Sandbox(leaky(wasi=True), name="leaky", limits=PER_CALL) as sb:
        sb.call("handle_request", {})
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            sb.call("handle_request", {})
        assert len(os.listdir("/proc/self/fd")) <= before



def test_a_process_address_space_limit_too_small_for_the_slot_pool_is_a_typed_error(tmp_path: Path) -> None:
    """The pooling allocator reserves ~1 TiB of address space up front; under an ``RLIMIT_AS`` below that
    (``ulimit -v``, systemd's ``LimitAS=``) wasmtime's engine constructor panics and aborts the process.
    Loading a per-call plugin there is refused with an InstanceLimitError, and the host goes on."""
    module = tmp_path / "leaky.wasm"
    module.write_bytes(leaky())
    code = textwrap.dedent("""
        import resource, sys
        from pathlib import Path
        resource.setrlimit(resource.RLIMIT_AS, (16 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))
        from sandbus.host.sandbox import Limits, Sandbox
        from sandbus.sdk.errors import InstanceLimitError
        wasm = Path(sys.argv[1]).read_bytes()
        try:
            Sandbox(wasm, name="leaky", limits=Limits(isolation="per-call"))
        except InstanceLimitError as e:
            print("refused:", e.plugin, e.message)
        with Sandbox(wasm, name="leaky", limits=Limits(isolation="pooled")) as sb:
            print("pooled:", sb.call("handle_request", {"a": 1}))
    """)
    done = subprocess.run([sys.executable, "-c", code, str(module)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("refused: leaky ")
    assert "address space" in lines[0]
    assert lines[1] == "pooled: None"


def test_fuel_beyond_what_wasmtime_counts_is_refused_by_the_limits() -> None:
    """Fuel is an i64 in wasmtime and in the native calls (-1: no metering). Above 2**63 - 1 the per-call
    slot read it as negative (no fuel set: every call "ran out of fuel"), the pooled native call raised an
    untyped OverflowError on every call, and 2**64 wrapped to no fuel at all."""
    for fuel in (2**63, 2**64 - 1, 2**64):
        with pytest.raises(ValueError, match="fuel"):
            Limits(fuel=fuel)
    limits = Limits(isolation="per-call", fuel=2**63 - 1, timeout_s=2.0)
    for isolation in ("per-call", "pooled"):
        with Sandbox(leaky(), name="leaky", limits=limits.model_copy(update={"isolation": isolation})) as sb:
            assert sb.call("handle_request", {"a": 1}) is None


def test_a_timeout_the_epoch_deadline_cannot_hold_is_refused_by_the_limits() -> None:
    """An infinite timeout raised an untyped OverflowError on every load (ticks_for); one of more than
    ~9e16 s wrapped the u64 deadline the native calls take to an arbitrary, maybe tiny, one."""
    for timeout in (float("inf"), float("nan"), 1e17):
        with pytest.raises(ValueError, match="timeout_s"):
            Limits(timeout_s=timeout)
    assert engine.ticks_for(Limits(timeout_s=1e9).timeout_s) < 2**63

# -- manifest and policy -------------------------------------------------------------------------------

HEADER = '[plugin]\nname = "orders"\nversion = "1.0.0"\n'


def limits_for(resources: str, policy: Policy, tmp_path: Path) -> Limits:
    manifest = parse_manifest(HEADER + resources, source="orders.toml")
    return resolve(manifest, policy, data_root=tmp_path, host_env={}).limits


def test_manifest_isolation_reaches_the_limits(tmp_path: Path) -> None:
    policy = Policy.default()
    assert limits_for("", policy, tmp_path).isolation == "pooled"
    assert limits_for('[resources]\nisolation = "per-call"\n', policy, tmp_path).isolation == "per-call"


def test_manifest_isolation_must_be_a_known_mode() -> None:
    with pytest.raises(SandbusError, match="isolation"):
        parse_manifest(HEADER + '[resources]\nisolation = "shared"\n', source="orders.toml")


def test_policy_requiring_per_call_refuses_a_pooled_plugin(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[limits]\nisolation = "per-call"\n')
    policy = load_policy(path)
    assert policy.defaults.isolation == "per-call"  # a silent manifest gets what is required
    assert limits_for("", policy, tmp_path).isolation == "per-call"
    with pytest.raises(SecurityViolationError, match=r"isolation = 'pooled'.*requires 'per-call'") as info:
        limits_for('[resources]\nisolation = "pooled"\n', policy, tmp_path)
    assert info.value.details["asked"] == "pooled"
    assert info.value.details["required"] == "per-call"


def test_policy_default_weaker_than_its_requirement_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[limits]\nisolation = "per-call"\n[defaults]\nisolation = "pooled"\n')
    with pytest.raises(PolicyError, match="weaker"):
        load_policy(path)


# -- over NATS: a node serving both modes ----------------------------------------------------------------

LEAKY_TOML = """
[plugin]
name = "{name}"
version = "1.0.0"
description = "keeps the last request"
author = "tests"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
[capabilities]
required = ["compute"]
[resources]
max_instances = 1
isolation = "{isolation}"
"""


def test_node_serves_per_call_plugins_without_leaks(tmp_path: Path) -> None:
    from sandbus.sdk.client import Client
    from tests.bus.conftest import served

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    for name, isolation in (("leaky_pooled", "pooled"), ("leaky_fresh", "per-call")):
        (plugins / f"{name}.wasm").write_bytes(leaky())
        (plugins / f"{name}.toml").write_text(LEAKY_TOML.format(name=name, isolation=isolation))
    (tmp_path / "policy.toml").write_text('[capabilities]\nallowed = ["compute"]\n')

    async def callers(url: str) -> tuple[dict[str, list[Any]], dict[str, Any]]:
        async with await Client.connect(url) as client:
            answers = {name: [await client.request(name, payload={"tenant": t}) for t in "AB"]
                       for name in ("leaky_pooled", "leaky_fresh")}
            listed = await client.control("iso", "list")
            return answers, {p["name"]: p["isolation"] for p in listed["plugins"]}

    with served("iso", plugins, tmp_path / "iso.log", jetstream=False) as (url, _):
        got, isolation = asyncio.run(callers(url))
    assert got["leaky_pooled"] == [None, {"tenant": "A"}]
    assert got["leaky_fresh"] == [None, None]
    # an operator sees which plugins keep state between callers
    assert isolation == {"leaky_pooled": "pooled", "leaky_fresh": "per-call"}
