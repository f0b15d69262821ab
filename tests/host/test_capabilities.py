"""Deny by default: files, environment, clock, randomness, through plain libc in a real C guest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sandbus.host.sandbox import SandboxBuilder
from sandbus.sdk.errors import SecurityViolationError
from tests.conftest import AuditLog


@pytest.fixture
def guest(c_guest: Callable[[str], Path]) -> Path:
    return c_guest("capabilities")


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "data.txt").write_text("granted content")
    (tmp_path / "secret.txt").write_text("not for plugins")
    return ro, rw


def test_nothing_granted_denies_files(guest: Path, dirs: tuple[Path, Path], audit: AuditLog) -> None:
    ro, _ = dirs
    sb = SandboxBuilder(guest).on_audit(audit).build()
    with pytest.raises(SecurityViolationError, match="no directory containing it was granted"):
        sb.call("read_file", str(ro / "data.txt"))
    assert audit.kinds() == ["security.fs_denied"]
    assert audit[0].details["path"] == str(ro / "data.txt")


def test_granted_read_only_dir(guest: Path, dirs: tuple[Path, Path], audit: AuditLog) -> None:
    ro, _ = dirs
    sb = SandboxBuilder(guest).allow_read(ro).on_audit(audit).build()
    assert sb.call("read_file", str(ro / "data.txt")) == {"content": "granted content"}
    with pytest.raises(SecurityViolationError, match="granted read-only"):
        sb.call("write_file", str(ro / "new.txt"))
    assert not (ro / "new.txt").exists()
    with pytest.raises(SecurityViolationError, match="outside the granted directory"):
        sb.call("read_file", f"{ro}/../secret.txt")
    with pytest.raises(SecurityViolationError, match="no directory containing it"):
        sb.call("read_file", "/etc/hostname")
    assert audit.kinds() == ["security.fs_denied"] * 3


def test_granted_writable_dir(guest: Path, dirs: tuple[Path, Path]) -> None:
    _, rw = dirs
    sb = SandboxBuilder(guest).allow_write(rw).build()
    assert sb.call("write_file", str(rw / "out.txt")) == {"written": str(rw / "out.txt")}
    assert (rw / "out.txt").read_text() == "written by a plugin"


def test_guest_path_mapping(guest: Path, dirs: tuple[Path, Path]) -> None:
    ro, _ = dirs
    sb = SandboxBuilder(guest).allow_read(ro, guest="/data").build()
    assert sb.call("read_file", "/data/data.txt") == {"content": "granted content"}


def test_host_environment_does_not_leak(guest: Path, monkeypatch: pytest.MonkeyPatch, audit: AuditLog) -> None:
    monkeypatch.setenv("SANDBUS_TEST_SECRET", "hunter2")
    sb = SandboxBuilder(guest).on_audit(audit).build()
    assert sb.call("libc_getenv", "SANDBUS_TEST_SECRET") == {"value": None}
    assert sb.call("libc_getenv", "PATH") == {"value": None}
    with pytest.raises(SecurityViolationError, match="SANDBUS_TEST_SECRET"):
        sb.call("host_getenv", "SANDBUS_TEST_SECRET")
    assert audit.kinds() == ["security.env_denied"]


def test_allowlisted_environment(guest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDBUS_TEST_OK", "visible")
    monkeypatch.setenv("SANDBUS_TEST_SECRET", "hunter2")
    sb = SandboxBuilder(guest).allow_env("SANDBUS_TEST_OK").build()
    assert sb.call("libc_getenv", "SANDBUS_TEST_OK") == {"value": "visible"}
    assert sb.call("host_getenv", "SANDBUS_TEST_OK") == {"value": "visible"}
    assert sb.call("libc_getenv", "SANDBUS_TEST_SECRET") == {"value": None}


@pytest.mark.parametrize(("function", "grant"), [("clock_now", "allow_clock"), ("random_bytes", "allow_random")])
def test_clock_and_random_need_a_grant(guest: Path, audit: AuditLog, function: str, grant: str) -> None:
    denied = SandboxBuilder(guest).on_audit(audit).build()
    with pytest.raises(SecurityViolationError, match="capability"):
        denied.call(function, "")
    assert audit.kinds() == ["security.capability_denied"]
    allowed = getattr(SandboxBuilder(guest), grant)().build()
    reply = allowed.call(function, "")
    assert "error" not in reply
    assert set(reply) == {"now"} if function == "clock_now" else {"random"}


def test_stdout_is_captured_into_the_plugin_log(guest: Path, caplog: pytest.LogCaptureFixture) -> None:
    sb = SandboxBuilder(guest).build()
    with caplog.at_level("INFO", logger="sandbus.plugin.capabilities"):
        assert sb.call("print_lines", "") == {"printed": "3"}
    text = "".join(r.getMessage() for r in caplog.records if r.name == "sandbus.plugin.capabilities")
    assert "line 0" in text
    assert "line 2" in text


def test_granted_but_unset_variable_reads_as_unset(guest: Path, monkeypatch: pytest.MonkeyPatch,
                                                   audit: AuditLog) -> None:
    monkeypatch.delenv("SANDBUS_TEST_MAYBE", raising=False)
    sb = SandboxBuilder(guest).allow_env("SANDBUS_TEST_MAYBE").on_audit(audit).build()
    assert sb.call("host_getenv", "SANDBUS_TEST_MAYBE") == {"value": None}
    assert sb.call("libc_getenv", "SANDBUS_TEST_MAYBE") == {"value": None}
    assert audit.kinds() == []
