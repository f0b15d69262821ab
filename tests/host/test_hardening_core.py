"""Hardening of the core call path, the engine, the module cache and module loading.

Each test reproduces one attack on the host and checks it fails the documented way: a typed error,
an audit event, and a host that goes on serving.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import wasmtime

from sandbus.host.authoring import inspect_wasm
from sandbus.host.sandbox import Auditor, Limits, ModuleCache, Sandbox
from sandbus.host.sandbox.cache import wasm_digest
from sandbus.host.sandbox.compiler import IN_PROCESS_BELOW, IN_PROCESS_FUNCTIONS, check_bounds
from sandbus.host.sandbox.config import Capabilities
from sandbus.host.sandbox.engine import get_engine
from sandbus.host.sandbox.hostfuncs import HostFunction, HostFunctions
from sandbus.host.sandbox.instance import PluginInstance
from sandbus.sdk.errors import AbiViolationError, InvalidModuleError, SandbusError, SecurityViolationError, TrapError
from tests.conftest import AuditLog

#: (fast, native) of each core-module call path, as in tests/host/test_invoke.py.
PATHS = {"native": (True, True), "ctypes": (True, False), "plain": (False, False)}

# -- finding 2: another tenant's error must never reach your caller ---------------------------------

#: Plugin A: reads an environment variable it was not granted (a SecurityViolationError naming it),
#: from a call, from ``_initialize`` or from ``sandbus_init`` depending on the export used.
TENANT_WAT = """
(module
  (import "sandbus_v1" "env_get" (func $env_get (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "SECRET_OF_A")
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "steal") (param i32 i32) (result i64)
    (drop (call $env_get (i32.const 16) (i32.const 11) (i32.const 64) (i32.const 16)))
    (i64.const 0))
  (func (export "trap") (param i32 i32) (result i64) (unreachable))
  (func (export "echo") (param $p i32) (param $n i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $p)) (i64.const 32)) (i64.extend_i32_u (local.get $n))))
  %s
)
"""


def _tenant(path: str, extra: str = "", **kwargs: object) -> Sandbox:
    fast, native = PATHS[path]
    wasm = wasmtime.wat2wasm(TENANT_WAT % extra)
    return Sandbox(bytes(wasm), name=str(kwargs.pop("name", "tenant")), fast=fast, native=native,
                   limits=Limits(max_instances=1), **kwargs)  # type: ignore[arg-type]


def _race(a: Callable[[], None], b: Callable[[], None], rounds: int) -> tuple[list[str], list[str]]:
    """Run ``a`` and ``b`` ``rounds`` times each on two threads; each returns what went wrong."""
    bad_a: list[str] = []
    bad_b: list[str] = []
    start = threading.Barrier(2)

    def loop(fn: Callable[[], None], bad: list[str]) -> None:
        start.wait(timeout=10)
        for _ in range(rounds):
            try:
                fn()
            except AssertionError as e:
                bad.append(str(e))

    threads = [threading.Thread(target=loop, args=(a, bad_a)), threading.Thread(target=loop, args=(b, bad_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive()
    return bad_a, bad_b


def _expect(call: Callable[[], object], kind: type[SandbusError], plugin: str, *, mentions: str = "",
            excludes: str = "") -> None:
    got: SandbusError | None = None
    try:
        call()
    except SandbusError as e:
        got = e
    if got is None:
        raise AssertionError(f"{plugin}: no error")
    if type(got) is not kind or got.plugin != plugin or mentions not in str(got) or (excludes and excludes in str(got)):
        raise AssertionError(f"{plugin} got {type(got).__name__}({got.plugin}): {got}")


@pytest.mark.parametrize("path", list(PATHS))
def test_f02_host_errors_stay_with_their_call(path: str) -> None:
    """Plugin A's denied env read and plugin B's trap, 2,000 times each on two threads: each caller gets
    its own error, every time (wasmtime-py keeps a host function's exception in a process-wide slot)."""
    a, b = _tenant(path, name="a"), _tenant(path, name="b")
    inst_a, inst_b = a.pool.acquire(), b.pool.acquire()
    assert isinstance(inst_a, PluginInstance)
    assert isinstance(inst_b, PluginInstance)
    # The same instance again and again: a failed call marks it poisoned, but a WAT guest's state is
    # intact, and rebuilding would spend the time outside the race we are looking for.
    bad_a, bad_b = _race(
        lambda: _expect(lambda: inst_a.call("steal", b"{}"), SecurityViolationError, "a", mentions="SECRET_OF_A"),
        lambda: _expect(lambda: inst_b.call("trap", b"{}"), TrapError, "b", mentions="unreachable",
                        excludes="SECRET"),
        rounds=2000)
    assert (bad_a, bad_b) == ([], []), (len(bad_a), len(bad_b), (bad_a + bad_b)[:3])
    # A's error reached A; and both still serve.
    assert inst_a.call("echo", b"[1]") == b"[1]"
    assert inst_b.call("echo", b"[2]") == b"[2]"


def test_f02_without_the_library_filter_errors_still_never_cross(monkeypatch: pytest.MonkeyPatch) -> None:
    """If wasmtime-py's internals move and the filter cannot be installed, the public API may raise another
    call's exception: the call context still keeps it out (the call is reported as a plain trap)."""
    from wasmtime import _func

    from sandbus.host.sandbox import hostcall

    assert hostcall.last_exception_filtered()
    assert hostcall.library_maybe_raise is not None
    monkeypatch.setattr(_func, "maybe_raise_last_exn", hostcall.library_maybe_raise)
    a, b = _tenant("plain", name="a"), _tenant("plain", name="b")
    inst_a, inst_b = a.pool.acquire(), b.pool.acquire()
    assert isinstance(inst_a, PluginInstance)
    assert isinstance(inst_b, PluginInstance)
    bad_a, bad_b = _race(
        lambda: _expect(lambda: inst_a.call("steal", b"{}"), SecurityViolationError, "a", mentions="SECRET_OF_A"),
        lambda: _expect(lambda: inst_b.call("trap", b"{}"), TrapError, "b", excludes="SECRET"),
        rounds=2000)
    assert (bad_a, bad_b) == ([], []), (len(bad_a), len(bad_b), (bad_a + bad_b)[:3])


@pytest.mark.parametrize("path", ["native", "plain"])
@pytest.mark.parametrize("stage", ["_initialize", "sandbus_init"])
def test_f02_instance_builds_keep_their_own_errors(path: str, stage: str) -> None:
    """The same race while instances are being built: A's ``_initialize`` / ``sandbus_init`` reads an
    ungranted variable (instantiation through the public API), B traps in calls on another thread."""
    if stage == "_initialize":
        extra = """(func (export "_initialize")
                     (drop (call $env_get (i32.const 16) (i32.const 11) (i32.const 64) (i32.const 16))))"""
    else:
        extra = """(func (export "sandbus_init") (param i32 i32) (result i32)
                     (call $env_get (i32.const 16) (i32.const 11) (i32.const 64) (i32.const 16)))"""
    a = _tenant(path, name="a")  # loads: "steal" is never called while loading
    fast, native = PATHS[path]
    wasm_a = bytes(wasmtime.wat2wasm(TENANT_WAT % extra))
    b = _tenant(path, name="b")
    inst_b = b.pool.acquire()
    assert isinstance(inst_b, PluginInstance)
    a.close()

    def build_a() -> None:
        _expect(lambda: Sandbox(wasm_a, name="a", fast=fast, native=native), SecurityViolationError, "a",
                mentions="SECRET_OF_A")

    def trap_b() -> None:
        for _ in range(20):
            _expect(lambda: inst_b.call("trap", b"{}"), TrapError, "b", mentions="unreachable", excludes="SECRET")

    bad_a, bad_b = _race(build_a, trap_b, rounds=100)
    assert (bad_a, bad_b) == ([], []), (len(bad_a), len(bad_b), (bad_a + bad_b)[:3])


#: A tenant that also imports ``test.boom`` (the test's host function) and calls it from the given place.
BOOM_WAT = TENANT_WAT.replace("(memory", '(import "test" "boom" (func $boom)) (memory', 1)
BOOM_STAGES = {
    "start": "(func $s (call $boom)) (start $s)",
    "_initialize": '(func (export "_initialize") (call $boom))',
    "call": '(func (export "kb") (param i32 i32) (result i64) (call $boom) (i64.const 0))',
}


def _boom_functions(exc: BaseException | None, capability: str | None = None) -> HostFunctions:
    funcs = HostFunctions()

    def boom(_ctx: object) -> None:
        if exc is not None:
            raise exc

    funcs.add(HostFunction("boom", (), (), boom, capability, "test"))
    return funcs


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("stage", list(BOOM_STAGES))
@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, SystemExit])
def test_f02_base_exceptions_in_host_functions_are_never_a_guest_error(path: str, stage: str,
                                                                       exc_type: type[BaseException]) -> None:
    """A KeyboardInterrupt / SystemExit raised in a host function (a signal arriving there) reaches the
    caller as itself -- from a start function too, which wasmtime reports as a bare "python exception"
    -- and the instance it interrupted midway is never used again."""
    fast, native = PATHS[path]
    wasm = bytes(wasmtime.wat2wasm(BOOM_WAT % BOOM_STAGES[stage]))
    if stage != "call":
        with pytest.raises(exc_type, match="boom"):
            Sandbox(wasm, name="boom", fast=fast, native=native, host_functions=_boom_functions(exc_type("boom")))
        return
    with Sandbox(wasm, name="boom", fast=fast, native=native, host_functions=_boom_functions(exc_type("boom")),
                 limits=Limits(max_instances=1)) as sb:
        inst = sb.pool.acquire()
        assert isinstance(inst, PluginInstance)
        with pytest.raises(exc_type, match="boom"):
            inst.call("kb", b"{}")
        assert inst.poisoned
        sb.pool.release(inst)
        assert sb.call("echo", [1]) == [1]  # a fresh instance serves
        assert sb.pool.replaced == 1


@pytest.mark.parametrize("path", list(PATHS))
def test_f02_start_function_denial_keeps_its_type(path: str, audit: AuditLog) -> None:
    """A start function calling a host function it was not granted: the caller gets that denial (it was
    an InvalidModuleError "cannot instantiate: python exception")."""
    fast, native = PATHS[path]
    wasm = bytes(wasmtime.wat2wasm(BOOM_WAT % BOOM_STAGES["start"]))
    with pytest.raises(SecurityViolationError, match="needs the 'random' capability") as info:
        Sandbox(wasm, name="boom", fast=fast, native=native, host_functions=_boom_functions(None, "random"),
                on_audit=audit)
    assert info.value.plugin == "boom"
    assert "security.capability_denied" in audit.kinds()
    # Granted, the same module builds and serves.
    with Sandbox(wasm, name="boom", fast=fast, native=native, host_functions=_boom_functions(None, "random"),
                 capabilities=Capabilities(random=True)) as sb:
        assert sb.call("echo", [2]) == [2]


# -- finding 6: the module cache trusts only a directory no one else can change ---------------------

NOBODY = 65534
#: What a planted entry does when it runs: answers "pwned" instead of echoing.
PWNED_WAT = """(module
  (memory (export "memory") 1)
  (data (i32.const 16) "\\"pwned\\"")
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "handle_request") (param i32 i32) (result i64) (i64.const 0x1000000007)))"""

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _plant(directory: Path, victim: bytes) -> Path:
    """Write, under the victim's cache key, the compiled code of another module -- as an attacker who can
    write the directory would. Returns the entry."""
    handle = get_engine(Limits().stack_bytes)
    staging = ModuleCache(directory.parent / f"{directory.name}-staging")
    staging.load(handle, bytes(wasmtime.wat2wasm(PWNED_WAT)))
    (compiled,) = (directory.parent / f"{directory.name}-staging").glob("*.cwasm")
    entry = directory / f"{wasm_digest(victim)}-{handle.fingerprint}.cwasm"
    entry.write_bytes(compiled.read_bytes())
    return entry


@root_only
def test_f06_cache_owned_by_another_user_is_refused(tmp_path: Path, plugins_dir: Path, audit: AuditLog) -> None:
    echo = (plugins_dir / "echo.wasm").read_bytes()
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o755)
    entry = _plant(cache_dir, echo)
    # Control: in a directory that is ours, the planted entry is what runs -- the attack is real.
    with Sandbox(echo, name="echo", cache=ModuleCache(cache_dir)) as sb:
        assert sb.call("handle_request", [1]) == "pwned"
    os.chown(cache_dir, NOBODY, NOBODY)
    os.chown(entry, NOBODY, NOBODY)
    with pytest.raises(SecurityViolationError, match=r"owned by uid 65534.*chmod 700") as info:
        ModuleCache(cache_dir, auditor=_auditor(audit))
    assert info.value.details["path"] == str(cache_dir)
    assert audit.kinds() == ["security.cache_untrusted"]
    # The shared cache (what every Sandbox uses by default) refuses it the same way, and runs nothing.
    from sandbus.host.sandbox import sandbox as sandbox_mod

    saved, before = sandbox_mod._shared_cache, os.environ.get("SANDBUS_CACHE_DIR")
    sandbox_mod._shared_cache = None
    os.environ["SANDBUS_CACHE_DIR"] = str(cache_dir)
    try:
        with pytest.raises(SecurityViolationError):
            Sandbox(echo, name="echo")
    finally:
        sandbox_mod._shared_cache = saved
        if before is None:
            os.environ.pop("SANDBUS_CACHE_DIR", None)
        else:
            os.environ["SANDBUS_CACHE_DIR"] = before
    assert entry.exists()  # left alone: not ours to delete, and never read


def _auditor(audit: AuditLog) -> Auditor:
    return Auditor(audit)


@pytest.mark.parametrize(("mode", "trusted"), [(0o777, False), (0o775, False), (0o1777, True), (0o755, True)],
                         ids=["0777", "0775", "1777-sticky", "0755"])
def test_f06_parent_directories_are_checked(tmp_path: Path, mode: int, trusted: bool) -> None:
    """A parent others can write (without the sticky bit) lets them swap the cache for their own."""
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(parent, mode)
    if trusted:
        assert ModuleCache(parent / "cache").directory == (parent / "cache").resolve()
    else:
        with pytest.raises(SecurityViolationError, match="writable by"):
            ModuleCache(parent / "cache")


def test_f06_group_writable_cache_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    os.chmod(d, 0o770)
    with pytest.raises(SecurityViolationError, match="writable by group"):
        ModuleCache(d)


@pytest.mark.parametrize("how", [
    pytest.param("other_owner", marks=root_only), "group_writable", "symlink",
])
def test_f06_untrusted_entry_is_never_deserialized(tmp_path: Path, plugins_dir: Path, audit: AuditLog,
                                                  how: str) -> None:
    echo = (plugins_dir / "echo.wasm").read_bytes()
    cache_dir = tmp_path / "cache"
    ModuleCache(cache_dir)  # creates it, private
    entry = _plant(cache_dir, echo)
    if how == "other_owner":
        os.chown(entry, NOBODY, NOBODY)
    elif how == "group_writable":
        os.chmod(entry, 0o664)
    else:
        target = tmp_path / "elsewhere.cwasm"
        entry.rename(target)
        entry.symlink_to(target)
    cache = ModuleCache(cache_dir, auditor=_auditor(audit))
    with Sandbox(echo, name="echo", cache=cache) as sb:
        assert sb.call("handle_request", [1]) == [1]  # the real echo: compiled, not the planted code
    assert (cache.hits_disk, cache.compiles) == (0, 1)
    assert "security.cache_untrusted" in audit.kinds()
    # Replaced by our own compile, private to us.
    st = entry.lstat()
    assert st.st_uid == os.geteuid()
    assert not st.st_mode & 0o022
    assert entry.is_file()
    assert not entry.is_symlink()


@pytest.mark.parametrize("where", ["/proc/self/nope", "/dev/null/cache", "below_a_file"])
def test_f06_a_cache_dir_that_cannot_be_made_is_a_typed_refusal(tmp_path: Path, audit: AuditLog, where: str) -> None:
    """SANDBUS_CACHE_DIR pointing somewhere odd: a refusal with the cache's error and audit event, not a
    bare FileNotFoundError / NotADirectoryError from deep inside."""
    if where == "below_a_file":
        (tmp_path / "file").write_bytes(b"")
        where = str(tmp_path / "file" / "cache")
    with pytest.raises(SecurityViolationError, match="cannot be checked"):
        ModuleCache(Path(where), auditor=_auditor(audit))
    assert audit.kinds() == ["security.cache_untrusted"]


def test_f06_a_cache_that_cannot_be_written_costs_a_compile_not_the_load(plugins_dir: Path) -> None:
    """/proc/self/fd passes the ownership checks (ours, mode 0500) but takes no files: the module is
    compiled and served, and nothing is written."""
    cache = ModuleCache(Path("/proc/self/fd"))
    with Sandbox((plugins_dir / "echo.wasm").read_bytes(), name="echo", cache=cache) as sb:
        assert sb.call("handle_request", [1]) == [1]
    assert cache.compiles == 1


# -- finding 7: a refusal is typed and audited whichever way it came -------------------------------

#: fuzz_guest's ``call_host`` fields: (selector, args...) -> WASI fd_write / random_get / clock_time_get
#: handed a pointer past the end of the guest's one page of memory, or straddling it.
WASI_OOB = {
    "fd_write_iovs": ((3, 1, 70_000, 1, 0), "fd_write"),
    "fd_write_nwritten": ((3, 1, 65_535, 1, 0), "fd_write"),
    "random_get_buf": ((4, 65_530, 100, 0, 0), "random_get"),
    "clock_time_get_out": ((5, 1, 70_000, 0, 0), "clock_time_get"),
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", list(WASI_OOB))
def test_f07_wasi_out_of_bounds_pointer_is_an_abi_violation(wat: Callable[[str], bytes], audit: AuditLog,
                                                            path: str, case: str) -> None:
    """wasmtime's own WASI functions refuse an out-of-bounds pointer with a bare trap; our host functions
    with an AbiViolationError and an ``abi.violation`` event. Both are the guest breaking the ABI: the same
    error and the same audit event, on every call path."""
    fields, wasi_function = WASI_OOB[case]
    fast, native = PATHS[path]
    with Sandbox(wat("fuzz_guest"), name="fuzz", fast=fast, native=native, on_audit=audit,
                 capabilities=Capabilities(random=True, clock=True)) as sb:
        payload = b'"' + b"".join(b"%08x" % f for f in fields) + b'"'
        with pytest.raises(AbiViolationError, match="passed WASI an unusable argument: Pointer out of bounds") as info:
            sb.call_bytes("call_host", payload)
        assert info.value.plugin == "fuzz"
        assert audit.kinds() == ["abi.violation"]
        if wasi_function == "clock_time_get":  # the only one whose error names the function
            assert info.value.details == {"wasi_function": "clock_time_get"}
            assert audit[0].details == {"wasi_function": "clock_time_get"}
        assert sb.call("echo", {"n": 1}) == {"n": 1}


START_WASI_OOB = """(module
  (import "wasi_snapshot_preview1" "random_get" (func $rg (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func $s (drop (call $rg (i32.const 70000) (i32.const 4)))) (start $s)
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "h") (param i32 i32) (result i64) (i64.const 0)))"""


@pytest.mark.parametrize("path", ["native", "plain"])
def test_f07_wasi_out_of_bounds_pointer_in_a_start_function(audit: AuditLog, path: str) -> None:
    """The same from a start function, which runs during instantiation (it was an InvalidModuleError)."""
    fast, native = PATHS[path]
    with pytest.raises(AbiViolationError, match="instantiation passed WASI an unusable argument"):
        Sandbox(bytes(wasmtime.wat2wasm(START_WASI_OOB)), name="st", capabilities=Capabilities(random=True),
                fast=fast, native=native, on_audit=audit)
    assert audit.kinds() == ["abi.violation"]


@pytest.mark.parametrize("path", list(PATHS))
def test_f11_backtrace_names_are_escaped_and_bounded(path: str) -> None:
    """A trap's backtrace names come from the guest's name section: in the error they are escaped,
    cut, and at most 32 frames deep, whatever the guest named its functions or how deep it trapped."""
    chain = "\n".join(
        f'(func $c{i} (@name "evil\\0a\\1b[2J{"x" * 300}{i}") (call $c{i + 1}))' for i in range(40))
    funcs = f"""{chain}
  (func $c40 unreachable)
  (func (export "deep") (param i32 i32) (result i64) (call $c0) (i64.const 0))"""
    sb = Sandbox(bytes(wasmtime.wat2wasm(TENANT_WAT % funcs)), name="names", fast=PATHS[path][0],
                 native=PATHS[path][1])
    try:
        with pytest.raises(TrapError) as info:
            sb.call_bytes("deep", b"{}")
    finally:
        sb.close()
    frames = info.value.details["backtrace"]
    assert 0 < len(frames) <= 32
    assert any("evil" in f for f in frames), frames
    for frame in frames:
        assert all(0x20 <= ord(c) < 0x7F for c in frame), frame
        assert len(frame) < 2 * 128 + 32



@pytest.mark.parametrize("path", list(PATHS))
def test_f07_guest_out_of_bounds_access_stays_a_trap(path: str, audit: AuditLog) -> None:
    """The guest's own out-of-bounds load is a trap of the guest (TrapError), not an ABI violation -- even
    when its function's name (the guest chooses it, newlines included) reads like wasmtime's WASI refusal;
    and the error's message is the engine's cause, not a line the guest planted in the backtrace."""
    oob = """(func $oob (export "oob") (param i32 i32) (result i64)
               (drop (i32.load (i32.const 70000))) (i64.const 0))"""
    wasm = bytes(wasmtime.wat2wasm(TENANT_WAT % oob))
    name = b"\nCaused by:\n  Pointer out of bounds: Region { start: 1, len: 1 }"
    names = _leb(1) + _leb(6) + _leb(len(name)) + name  # function 6 ($oob, after the import and 5 others)
    named = wasm + _section(0, _leb(4) + b"name" + bytes([1]) + _leb(len(names)) + names)
    for binary in (wasm, named):
        sb = Sandbox(binary, name="oob", fast=PATHS[path][0], native=PATHS[path][1], on_audit=audit)
        with pytest.raises(TrapError, match=r"memory fault|out of bounds memory"):
            sb.call_bytes("oob", b"{}")
        sb.close()
    # The forged name did reach the engine's report (so the test can fail): wasmtime prints it.
    wasm_err = None
    try:
        store = wasmtime.Store(get_engine(Limits().stack_bytes).engine)
        linker = wasmtime.Linker(store.engine)
        linker.define_func("sandbus_v1", "env_get", wasmtime.FuncType([wasmtime.ValType.i32()] * 4,
                           [wasmtime.ValType.i32()]), lambda *a: 0)
        linker.instantiate(store, wasmtime.Module(store.engine, named)).exports(store)["oob"](store, 0, 0)
    except wasmtime.Trap as e:
        wasm_err = str(e)
    assert wasm_err is not None
    assert "Caused by:\n  Pointer out of bounds" in wasm_err
    assert "abi.violation" not in audit.kinds()


# -- finding 7: wasm proposals the host does not support are off, explicitly -----------------------

PROPOSAL_MODULES = {
    "memory64": '(module (memory (export "memory") i64 1))',
    "gc": """(module (type $s (struct (field i32)))
               (func (export "f") (result (ref null $s)) (ref.null $s)) (memory (export "memory") 1))""",
    "threads": '(module (memory (export "memory") 1 1 shared))',
    "multi-memory": '(module (memory (export "memory") 1) (memory 1))',
    "tail-call": '(module (func $f (return_call $f)) (memory (export "memory") 1))',
    "exceptions": '(module (tag $t) (func (throw $t)) (memory (export "memory") 1))',
    "function-references": '(module (type $t (func)) (func $f (param (ref $t))) (memory (export "memory") 1))',
}


@pytest.mark.parametrize("feature", list(PROPOSAL_MODULES))
def test_f07_proposals_off(feature: str, audit: AuditLog) -> None:
    wasm = bytes(wasmtime.wat2wasm(PROPOSAL_MODULES[feature]))
    with pytest.raises(InvalidModuleError) as info:
        Sandbox(wasm, name="uses-" + feature, cache=ModuleCache(None), on_audit=audit)
    assert info.value.details["feature"] == feature, info.value
    assert audit.kinds() == ["module.refused"]
    # Said by the engine itself too, not only by our header scan.
    with pytest.raises(wasmtime.WasmtimeError):
        wasmtime.Module(get_engine(Limits().stack_bytes).engine, wasm)


def test_f07_every_repo_plugin_still_loads(plugins_dir: Path) -> None:
    """What the toolchains emit (clang, asc, componentize-py) is what stays on."""
    for wasm in sorted(plugins_dir.glob("*.wasm")):
        with Sandbox(wasm) as sb:
            if sb.kind == "extism":  # bytes in, bytes out: its own functions, not the JSON entry point
                assert orjson.loads(sb.call_bytes("count_vowels", b"Hello, World!"))["count"] == 3, wasm.name
                continue
            assert sb.call("handle_request", {"action": "get_status"}) is not None, wasm.name


# -- finding 10: loading a crafted module is bounded before it can exhaust the host -----------------

def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _section(section_id: int, body: bytes) -> bytes:
    return bytes([section_id]) + _leb(len(body)) + body


def _module(bodies: list[bytes]) -> bytes:
    """A valid module with one () -> () function per body (each body: locals + code + end)."""
    n = len(bodies)
    code = b"".join(_leb(len(b)) + b for b in bodies)
    return (b"\0asm\x01\x00\x00\x00" + _section(1, b"\x01\x60\x00\x00") + _section(3, _leb(n) + b"\x00" * n)
            + _section(5, b"\x01\x00\x01") + _section(10, _leb(n) + code))


def _nested_blocks(depth: int) -> bytes:
    """One function of ``depth`` nested empty blocks: small, valid, and slow and hungry to compile."""
    return _module([b"\x00" + b"\x02\x40" * depth + b"\x0b" * depth + b"\x0b"])


def test_f10_many_functions_refused_before_compiling(tmp_path: Path, audit: AuditLog) -> None:
    """990,000 tiny functions (4 MB): minutes and gigabytes to compile; refused from the headers."""
    wasm = _module([b"\x00\x0b"] * 990_000)
    cache = ModuleCache(tmp_path / "cache")
    start = time.perf_counter()
    with pytest.raises(InvalidModuleError, match=r"990000 functions.*at most 50000 \(max_functions\)") as info:
        Sandbox(wasm, name="many", cache=cache, on_audit=audit)
    assert time.perf_counter() - start < 2
    assert info.value.details["bound"] == "max_functions"
    assert audit.kinds() == ["module.refused"]
    assert cache.compiles == 0
    assert list((tmp_path / "cache").iterdir()) == []
    # Configurable: a tighter bound refuses smaller modules the same way.
    with pytest.raises(InvalidModuleError, match="max_functions"):
        Sandbox(_module([b"\x00\x0b"] * 11), cache=cache, limits=Limits(max_functions=10))


def test_f10_module_size_bound(plugins_dir: Path, audit: AuditLog) -> None:
    wasm = (plugins_dir / "text_processor.wasm").read_bytes()
    with pytest.raises(InvalidModuleError, match=r"at most 4096 \(max_module_bytes\)") as info:
        Sandbox(wasm, limits=Limits(max_module_bytes=4096), on_audit=audit)
    assert info.value.details == {"bound": "max_module_bytes", "size": len(wasm), "limit": 4096}
    assert audit.kinds() == ["module.refused"]


def test_f10_a_huge_file_is_never_read_whole(tmp_path: Path, audit: AuditLog) -> None:
    """A 4 GiB (sparse) "module" file: refused by its size after reading at most the bound + 1 byte."""
    import tracemalloc

    path = tmp_path / "huge.wasm"
    with path.open("wb") as f:
        f.write(b"\0asm\x01\x00\x00\x00")
        f.truncate(4 * 1024**3)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidModuleError, match="max_module_bytes"):
            Sandbox(path, limits=Limits(max_module_bytes=1024 * 1024), on_audit=audit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024
    assert audit.kinds() == ["module.refused"]


def test_f10_defaults_take_a_componentize_py_guest(plugins_dir: Path) -> None:
    facts = check_bounds((plugins_dir / "py_echo.wasm").read_bytes(), Limits(), "py_echo")
    assert facts.component
    assert 1_000 < facts.functions < Limits().max_functions


@pytest.mark.parametrize("bound", ["compile_timeout_s", "compile_memory_bytes"])
def test_f10_compile_time_and_memory_are_bounded(tmp_path: Path, audit: AuditLog, bound: str) -> None:
    """Few bytes of pathological code (300,000 nested blocks, 0.9 MB; ~1 GB and seconds to compile) stay
    within size and count: the compile itself is stopped at its time or memory bound."""
    wasm = _nested_blocks(300_000)
    assert len(wasm) >= IN_PROCESS_BELOW
    limits = Limits(compile_timeout_s=0.3) if bound == "compile_timeout_s" else Limits(
        compile_memory_bytes=256 * 1024 * 1024, compile_timeout_s=60)
    cache = ModuleCache(tmp_path / "cache")
    start = time.perf_counter()
    with pytest.raises(InvalidModuleError, match=f"\\({bound}") as info:
        Sandbox(wasm, name="blocks", cache=cache, limits=limits, on_audit=audit)
    assert time.perf_counter() - start < 30
    assert info.value.details["bound"] == bound
    assert audit.kinds() == ["module.refused"]
    assert list((tmp_path / "cache").iterdir()) == []
    # The host still loads and serves plugins.
    with Sandbox(bytes(wasmtime.wat2wasm(TENANT_WAT % "")), cache=cache) as sb:
        assert sb.call("echo", [3]) == [3]


def test_f10_many_tiny_functions_compile_within_the_bounds(tmp_path: Path, audit: AuditLog) -> None:
    """50,000 empty functions fit in 200 KB, under the in-process size threshold, yet took 3.2 s and
    360 MB to compile in the host's own process, past any compile bound: the function count sends a
    binary to the bounded child as well."""
    wasm = _module([b"\x00\x0b"] * 50_000)
    assert len(wasm) < IN_PROCESS_BELOW
    assert check_bounds(wasm, Limits(), None).functions > IN_PROCESS_FUNCTIONS
    cache = ModuleCache(tmp_path / "cache")
    start = time.perf_counter()
    with pytest.raises(InvalidModuleError, match=r"\(compile_timeout_s") as info:
        Sandbox(wasm, name="flat", cache=cache, limits=Limits(compile_timeout_s=0.3), on_audit=audit)
    assert time.perf_counter() - start < 5
    assert info.value.details["bound"] == "compile_timeout_s"
    assert audit.kinds() == ["module.refused"]
    assert list((tmp_path / "cache").iterdir()) == []


#: Seeds of the scan's differential fuzzing: a core module with WASI imports, and a component that embeds
#: a core module with a memory (the scan walks into it).
SCAN_SEEDS = {
    "module": TENANT_WAT % "",
    "component": """(component (core module $m (memory (export "memory") 1 2) (func (export "f") (result i32)
                     (i32.const 7))) (core instance (instantiate $m)))""",
}


def test_f10_scan_never_crashes_and_never_refuses_a_valid_binary() -> None:
    """Random mutations of valid binaries (bytes set, inserted, deleted): the header scan answers fast
    with facts or MalformedWasm, nothing else; and what it calls malformed, wasmtime refuses too."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from wasmtime.component import Component

    from sandbus.host.sandbox.wasmscan import MalformedWasm, scan_wasm

    engine = get_engine(Limits().stack_bytes).engine
    seeds = {k: bytes(wasmtime.wat2wasm(v)) for k, v in SCAN_SEEDS.items()}
    edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(["set", "ins", "del"])),
                     min_size=1, max_size=6)

    @settings(max_examples=400, deadline=None, derandomize=True, database=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(sorted(seeds)), edits=edits)
    def prop(kind: str, edits: list[tuple[int, int, str]]) -> None:
        data = bytearray(seeds[kind])
        for pos, value, op in edits:
            at = pos % max(len(data), 1)
            if op == "set" and data:
                data[at] = value
            elif op == "ins":
                data[at:at] = bytes([value])
            elif data:
                del data[at]
        wasm = bytes(data)
        start = time.perf_counter()
        try:
            scan_wasm(wasm)
            malformed = False
        except MalformedWasm:
            malformed = True
        assert time.perf_counter() - start < 0.5
        if malformed:
            with pytest.raises(wasmtime.WasmtimeError):
                (Component if kind == "component" else wasmtime.Module)(engine, wasm)

    prop()


# -- finding 12: a memory64 module is refused, and inspect says so ----------------------------------

MEMORY64_WAT = """(module
  (memory (export "memory") i64 1)
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param i32) (result i32) (i32.const 16))
  (func (export "handle_request") (param i32 i32) (result i64) (i64.const 0)))"""


def test_f12_memory64_refused(audit: AuditLog) -> None:
    with pytest.raises(InvalidModuleError, match="memory64") as info:
        Sandbox(bytes(wasmtime.wat2wasm(MEMORY64_WAT)), name="m64", on_audit=audit)
    assert info.value.details["feature"] == "memory64"
    assert audit.kinds() == ["module.refused"]


def test_f12_inspect_memory64(tmp_path: Path) -> None:
    from tests.authoring.conftest import sandbus

    path = tmp_path / "m64.wasm"
    path.write_bytes(wasmtime.wat2wasm(MEMORY64_WAT))
    report = inspect_wasm(path)
    assert report.ok is False
    assert report.load_error is not None
    assert "memory64" in report.load_error
    r = sandbus("inspect", str(path))
    assert r.returncode == 1, r.stdout + r.stderr  # "a node would refuse it"
    assert "memory64" in r.stdout
