"""Python guests as components: plugins/py_echo (componentize-py, sdk/guest/python) built by plugins/build.sh and
run by the same Sandbox as core modules, under the same limits and capability rules.

The component takes seconds to compile, so the module compiles it once (into the session's module cache)
and every other load comes from the cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from sandbus.host.sandbox import (
    BudgetExceeded,
    CallContext,
    HostFunction,
    HostFunctions,
    Limits,
    ModuleCache,
    Sandbox,
    SandboxBuilder,
    shared_cache,
)
from sandbus.host.sandbox.component import ComponentInstance
from sandbus.sdk.errors import (
    AbiViolationError,
    ExecutionTimeoutError,
    MemoryLimitError,
    OutOfFuelError,
    PayloadTooLargeError,
    SandboxError,
    SecurityViolationError,
)
from tests.conftest import AuditLog


@pytest.fixture(scope="module")
def py_echo(plugins_dir: Path) -> Path:
    path = plugins_dir / "py_echo.wasm"
    if not path.exists():
        pytest.fail("plugins/build.sh did not build py_echo: install componentize-py into the venv "
                    "(pip install componentize-py)")
    return path


@pytest.fixture(scope="module")
def sandbox(py_echo: Path) -> Iterator[Sandbox]:
    """The plugin with no capabilities; compiles the component once for the whole module."""
    with Sandbox(py_echo) as sb:
        yield sb


def test_loads_as_a_component(sandbox: Sandbox) -> None:
    assert sandbox.kind == "component"
    inst = sandbox.pool.acquire()
    try:
        assert isinstance(inst, ComponentInstance)
    finally:
        sandbox.pool.release(inst)
    assert sandbox.functions == ("handle_request",)
    # The node reads the sandbus_v1 imports to decide what may run inline on its loop.
    assert {"log", "time_now_ms", "env_get", "publish", "kv_get", "http_request"} <= \
        sandbox.info.imports_of("sandbus_v1")


def test_echo_and_envelope(sandbox: Sandbox) -> None:
    assert sandbox.call_bytes("echo", b'{"a": [1, 2]}') == b'{"a": [1, 2]}'
    request = {"text": 'quote " é 😀 \u0000', "n": [1, 2.5, None, True]}
    assert sandbox.call("handle_request", request) == {"success": True, "result": {"echo": request},
                                                       "error": None}
    result = sandbox.call_detailed("handle_request", b"{}")
    assert result.fuel_used > 0
    assert result.json()["success"] is True


def test_err_results_become_failure_envelopes(sandbox: Sandbox) -> None:
    bad = orjson.loads(sandbox.call_bytes("handle_request", b'{"a": '))
    assert bad["success"] is False
    assert bad["error"].startswith("request is not valid JSON")
    unknown = sandbox.call("fly", {})
    assert unknown == {"success": False, "result": None,
                       "error": "unknown function 'fly'; this plugin has: announce, ask, echo, env, "
                                "handle_request, now, probe, remember, spin"}
    assert sandbox.call("env", {}) == {"success": False, "result": None, "error": 'expected {"name": "<variable>"}'}
    assert sandbox.pool.replaced == 0  # plugin-level failures keep the instance


def test_fuel_limit(py_echo: Path, audit: AuditLog) -> None:
    with Sandbox(py_echo, limits=Limits(fuel=5_000_000), on_audit=audit) as sb:
        with pytest.raises(OutOfFuelError):
            sb.call("spin", {"iterations": 10**9})
        assert audit.kinds() == ["limit.fuel"]
        assert sb.call("spin", {"iterations": 3})["result"]["iterations"] == 3  # a fresh instance
        assert sb.pool.replaced == 1


def test_timeout(py_echo: Path, audit: AuditLog) -> None:
    # Fuel stays on (plenty of it): turning it off means another engine, and compiling the component again.
    with Sandbox(py_echo, limits=Limits(timeout_s=0.2, fuel=10**15), on_audit=audit) as sb:
        start = time.monotonic()
        with pytest.raises(ExecutionTimeoutError):
            sb.call("spin", {"iterations": 10**12})
        assert time.monotonic() - start < 2
    assert audit.kinds() == ["limit.timeout"]


def test_memory_limit(py_echo: Path, audit: AuditLog) -> None:
    with Sandbox(py_echo, limits=Limits(memory_bytes=32 * 1024 * 1024), on_audit=audit) as sb:
        with pytest.raises(MemoryLimitError, match="memory limit"):
            sb.call("probe", {"what": "memory"})
        assert sb.call("echo", {"after": 1}) == {"after": 1}
    assert audit.kinds() == ["limit.memory"]
    # CPython's heap snapshot alone is ~12 MiB: below that the component cannot even be instantiated.
    with pytest.raises(MemoryLimitError, match="initial memory"):
        Sandbox(py_echo, limits=Limits(memory_bytes=4 * 1024 * 1024))


def test_short_budget_ends_in_budget_exceeded(sandbox: Sandbox) -> None:
    """The node's inline calls: past ``budget_s`` the call stops with BudgetExceeded (to be retried)."""
    with pytest.raises(BudgetExceeded):
        sandbox.call_detailed("spin", b'{"iterations": 1000000000000}', budget_s=0.05)
    assert sandbox.call("echo", 1) == 1


def test_input_and_output_caps(py_echo: Path) -> None:
    with Sandbox(py_echo, limits=Limits(max_input_bytes=100)) as sb, pytest.raises(PayloadTooLargeError):
        sb.call("echo", "x" * 200)
    with Sandbox(py_echo, limits=Limits(max_output_bytes=100)) as sb:
        with pytest.raises(PayloadTooLargeError, match="output"):
            sb.call("handle_request", "x" * 90)
        assert sb.call("echo", "short") == "short"


def test_host_functions_are_gated_like_core_modules(sandbox: Sandbox, audit: AuditLog) -> None:
    sandbox.auditor.add_sink(audit)
    with pytest.raises(SecurityViolationError, match="'clock' capability"):
        sandbox.call("now", {})  # time-now-ms
    with pytest.raises(SecurityViolationError, match="HOME"):
        sandbox.call("env", {"name": "HOME"})  # env-get
    assert audit.kinds() == ["security.capability_denied", "security.env_denied"]


def test_granted_capabilities(py_echo: Path) -> None:
    with SandboxBuilder(py_echo).allow_clock().allow_env("GREETING", "hej").build() as sb:
        now = sb.call("now", {})["result"]["now_ms"]
        assert abs(now - time.time() * 1000) < 60_000
        assert sb.call("env", {"name": "GREETING"})["result"] == {"name": "GREETING", "value": "hej"}
        assert sb.call("probe", {"what": "environ"})["result"] == {"environ": {"GREETING": "hej"}}
        assert sb.call("probe", {"what": "clock"})["success"] is True


@pytest.mark.parametrize(("what", "match"), [
    ("clock", "'clock' capability"),     # wasi:clocks/wall-clock without the grant
    ("socket", "sockets are not available"),
])
def test_wasi_denials(sandbox: Sandbox, what: str, match: str) -> None:
    with pytest.raises(SecurityViolationError, match=match):
        sandbox.call("probe", {"what": what})


def test_sleep_is_refused_even_with_the_clock(py_echo: Path, audit: AuditLog) -> None:
    with (SandboxBuilder(py_echo).allow_clock().on_audit(audit).build() as sb,
          pytest.raises(SecurityViolationError, match="sleep")):
        sb.call("probe", {"what": "sleep", "seconds": 30})
    assert audit.kinds() == ["security.sleep_denied"]


def test_files_only_in_granted_directories(py_echo: Path, tmp_path: Path) -> None:
    (tmp_path / "note.txt").write_text("hello")
    with SandboxBuilder(py_echo).allow_read(tmp_path, guest="/data").build() as sb:
        assert sb.call("probe", {"what": "file", "path": "/data/note.txt"})["result"] == {"content": "hello"}
        outside = sb.call("probe", {"what": "file", "path": "/etc/hostname"})
        assert outside["success"] is False
        assert "FileNotFoundError" in outside["error"]


def _fake_store() -> HostFunctions:
    """kv_get / kv_put / take_result over a dict, written against the core ABI like host/node/hostfuncs.py."""
    store: dict[str, bytes] = {}

    def kv_get(ctx: CallContext, kptr: int, klen: int, buf: int, cap: int) -> int:
        value = store.get(ctx.read_str(kptr, klen, "key"))
        if value is None:
            return -1
        ctx.extra["bus_result"] = value
        ctx.write(buf, value[:cap])
        return len(value)

    def kv_put(ctx: CallContext, kptr: int, klen: int, vptr: int, vlen: int) -> int:
        store[ctx.read_str(kptr, klen, "key")] = ctx.read(vptr, vlen)
        return 0

    def take_result(ctx: CallContext, buf: int, cap: int) -> int:
        data: bytes = ctx.extra["bus_result"]
        ctx.write(buf, data[:cap])
        return len(data)

    funcs = HostFunctions()
    funcs.add(HostFunction("kv_get", ("i32",) * 4, ("i32",), kv_get, capability="storage"))
    funcs.add(HostFunction("kv_put", ("i32",) * 4, ("i32",), kv_put, capability="storage"))
    funcs.add(HostFunction("take_result", ("i32",) * 2, ("i32",), take_result))
    return funcs


def test_registered_host_functions_serve_components(py_echo: Path, audit: AuditLog) -> None:
    """The same Python implementations as for core modules (the bus registers its own the same way)."""
    with SandboxBuilder(py_echo).grant("storage").host_functions(_fake_store()).build() as sb:
        assert sb.call("remember", {"key": "a"})["result"] == {"key": "a", "value": None}
        assert sb.call("remember", {"key": "a", "value": "1"})["result"] == {"key": "a", "value": "1"}
        big = "é" * 100_000  # 200 KB: longer than the first result buffer, fetched again via take_result
        assert sb.call("remember", {"key": "big", "value": big})["result"]["value"] == big
    with (SandboxBuilder(py_echo).host_functions(_fake_store()).on_audit(audit).build() as sb,
          pytest.raises(SecurityViolationError, match="'storage' capability")):
        sb.call("remember", {"key": "a"})
    assert audit.kinds() == ["security.capability_denied"]


def _fake_peers() -> HostFunctions:
    """``request`` + ``take_result`` written against the core ABI like host/node/hostfuncs.py: "echo"
    answers with its request, anything else has no node (-2, with the error JSON in take_result)."""

    def request(ctx: CallContext, tptr: int, tlen: int, jptr: int, jlen: int, buf: int, cap: int) -> int:
        target, body = ctx.read_str(tptr, tlen, "target"), ctx.read(jptr, jlen)
        if target.split(".")[0] == "echo":
            data, status = body, 0
        else:
            data = orjson.dumps({"code": "plugin.not_found", "message": f"no node serves {target}",
                                 "plugin": target, "details": {}})
            status = -2
        ctx.extra["bus_result"] = data
        if status:
            return status
        ctx.write(buf, data[:cap])
        return len(data)

    def take_result(ctx: CallContext, buf: int, cap: int) -> int:
        data: bytes = ctx.extra["bus_result"]
        ctx.write(buf, data[:cap])
        return len(data)

    funcs = HostFunctions()
    funcs.add(HostFunction("request", ("i32",) * 6, ("i32",), request, capability="messaging"))
    funcs.add(HostFunction("take_result", ("i32",) * 2, ("i32",), take_result))
    return funcs


def test_a_python_plugin_requests_another_plugin(py_echo: Path) -> None:
    with SandboxBuilder(py_echo).grant("messaging").host_functions(_fake_peers()).build() as sb:
        assert sb.call("ask", {"target": "echo.handle_request", "payload": {"n": 1}})["result"] == {
            "reply": {"n": 1}}
        big = "é" * 50_000  # a reply longer than the first result buffer: fetched again via take_result
        assert sb.call("ask", {"target": "echo", "payload": big})["result"] == {"reply": big}
        failed = sb.call("ask", {"target": "nobody.f", "payload": None})
        assert failed["success"] is False
        assert failed["error"].startswith("plugin.not_found: no node serves nobody.f")


def test_bus_functions_fail_when_the_host_has_no_bus(sandbox: Sandbox) -> None:
    # A component imports the whole host interface, so this cannot be refused at load.
    with pytest.raises(SandboxError, match="publish is not provided by this host"):
        sandbox.call("announce", {"topic": "t", "payload": {}})


def test_second_load_comes_from_the_disk_cache(py_echo: Path, sandbox: Sandbox) -> None:
    # `sandbox` compiled the component into the session's shared cache, which wrote it to disk.
    directory = shared_cache().directory
    assert directory is not None
    assert list(directory.glob("*.component.cwasm"))
    fresh = ModuleCache(directory)  # an empty memory layer: a new process, in effect
    with Sandbox(py_echo, cache=fresh) as sb:
        assert sb.call("echo", {"ok": 1}) == {"ok": 1}
    assert (fresh.hits_disk, fresh.compiles) == (1, 0)


def test_module_cache_refuses_a_component_as_a_core_module(py_echo: Path, tmp_path: Path) -> None:
    from sandbus.host.sandbox.engine import get_engine
    from sandbus.sdk.errors import InvalidModuleError

    with pytest.raises(InvalidModuleError, match="component"):
        ModuleCache(tmp_path).load(get_engine(Limits().stack_bytes), py_echo.read_bytes())


def test_bad_request_bytes(sandbox: Sandbox) -> None:
    with pytest.raises(AbiViolationError, match="UTF-8"):
        sandbox.call_bytes("echo", b'"\xff"')
