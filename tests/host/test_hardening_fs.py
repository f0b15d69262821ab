"""Hardening of directory grants: a grant is an identity, and every refusal is reported.

Each test drives a real hostile C guest (tests/host/guests/fs_attack.c, plain libc and raw WASI calls)
through ``SandboxBuilder`` and checks that the attack fails the documented way: a
``SecurityViolationError`` with a critical ``security.fs_denied`` audit event, nothing reached outside
the grants, and a sandbox that goes on serving.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from sandbus.host.lifecycle import PluginManager
from sandbus.host.lifecycle.policy import Policy
from sandbus.host.sandbox import AuditLevel, Capabilities, Limits, ModuleCache, Sandbox, SandboxBuilder
from sandbus.host.sandbox.config import DirGrant
from sandbus.host.sandbox.fsguard import MAX_OPEN_FILES, WASI_SIGNATURES
from sandbus.host.sandbox.grants import GrantSet, decoy_root, open_no_symlinks
from sandbus.sdk.errors import InvalidModuleError, ResourceLimitError, SandboxError, SecurityViolationError, TrapError
from tests.conftest import AuditLog


@pytest.fixture
def guest(c_guest: Callable[[str], Path]) -> Path:
    return c_guest("fs_attack")


def fs(sb: Sandbox, *args: str | Path) -> dict[str, str]:
    """Run one fs_attack operation: ``fs(sb, "read", path)``."""
    reply: dict[str, str] = sb.call("fs", "|".join(str(a) for a in args))
    return reply


def trap(sb: Sandbox) -> None:
    """Make the guest trap, so that the pool replaces its instance before the next call."""
    with pytest.raises(TrapError):
        fs(sb, "trap")


def denied(sb: Sandbox, audit: AuditLog, *args: str | Path, match: str = "") -> SecurityViolationError:
    """The operation fails with a SecurityViolationError and exactly one new critical fs_denied event."""
    before = len(audit)
    with pytest.raises(SecurityViolationError, match=match) as info:
        fs(sb, *args)
    new = audit[before:]
    assert [(e.kind, e.level) for e in new] == [("security.fs_denied", AuditLevel.CRITICAL)], new
    return info.value


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- finding 1: a nested grant re-resolved by name let the guest reach "/" ---------------------------


@pytest.fixture
def nested(tmp_path: Path) -> tuple[Path, Path]:
    """``tmp/outside/work`` (the outer grant) and ``work/out`` (the inner one), deep enough that the
    escaping symlink of the report climbs to "/"."""
    work = tmp_path / "outside" / "work"
    out = work / "out"
    out.mkdir(parents=True)
    (out / "inner.txt").write_text("inner")
    (tmp_path / "outside" / "secret.txt").write_text("not for plugins")
    return work, out


def nested_sandbox(guest: Path, work: Path, out: Path, inner_writable: bool, audit: AuditLog) -> Sandbox:
    builder = SandboxBuilder(guest, name="fs").allow_write(work)
    builder = builder.allow_write(out) if inner_writable else builder.allow_read(out)
    return builder.instances(1).on_audit(audit).build()


def listing(reply: dict[str, str]) -> set[str]:
    return set(reply["ok"].split("/")) - {"", ".", ".."}


@pytest.mark.parametrize("inner_writable", [True, False], ids=["writable-inner", "read-only-inner"])
def test_f01_nested_grant_symlink_escape(guest: Path, nested: tuple[Path, Path], audit: AuditLog,
                                         inner_writable: bool, tmp_path: Path) -> None:
    work, out = nested
    sb = nested_sandbox(guest, work, out, inner_writable, audit)
    to_root = "/".join([".."] * len(work.parts))
    # The attack of the report: rename the inner grant away through the outer one, put a relative
    # symlink climbing to "/" in its place, trap so that the pool builds a new instance.
    assert fs(sb, "rename", f"{work}/./out", f"{work}/moved") == {"ok": ""}
    denied(sb, audit, "symlink", to_root, f"{work}/./out", match="symlink target")  # refused now
    # Even with the symlink in place (planted here as the guest did before), no instance follows it.
    os.symlink(to_root, work / "out")
    trap(sb)
    assert listing(fs(sb, "list", out)) == {"inner.txt"}  # the original directory, not "/"
    assert fs(sb, "read", f"{out}/inner.txt") == {"ok": "inner"}
    assert "ok" not in fs(sb, "read", f"{out}/etc/hostname")
    escaped = tmp_path / "escaped.txt"
    if inner_writable:
        assert fs(sb, "write", f"{out}/new.txt") == {"ok": f"{out}/new.txt"}
        assert (work / "moved" / "new.txt").read_text() == "written by a plugin"
        assert "ok" not in fs(sb, "write", f"{out}{escaped}")
    else:
        denied(sb, audit, "write", f"{out}{escaped}", match="read-only")
    assert not escaped.exists()
    assert fs(sb, "read", f"{work}/moved/inner.txt") == {"ok": "inner"}  # still serving


def _rename(sb: Sandbox, work: Path) -> None:
    assert fs(sb, "rename", f"{work}/./out", f"{work}/moved") == {"ok": ""}


def _symlink_inside(sb: Sandbox, work: Path) -> None:
    _rename(sb, work)
    assert fs(sb, "mkdir", f"{work}/decoy") == {"ok": ""}
    assert fs(sb, "write", f"{work}/decoy/planted.txt")["ok"]
    assert fs(sb, "symlink", "decoy", f"{work}/./out") == {"ok": ""}


def _replace(sb: Sandbox, work: Path) -> None:
    _rename(sb, work)
    assert fs(sb, "mkdir", f"{work}/./out") == {"ok": ""}
    assert fs(sb, "write", f"{work}/./out/planted.txt")["ok"]


def _remove(sb: Sandbox, work: Path) -> None:
    assert fs(sb, "unlink", f"{work}/./out/inner.txt") == {"ok": ""}
    assert fs(sb, "rmdir", f"{work}/./out") == {"ok": ""}
    assert fs(sb, "mkdir", f"{work}/./out") == {"ok": ""}
    assert fs(sb, "write", f"{work}/./out/planted.txt")["ok"]


CHANGES: dict[str, Callable[[Sandbox, Path], None]] = {
    "rename": _rename, "symlink": _symlink_inside, "replace": _replace, "unlink-rmdir": _remove,
}


@pytest.mark.parametrize("inner_writable", [True, False], ids=["writable-inner", "read-only-inner"])
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_f01_tree_changes_never_redirect_a_grant(guest: Path, nested: tuple[Path, Path], audit: AuditLog,
                                                 change: str, inner_writable: bool) -> None:
    """Whatever the guest does to the tree, a new instance's inner grant is the original directory:
    moved (rename, symlink, replace), or removed (then empty, and nothing can be created in it)."""
    work, out = nested
    sb = nested_sandbox(guest, work, out, inner_writable, audit)
    CHANGES[change](sb, work)
    trap(sb)
    seen = listing(fs(sb, "list", out))
    assert "planted.txt" not in seen
    if change == "unlink-rmdir":
        assert seen == set()
        if inner_writable:
            assert "ok" not in fs(sb, "write", f"{out}/new.txt")  # a removed directory takes nothing
        assert sorted(p.name for p in (work / "out").iterdir()) == ["planted.txt"]
    else:
        assert seen == {"inner.txt"}
        assert fs(sb, "read", f"{out}/inner.txt") == {"ok": "inner"}
        if inner_writable:
            assert fs(sb, "write", f"{out}/new.txt")["ok"]
            assert (work / "moved" / "new.txt").exists()
    assert audit.kinds() == []


@pytest.mark.parametrize("key", ["write_files", "read_files"], ids=["writable-inner", "read-only-inner"])
def test_f01_nested_grant_through_a_manifest(guest: Path, tmp_path: Path, audit: AuditLog, key: str) -> None:
    """The same attack on a plugin loaded from a manifest by the manager (``work`` + ``work/out``)."""
    plugins, data = tmp_path / "plugins", tmp_path / "data"
    plugins.mkdir()
    out = data / "fs_attack" / "work" / "out"
    out.mkdir(parents=True)
    (out / "inner.txt").write_text("inner")
    (plugins / "fs_attack.wasm").write_bytes(guest.read_bytes())
    inner = '"work/out"'
    perms = f'write_files = ["work", {inner}]' if key == "write_files" else \
        f'write_files = ["work"]\nread_files = [{inner}]'
    (plugins / "fs_attack.toml").write_text(
        '[plugin]\nname = "fs_attack"\nversion = "1.0.0"\n[capabilities]\nrequired = ["filesystem"]\n'
        f"[resources]\nmax_instances = 1\n[permissions]\n{perms}\n")
    policy = Policy(capabilities={"allowed": ["compute", "filesystem"]}, filesystem={"writable": [data]})
    manager = PluginManager(plugins, policy=policy, data_root=data, on_audit=audit,
                            cache=ModuleCache(tmp_path / "cache"))
    try:
        manager.discover_and_load()

        def call(*args: str) -> Any:
            return manager.execute_json("fs_attack", "fs", "|".join(args))

        assert call("rename", "/work/./out", "/work/moved") == {"ok": ""}
        os.symlink("/".join([".."] * 12), out)  # as the guest did before symlink targets were checked
        with pytest.raises(TrapError):
            call("trap")
        assert listing(call("list", "/work/out")) == {"inner.txt"}
        assert "ok" not in call("read", "/work/out/etc/hostname")
    finally:
        manager.close(timeout=10)


def test_f01_read_only_outer_grant_cannot_move_a_writable_inner_one(guest: Path, nested: tuple[Path, Path],
                                                                    audit: AuditLog) -> None:
    work, out = nested
    sb = SandboxBuilder(guest, name="fs").allow_read(work).allow_write(out).on_audit(audit).build()
    denied(sb, audit, "rename", f"{work}/./out", f"{work}/moved", match="granted read-only")
    denied(sb, audit, "rmdir", f"{work}/./out", match="granted read-only")
    assert fs(sb, "write", f"{out}/new.txt")["ok"]  # the inner grant is writable under its own path
    assert sorted(p.name for p in out.iterdir()) == ["inner.txt", "new.txt"]


def test_f01_grant_is_opened_without_following_symlinks(tmp_path: Path) -> None:
    """The grant's path is opened component by component: a symlink met there (the tree changed since
    the path was resolved) is refused, typed."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(SecurityViolationError, match="symlink"):
        open_no_symlinks(str(tmp_path / "link"))
    with pytest.raises(SandboxError, match="cannot be opened"):
        open_no_symlinks(str(tmp_path / "missing"))
    fd = open_no_symlinks(str(tmp_path / "real"))
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(tmp_path / "real"))
    finally:
        os.close(fd)


def test_f01_grant_that_became_a_symlink_is_refused(guest: Path, tmp_path: Path, audit: AuditLog) -> None:
    """A granted path is resolved once, when the grant is made (and checked by the policy); if a
    component is replaced by a symlink before the sandbox opens it, the sandbox refuses to follow."""
    (tmp_path / "data" / "work").mkdir(parents=True)
    grant = DirGrant(host=tmp_path / "data" / "work", writable=True)
    (tmp_path / "data").rename(tmp_path / "elsewhere")
    (tmp_path / "data").symlink_to("/")
    with pytest.raises(SecurityViolationError, match="is now a symlink"):
        Sandbox(guest, name="fs", capabilities=Capabilities(dirs=(grant,)), on_audit=audit)
    assert [(e.kind, e.level) for e in audit] == [("security.fs_denied", AuditLevel.CRITICAL)]


def test_f01_grant_set_holds_identity_until_closed(tmp_path: Path, audit: AuditLog) -> None:
    (tmp_path / "data").mkdir()
    before = fd_count()
    grants = GrantSet([DirGrant(host=tmp_path / "data")], plugin="p")
    (opened,) = grants.grants
    assert fd_count() == before + 1
    (tmp_path / "data").rename(tmp_path / "moved")
    assert os.path.samestat(os.stat(opened.preopen_path), os.stat(tmp_path / "moved"))
    grants.close()
    assert fd_count() == before
    with pytest.raises(SandboxError, match="closed"):
        grants.preopen(wasmtime.WasiConfig())


def test_f01_sandbox_close_releases_grants(guest: Path, tmp_path: Path) -> None:
    sb = SandboxBuilder(guest).allow_read(tmp_path).build()
    (held,) = sb._grants.grants
    assert os.path.samestat(os.fstat(held.fd), os.stat(tmp_path))
    sb.close()
    assert sb._grants.closed
    try:
        reused = os.fstat(held.fd)  # the number may have been reused by another open since
    except OSError:
        return
    assert not os.path.samestat(reused, os.stat(tmp_path))


def test_f01_missing_grant_is_a_typed_error(guest: Path, tmp_path: Path) -> None:
    with pytest.raises(SandboxError, match="cannot be opened"):
        SandboxBuilder(guest).allow_read(tmp_path / "missing").build()


def test_f01_decoy_root_has_no_name(guest: Path, audit: AuditLog) -> None:
    """The empty "/" that catches ungranted paths is held open and removed: no name to replace."""
    st = os.stat(decoy_root())
    assert st.st_nlink == 0
    assert os.listdir(decoy_root()) == []
    sb = SandboxBuilder(guest).on_audit(audit).build()
    denied(sb, audit, "list", "/", match="no directory containing it was granted")


# -- finding 7: refusals that took another path were neither typed nor audited --------------------


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path, Path]:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    (ro / "sub").mkdir(parents=True)
    rw.mkdir()
    (ro / "sub" / "f.txt").write_text("granted")
    (rw / "file.txt").write_text("rw file")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for plugins")
    os.symlink(secret, ro / "abs_link")
    os.symlink("../secret.txt", ro / "rel_link")
    return ro, rw, secret


@pytest.fixture
def sb(guest: Path, trees: tuple[Path, Path, Path], audit: AuditLog) -> Iterator[Sandbox]:
    ro, rw, _ = trees
    sandbox = SandboxBuilder(guest, name="fs").allow_read(ro).allow_write(rw).on_audit(audit).build()
    yield sandbox
    sandbox.close()


def still_serving(sb: Sandbox, ro: Path) -> None:
    assert fs(sb, "read", f"{ro}/sub/f.txt") == {"ok": "granted"}


@pytest.mark.parametrize("link", ["abs_link", "rel_link"])
@pytest.mark.parametrize("op", ["read", "stat"])
def test_f07_read_through_symlink_pointing_outside(sb: Sandbox, trees: tuple[Path, Path, Path], audit: AuditLog,
                                                   link: str, op: str) -> None:
    ro, _, _ = trees
    err = denied(sb, audit, op, ro / link, match="refused by the sandbox")
    assert err.details["path"] == str(ro / link)
    assert "not for plugins" not in str(err)
    still_serving(sb, ro)


@pytest.mark.parametrize("op", ["dirwrite", "dirmkdir"])
def test_f07_write_through_own_dir_fd_under_read_only_grant(sb: Sandbox, trees: tuple[Path, Path, Path],
                                                           audit: AuditLog, op: str) -> None:
    ro, _, _ = trees
    denied(sb, audit, op, ro / "sub", "new", match="granted read-only")
    assert not (ro / "sub" / "new").exists()
    still_serving(sb, ro)


@pytest.mark.parametrize("how", ["truncate", "times"])
@pytest.mark.parametrize("target", ["sub/f.txt", "sub", "."])
def test_f07_metadata_writes_through_fd_under_read_only_grant(sb: Sandbox, trees: tuple[Path, Path, Path],
                                                              audit: AuditLog, how: str, target: str) -> None:
    """Truncating or touching through a descriptor opened for reading, in a read-only grant."""
    ro, _, _ = trees
    before = os.stat(ro / "sub" / "f.txt")
    denied(sb, audit, "fdwrite", ro / target, how, match="granted read-only")
    after = os.stat(ro / "sub" / "f.txt")
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    still_serving(sb, ro)


def test_f07_dotdot_from_own_dir_fd(sb: Sandbox, trees: tuple[Path, Path, Path], audit: AuditLog) -> None:
    ro, _, secret = trees
    err = denied(sb, audit, "dirread", ro / "sub", "../../secret.txt", match="outside the granted directory")
    assert err.details["path"] == str(secret)
    # wasmtime confines a descriptor to its own directory: '..' above it is refused, typed, even inside
    # the grant; beneath it, '..' is fine.
    denied(sb, audit, "dirread", ro / "sub", "../sub/f.txt", match="leads above the directory")
    (ro / "sub" / "d").mkdir()
    assert fs(sb, "dirread", ro / "sub", "d/../f.txt") == {"ok": "granted"}


def test_f07_renumbered_fd(sb: Sandbox, trees: tuple[Path, Path, Path], audit: AuditLog) -> None:
    ro, rw, _ = trees
    denied(sb, audit, "renumber", ro / "sub", "x.txt", match="granted read-only")
    assert not (ro / "sub" / "x.txt").exists()
    assert fs(sb, "renumber", rw, "x.txt") == {"ok": "x.txt"}  # a writable grant stays writable
    assert (rw / "x.txt").exists()
    # The preopens themselves: the read-only grant moved onto the decoy's number is still checked as
    # the read-only grant it is, not as the decoy (nor left unchecked).
    preopen_ro = 4  # WASI numbers the preopens from 3: the decoy "/", then the grants in order (ro, rw)
    assert fs(sb, "rawrenumber", str(preopen_ro), "3") == {"ok": ""}
    denied(sb, audit, "rawopen", "3", "../secret.txt", match="outside the granted directory")


def test_f07_second_path_of_rename_and_link(sb: Sandbox, trees: tuple[Path, Path, Path], audit: AuditLog,
                                            tmp_path: Path) -> None:
    ro, rw, _ = trees
    denied(sb, audit, "rename", rw / "file.txt", tmp_path / "stolen.txt", match="no directory containing it")
    denied(sb, audit, "link", rw / "file.txt", tmp_path / "linked.txt", match="no directory containing it")
    denied(sb, audit, "rename", rw / "file.txt", ro / "moved.txt", match="granted read-only")
    # Linking a read-only file into a writable grant would make it writable.
    denied(sb, audit, "link", ro / "sub" / "f.txt", rw / "hard.txt", match="granted read-only")
    assert sorted(p.name for p in rw.iterdir()) == ["file.txt"]
    assert not (tmp_path / "stolen.txt").exists()
    assert not (tmp_path / "linked.txt").exists()
    assert fs(sb, "rename", rw / "file.txt", rw / "renamed.txt") == {"ok": ""}  # inside one grant: fine


def test_f07_ungranted_stat_and_raw_open(sb: Sandbox, trees: tuple[Path, Path, Path], audit: AuditLog) -> None:
    ro, _, _ = trees
    denied(sb, audit, "stat", "/etc/hostname", match="no directory containing it was granted")
    denied(sb, audit, "rawopen", "3", "etc/hostname", match="no directory containing it was granted")
    still_serving(sb, ro)


def test_f07_overlong_path_is_refused_before_it_is_copied(sb: Sandbox, trees: tuple[Path, Path, Path],
                                                          audit: AuditLog) -> None:
    """A path longer than the host's PATH_MAX gets ENAMETOOLONG (37) without being copied or decoded;
    one within it, on the decoy "/", is a security violation as usual."""
    ro, _, _ = trees
    assert fs(sb, "rawlong", str(4 * 1024 * 1024)) == {"errno": "37"}
    assert audit.kinds() == []
    denied(sb, audit, "rawlong", "4096", match="no directory containing it was granted")
    still_serving(sb, ro)


def test_f07_granted_operations_raise_nothing(sb: Sandbox, trees: tuple[Path, Path, Path], audit: AuditLog) -> None:
    """The checks refuse only what leaves the grants: ordinary work is not audited."""
    ro, rw, _ = trees
    assert fs(sb, "dirread", ro / "sub", "f.txt") == {"ok": "granted"}
    assert fs(sb, "dirwrite", rw, "w.txt") == {"ok": "w.txt"}
    assert fs(sb, "mkdir", rw / "d") == {"ok": ""}
    assert fs(sb, "rmdir", rw / "d") == {"ok": ""}
    assert fs(sb, "readlink", ro / "rel_link") == {"ok": "../secret.txt"}
    assert fs(sb, "fdwrite", rw / "file.txt", "times") == {"ok": ""}
    assert fs(sb, "fdwrite", rw / "file.txt", "write") == {"errno": "8"}  # opened for reading: EBADF
    assert listing(fs(sb, "list", ro)) == {"sub", "abs_link", "rel_link"}
    assert audit.kinds() == []


# -- finding 12: a symlink whose target leaves the grant ------------------------------------------


@pytest.mark.parametrize("target", ["../outside", "/etc", "sub/../../outside", "..", ""])
def test_f12_symlink_target_outside_grant(sb: Sandbox, trees: tuple[Path, Path, Path], audit: AuditLog,
                                          target: str) -> None:
    ro, rw, _ = trees
    err = denied(sb, audit, "symlink", target, rw / "evil2", match="symlink target")
    details: dict[str, Any] = err.details
    assert details["target"] == target
    assert not os.path.lexists(rw / "evil2")
    assert fs(sb, "symlink", "file.txt", rw / "good") == {"ok": ""}  # a target inside: fine
    assert fs(sb, "read", rw / "good") == {"ok": "rw file"}
    still_serving(sb, ro)


START_CLOSES_FD_WAT = """
(module
  (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
  (memory (export "memory") 1)
  (func $start (drop (call $fd_close (i32.const 3))))
  (start $start)
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "handle_request") (param i32 i32) (result i64) (i64.const 0)))
"""


def test_f07_wasi_file_call_during_instantiation_is_typed(tmp_path: Path, audit: AuditLog) -> None:
    """The file functions are checked from the first instruction: a start function that reaches them
    before the host's checks are linked gets a typed error, not a host exception."""
    wasm = bytes(wasmtime.wat2wasm(START_CLOSES_FD_WAT))
    with pytest.raises(SandboxError):  # AbiViolationError, or InvalidModuleError where wasmtime hides it
        SandboxBuilder(wasm, name="early").allow_read(tmp_path).on_audit(audit).build()


# -- attacks on the fix itself: raw WASI calls (tests/host/guests/fs_raw.c) -----------------------


@pytest.fixture
def raw_guest(c_guest: Callable[[str], Path]) -> Path:
    return c_guest("fs_raw")


def raw(sb: Sandbox, *args: object) -> str:
    """Run one fs_raw operation: ``raw(sb, "open", dirfd, dirflags, oflags, rights, fdflags, path)``."""
    reply: str = sb.call("fs", "|".join(str(a) for a in args))
    return reply


RIGHTS_READ, RIGHTS_WRITE = 2, 64
DECOY, RO, RW = 3, 4, 5  # the preopens of `raw_sb`: the decoy "/", then the grants in order


@pytest.fixture
def raw_sb(raw_guest: Path, trees: tuple[Path, Path, Path], audit: AuditLog) -> Iterator[Sandbox]:
    ro, rw, _ = trees
    sandbox = SandboxBuilder(raw_guest, name="raw").allow_read(ro).allow_write(rw).instances(2).on_audit(audit).build()
    yield sandbox
    sandbox.close()


def raw_denied(sb: Sandbox, audit: AuditLog, *args: object, match: str | None = None) -> SecurityViolationError:
    before = len(audit)
    with pytest.raises(SecurityViolationError, match=match) as info:
        raw(sb, *args)
    assert [(e.kind, e.level) for e in audit[before:]] == [("security.fs_denied", AuditLevel.CRITICAL)]
    return info.value


def test_f12_guest_cannot_move_a_symlink_out_of_its_meaning(raw_sb: Sandbox, trees: tuple[Path, Path, Path],
                                                            audit: AuditLog, tmp_path: Path) -> None:
    """A symlink the host put in a writable grant, ``deep/l -> ../secret.txt``, points inside the grant;
    renamed or hard-linked one directory up by the guest it would point outside (for host tools that
    follow it later, as in the symlink-target check). Moving or linking such a symlink is refused."""
    _, rw, secret = trees
    (rw / "deep").mkdir()
    os.symlink("../secret.txt", rw / "deep" / "l")
    os.symlink(secret, rw / "abs")
    raw_denied(raw_sb, audit, "rename", RW, "deep/l", RW, "l", match="may not move or link a symlink")
    raw_denied(raw_sb, audit, "link", RW, 0, "deep/l", RW, "l", match="may not move or link a symlink")
    err = raw_denied(raw_sb, audit, "link", RW, 0, "abs", RW, "abs2", match="may not move or link a symlink")
    assert err.details["target"] == "a target outside the granted directory"
    assert sorted(p.name for p in rw.iterdir()) == ["abs", "deep", "file.txt"]
    assert os.listdir(rw / "deep") == ["l"]
    # The guest's own symlinks (relative, no '..') point beneath themselves wherever they go.
    (rw / "deep" / "file.txt").write_text("deep")
    assert raw(raw_sb, "symlink", "file.txt", RW, "deep/mine") == "e=0 fd=0"
    assert raw(raw_sb, "rename", RW, "deep/mine", RW, "mine") == "e=0 fd=0"
    assert raw(raw_sb, "link", RW, 0, "mine", RW, "mine2") == "e=0 fd=0"
    assert raw(raw_sb, "rename", RW, "file.txt", RW, "renamed.txt") == "e=0 fd=0"  # not a symlink: fine
    assert os.readlink(rw / "mine2") == "file.txt"


@pytest.mark.parametrize("how", ["O_CREAT", "O_CREAT|O_EXCL", "O_TRUNC", "O_DIRECTORY"])
def test_f07_open_flags_through_a_host_symlink_pointing_outside(raw_sb: Sandbox, trees: tuple[Path, Path, Path],
                                                                audit: AuditLog, tmp_path: Path, how: str) -> None:
    """Host-made symlinks in a writable grant pointing outside (one dangling) are never followed, whatever
    the open flags; following is refused typed and audited, not following opens nothing outside."""
    _, rw, secret = trees
    os.symlink(secret, rw / "abs")
    os.symlink("../created_outside.txt", rw / "dangling")
    oflags = {"O_CREAT": 1, "O_CREAT|O_EXCL": 5, "O_TRUNC": 8, "O_DIRECTORY": 2}[how]
    rights = RIGHTS_READ if how == "O_DIRECTORY" else RIGHTS_WRITE
    for link in ("abs", "dangling"):
        if how == "O_CREAT|O_EXCL":  # never follows a symlink (POSIX): the name exists
            assert raw(raw_sb, "open", RW, 1, oflags, rights, 0, link) == "e=20 fd=0"  # EEXIST
        else:
            raw_denied(raw_sb, audit, "open", RW, 1, oflags, rights, 0, link, match="refused by the sandbox")
        assert raw(raw_sb, "open", RW, 0, oflags, rights, 0, link).split()[0] in ("e=20", "e=32")  # EEXIST/ELOOP
    raw_denied(raw_sb, audit, "times", RW, 1, "abs", match="refused by the sandbox")
    assert secret.read_text() == "not for plugins"
    assert os.stat(secret).st_mtime > 1e9 + 1
    assert not (tmp_path / "created_outside.txt").exists()


@pytest.mark.parametrize("path", ["/", "//", "//rw", "/etc/hostname", "..", "../ro", "./../rw"])
def test_f07_odd_paths_on_a_grant(raw_sb: Sandbox, audit: AuditLog, path: str) -> None:
    raw_denied(raw_sb, audit, "open", RW, 0, 0, RIGHTS_READ, 0, path)
    assert raw(raw_sb, "open", RW, 0, 2, RIGHTS_READ, 0, ".").startswith("e=0 ")  # still serving


def test_f07_closing_and_renumbering_preopens(raw_sb: Sandbox, trees: tuple[Path, Path, Path],
                                             audit: AuditLog) -> None:
    """Descriptor numbers are not identities: a closed preopen's number reused by a directory opened in
    another grant is checked as that directory; a file moved onto a preopen's number keeps its grant.
    (A refusal ends the instance: each step below that follows one runs in a fresh instance.)"""
    ro, rw, _ = trees
    assert raw(raw_sb, "close", RO) == "e=0 fd=0"
    assert raw(raw_sb, "open", RW, 0, 2, RIGHTS_READ, 0, ".") == f"e=0 fd={RO}"  # the lowest free number
    assert raw(raw_sb, "open", RO, 0, 1, RIGHTS_WRITE, 0, "via_reused.txt").startswith("e=0 ")
    assert (rw / "via_reused.txt").read_text() == "PWNED"
    assert raw(raw_sb, "close", RW) == "e=0 fd=0"
    raw_denied(raw_sb, audit, "open", DECOY, 0, 1, RIGHTS_WRITE, 0, "x", match="no directory containing it")
    # A file of the read-only grant renumbered onto the decoy's number carries its grant with it.
    file_fd = raw(raw_sb, "open", RO, 0, 0, RIGHTS_READ, 0, "sub/f.txt").split()[1]  # 'fd=N'
    assert file_fd.startswith("fd=")
    assert raw(raw_sb, "renumber", file_fd[3:], DECOY) == "e=0 fd=0"
    raw_denied(raw_sb, audit, "open", DECOY, 0, 1, RIGHTS_WRITE, 0, "x", match="granted read-only")
    assert sorted(p.name for p in ro.rglob("*")) == ["abs_link", "f.txt", "rel_link", "sub"]
    assert audit.kinds() == ["security.fs_denied"] * 2


WRONG_WASI_TYPES = {
    "path_open": "(param i32 i32 i32) (result i32)",
    "fd_close": "(param i32 i32) (result i32)",
    "fd_renumber": "(param i32 i32)",
    "path_unlink_file": "(param i32 i64 i32) (result i32)",
    "poll_oneoff": "(param i32) (result i32)",
    "random_get": "(param i32 i32) (result i64)",
}


@pytest.mark.parametrize("name", sorted(WRONG_WASI_TYPES))
def test_f07_wasi_import_with_a_wrong_type_is_an_invalid_module(name: str, tmp_path: Path) -> None:
    """The host links its own code for these WASI functions under the type the guest declares: a wrong
    one used to pass linking and fail later as a raw wasmtime error out of the sandbox's build."""
    wasm = wasmtime.wat2wasm(f"""(module
      (import "wasi_snapshot_preview1" "{name}" (func {WRONG_WASI_TYPES[name]}))
      (memory (export "memory") 1)
      (func (export "sandbus_abi_version") (result i32) (i32.const 1))
      (func (export "sandbus_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "handle_request") (param i32 i32) (result i64) (i64.const 0)))""")
    with pytest.raises(InvalidModuleError, match=f"wasi_snapshot_preview1.{name} with type"):
        SandboxBuilder(bytes(wasm), name="wrong").allow_read(tmp_path).build()


def test_f07_wasi_signature_table_matches_wasmtime() -> None:
    """The host's table of WASI types is wasmtime's own: a module importing each function with the
    table's type links against wasmtime's WASI."""
    imports = "\n".join(
        f'(import "wasi_snapshot_preview1" "{n}" (func (param {" ".join(p)}) (result {" ".join(r)})))'
        for n, (p, r) in WASI_SIGNATURES.items())
    engine = wasmtime.Engine()
    module = wasmtime.Module(engine, wasmtime.wat2wasm(f"(module {imports})"))
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    store = wasmtime.Store(engine)
    store.set_wasi(wasmtime.WasiConfig())
    linker.instantiate(store, module)


def test_f07_guest_cannot_exhaust_host_descriptors(raw_sb: Sandbox, audit: AuditLog) -> None:
    """Each file a guest opens is a host descriptor: opening without end would take the node's last one
    (its sockets included). Past MAX_OPEN_FILES the call fails typed, audited; the instance is replaced."""
    before = fd_count()
    assert raw(raw_sb, "openmany", RW, MAX_OPEN_FILES) == f"e=0 fd={MAX_OPEN_FILES + 5}"
    with pytest.raises(ResourceLimitError, match="files open"):
        raw(raw_sb, "openmany", RW, 1)
    assert audit.kinds() == ["limit.exceeded"]
    assert fd_count() <= before + 2 * MAX_OPEN_FILES
    assert raw(raw_sb, "openmany", RW, 10) == "e=0 fd=15"  # a fresh instance, serving


def _live_stores() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, wasmtime.Store))


def test_f07_instances_are_freed_with_their_descriptors(raw_guest: Path, trees: tuple[Path, Path, Path]) -> None:
    """An instance replaced after a trap, or closed with its sandbox, releases its store, its memory and
    its host descriptors (preopens, files the guest left open). Functions linked into a store used to
    hold the instance, a cycle through wasmtime that Python never collects: every instance ever built
    stayed, and a plugin trapping on purpose grew the host without bound."""
    ro, rw, _ = trees
    stores_before = _live_stores()  # collects first: what earlier tests left is not counted
    fds_before = fd_count()
    for _ in range(3):
        sb = SandboxBuilder(raw_guest, name="raw").allow_read(ro).allow_write(rw).instances(2).build()
        for _ in range(10):
            assert raw(sb, "openmany", RW, 20).startswith("e=0 ")
            with pytest.raises(TrapError):
                raw(sb, "trap")
        sb.close()
    for _ in range(100):  # instances busy at close are shut down by a worker thread: wait for it, bounded
        if _live_stores() <= stores_before and fd_count() <= fds_before:
            break
        time.sleep(0.05)
    assert _live_stores() <= stores_before
    assert fd_count() <= fds_before


EXIT_SCRIPT = """
import sys, threading
from sandbus.host.sandbox import SandboxBuilder
from sandbus.sdk.errors import TrapError
sb = SandboxBuilder(sys.argv[1], name="exit").allow_write(sys.argv[2]).instances(2).build()
def work():
    for i in range(40):
        sb.call("fs", f"print|line {i}")
        try:
            sb.call("fs", "trap")
        except TrapError:
            pass
threads = [threading.Thread(target=work) for _ in range(2)]
for t in threads: t.start()
for t in threads: t.join()
print("done")  # the sandbox stays open: its instances end with the interpreter
"""


def test_f07_exit_is_clean_with_live_instances(raw_guest: Path, tmp_path: Path) -> None:
    """Instances alive at interpreter exit end with it, cleanly. (Guest output used to go through Python
    callbacks that wasmtime runs on its own threads, which abort the process when they run during
    interpreter shutdown: about one run in three, once instances were freed at all.)"""
    root = Path(__file__).resolve().parents[2]
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(raw_guest), str(tmp_path)], cwd=root,
                              capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout.strip()) == (0, "done"), proc.stderr[-2000:]
        assert "panicked" not in proc.stderr


def test_f07_output_of_a_call_is_logged_after_it(raw_guest: Path, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    sb = SandboxBuilder(raw_guest, name="out").allow_read(tmp_path).build()
    with caplog.at_level(logging.INFO, logger="sandbus.plugin.out"):
        raw(sb, "print", "hello\x1b[2J")
    lines = [r.getMessage() for r in caplog.records if r.name == "sandbus.plugin.out"]
    assert lines == ["[stdout] hello\\u001b[2J", "[stderr] hello\\u001b[2J"]
    sb.close()


def test_f07_concurrent_tree_changes_never_escape(raw_guest: Path, trees: tuple[Path, Path, Path],
                                                  audit: AuditLog) -> None:
    """Two instances of one plugin read through one name on two threads while a third thread keeps
    swapping, under that name, a real directory and a host-made symlink to outside (the guest itself
    may not move that symlink). No read ever reaches outside: refused (audited) or inside."""
    _, rw, secret = trees
    (rw / "realdir").mkdir()
    (rw / "realdir" / "secret.txt").write_text("inside")
    os.symlink(secret.parent, rw / "evil")
    sb = SandboxBuilder(raw_guest, name="race").allow_write(rw).instances(2).on_audit(audit).build()
    seen: set[str] = set()
    done = threading.Event()

    def swap() -> None:
        while not done.is_set():
            for a, b in (("evil", "x"), ("x", "evil"), ("realdir", "x"), ("x", "realdir")):
                os.rename(rw / a, rw / b)

    def read() -> None:
        for _ in range(300):
            try:
                seen.add(raw(sb, "open", 4, 1, 0, RIGHTS_READ, 0, "x/secret.txt").split("data=")[-1])
            except SecurityViolationError:
                seen.add("refused")

    swapper, readers = threading.Thread(target=swap), [threading.Thread(target=read) for _ in range(2)]
    swapper.start()
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=60)
    done.set()
    swapper.join(timeout=10)
    sb.close()
    assert not any(t.is_alive() for t in (*readers, swapper)), "a reader or the swapper never finished"
    assert "not for plugins" not in seen
    assert "inside" in seen or "refused" in seen
    assert all(e.kind == "security.fs_denied" for e in audit)


def test_f01_grant_beneath_a_search_only_directory() -> None:
    """A grant is opened component by component; the directories on the way are only searched, as by a
    path walk: a grant beneath a directory the host may search but not list (a 0711 home) opens."""
    base = Path(tempfile.mkdtemp(prefix="sandbus-search-"))
    try:
        (base / "home" / "data").mkdir(parents=True)
        base.chmod(0o755)
        (base / "home").chmod(0o311 if os.geteuid() != 0 else 0o711)
        target = str(base / "home" / "data")
        if os.geteuid() != 0:
            os.close(open_no_symlinks(target))  # the owner of a 0311 directory may search it, not list it
            return
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.close(open_no_symlinks(target))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        (base / "home").chmod(0o755)
        shutil.rmtree(base)


NOT_UTF8_WAT = """
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_unlink_file" (func $unlink (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_rename" (func $rename (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "path_symlink" (func $symlink (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "\\ff\\fe")
  (data (i32.const 200) "file.txt")
  (data (i32.const 300) "[00,00,00,00]")
  (func $put (param $at i32) (param $errno i32)  ;; the errno as two decimal digits
    (i32.store8 (local.get $at) (i32.add (i32.const 48) (i32.div_u (local.get $errno) (i32.const 10))))
    (i32.store8 (i32.add (local.get $at) (i32.const 1))
                (i32.add (i32.const 48) (i32.rem_u (local.get $errno) (i32.const 10)))))
  (func (export "sandbus_abi_version") (result i32) (i32.const 1))
  (func (export "sandbus_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "handle_request") (param i32 i32) (result i64)
    (call $put (i32.const 301) (call $open (i32.const 4) (i32.const 0) (i32.const 100) (i32.const 2)
                                            (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 500)))
    (call $put (i32.const 304) (call $unlink (i32.const 4) (i32.const 100) (i32.const 2)))
    (call $put (i32.const 307) (call $rename (i32.const 4) (i32.const 200) (i32.const 8)
                                              (i32.const 4) (i32.const 100) (i32.const 2)))
    (call $put (i32.const 310) (call $symlink (i32.const 100) (i32.const 2)
                                               (i32.const 4) (i32.const 200) (i32.const 2)))
    (i64.or (i64.shl (i64.const 300) (i64.const 32)) (i64.const 13))))
"""


def test_f07_path_that_is_not_utf8_gets_eilseq(tmp_path: Path, audit: AuditLog) -> None:
    """A path (or symlink target) that is not UTF-8 gets EILSEQ, as from wasmtime itself: it reaches no
    file, so it is neither a security violation nor a reason to end the guest."""
    (tmp_path / "file.txt").write_text("x")
    wasm = bytes(wasmtime.wat2wasm(NOT_UTF8_WAT))
    sb = SandboxBuilder(wasm, name="utf8").allow_write(tmp_path).on_audit(audit).build()
    assert sb.call("handle_request", {}) == [25, 25, 25, 25]  # EILSEQ from each function
    assert audit.kinds() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    sb.close()


# -- grants by file-name pattern (a manifest's "data/*.txt") and max_open_files -------------------------


@pytest.fixture
def globbed(tmp_path: Path) -> tuple[Path, Path]:
    """data/: a.txt, b.txt, secret.key, sub/c.txt, notes.txt -> secret.key (a host symlink), and 300
    long-named files the pattern does not match (so that listing it takes several fd_readdir rounds);
    out/: keep.txt, secret.key and report.json."""
    data, out = tmp_path / "data", tmp_path / "out"
    (data / "sub").mkdir(parents=True)
    out.mkdir()
    (data / "a.txt").write_text("alpha")
    (data / "b.txt").write_text("beta")
    (data / "secret.key").write_text("KEY")
    (data / "sub" / "c.txt").write_text("deep")
    for i in range(300):
        (data / f"filler-{'x' * 80}-{i:03}.dat").write_text("")
    (out / "keep.txt").write_text("keep")
    (out / "secret.key").write_text("OUTKEY")
    (out / "report.json").write_text("{}")
    return data, out


def glob_sandbox(guest: Path, data: Path, out: Path, audit: AuditLog, **limits: Any) -> Sandbox:
    dirs = (DirGrant(host=data, guest="/data", patterns=("*.txt",)),
            DirGrant(host=out, guest="/out", writable=True, patterns=("*.json",), write_patterns=("*.json",)))
    return Sandbox(guest, name="globs", capabilities=Capabilities(dirs=dirs), limits=Limits(**limits),
                   on_audit=audit)


@pytest.fixture
def glob_sb(guest: Path, globbed: tuple[Path, Path], audit: AuditLog) -> Iterator[Sandbox]:
    sandbox = glob_sandbox(guest, *globbed, audit)
    yield sandbox
    sandbox.close()


def test_glob_grant_reaches_matching_names_only(glob_sb: Sandbox, audit: AuditLog) -> None:
    """`data/*.txt` reads data/a.txt, not data/secret.key, data/sub/c.txt nor anything by '..'."""
    assert fs(glob_sb, "read", "/data/a.txt") == {"ok": "alpha"}
    assert fs(glob_sb, "read", "/out/report.json") == {"ok": "{}"}
    assert audit.kinds() == []
    err = denied(glob_sb, audit, "read", "/data/secret.key", match="matches none of the patterns")
    assert err.details["path"] == "/data/secret.key"
    denied(glob_sb, audit, "stat", "/data/secret.key", match="matches none")
    denied(glob_sb, audit, "read", "/data/sub/c.txt", match="only files directly in /data")
    denied(glob_sb, audit, "list", "/data/sub", match="sub matches none")
    denied(glob_sb, audit, "read", "/data/sub/../secret.key", match="'..' is not allowed")
    denied(glob_sb, audit, "read", "/out/keep.txt", match="matches none")
    denied(glob_sb, audit, "dirread", "/data", "secret.key", match="matches none")
    assert fs(glob_sb, "dirread", "/data", "b.txt") == {"ok": "beta"}
    assert fs(glob_sb, "read", "/data/a.txt") == {"ok": "alpha"}  # still serving after every refusal


def test_glob_grant_listing_shows_matching_names_only(glob_sb: Sandbox, globbed: tuple[Path, Path],
                                                      audit: AuditLog) -> None:
    """readdir of the directory lists what may be reached, across as many fd_readdir rounds as it takes:
    the 300 other names fill the guest's buffer several times over and are left out."""
    data, _ = globbed
    for i in range(200):  # more matching entries than one 4 KiB buffer holds: wasi-libc asks again
        (data / f"m{i:03}.txt").write_text("")
    listed = fs(glob_sb, "list", "/data")["ok"].rstrip("/").split("/")
    assert sorted(listed) == sorted([".", "..", "a.txt", "b.txt", *(f"m{i:03}.txt" for i in range(200))])
    assert sorted(fs(glob_sb, "list", "/out")["ok"].rstrip("/").split("/")) == [".", "..", "report.json"]
    assert audit.kinds() == []


@pytest.mark.parametrize(("op", "args", "why"), [
    ("write", ("/out/new.key",), "matches none"),                      # create a name that does not match
    ("write", ("/data/a.txt",), "read-only"),                          # a read-only pattern grant
    ("rename", ("/out/secret.key", "/out/stolen.json"), "matches none"),  # rename into a matching name
    ("rename", ("/out/report.json", "/out/report.key"), "matches none"),  # ... or out of one
    ("link", ("/out/secret.key", "/out/stolen.json"), "matches none"),    # hard link into a matching name
    ("symlink", ("secret.key", "/out/stolen.json"), "may not create symlinks"),
    ("unlink", ("/out/secret.key",), "matches none"),
    ("mkdir", ("/out/sub.json/x",), "only files directly in /out"),
    ("rmdir", ("/out",), "may be changed"),
])
def test_glob_grant_hostile_path_ops(glob_sb: Sandbox, globbed: tuple[Path, Path], audit: AuditLog, op: str,
                                     args: tuple[str, ...], why: str) -> None:
    """Every path operation that would reach a name the patterns do not grant fails typed and audited,
    and changes nothing."""
    _, out = globbed
    before = sorted(p.name for p in out.iterdir())
    denied(glob_sb, audit, op, *args, match=why)
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "secret.key").read_text() == "OUTKEY"


def test_glob_grant_writes_matching_names(glob_sb: Sandbox, globbed: tuple[Path, Path], audit: AuditLog) -> None:
    _, out = globbed
    assert fs(glob_sb, "write", "/out/new.json") == {"ok": "/out/new.json"}
    assert fs(glob_sb, "rename", "/out/new.json", "/out/renamed.json") == {"ok": ""}
    assert fs(glob_sb, "unlink", "/out/report.json") == {"ok": ""}
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "renamed.json", "secret.key"]
    assert (out / "renamed.json").read_text() == "written by a plugin"
    assert audit.kinds() == []


def test_glob_grant_raw_wasi(raw_guest: Path, globbed: tuple[Path, Path], audit: AuditLog) -> None:
    """The same through raw WASI calls on the preopened descriptors (3: the decoy "/", 4: /data, 5: /out),
    where wasi-libc's own path handling is out of the way."""
    data, out = globbed
    sb = glob_sandbox(raw_guest, data, out, audit)
    try:
        assert "data=alpha" in raw(sb, "open", 4, 0, 0, RIGHTS_READ, 0, "a.txt")
        assert "data=alpha" in raw(sb, "open", 4, 0, 0, RIGHTS_READ, 0, "./a.txt")
        for path in ("secret.key", "sub/c.txt", "sub/../secret.key", "../out/report.json", "x/../a.txt"):
            raw_denied(sb, audit, "open", 4, 0, 0, RIGHTS_READ, 0, path)
        raw_denied(sb, audit, "open", 3, 0, 0, RIGHTS_READ, 0, "data/secret.key")  # through the decoy "/"
        raw_denied(sb, audit, "link", 5, 0, "secret.key", 5, "x.json", match="matches none")
        raw_denied(sb, audit, "rename", 5, "secret.key", 5, "x.json", match="matches none")
        raw_denied(sb, audit, "symlink", "secret.key", 5, "x.json", match="may not create symlinks")
        # a file descriptor opened under the grant carries its patterns: changing a read-only name by fd
        raw_denied(sb, audit, "times", 5, 0, "keep.txt", match="matches none")
        listed = raw(sb, "readdir", 4)
        assert listed.startswith("e=0 ")
        assert sorted(listed[4:].rstrip("/").split("/")) == [".", "..", "a.txt", "b.txt"]
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "report.json", "secret.key"]
    finally:
        sb.close()


def test_glob_grant_of_a_host_symlink_is_the_operators(guest: Path, globbed: tuple[Path, Path],
                                                       audit: AuditLog) -> None:
    """A symlink the *host* put in the directory under a matching name is followed as wasmtime follows it
    (inside the grant): the operator chose it. One pointing outside the directory is refused."""
    data, out = globbed
    os.symlink("secret.key", data / "alias.txt")
    os.symlink("../out/secret.key", data / "escape.txt")
    sb = glob_sandbox(guest, data, out, audit)
    try:
        assert fs(sb, "read", "/data/alias.txt") == {"ok": "KEY"}
        denied(sb, audit, "read", "/data/escape.txt", match="refused by the sandbox")
    finally:
        sb.close()


def test_glob_grant_is_refused_for_a_component(plugins_dir: Path, globbed: tuple[Path, Path],
                                               audit: AuditLog) -> None:
    """A component's file operations cannot be checked one by one (wasmtime-py): a pattern grant would be
    the whole directory, so it is refused at load, typed and audited, instead of silently widened."""
    data, _ = globbed
    caps = Capabilities(dirs=(DirGrant(host=data, guest="/data", patterns=("*.txt",)),))
    with pytest.raises(SecurityViolationError, match="cannot be enforced for a component"):
        Sandbox(plugins_dir / "py_echo.wasm", name="py_echo", capabilities=caps, on_audit=audit)
    assert audit.kinds() == ["security.fs_denied"]
    whole = Sandbox(plugins_dir / "py_echo.wasm", name="py_echo", capabilities=Capabilities(
        dirs=(DirGrant(host=data, guest="/data"),)), on_audit=audit)
    whole.close()


def test_max_open_files_is_the_limit(raw_guest: Path, globbed: tuple[Path, Path], audit: AuditLog) -> None:
    """``Limits.max_open_files`` (a manifest's [resources] max_open_files) bounds the guest's open files:
    one more fails typed and audited, and a fresh instance serves again."""
    data, out = globbed
    sb = glob_sandbox(raw_guest, data, out, audit, max_open_files=20)
    try:
        assert raw(sb, "openmany", 5, 20) == "e=0 fd=25"
        with pytest.raises(ResourceLimitError, match="already has 20 files open") as info:
            raw(sb, "openmany", 5, 1)
        assert info.value.details["limit"] == 20
        assert audit.kinds() == ["limit.exceeded"]
        assert raw(sb, "openmany", 5, 20) == "e=0 fd=25"
    finally:
        sb.close()


@pytest.mark.parametrize("pattern", ["", "a/b", ".", "..", "x\x00", "\n*", "a" * 256])
def test_dir_grant_pattern_must_be_one_name(tmp_path: Path, pattern: str) -> None:
    with pytest.raises(ValueError, match="file-name pattern"):
        DirGrant(host=tmp_path, patterns=(pattern,))


@pytest.fixture(scope="module")
def readdir_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/host/fixtures/readdir_small.c: raw fd_readdir into a buffer of a given size, resuming by cookie."""
    out = tmp_path_factory.mktemp("readdir") / "readdir_small.wasm"
    root = Path(__file__).resolve().parents[2]
    subprocess.run(["clang", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-mexec-model=reactor",
                    "-Wl,--strip-all", "-Wall", "-Wextra", "-Werror", "-I", str(root / "sdk" / "guest" / "c"),
                    "-o", str(out), str(Path(__file__).resolve().parent / "fixtures" / "readdir_small.c")],
                   check=True, capture_output=True)
    return out


@pytest.mark.parametrize("size", [40, 64, 300, 4096])
def test_glob_grant_listing_with_small_buffers(readdir_guest: Path, tmp_path: Path, audit: AuditLog,
                                               size: int) -> None:
    """Whatever the guest's buffer (smaller than one entry, a few entries, a page), resuming by cookie lists
    exactly the matching names, long ones included, and nothing of the others -- not even cut off."""
    data = tmp_path / "data"
    data.mkdir()
    visible = {"a.txt", *(f"{'L' * 200}{i}.txt" for i in range(3))}
    for name in [*visible, "secret.key", *(f"{'h' * 100}{i}.dat" for i in range(50))]:
        (data / name).write_text("")
    sb = Sandbox(readdir_guest, name="readdir", on_audit=audit,
                 capabilities=Capabilities(dirs=(DirGrant(host=data, guest="/data", patterns=("*.txt",)),)))
    try:
        reply = sb.call("fs", f"3|{size}")  # no path functions imported: the grant is descriptor 3
    finally:
        sb.close()
    assert reply.startswith("e=0 ")
    names = reply.split(" ", 2)[2].rstrip("/").split("/")
    assert sorted(names) == sorted([".", "..", *visible])
    assert "secret" not in reply
    assert "hhhh" not in reply
    assert audit.kinds() == []
