"""Attacks on grants by file-name pattern (a manifest's ``data/*.txt``) and on ``max_open_files``, by a
hostile plugin author: a real C guest calling WASI directly (paths are passed with their exact length, so
NUL, '/' and '..' reach the host as written), against real directories.

Holes these tests found (each failed before its fix):

- a symlink made in another writable grant and renamed or hard-linked into a pattern grant under a
  matching name opened (read and write) the name the patterns refuse;
- a filtered ``fd_readdir`` left what wasmtime had written -- every hidden name -- in the guest's buffer
  past the entries it kept;
- ``*`` matched names starting with '.', which a glob does not;
- an entry larger than the guest's buffer went out as its header, telling the length of a hidden name;
- any number of patterns: one manifest with 40,000 globs made each file operation take seconds, in a
  WASI call no timeout interrupts, and each refusal message half a megabyte;
- max_open_files bounds one instance only: four plugins at the default 256 files took every descriptor
  of a process with the usual soft limit of 1,024.

The other tests are attacks that held; they stay as regression tests.
"""

from __future__ import annotations

import gc
import os
import re
import resource
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbus.host.lifecycle.manifest import MAX_FILE_ENTRIES, parse_manifest
from sandbus.host.lifecycle.policy import Policy, resolve
from sandbus.host.sandbox import AuditLevel, Capabilities, Limits, Sandbox
from sandbus.host.sandbox.config import MAX_NAME_PATTERNS, DirGrant
from sandbus.host.sandbox.fsguard import HOST_FILES
from sandbus.sdk.errors import ManifestError, ResourceLimitError, SecurityViolationError
from tests.conftest import AuditLog

ROOT = Path(__file__).resolve().parents[2]

#: The guest: one export "fs" taking "op|arg|..." (paths '%XX'-escaped) and replying "e=<WASI errno> ...".
GUEST_C = r'''/* A hostile guest: raw WASI file calls with exact path lengths. */
#include "sandbus.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <wasi/api.h>

#define RAW(name) __attribute__((import_module("wasi_snapshot_preview1"), import_name(#name)))
RAW(path_open) int32_t raw_open(int32_t, int32_t, const char *, size_t, int32_t, int64_t, int64_t, int32_t,
                                __wasi_fd_t *);
RAW(path_readlink) int32_t raw_readlink(int32_t, const char *, size_t, uint8_t *, size_t, __wasi_size_t *);
RAW(path_symlink) int32_t raw_symlink(const char *, size_t, int32_t, const char *, size_t);
RAW(path_link) int32_t raw_link(int32_t, int32_t, const char *, size_t, int32_t, const char *, size_t);
RAW(path_rename) int32_t raw_rename(int32_t, const char *, size_t, int32_t, const char *, size_t);
RAW(path_unlink_file) int32_t raw_unlink(int32_t, const char *, size_t);
RAW(path_create_directory) int32_t raw_mkdir(int32_t, const char *, size_t);
RAW(path_remove_directory) int32_t raw_rmdir(int32_t, const char *, size_t);
RAW(path_filestat_get) int32_t raw_stat(int32_t, int32_t, const char *, size_t, __wasi_filestat_t *);
RAW(path_filestat_set_times) int32_t raw_times(int32_t, int32_t, const char *, size_t, int64_t, int64_t, int32_t);

static char in_buf[8192];
static char paths[4][1100];
static size_t plen[4];
static uint8_t d[65536];
static char out[140000];

static uint64_t reply(const char *text) {
    sandbus_buf b;
    sandbus_buf_init(&b);
    sandbus_buf_json_string(&b, text, strlen(text));
    return sandbus_buf_reply(&b);
}

/* '%XX' -> byte, so that a path may hold NUL, '|', '"' or '\\'. */
static size_t decode(const char *s, char *o) {
    size_t n = 0;
    for (; *s && n < 1090; s++) {
        if (s[0] == '%' && s[1] && s[2]) {
            char h[3] = {s[1], s[2], 0};
            o[n++] = (char)strtoul(h, NULL, 16);
            s += 2;
        } else o[n++] = *s;
    }
    o[n] = 0;
    return n;
}

static void show(const uint8_t *p, size_t n, char *o) {
    for (size_t i = 0; i < n; i++) o[i] = (p[i] >= 32 && p[i] < 127 && p[i] != '\\' && p[i] != '"') ? (char)p[i] : '.';
    o[n] = 0;
}

SANDBUS_EXPORT(fs)
uint64_t fs(const uint8_t *in, uint32_t len) {
    char *f[12] = {0};
    size_t n = 0;
    if (len >= 2 && in[0] == '"')
        for (uint32_t i = 1; i + 1 < len && n + 1 < sizeof in_buf; i++) in_buf[n++] = (char)in[i];
    in_buf[n] = 0;
    int k = 0;
    f[k++] = in_buf;
    for (char *p = in_buf; *p && k < 12; p++)
        if (*p == '|') { *p = 0; f[k++] = p + 1; }
#define N(i) ((uint64_t)strtoull(f[i], NULL, 0))
#define P(slot, i) (plen[slot] = decode(f[i], paths[slot]), paths[slot])
#define PL(slot) plen[slot]
    __wasi_errno_t e = 0;
    __wasi_fd_t fd = 0;
    const char *op = f[0];
    if (!strcmp(op, "open")) { /* open|dirfd|dirflags|oflags|rights|rights_inh|fdflags|path */
        P(0, 7);
        e = raw_open(N(1), N(2), paths[0], PL(0), N(3), N(4), N(5), N(6), &fd);
    } else if (!strcmp(op, "read")) {
        __wasi_iovec_t iov = {d, 200};
        __wasi_size_t r = 0;
        e = __wasi_fd_read(N(1), &iov, 1, &r);
        char tmp[300]; show(d, r, tmp);
        snprintf(out, sizeof out, "e=%d data=%s", e, tmp);
        return reply(out);
    } else if (!strcmp(op, "write")) {
        __wasi_ciovec_t iov = {(const uint8_t *)f[2], strlen(f[2])};
        __wasi_size_t w = 0;
        e = __wasi_fd_write(N(1), &iov, 1, &w);
    } else if (!strcmp(op, "readdir")) { /* readdir|fd|bufsize|cookie: the whole buffer, prefilled with '#' */
        size_t size = N(2);
        if (size > sizeof d) size = sizeof d;
        memset(d, '#', sizeof d);
        __wasi_size_t used = 0;
        e = __wasi_fd_readdir(N(1), d, size, N(3), &used);
        size_t o = (size_t)snprintf(out, sizeof out, "e=%d used=%lu buf=", e, (unsigned long)used);
        show(d, size, out + o);
        return reply(out);
    } else if (!strcmp(op, "readlink")) {
        char *p = P(0, 2);
        __wasi_size_t used = 0;
        memset(d, 0, 300);
        e = raw_readlink(N(1), p, PL(0), d, 256, &used);
        char tmp[300]; show(d, used, tmp);
        snprintf(out, sizeof out, "e=%d link=%s", e, tmp);
        return reply(out);
    } else if (!strcmp(op, "symlink")) { /* symlink|target|fd|path */
        char *t = P(1, 1);
        P(0, 3); e = raw_symlink(t, PL(1), N(2), paths[0], PL(0));
    } else if (!strcmp(op, "link")) { /* link|fd|flags|old|fd2|new */
        char *a = P(0, 3);
        P(1, 5); e = raw_link(N(1), N(2), a, PL(0), N(4), paths[1], PL(1));
    } else if (!strcmp(op, "rename")) { /* rename|fd|old|fd2|new */
        char *a = P(0, 2);
        P(1, 4); e = raw_rename(N(1), a, PL(0), N(3), paths[1], PL(1));
    } else if (!strcmp(op, "unlink")) {
        P(0, 2); e = raw_unlink(N(1), paths[0], PL(0));
    } else if (!strcmp(op, "mkdir")) {
        P(0, 2); e = raw_mkdir(N(1), paths[0], PL(0));
    } else if (!strcmp(op, "rmdir")) {
        P(0, 2); e = raw_rmdir(N(1), paths[0], PL(0));
    } else if (!strcmp(op, "stat")) { /* stat|fd|flags|path */
        __wasi_filestat_t st;
        P(0, 3); e = raw_stat(N(1), N(2), paths[0], PL(0), &st);
        if (!e) {
            snprintf(out, sizeof out, "e=0 size=%llu type=%d", (unsigned long long)st.size, st.filetype);
            return reply(out);
        }
    } else if (!strcmp(op, "times")) { /* times|fd|flags|path */
        P(0, 3); e = raw_times(N(1), N(2), paths[0], PL(0), 1000000000ll, 1000000000ll,
                                           __WASI_FSTFLAGS_ATIM | __WASI_FSTFLAGS_MTIM);
    } else if (!strcmp(op, "fdsize")) {
        e = __wasi_fd_filestat_set_size(N(1), N(2));
    } else if (!strcmp(op, "fdtimes")) {
        e = __wasi_fd_filestat_set_times(N(1), 1000000000ull, 1000000000ull,
                                         __WASI_FSTFLAGS_ATIM | __WASI_FSTFLAGS_MTIM);
    } else if (!strcmp(op, "close")) {
        e = __wasi_fd_close(N(1));
    } else if (!strcmp(op, "renumber")) {
        e = __wasi_fd_renumber(N(1), N(2));
    } else if (!strcmp(op, "openmany")) { /* openmany|dirfd|n|path: open n times, never closing */
        char *p = P(0, 3);
        for (uint64_t i = 0; i < N(2); i++)
            if ((e = raw_open(N(1), 0, p, PL(0), 0, __WASI_RIGHTS_FD_READ, 0, 0, &fd))) break;
    } else if (!strcmp(op, "cycle")) { /* cycle|dirfd|n|path: open and close n times */
        char *p = P(0, 3);
        for (uint64_t i = 0; i < N(2); i++) {
            if ((e = raw_open(N(1), 0, p, PL(0), 0, __WASI_RIGHTS_FD_READ, 0, 0, &fd))) break;
            if ((e = __wasi_fd_close(fd))) break;
        }
    } else if (!strcmp(op, "trap")) {
        __builtin_trap();
    } else return reply("unknown");
    snprintf(out, sizeof out, "e=%d fd=%d", e, fd);
    return reply(out);
}
'''

RIGHTS_READ, RIGHTS_WRITE = 2, 64
O_CREAT, O_DIRECTORY, O_EXCL, O_TRUNC = 1, 2, 4, 8
DATA, OUT, RW = 4, 5, 6  # the preopens (3 is the decoy "/")


@pytest.fixture(scope="module")
def attack_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = tmp_path_factory.mktemp("attack-guest")
    source, out = build / "glob_attack.c", build / "glob_attack.wasm"
    source.write_text(GUEST_C)
    subprocess.run(["clang", "--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-mexec-model=reactor",
                    "-Wl,--strip-all", "-Wall", "-Wextra", "-Werror", "-I", str(ROOT / "sdk" / "guest" / "c"),
                    "-o", str(out), str(source)], check=True, capture_output=True)
    return out


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    """data/ (read `*.txt`): a.txt, .hidden.txt, secret.key, sub/c.txt and 60 hidden long names;
    out/ (read and write `*.json`): report.json, secret.key; rw/: a whole writable directory."""
    data, out, rw = tmp_path / "data", tmp_path / "out", tmp_path / "rw"
    for d in (data / "sub", out, rw):
        d.mkdir(parents=True)
    (data / "a.txt").write_text("alpha")
    (data / ".hidden.txt").write_text("HIDDEN")
    (data / "secret.key").write_text("KEY")
    (data / "sub" / "c.txt").write_text("deep")
    for i in range(60):
        (data / f"zz-hidden-name-{i:03}.key").write_text("")
    (out / "report.json").write_text("{}")
    (out / "secret.key").write_text("OUTKEY")
    return data, out, rw


def make(guest: Path, tree: tuple[Path, Path, Path], audit: AuditLog, *, data_patterns: tuple[str, ...] = ("*.txt",),
         **limits: Any) -> Sandbox:
    data, out, rw = tree
    dirs = (DirGrant(host=data, guest="/data", patterns=data_patterns),
            DirGrant(host=out, guest="/out", writable=True, patterns=("*.json",), write_patterns=("*.json",)),
            DirGrant(host=rw, guest="/rw", writable=True))
    # One instance: a descriptor opened by one call is there for the next.
    return Sandbox(guest, name="attacker", capabilities=Capabilities(dirs=dirs),
                   limits=Limits(max_instances=1, **limits), on_audit=audit)


@pytest.fixture
def sb(attack_guest: Path, tree: tuple[Path, Path, Path], audit: AuditLog) -> Iterator[Sandbox]:
    sandbox = make(attack_guest, tree, audit)
    yield sandbox
    sandbox.close()


def run(sb: Sandbox, *args: object) -> str:
    reply: str = sb.call("fs", "|".join(str(a) for a in args))
    return reply


def refused(sb: Sandbox, audit: AuditLog, *args: object, match: str | None = None) -> SecurityViolationError:
    """The call fails with a SecurityViolationError and exactly one new critical fs_denied event."""
    before = len(audit)
    with pytest.raises(SecurityViolationError, match=match) as info:
        run(sb, *args)
    assert [(e.kind, e.level) for e in audit[before:]] == [("security.fs_denied", AuditLevel.CRITICAL)]
    return info.value


def opened_fd(reply: str) -> int:
    match = re.fullmatch(r"e=0 fd=(\d+)", reply)
    assert match, reply
    return int(match.group(1))


# -- holes found ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["rename", "link"])
def test_glob_symlink_moved_in_from_another_grant(sb: Sandbox, tree: tuple[Path, Path, Path], audit: AuditLog,
                                                  how: str) -> None:
    """The guest may create no symlink in a pattern grant -- nor make one elsewhere and move it in.
    ``rw/x.json -> secret.key`` (a relative target without '..': allowed in rw) renamed or hard-linked to
    ``out/x.json`` used to open out/secret.key, for reading and for writing."""
    _, out, rw = tree
    assert run(sb, "symlink", "secret.key", RW, "x.json") == "e=0 fd=0"
    if how == "rename":
        refused(sb, audit, "rename", RW, "x.json", OUT, "x.json", match="only a file already in /out")
    else:
        refused(sb, audit, "link", RW, 0, "x.json", OUT, "x.json", match="only a file already in /out")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "secret.key"]
    assert (out / "secret.key").read_text() == "OUTKEY"
    assert os.readlink(rw / "x.json") == "secret.key"
    # A regular file from elsewhere is refused the same way (by the time of the call it could be a symlink);
    # renaming inside the pattern grant is what a plugin needs, and works.
    (rw / "plain.json").write_text("{}")
    refused(sb, audit, "rename", RW, "plain.json", OUT, "plain.json", match="only a file already in /out")
    assert run(sb, "rename", OUT, "report.json", OUT, "renamed.json") == "e=0 fd=0"
    assert run(sb, "link", OUT, 0, "renamed.json", OUT, "linked.json") == "e=0 fd=0"
    assert run(sb, "rename", OUT, "renamed.json", RW, "out.json") == "e=0 fd=0"  # out of it: a matching name
    assert sorted(p.name for p in out.iterdir()) == ["linked.json", "secret.key"]


@pytest.mark.parametrize("size", [64, 600, 4096, 65536])
def test_glob_listing_leaves_no_hidden_name_in_the_buffer(sb: Sandbox, size: int) -> None:
    """A filtered fd_readdir is wasmtime's, asked again until the buffer is full: what wasmtime wrote of
    the names the guest may not see used to stay in the guest's buffer past the entries kept. The guest
    reads its whole buffer (prefilled with '#'), not only the part it is told is used -- from any cookie."""
    seen = ""
    for cookie in (0, 1, 2, 3, 10, 40, 62, 63, 64, 65, 1000):
        reply = run(sb, "readdir", DATA, size, cookie)
        match = re.fullmatch(r"e=0 used=(\d+) buf=(.*)", reply, re.S)
        assert match, reply[:200]
        used, buf = int(match.group(1)), match.group(2)
        assert not re.search(r"secret|zz-hidden|\.hidden", buf)
        assert set(buf[used:]) <= {".", "#"}  # zeros (shown '.') or the guest's own fill
        seen += buf[:used]
    assert "a.txt" in seen


def test_glob_listing_does_not_tell_the_length_of_a_hidden_name(attack_guest: Path, tree: tuple[Path, Path, Path],
                                                                 audit: AuditLog) -> None:
    """An entry larger than the guest's whole buffer goes out as its header alone (wasi-libc then grows its
    buffer). For a name the guest may not see that header used to tell its length (and that it is there);
    such an entry is now skipped. The hidden names here are 65 bytes long: 'A' in the header's d_namlen."""
    data = tree[0].parent / "small"
    data.mkdir()
    for name in ("a.txt", "b.txt", *(f"{i}{'h' * 60}.key" for i in range(8))):
        (data / name).write_text("")
    sb = make(attack_guest, (data, tree[1], tree[2]), audit)
    try:
        names = ""
        for cookie in range(14):  # 12 entries, '.' and '..' included
            reply = run(sb, "readdir", DATA, 40, cookie)
            buf = reply.split("buf=", 1)[1]
            assert buf[16:20] != "A...", (cookie, reply)
            names += buf
    finally:
        sb.close()
    assert "a.txt" in names
    assert audit.kinds() == []


def test_glob_star_does_not_match_a_leading_dot(sb: Sandbox, attack_guest: Path, tree: tuple[Path, Path, Path],
                                                audit: AuditLog) -> None:
    """As in a shell glob, `*.txt` does not reach `.hidden.txt` (it used to: fnmatch lets `*` match a
    leading '.'); a pattern that starts with '.' does. Listing follows the same rule."""
    refused(sb, audit, "open", DATA, 0, 0, RIGHTS_READ, 0, 0, ".hidden.txt", match="matches none of the patterns")
    listing = run(sb, "readdir", DATA, 4096, 0)
    assert "hidden.txt" not in listing
    assert "a.txt" in listing
    for patterns in ((".*",), (".h*",), ("*.txt", ".*.txt")):
        dotted = make(attack_guest, tree, audit, data_patterns=patterns)
        try:
            fd = opened_fd(run(dotted, "open", DATA, 0, 0, RIGHTS_READ, 0, 0, ".hidden.txt"))
            assert run(dotted, "read", fd) == "e=0 data=HIDDEN"
        finally:
            dotted.close()
    for patterns in (("?hidden.txt",), ("[.]*",), ("*",)):
        assert not DirGrant(host=tree[0], patterns=patterns).reaches(".hidden.txt", write=False)


def test_glob_pattern_count_is_bounded(tmp_path: Path, attack_guest: Path, tree: tuple[Path, Path, Path],
                                       audit: AuditLog) -> None:
    """Every name the guest reaches is matched against every pattern, inside a WASI call that no timeout
    interrupts: a manifest with 40,000 globs used to make one stat take seconds (and a listing hours), and
    each refusal message half a megabyte. A manifest lists at most MAX_FILE_ENTRIES files a key, a grant has
    at most MAX_NAME_PATTERNS patterns, they are matched as one expression, and a message names a few."""
    many = ", ".join(f'"data/f{i:05}*.txt"' for i in range(MAX_FILE_ENTRIES + 1))
    with pytest.raises(ManifestError, match=f"at most {MAX_FILE_ENTRIES} entries") as info:
        parse_manifest(f'[plugin]\nname = "x"\nversion = "1.0.0"\n[permissions]\nread_files = [{many}]\n')
    assert info.value.key == "permissions.read_files"
    with pytest.raises(ValueError, match=f"at most {MAX_NAME_PATTERNS} file-name patterns"):
        DirGrant(host=tmp_path, patterns=tuple(f"p{i}*" for i in range(MAX_NAME_PATTERNS + 1)))
    # The most a grant may have, each as long as a name may be and as slow to match as fnmatch allows.
    patterns = tuple(f"{i:03}" + "*a" * 126 for i in range(MAX_NAME_PATTERNS))
    data, _, _ = tree
    for i in range(2000):
        (data / f"{i:03}{'a' * 200}b").write_text("")
    heavy = make(attack_guest, tree, audit, data_patterns=patterns)
    try:
        start = time.perf_counter()
        err = refused(heavy, audit, "stat", DATA, 0, "secret.key", match="and 120 more")
        assert len(str(err)) < 4096
        assert run(heavy, "readdir", DATA, 65536, 0).startswith("e=0 used=")
        elapsed = time.perf_counter() - start
    finally:
        heavy.close()
    assert elapsed < 5.0, elapsed  # was seconds for one stat, and hours for the listing


# -- attacks that held ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "secret.key", "secret.key/", "secret.key/.", "./secret.key", ".//secret.key", "sub/c.txt", "sub//c.txt",
    "sub/./c.txt", "sub/../secret.key", "a.txt/../secret.key", "../data/secret.key", "/data/secret.key",
    "A.TXT", "a.txt%00", ".", "..", "sub", "zz-hidden-name-000.key", "a.txt\\..\\secret.key"[:0] + "x\\y.key",
])
def test_glob_odd_names_are_refused_typed(sb: Sandbox, audit: AuditLog, path: str) -> None:
    if path == ".":
        # The directory itself is granted for reading; as a write target it is not.
        assert run(sb, "open", DATA, 0, O_DIRECTORY, RIGHTS_READ, 0, 0, ".").startswith("e=0 ")
        refused(sb, audit, "open", OUT, 0, O_DIRECTORY, RIGHTS_WRITE, 0, 0, ".", match="may be changed")
        return
    refused(sb, audit, "open", DATA, 0, 0, RIGHTS_READ, 0, 0, path)
    assert run(sb, "open", DATA, 0, 0, RIGHTS_READ, 0, 0, "a.txt").startswith("e=0 ")  # still serving


def test_glob_nul_in_a_matching_name_reaches_nothing(sb: Sandbox, audit: AuditLog) -> None:
    """`secret.key<NUL>.txt` matches `*.txt` as text; the host's path is cut nowhere: wasmtime refuses a
    path with NUL (EINVAL), so nothing is opened."""
    assert run(sb, "open", DATA, 0, 0, RIGHTS_READ, 0, 0, "secret.key%00.txt") == "e=28 fd=0"
    assert run(sb, "stat", DATA, 0, "secret.key%00.txt") == "e=28 fd=0"
    assert audit.kinds() == []


@pytest.mark.parametrize(("oflags", "rights"), [
    (O_CREAT, RIGHTS_WRITE), (O_CREAT | O_EXCL, RIGHTS_WRITE), (O_TRUNC, RIGHTS_WRITE), (O_DIRECTORY, RIGHTS_READ),
    (0, RIGHTS_WRITE), (O_CREAT | O_DIRECTORY, RIGHTS_READ),
])
def test_glob_open_flags_on_a_refused_name(sb: Sandbox, tree: tuple[Path, Path, Path], audit: AuditLog,
                                           oflags: int, rights: int) -> None:
    _, out, _ = tree
    for name in ("secret.key", "new.key", "keep.txt"):
        refused(sb, audit, "open", OUT, 0, oflags, rights, 0, 0, name)
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "secret.key"]
    assert (out / "secret.key").read_text() == "OUTKEY"


def test_glob_every_path_operation_checks_the_name(sb: Sandbox, tree: tuple[Path, Path, Path],
                                                   audit: AuditLog) -> None:
    data, out, _ = tree
    refused(sb, audit, "readlink", DATA, "secret.key", match="matches none")
    refused(sb, audit, "times", OUT, 0, "secret.key", match="matches none")
    refused(sb, audit, "times", OUT, 0, ".", match="may be changed")
    refused(sb, audit, "rmdir", OUT, ".", match="may be changed")
    refused(sb, audit, "rmdir", DATA, "sub", match="read-only")
    refused(sb, audit, "unlink", OUT, "secret.key", match="matches none")
    refused(sb, audit, "mkdir", OUT, "d.key", match="matches none")
    refused(sb, audit, "rename", OUT, "report.json", OUT, "report.key", match="matches none")
    refused(sb, audit, "rename", OUT, "secret.key", OUT, "secret.json", match="matches none")
    refused(sb, audit, "link", OUT, 0, "secret.key", RW, "stolen", match="matches none")
    refused(sb, audit, "link", DATA, 0, "a.txt", RW, "stolen", match="read-only")
    refused(sb, audit, "symlink", "report.json", OUT, "x.json", match="may not create symlinks")
    # A matching directory made by the guest is a name like any other: nothing in it is reachable.
    assert run(sb, "mkdir", OUT, "d.json") == "e=0 fd=0"
    refused(sb, audit, "open", OUT, 0, O_CREAT, RIGHTS_WRITE, 0, 0, "d.json/x.json", match="only files directly")
    for oflags, rights, path in ((O_CREAT, RIGHTS_WRITE, "x.json"), (0, RIGHTS_READ, "../secret.key")):
        # A refusal replaces the instance: the descriptor is opened again in each.
        sub = opened_fd(run(sb, "open", OUT, 0, O_DIRECTORY, RIGHTS_READ, 0, 0, "d.json"))
        assert run(sb, "readdir", sub, 4096, 0).startswith("e=0 used=")
        refused(sb, audit, "open", sub, 0, oflags, rights, 0, 0, path)
    assert sorted(p.name for p in out.iterdir()) == ["d.json", "report.json", "secret.key"]
    assert list((out / "d.json").iterdir()) == []
    assert sorted(p.name for p in data.iterdir())[:4] == [".hidden.txt", "a.txt", "secret.key", "sub"]


def test_glob_descriptor_changes_need_a_writable_name(sb: Sandbox, tree: tuple[Path, Path, Path],
                                                      audit: AuditLog) -> None:
    """A file opened for reading under a matching read-only name cannot be truncated or touched through its
    descriptor; one under a writable name can (each refusal replaces the instance: opened again)."""
    data, out, _ = tree
    (out / "keep.txt").write_text("keep")
    for op in ("fdsize", "fdtimes"):
        for grant, name in ((DATA, "a.txt"), (DATA, "."), (OUT, ".")):
            fd = opened_fd(run(sb, "open", grant, 0, 0, RIGHTS_READ, 0, 0, name))
            refused(sb, audit, op, fd, 0)
    writable = opened_fd(run(sb, "open", OUT, 0, 0, RIGHTS_WRITE, 0, 0, "report.json"))
    assert run(sb, "fdsize", writable, 0) == "e=0 fd=0"
    assert (data / "a.txt").read_text() == "alpha"
    assert (out / "report.json").read_text() == ""


def test_glob_descriptor_games(sb: Sandbox, audit: AuditLog) -> None:
    """A descriptor of the grant directory opened again, renumbered onto another grant's number or onto the
    decoy, keeps its patterns (a refusal replaces the instance: each game starts from a fresh one)."""
    listing = run(sb, "readdir", DATA, 4096, 0)
    for target in (None, RW, 3):
        again = opened_fd(run(sb, "open", DATA, 0, O_DIRECTORY, RIGHTS_READ, 0, 0, "."))
        if target is not None:
            assert run(sb, "renumber", again, target) == "e=0 fd=0"
            again = target
        assert run(sb, "readdir", again, 4096, 0).split("buf=")[1].count("a.txt") == 1
        assert "secret" not in run(sb, "readdir", again, 4096, 0)
        fd = opened_fd(run(sb, "open", again, 0, 0, RIGHTS_READ, 0, 0, "a.txt"))
        assert run(sb, "read", fd) == "e=0 data=alpha"
        refused(sb, audit, "open", again, 0, 0, RIGHTS_READ, 0, 0, "secret.key", match="matches none")
    assert "secret" not in listing
    assert "a.txt" in listing


def test_open_files_closed_and_renumbered_are_counted_once(sb: Sandbox, attack_guest: Path,
                                                           tree: tuple[Path, Path, Path], audit: AuditLog) -> None:
    """max_open_files counts the guest's open descriptors: opening and closing again and again is fine,
    renumbering one onto another closes one (the host's too), and preopens are not counted."""
    small = make(attack_guest, tree, audit, max_open_files=8)
    try:
        assert run(small, "cycle", DATA, 1000, "a.txt").startswith("e=0 ")
        host_fds = len(os.listdir("/proc/self/fd"))  # the instance is there, with its preopens and pipes
        assert run(small, "openmany", DATA, 8, "a.txt") == "e=0 fd=14"  # 7..14: the preopens not counted
        for _ in range(50):  # renumber closes the target: the count and the host's descriptors stay put
            assert run(small, "renumber", 14, 13) == "e=0 fd=0"
            assert run(small, "openmany", DATA, 1, "a.txt") == "e=0 fd=14"
        assert len(os.listdir("/proc/self/fd")) <= host_fds + 8
        assert run(small, "renumber", 14, 0) == "e=0 fd=0"  # onto stdin: still one open file
        with pytest.raises(ResourceLimitError, match="already has 8 files open"):
            run(small, "openmany", DATA, 2, "a.txt")
        assert audit.kinds() == ["limit.exceeded"]
        assert run(small, "openmany", RW, 8, ".") == "e=0 fd=14"  # a fresh instance
    finally:
        small.close()


def test_open_files_are_bounded_for_the_whole_node(attack_guest: Path, tree: tuple[Path, Path, Path],
                                                   audit: AuditLog) -> None:
    """max_open_files bounds one instance; a node runs many. Under the usual soft limit of 1,024 descriptors,
    four plugins at the default 256 files used to take every descriptor of the process (the node could
    open no socket, pipe or file any more). All guests together now hold at most half the soft limit:
    past it an open is a ResourceLimitError (audited), and the node keeps the other half."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip("needs a hard RLIMIT_NOFILE of at least 1,024")
    gc.collect()
    baseline = HOST_FILES.held
    plugins = [make(attack_guest, tree, audit) for _ in range(4)]
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        replies = []
        for sb in plugins:
            try:
                replies.append(run(sb, "openmany", DATA, 256, "a.txt"))
            except ResourceLimitError as e:
                replies.append(f"{e.details['resource']} {e.details['limit']}")
        assert replies[:2] == ["e=0 fd=262", "e=0 fd=262"]  # 7..262: the first two plugins hold 512
        assert replies[2:] == ["host_open_files 512"] * 2
        assert audit.kinds() == ["limit.exceeded"] * 2
        with socket.socket() as s:  # the node still has descriptors of its own
            s.bind(("127.0.0.1", 0))
        assert HOST_FILES.held == baseline + 512
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for sb in plugins:
            sb.close()
    del plugins
    gc.collect()
    assert HOST_FILES.held == baseline  # given back with the instances


@pytest.mark.parametrize(("entry", "message"), [
    ("data/**", "'**' (any depth) is not supported"),
    ("data/**/*.txt", "may only be in the last component"),
    ("/etc/*.conf", "absolute path"),
    ("../*.txt", "contains a '..' component"),
    ("data/../../*.txt", "contains a '..' component"),
    ("*", "a glob names files in a directory"),
    ("data/\u202e*.txt", "control characters"),
    ("data/*\x00.txt", "NUL"),
    ("data/" + "*" * 256, "too long"),
    ("C:/*.txt", "absolute path"),
])
def test_glob_hostile_manifest_patterns(entry: str, message: str) -> None:
    text = ('[plugin]\nname = "x"\nversion = "1.0.0"\n[permissions]\nread_files = ['
            + '"' + entry.replace("\\", "\\\\").replace("\x00", "\\u0000").replace("\u202e", "\\u202E") + '"]\n')
    with pytest.raises(ManifestError, match=re.escape(message)) as info:
        parse_manifest(text)
    assert info.value.key == "permissions.read_files"


def test_glob_backslash_in_a_manifest_is_a_separator_not_an_escape(tmp_path: Path) -> None:
    """`data\\*.txt` is `data/*.txt` (a separator, as documented for paths), never a pattern escaping '*'."""
    (tmp_path / "data").mkdir()
    policy = Policy.model_validate({"capabilities": {"allowed": ["compute", "filesystem"]},
                                    "filesystem": {"readable": [str(tmp_path)]}})
    m = parse_manifest('[plugin]\nname = "x"\nversion = "1.0.0"\n[permissions]\nread_files = ["data\\\\*.txt"]\n')
    grant = resolve(m, policy, data_root=tmp_path, host_env={}).capabilities.dirs
    assert grant == (DirGrant(host=tmp_path / "data", guest="/data", patterns=("*.txt",)),)
