"""The same Extism plugins, the same inputs, in the Extism Python SDK and in sandbus: the outputs must be equal
byte for byte and the failures of the same kind (and, where the plugin set one with ``error_set``, the same
text).

The plugins are real builds with Extism's AssemblyScript PDK (tests/extism/guests). Where the two hosts differ
on purpose -- the limits, who may reach which host over HTTP, how much of an error text travels, where logs
go, per-call isolation -- each side's own behaviour is asserted, and the test's docstring says how they
differ. HTTP through a node's network grant, compared with Extism's allowed_hosts, is tests/extism/test_node.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import extism
import pytest

from sandbus.host.sandbox import Limits, Sandbox
from sandbus.sdk.errors import (
    ExecutionTimeoutError,
    GuestError,
    MemoryLimitError,
    PayloadTooLargeError,
    SecurityViolationError,
)
from sandbus.sdk.testing import PluginHarness
from tests.conftest import AuditLog
from tests.extism.loopback import LoopbackServer

Guest = Callable[[str], Path]
MIB = 1024 * 1024


def extism_plugin(wasm: Path, *, config: dict[str, str] | None = None, **manifest: Any) -> extism.Plugin:
    """The plugin in Extism's own host: no WASI (the PDK needs none), no host functions."""
    return extism.Plugin({"wasm": [{"data": wasm.read_bytes()}], **manifest}, wasi=False, config=config,
                         functions=[])


def outcome_extism(plugin: extism.Plugin, function: str, data: bytes) -> tuple[str, bytes | str]:
    """("ok", output) or ("error", the message Extism reports)."""
    try:
        return "ok", bytes(plugin.call(function, data))
    except extism.Error as e:
        return "error", str(e)


def outcome_sandbus(sandbox: Sandbox, function: str, data: bytes) -> tuple[str, bytes | str]:
    """("ok", output) or ("error", the guest's message) -- only a GuestError counts as the guest failing."""
    try:
        return "ok", sandbox.call_bytes(function, data)
    except GuestError as e:
        return "error", e.message


@pytest.fixture
def both(extism_guest: Guest) -> Iterator[Callable[..., tuple[extism.Plugin, Sandbox]]]:
    """``both(name, config=...)``: the guest loaded in each host, closed after the test."""
    opened: list[Sandbox] = []

    def make(name: str, *, config: dict[str, str] | None = None) -> tuple[extism.Plugin, Sandbox]:
        wasm = extism_guest(name)
        sandbox = Sandbox(wasm, limits=Limits(max_output_bytes=16 * MIB, max_input_bytes=16 * MIB),
                          config=config or {})
        opened.append(sandbox)
        return extism_plugin(wasm, config=config), sandbox

    yield make
    for sandbox in opened:
        sandbox.close()


def test_sandbus_sees_an_extism_plugin(extism_guest: Guest) -> None:
    with Sandbox(extism_guest("vars")) as sb:
        assert sb.kind == "extism"
        assert sb.body == "bytes"
        assert set(sb.functions) == {"count", "reset"}


COUNT_VOWELS_INPUTS = [
    b"Hello, World!",
    b"",
    b"AEIOU aeiou xyz",
    "naïve café – ünïcödé, 😀".encode(),
    bytes(range(256)),
    b"a" * 100_000,
]


@pytest.mark.parametrize("data", COUNT_VOWELS_INPUTS, ids=lambda d: f"{len(d)}B")
def test_count_vowels_json_is_the_same(both: Callable[..., tuple[extism.Plugin, Sandbox]], data: bytes) -> None:
    ext, sb = both("count_vowels")
    expected = outcome_extism(ext, "count_vowels", data)
    assert expected[0] == "ok"
    assert outcome_sandbus(sb, "count_vowels", data) == expected


def test_count_vowels_matches_extisms_example(both: Callable[..., tuple[extism.Plugin, Sandbox]]) -> None:
    """The running total lives in a var: it grows over calls the same way on both hosts."""
    ext, sb = both("count_vowels")
    assert sb.call_bytes("count_vowels", b"Hello, World!") == b'{"count":3,"total":3,"vowels":"aeiouAEIOU"}'
    assert sb.call_bytes("count_vowels", b"aeiou") == b'{"count":5,"total":8,"vowels":"aeiouAEIOU"}'
    assert bytes(ext.call("count_vowels", b"Hello, World!")) + bytes(ext.call("count_vowels", b"aeiou")) == \
        b'{"count":3,"total":3,"vowels":"aeiouAEIOU"}{"count":5,"total":8,"vowels":"aeiouAEIOU"}'
    texts = [b"Hello, World!", b"aeiou", b"", b"xyz", "ÄÖÜ äöü".encode(), b"A" * 1000]
    assert [sb.call_bytes("count_vowels", t) for t in texts] == [bytes(ext.call("count_vowels", t)) for t in texts]


def test_count_vowels_reads_its_vowels_from_config(both: Callable[..., tuple[extism.Plugin, Sandbox]]) -> None:
    ext, sb = both("count_vowels", config={"vowels": "aeiouyAEIOUY"})
    out = sb.call_bytes("count_vowels", b"Happy day, my boy")
    assert out == bytes(ext.call("count_vowels", b"Happy day, my boy"))
    assert out == b'{"count":7,"total":7,"vowels":"aeiouyAEIOUY"}'


REFLECT_INPUTS = [bytes(range(256)), bytes(range(255, -1, -1)) * 4, b"", b"\x00", os.urandom(10_000),
                  os.urandom(3 * MIB + 7)]


@pytest.mark.parametrize("data", REFLECT_INPUTS, ids=lambda d: f"{len(d)}B")
def test_reflect_round_trips_every_byte(both: Callable[..., tuple[extism.Plugin, Sandbox]], data: bytes) -> None:
    ext, sb = both("reflect")
    assert outcome_extism(ext, "reflect", data) == ("ok", data)
    assert outcome_sandbus(sb, "reflect", data) == ("ok", data)


def test_reflect_many_calls_on_one_instance(both: Callable[..., tuple[extism.Plugin, Sandbox]]) -> None:
    """Kernel memory is reset between calls on both hosts: a thousand 10 KB calls neither leak nor mix."""
    ext, sb = both("reflect")
    for i in range(1000):
        data = i.to_bytes(4, "little") * 2500
        assert sb.call_bytes("reflect", data) == data
        if i % 100 == 0:
            assert bytes(ext.call("reflect", data)) == data


CONFIG = {"greeting": "héllo wörld", "empty_is_absent": "", "number": "42", "json": '{"a": [1, 2]}'}


@pytest.mark.parametrize("key", [b"greeting", b"number", b"json", b"missing", b"empty_is_absent", b""])
def test_config_get(both: Callable[..., tuple[extism.Plugin, Sandbox]], key: bytes) -> None:
    """A present key answers its value; a missing one fails with the plugin's error_set text on both. (The
    PDK reads a zero-length value as absent, so an empty string is "missing" on both hosts.)"""
    ext, sb = both("config", config=CONFIG)
    expected = outcome_extism(ext, "get_config", key)
    assert outcome_sandbus(sb, "get_config", key) == expected
    if key in (b"missing", b"empty_is_absent"):
        assert expected == ("error", f"no config key: {key.decode()}")


def test_vars_persist_across_calls(both: Callable[..., tuple[extism.Plugin, Sandbox]]) -> None:
    ext, sb = both("vars")
    calls = ["count"] * 5 + ["reset", "count", "count"]
    seen_extism = [outcome_extism(ext, fn, b"") for fn in calls]
    seen_sandbus = [outcome_sandbus(sb, fn, b"") for fn in calls]
    assert seen_sandbus == seen_extism
    assert [out for (_, out), fn in zip(seen_sandbus, calls, strict=True) if fn == "count"] == \
        [b"1", b"2", b"3", b"4", b"5", b"1", b"2"]


def test_error_set_failure_has_the_same_text(both: Callable[..., tuple[extism.Plugin, Sandbox]]) -> None:
    ext, sb = both("fail")
    assert outcome_extism(ext, "fail", b"no thanks") == ("error", "refused: no thanks")
    assert outcome_sandbus(sb, "fail", b"no thanks") == ("error", "refused: no thanks")
    # The plugin is still usable on both after a failure.
    assert outcome_sandbus(sb, "fail", b"again") == outcome_extism(ext, "fail", b"again")


def test_nonzero_return_without_a_message(both: Callable[..., tuple[extism.Plugin, Sandbox]],
                                          audit: AuditLog) -> None:
    """Both fail; Extism says "Error code: 7", sandbus keeps the code in the error's details."""
    ext, sb = both("fail")
    assert outcome_extism(ext, "fail_silently", b"") == ("error", "Error code: 7")
    with pytest.raises(GuestError) as failure:
        sb.call_bytes("fail_silently", b"")
    assert failure.value.code == "sandbox.guest_error"
    assert failure.value.details["return_code"] == 7
    assert failure.value.details["function"] == "fail_silently"


def test_huge_output_under_the_cap_is_the_same(both: Callable[..., tuple[extism.Plugin, Sandbox]]) -> None:
    ext, sb = both("hostile")
    assert outcome_sandbus(sb, "huge", b"5000000") == outcome_extism(ext, "huge", b"5000000")


def test_huge_output_each_host_caps_differently(extism_guest: Guest, audit: AuditLog) -> None:
    """Extism has no output cap: the 8 MiB output comes back. sandbus refuses an output above the plugin's
    max_output_bytes with a typed error, and the plugin serves the next call."""
    wasm = extism_guest("hostile")
    assert len(extism_plugin(wasm).call("huge", str(8 * MIB).encode())) == 8 * MIB
    with Sandbox(wasm, limits=Limits(max_output_bytes=1 * MIB), on_audit=audit) as sb:
        with pytest.raises(PayloadTooLargeError):
            sb.call_bytes("huge", str(8 * MIB).encode())
        assert sb.call_bytes("huge", b"1000") == b"x" * 1000


def test_infinite_loop_each_host_times_out(extism_guest: Guest, audit: AuditLog) -> None:
    """Both stop the loop at their timeout (Extism's manifest timeout_ms, sandbus' Limits.timeout_s); sandbus
    answers with its typed error and an audit event."""
    wasm = extism_guest("hostile")
    with pytest.raises(extism.Error, match=r"(?i)timeout|timed out"):
        extism_plugin(wasm, timeout_ms=200).call("spin", b"")
    with Sandbox(wasm, limits=Limits(timeout_s=0.2, fuel=None), on_audit=audit) as sb:
        with pytest.raises(ExecutionTimeoutError):
            sb.call_bytes("spin", b"")
        assert "limit.timeout" in audit.kinds()
        assert sb.call_bytes("huge", b"3") == b"xxx"


def test_memory_bomb_each_host_stops_at_its_limit(extism_guest: Guest, audit: AuditLog) -> None:
    """Both refuse to grow memory past their limit (Extism's memory.max_pages, sandbus' Limits.memory_bytes);
    the plugin's allocation then fails and the call fails. sandbus names it a memory limit."""
    wasm = extism_guest("hostile")
    with pytest.raises(extism.Error):
        extism_plugin(wasm, memory={"max_pages": 256}).call("bomb", b"")
    with Sandbox(wasm, limits=Limits(memory_bytes=16 * MIB), on_audit=audit) as sb:
        with pytest.raises(MemoryLimitError):
            sb.call_bytes("bomb", b"")
        assert sb.call_bytes("huge", b"3") == b"xxx"


def test_http_each_host_grants_differently(extism_guest: Guest, loopback: LoopbackServer,
                                           audit: AuditLog) -> None:
    """Extism reaches a host listed in the manifest's allowed_hosts and refuses others. A plain sandbus
    Sandbox (no node) grants no network at all: the request is a security violation with an audit event.
    (On a node, the manifest's network grant decides: tests/extism/test_node.py.)"""
    wasm = extism_guest("http")
    url = loopback.url("/hello").encode()
    status, _, body = bytes(extism_plugin(wasm, allowed_hosts=["127.0.0.1"]).call("fetch", url)).partition(b"\n")
    assert (status, body) == (b"200", loopback.body)
    assert outcome_extism(extism_plugin(wasm, allowed_hosts=["example.com"]), "fetch", url)[0] == "error"
    assert outcome_extism(extism_plugin(wasm), "fetch", url)[0] == "error"
    with Sandbox(wasm, on_audit=audit) as sb, pytest.raises(SecurityViolationError, match="'network' capability"):
        sb.call_bytes("fetch", url)
    assert audit.kinds() == ["security.capability_denied"]
    assert loopback.hits == 1  # only the granted Extism call reached the server


def test_var_bomb_both_hosts_refuse(both: Callable[..., tuple[extism.Plugin, Sandbox]], audit: AuditLog) -> None:
    """Both cap what a plugin's vars hold at 1 MiB by default (Extism's memory.max_var_bytes, sandbus'
    max_var_bytes): a var above it fails the call on both -- Extism with a trap, sandbus with its typed
    limit error -- and the plugin goes on serving."""
    ext, sb = both("hostile")
    assert outcome_sandbus(sb, "var_bomb", b"1000") == outcome_extism(ext, "var_bomb", b"1000") == ("ok", b"")
    with pytest.raises(extism.Error):
        ext.call("var_bomb", str(MIB).encode())
    with pytest.raises(PayloadTooLargeError, match="max_var_bytes"):
        sb.call_bytes("var_bomb", str(MIB).encode())
    assert outcome_sandbus(sb, "huge", b"2") == outcome_extism(ext, "huge", b"2") == ("ok", b"xx")


def test_a_long_error_message_each_host_bounds_differently(both: Callable[..., tuple[extism.Plugin, Sandbox]]
                                                           ) -> None:
    """Extism hands back the plugin's whole error text as it is; sandbus keeps its first 4 KiB with control
    characters escaped, since the text travels in reply headers and lands in logs and terminals."""
    ext, sb = both("hostile")
    raw = outcome_extism(ext, "fail_loudly", b"100000")
    assert raw == ("error", "\x1b\n" + "y" * 99_998)
    with pytest.raises(GuestError) as failure:
        sb.call_bytes("fail_loudly", b"100000")
    message = failure.value.message
    assert message.startswith("\\x1b\\x0ayyyy")
    assert "\x1b" not in message
    assert "\n" not in message
    assert len(message) < 4096 + 64


def test_input_above_the_cap_only_sandbus_refuses(extism_guest: Guest, audit: AuditLog) -> None:
    """sandbus refuses an input above the plugin's max_input_bytes before the plugin runs; Extism takes it."""
    wasm = extism_guest("reflect")
    data = os.urandom(2 * MIB)
    assert bytes(extism_plugin(wasm).call("reflect", data)) == data
    with Sandbox(wasm, limits=Limits(max_input_bytes=1 * MIB, max_output_bytes=4 * MIB), on_audit=audit) as sb:
        with pytest.raises(PayloadTooLargeError):
            sb.call_bytes("reflect", data)
        assert sb.call_bytes("reflect", data[:MIB]) == data[:MIB]


def test_logs_reach_sandbus_at_their_level(both: Callable[..., tuple[extism.Plugin, Sandbox]],
                                           extism_guest: Guest) -> None:
    """The same output on both; sandbus keeps each PDK log line at its level, control characters escaped
    (Extism writes them to its own log file, which the Python SDK leaves off)."""
    ext, sb = both("logger")
    text = b"hello \x1b[31m"
    assert outcome_sandbus(sb, "log_all", text) == outcome_extism(ext, "log_all", text) == ("ok", text)
    with PluginHarness(extism_guest("logger")) as plugin:
        assert plugin.call_bytes("log_all", text, validate=False) == text
        assert [(line.level_name, line.message) for line in plugin.logs] == [
            ("DEBUG", "debug: hello \\x1b[31m"), ("INFO", "info: hello \\x1b[31m"),
            ("WARNING", "warn: hello \\x1b[31m"), ("ERROR", "error: hello \\x1b[31m")]


def test_per_call_isolation_forgets_vars(extism_guest: Guest) -> None:
    """sandbus' isolation = "per-call" gives every call a fresh instance, so vars last one call (Extism has
    no such mode: its vars live as long as the plugin)."""
    with Sandbox(extism_guest("vars"), limits=Limits(isolation="per-call")) as sb:
        assert [sb.call_bytes("count", b"") for _ in range(3)] == [b"1", b"1", b"1"]


@pytest.mark.parametrize("text", ["hello", "héllo wörld", "😀" * 10])
def test_a_pdk_flaw_comes_out_the_same(both: Callable[..., tuple[extism.Plugin, Sandbox]], text: str) -> None:
    """The AS PDK's Host.outputString cuts non-ASCII text short (it counts UTF-16 units, writes UTF-8 past its
    block): sandbus' kernel gives the same bytes as Extism's, so a plugin behaves the same, flaws included."""
    ext, sb = both("quirks")
    expected = outcome_extism(ext, "shout", text.encode())
    assert outcome_sandbus(sb, "shout", text.encode()) == expected
    utf16_units = len((text + "!").encode("utf-16-le")) // 2
    assert expected == ("ok", (text + "!").encode()[:utf16_units])
