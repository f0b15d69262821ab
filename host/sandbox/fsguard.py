"""The host's check of every WASI file operation of a core module, before and after wasmtime runs it.

wasmtime confines each preopened directory on its own, but it answers an access outside the grants
with a bare errno the guest may ignore. The sandbox promises more: every refusal of an access outside
the grants is a :class:`SecurityViolationError` and a critical ``security.fs_denied`` audit event,
whatever path the attempt took. So the WASI functions that take a path (``path_*``), the two that
change the descriptor table (``fd_close``, ``fd_renumber``) and the two that change a file's size
or times through its descriptor are linked to :class:`FsGuard` first:

- It keeps its own table of the guest's directory descriptors: each preopen (the grants and the
  empty decoy ``/`` that catches every ungranted path), and each descriptor the guest opens with
  ``path_open`` -- recorded with the grant it came from, its guest path and whether that grant is
  writable -- updated by ``fd_close`` and ``fd_renumber``. A path relative to any descriptor, a
  renumbered one included, is checked against the grant that descriptor belongs to: ``..`` may not
  leave it (nor the descriptor's own directory: wasmtime treats each descriptor as a root), a write
  needs a writable grant.
- ``fd_filestat_set_size`` / ``fd_filestat_set_times`` (truncating, touching) need the descriptor's
  grant to be writable.
- Both paths of ``path_rename`` and ``path_link`` are checked, each as a write (linking a file out of
  a read-only grant into a writable one would make it writable).
- ``path_symlink`` must name a relative target without ``..``: that target stays inside the
  directory the link is created in, whatever other symlinks there are; any other target could point
  outside the grant for a host tool that follows it later, so it is refused. For the same reason a
  symlink that is *not* of that kind (one the host put there) may not be renamed or hard-linked by the
  guest: ``../x`` moved one directory up points outside. (The guest's own symlinks can go anywhere:
  a relative target without ``..`` stays beneath the link wherever it is. A *directory* the guest
  renames carries the symlinks in it along; keep symlinks with ``..`` out of writable grants.)
- What passes these checks but wasmtime still refuses as outside the grant (``EPERM`` /
  ``ENOTCAPABLE``: e.g. a symlink inside a grant that points outside it, or a ``..`` past a symlink)
  is turned into the same error and audit event. (wasmtime answers ``EPERM`` too for what the host
  itself forbids, like a hard link to a directory: that is reported the same way.)
- A path longer than ``MAX_PATH_BYTES`` gets ``ENAMETOOLONG`` before it is copied out of the guest,
  one that is not UTF-8 ``EILSEQ`` (as wasmtime answers both).
- At most ``max_open_files`` descriptors opened by the guest are open at once (``Limits.max_open_files``:
  the manifest's ``[resources] max_open_files`` under the operator's ceiling, default
  ``MAX_OPEN_FILES``): each one is a host descriptor, and a guest that opened files until the host ran
  out would stop the whole node (its sockets included). One more is a :class:`ResourceLimitError`
  (audited ``limit.exceeded``); the instance is replaced, which closes them all. That bound is per
  instance, and a node runs many (4 instances of 256 files each are already the usual soft limit of
  1,024 descriptors): so all the guests of the process together also hold at most half of its soft
  ``RLIMIT_NOFILE`` (:data:`HOST_FILES`); past it an open is the same error.
- A grant by file-name pattern (``DirGrant.patterns``: a manifest's ``data/*.txt``) reaches the
  directory itself and the names directly in it that match: every path operation on another name,
  in a subdirectory, or through ``..`` is refused like a path outside the grant, writes need a name
  matching the write patterns, the guest may create no symlink there, and ``fd_readdir`` of the
  directory lists only the matching names (and ``.`` / ``..``).
- Each wrapped function must be imported with its WASI type (``WASI_SIGNATURES``): the host links
  its checks under the guest's declared type, so a wrong one is refused when the module is linked.

Paths are compared lexically, as guest paths (``/data/x``), which is enough for the checks above:
whatever they let through stays confined by wasmtime to the descriptor's directory, and a refusal
there ends as a security violation too.
"""

from __future__ import annotations

import posixpath
import resource
import struct
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

import wasmtime

from sandbus.host.sandbox.config import DirGrant, show_patterns
from sandbus.host.sandbox.guest_text import escape_controls
from sandbus.sdk.errors import AbiViolationError, InvalidModuleError, ResourceLimitError, SecurityViolationError

__all__ = [
    "FD_CHANGES",
    "FS_FUNCTIONS",
    "MAX_OPEN_FILES",
    "MAX_PATH_BYTES",
    "PATH_FUNCTIONS",
    "WASI_SIGNATURES",
    "DirFd",
    "FsGuard",
    "check_signature",
]

# WASI errno values (wasi_snapshot_preview1 numbering).
ERRNO_ILSEQ = 25
ERRNO_NAMETOOLONG = 37
ERRNO_PERM = 63
ERRNO_NOTCAPABLE = 76
_REFUSED = (ERRNO_PERM, ERRNO_NOTCAPABLE)
#: Longest path (and symlink target) copied out of the guest: Linux's PATH_MAX, beyond which the host
#: answers ENAMETOOLONG anyway.
MAX_PATH_BYTES = 4096
#: Most descriptors a guest may have opened at once (preopens and stdio not counted) unless its limits
#: say otherwise (``Limits.max_open_files``, whose default this is).
MAX_OPEN_FILES = 256
#: Most directory entries one ``fd_readdir`` of a pattern grant reads while looking for matching names.
MAX_READDIR_SCAN = 65536
#: Longest directory entry name read into a scratch area to decide whether the guest may see it (Linux's
#: NAME_MAX is 255 bytes).
_MAX_NAME_BYTES = 1024
_DIRENT = struct.Struct("<QQIB3x")  # d_next, d_ino, d_namlen, d_type: WASI's 24-byte dirent header
# Open flags and rights that make an open a write.
_O_CREAT, _O_TRUNC = 1, 8
_FDFLAG_APPEND = 1
_WRITE_RIGHTS = (1 << 0) | (1 << 6) | (1 << 8) | (1 << 22)  # fd_datasync, fd_write, fd_allocate, set_size

#: The WASI functions taking a path: (position of fd, of path ptr, of path len) for each path they take.
PATH_FUNCTIONS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "path_open": ((0, 2, 3),),
    "path_create_directory": ((0, 1, 2),),
    "path_remove_directory": ((0, 1, 2),),
    "path_unlink_file": ((0, 1, 2),),
    "path_filestat_get": ((0, 2, 3),),
    "path_filestat_set_times": ((0, 2, 3),),
    "path_readlink": ((0, 1, 2),),
    "path_rename": ((0, 1, 2), (3, 4, 5)),
    "path_link": ((0, 2, 3), (4, 5, 6)),
    "path_symlink": ((2, 3, 4),),
}
_READS = frozenset({"path_filestat_get", "path_readlink"})
#: The functions that move or link what their first path names: (fd, path ptr, path len) of it.
_MOVES = {"path_rename": (0, 1, 2), "path_link": (0, 2, 3)}
#: The WASI functions that change a file through its descriptor, short of writing data (a descriptor
#: opened for reading cannot write data: wasmtime answers EBADF, whatever the grant).
FD_CHANGES = ("fd_filestat_set_size", "fd_filestat_set_times")
#: Every WASI function FsGuard wraps.
FS_FUNCTIONS = (*PATH_FUNCTIONS, *FD_CHANGES, "fd_close", "fd_renumber", "fd_readdir")

_I, _L = "i32", "i64"
#: The wasi_snapshot_preview1 types (params, results) of the functions the host links its own code
#: for (FsGuard's, and the clock, random and poll functions instance.py replaces).
WASI_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fd_close": ((_I,), (_I,)),
    "fd_renumber": ((_I, _I), (_I,)),
    "fd_filestat_set_size": ((_I, _L), (_I,)),
    "fd_filestat_set_times": ((_I, _L, _L, _I), (_I,)),
    "fd_readdir": ((_I, _I, _I, _L, _I), (_I,)),
    "path_open": ((_I, _I, _I, _I, _I, _L, _L, _I, _I), (_I,)),
    "path_create_directory": ((_I, _I, _I), (_I,)),
    "path_remove_directory": ((_I, _I, _I), (_I,)),
    "path_unlink_file": ((_I, _I, _I), (_I,)),
    "path_filestat_get": ((_I, _I, _I, _I, _I), (_I,)),
    "path_filestat_set_times": ((_I, _I, _I, _I, _L, _L, _I), (_I,)),
    "path_readlink": ((_I, _I, _I, _I, _I, _I), (_I,)),
    "path_rename": ((_I, _I, _I, _I, _I, _I), (_I,)),
    "path_link": ((_I, _I, _I, _I, _I, _I, _I), (_I,)),
    "path_symlink": ((_I, _I, _I, _I, _I), (_I,)),
    "clock_time_get": ((_I, _L, _I), (_I,)),
    "clock_res_get": ((_I, _I), (_I,)),
    "random_get": ((_I, _I), (_I,)),
    "poll_oneoff": ((_I, _I, _I, _I), (_I,)),
}


def check_signature(name: str, ty: wasmtime.FuncType, plugin: str) -> None:
    """Raise :class:`InvalidModuleError` unless the guest imports WASI ``name`` with its WASI type.

    The host links its own function for ``name`` under the type the guest declares; with a wrong
    type wasmtime would accept the module and fail later, inside the host (e.g. linking the call
    through to its own implementation) -- so the type is checked here, as linking would.
    """
    params, results = tuple(str(p) for p in ty.params), tuple(str(r) for r in ty.results)
    want = WASI_SIGNATURES[name]
    if (params, results) != want:
        raise InvalidModuleError(
            f"imports wasi_snapshot_preview1.{name} with type ({', '.join(params)}) -> ({', '.join(results)}); "
            f"WASI defines ({', '.join(want[0])}) -> ({', '.join(want[1])})",
            plugin=plugin, import_name=f"wasi_snapshot_preview1.{name}")


class _HostFiles:
    """The host descriptors all guests of this process hold (see the module docstring). Thread-safe: the
    instances of every plugin open and close files on their own threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.held = 0

    @staticmethod
    def limit() -> int:
        """Half the process's soft ``RLIMIT_NOFILE`` (read each time: an operator may raise it at run time);
        the other half stays for the node's sockets, grants, pipes and compiled-module cache."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return 1 << 20 if soft == resource.RLIM_INFINITY else max(soft // 2, 1)

    def take(self) -> bool:
        with self._lock:
            if self.held >= self.limit():
                return False
            self.held += 1
            return True

    def give(self, count: int) -> None:
        with self._lock:
            self.held = max(self.held - count, 0)


#: The descriptors guests hold in this process, all instances of all plugins together.
HOST_FILES = _HostFiles()


def _give_back(opened: set[int]) -> None:
    """What a guard still counted when it went (its finalizer holds the set, not the guard)."""
    HOST_FILES.give(len(opened))


class DirFd(NamedTuple):
    """What the host knows of one guest descriptor.

    ``root``: guest path of the grant it belongs to (``None`` for the decoy ``/``: nothing granted);
    ``path``: the guest path it was opened at; ``writable``: whether its grant is; ``grant``: the grant
    itself, whose file-name patterns (if any) every path under ``root`` must pass.
    """

    root: str | None
    path: str
    writable: bool
    grant: DirGrant | None = None

    @property
    def filtered(self) -> bool:
        """Whether only names matching the grant's patterns are reachable under ``root``."""
        return self.grant is not None and self.grant.filtered


class Memory(Protocol):
    """The guest-memory access FsGuard needs (a :class:`~sandbus.host.sandbox.instance.CallContext`)."""

    def read(self, ptr: int, length: int) -> bytes: ...

    def write(self, ptr: int, data: bytes) -> None: ...

    def memory_size(self) -> int: ...


Deny = Callable[..., SecurityViolationError]


def _show(path: str) -> str:
    """A guest-chosen path as it may appear in a message (and so in the host's log): no control
    characters (the raw path stays in the event's details)."""
    return escape_controls(path)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _safe_target(target: bytes) -> bool:
    """A symlink target that stays beneath the link's directory: relative, without '..'."""
    return bool(target) and not target.startswith(b"/") and b".." not in target.split(b"/")


def _outside_patterns(entry: DirFd, path: str, full: str, write: bool) -> str | None:
    """Why ``full`` (reached through ``path``) is not granted by ``entry``'s file-name patterns, or ``None``."""
    assert entry.grant is not None
    assert entry.root is not None
    grant, root = entry.grant, entry.root
    shown = show_patterns(tuple(dict.fromkeys((*grant.patterns, *grant.write_patterns))))
    writable = show_patterns(grant.write_patterns or grant.patterns)
    if ".." in path.split("/"):
        return f"'..' is not allowed under {_show(root)}, granted by file-name pattern ({shown})"
    if full == root:
        return f"only files matching {writable} in {_show(root)} may be changed" if write else None
    name = full[len(root.rstrip("/")) + 1:]
    if "/" in name:
        if write or grant.patterns:
            return f"only files directly in {_show(root)} matching {writable if write else shown} were granted"
        return None  # the whole tree is readable; writes are what the patterns limit
    if grant.reaches(name, write=write):
        return None
    if write and grant.reaches(name, write=False):
        return f"{_show(name)} in {_show(root)} was granted read-only (writable: {writable})"
    return f"{_show(name)} matches none of the patterns granted in {_show(root)} ({shown})"


def _listed(entry: DirFd, name: bytes) -> bool:
    """Whether ``fd_readdir`` of ``entry`` shows ``name``: only a directory's own entries the guest may reach."""
    if entry.grant is None or not entry.grant.patterns:
        return True  # names limit only writes here: the tree is readable
    if entry.path != entry.root:
        return False  # a subdirectory of a pattern grant: nothing in it is reachable
    try:
        return entry.grant.reaches(name.decode(), write=False)
    except UnicodeDecodeError:
        return False


def _climbs(path: str) -> bool:
    """Whether a relative path goes above its starting directory at any point (``a/../../b`` does)."""
    depth = 0
    for part in path.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


class FsGuard:
    """The checks of one instance (see the module docstring). Not thread-safe, like its instance.

    Parameters:
        memory: reads the guest's path arguments.
        deny: ``deny(kind, message, **details)`` audits a refusal and returns the error to raise.
    """

    def __init__(self, memory: Memory, deny: Deny, plugin: str, *, max_open_files: int = MAX_OPEN_FILES) -> None:
        self._memory = memory
        self._plugin = plugin
        self._deny = deny
        self.max_open_files = max_open_files
        self.fds: dict[int, DirFd] = {}
        #: The descriptors the guest opened itself and has not closed (bounded by ``max_open_files``).
        self.opened: set[int] = set()
        # Given back to HOST_FILES when the guard goes, with its instance (whose store closes the files).
        weakref.finalize(self, _give_back, self.opened)
        #: wasmtime's own implementation of each wrapped function, set once the trampoline is linked.
        self.passthrough: dict[str, wasmtime.Func] = {}

    # -- the checks ------------------------------------------------------------------------------

    def check(self, fd: int, path: str, write: bool, op: str) -> str | None:
        """Raise unless ``path`` under descriptor ``fd`` is granted for this access; its guest path.

        ``None`` for a descriptor the host does not know as a directory (stdio, a file, a closed
        number): wasmtime answers those with ``EBADF`` / ``ENOTDIR`` on its own.
        """
        entry = self.fds.get(fd)
        if entry is None:
            return None
        full = posixpath.normpath(posixpath.join(entry.path, path)) if path else entry.path
        shown = _show(full)
        if entry.root is None:
            why = "no directory containing it was granted"
        elif not _inside(full, entry.root):
            why = f"outside the granted directory {_show(entry.root)}"
        elif _climbs(path):
            # wasmtime confines each descriptor to its own directory, as a root of its own.
            why = f"'..' leads above the directory {_show(entry.path)} the path is relative to"
        elif write and not entry.writable:
            why = f"{_show(entry.root)} was granted read-only"
        elif entry.filtered and (refused := _outside_patterns(entry, path, full, write)) is not None:
            why = refused
        else:
            return full
        raise self._deny("security.fs_denied", f"{op} of {shown}: {why}", path=full, write=write)

    def _check_symlink_target(self, target: str, link: str | None) -> None:
        if _safe_target(target.encode()):
            return
        where = link or "a symlink"
        raise self._deny("security.fs_denied",
                         f"symlink {_show(where)} -> {target!r}: a plugin's symlink target must be a relative path "
                         "without '..', so that it cannot point outside the granted directory",
                         path=link, target=target, write=True)

    def _check_move_into_patterns(self, name: str, args: tuple[int, ...], paths: list[str | None]) -> None:
        """Refuse a rename or hard link into a pattern grant from anywhere but that grant itself.

        The guest may create no symlink in a pattern grant, and that must hold for one it makes elsewhere
        and then moves or links in: ``x.json -> secret.key`` would open the name the patterns refuse. Telling
        a symlink from a file when the call is made would not do: another instance of the plugin can swap
        one for the other in between. So what comes in must come from the same grant, whose names the guest
        could not have made symlinks."""
        src_fd, dst_fd = PATH_FUNCTIONS[name][0][0], PATH_FUNCTIONS[name][1][0]
        src, dst = self.fds.get(args[src_fd]), self.fds.get(args[dst_fd])
        if dst is None or not dst.filtered or (src is not None and (src.root, src.grant) == (dst.root, dst.grant)):
            return
        op = name.removeprefix("path_")
        raise self._deny("security.fs_denied",
                         f"{op} of {_show(paths[0] or 'a path')} to {_show(paths[1] or 'a path')}: only a file already "
                         f"in {_show(dst.root or '/')}, granted by file-name pattern, may be renamed or linked into it "
                         "(it could be a symlink to a name the patterns refuse)",
                         path=paths[1], source=paths[0], write=True)

    def _link_target(self, caller: wasmtime.Caller, fd: int, ptr: int, length: int) -> bytes | None:
        """The target of the symlink the guest's (fd, path) names, as wasmtime resolves that path now;
        ``None`` when it is not a symlink (or cannot be reached: the operation itself then fails); ``b""``
        when wasmtime refuses to read it (an absolute target, or a path that leaves the grant).

        wasmtime's own ``path_readlink`` answers, so the path means exactly what it will mean to the
        operation that follows. Its output goes to a scratch area of guest memory clear of the path,
        restored at once: the guest is suspended in this call and never sees it.
        """
        span = MAX_PATH_BYTES + 4  # the target, then the u32 length wasmtime writes
        start = 0 if span <= ptr else (ptr + length + 7) & ~7
        if start + span > self._memory.memory_size():
            raise self._deny("security.fs_denied", "no room in guest memory to check a symlink", write=True)
        saved = self._memory.read(start, span)
        try:
            errno = int(self._orig("path_readlink")(caller, fd, ptr, length, start, MAX_PATH_BYTES,
                                                       start + MAX_PATH_BYTES))
            if errno in _REFUSED:  # wasmtime will not even read a target that leaves the grant
                return b""
            if errno != 0:
                return None
            (used,) = struct.unpack("<I", self._memory.read(start + MAX_PATH_BYTES, 4))
            return self._memory.read(start, min(used, MAX_PATH_BYTES)) + (b"/.." if used >= MAX_PATH_BYTES else b"")
        finally:
            self._memory.write(start, saved)

    @staticmethod
    def helpers_for(wrapped: Iterable[str]) -> set[str]:
        """The WASI functions the checks of ``wrapped`` call besides them (to link through as well)."""
        return {"path_readlink"} if set(_MOVES) & set(wrapped) else set()

    # -- the wrapped WASI functions ---------------------------------------------------------------

    def _orig(self, name: str) -> wasmtime.Func:
        func = self.passthrough.get(name)
        if func is None:  # linked after instantiation: a start function cannot reach the files
            raise AbiViolationError(f"WASI {name} called during instantiation", plugin=self._plugin)
        return func

    def wrap(self, name: str) -> Callable[..., int]:
        """The host function linked as WASI ``name``: check, run wasmtime's own, check its answer."""
        if name == "fd_close":
            return self._fd_close
        if name == "fd_renumber":
            return self._fd_renumber
        if name == "path_open":
            return self._path_open
        if name == "fd_readdir":
            return self._fd_readdir
        if name in FD_CHANGES:
            return self._fd_change(name)
        triples = PATH_FUNCTIONS[name]
        op = name.removeprefix("path_")
        write = name not in _READS

        def run(caller: wasmtime.Caller, *args: int) -> int:
            if any(args[len_i] > MAX_PATH_BYTES for _, _, len_i in triples) or (
                    name == "path_symlink" and args[1] > MAX_PATH_BYTES):
                return ERRNO_NAMETOOLONG  # before copying anything: the host would refuse it anyway
            texts = [self._text(args[ptr_i], args[len_i]) for _, ptr_i, len_i in triples]
            target = self._text(args[0], args[1]) if name == "path_symlink" else ""
            if target is None or None in texts:
                return ERRNO_ILSEQ  # as wasmtime answers, before it touches anything
            paths = [self.check(args[fd_i], text, write, op)
                     for (fd_i, _, _), text in zip(triples, texts, strict=True) if text is not None]
            if name == "path_symlink":
                entry = self.fds.get(args[2])
                if entry is not None and entry.filtered:
                    raise self._deny("security.fs_denied",
                                     f"symlink {_show(paths[0] or 'a path')}: a plugin may not create symlinks in "
                                     f"{_show(entry.root or '/')}, granted by file-name pattern",
                                     path=paths[0], target=target, write=True)
                self._check_symlink_target(target, paths[0])
            if name in _MOVES:
                self._check_move_into_patterns(name, args, paths)
                fd_i, ptr_i, len_i = _MOVES[name]
                moved = self._link_target(caller, args[fd_i], args[ptr_i], args[len_i])
                if moved is not None and not _safe_target(moved):
                    shown_target = moved.decode(errors="replace") or "a target outside the granted directory"
                    raise self._deny(
                        "security.fs_denied",
                        f"{op} of the symlink {_show(paths[0] or 'a path')} -> {_show(shown_target)!r}: a plugin may "
                        "not move or link a symlink whose target is absolute or has '..' (elsewhere it could "
                        "point outside the granted directory)",
                        path=paths[0], target=shown_target, write=True)
            errno = int(self._orig(name)(caller, *args))
            if errno in _REFUSED:
                self._refused(op, paths, errno, write)
            return errno

        return run

    def _text(self, ptr: int, length: int) -> str | None:
        """A path argument (bounds-checked; ``None`` if it is not UTF-8, which WASI paths must be)."""
        try:
            return self._memory.read(ptr, length).decode()
        except UnicodeDecodeError:
            return None

    def _refused(self, op: str, paths: list[str | None], errno: int, write: bool) -> None:
        shown = " / ".join(_show(p) for p in paths if p is not None) or "a path"
        raise self._deny("security.fs_denied",
                         f"{op} of {shown}: refused by the sandbox (it leaves the granted directory, "
                         "e.g. through a symlink or '..')",
                         path=next((p for p in paths if p is not None), None), write=write, errno=errno)

    def _path_open(self, caller: wasmtime.Caller, fd: int, dirflags: int, path_ptr: int, path_len: int,
                   oflags: int, rights: int, rights_inh: int, fdflags: int, out: int) -> int:
        if path_len > MAX_PATH_BYTES:
            return ERRNO_NAMETOOLONG
        path = self._text(path_ptr, path_len)
        if path is None:
            return ERRNO_ILSEQ
        write = bool(oflags & (_O_CREAT | _O_TRUNC) or rights & _WRITE_RIGHTS or fdflags & _FDFLAG_APPEND)
        full = self.check(fd, path, write, "open")
        if len(self.opened) >= self.max_open_files:
            raise ResourceLimitError(f"open of {_show(full or path)}: the guest already has {self.max_open_files} "
                                     "files open (the most it may: max_open_files)", plugin=self._plugin,
                                     limit=self.max_open_files, resource="max_open_files")
        if not HOST_FILES.take():
            raise ResourceLimitError(f"open of {_show(full or path)}: the plugins of this node already hold "
                                     f"{HOST_FILES.limit()} files open (half its descriptor limit, RLIMIT_NOFILE)",
                                     plugin=self._plugin, limit=HOST_FILES.limit(), resource="host_open_files")
        try:
            errno = int(self._orig("path_open")(caller, fd, dirflags, path_ptr, path_len, oflags, rights,
                                                      rights_inh, fdflags, out))
            new = struct.unpack("<I", self._memory.read(out, 4))[0] if errno == 0 else None
        except BaseException:
            HOST_FILES.give(1)
            raise
        if new is None:
            HOST_FILES.give(1)
        if errno in _REFUSED:
            self._refused("open", [full], errno, write)
        if new is not None:
            self.opened.add(new)
            entry = self.fds.get(fd)
            if entry is not None and full is not None:
                self.fds[new] = DirFd(entry.root, full, entry.writable, entry.grant)
            else:
                self.fds.pop(new, None)
        return errno

    def _fd_change(self, name: str) -> Callable[..., int]:
        op = name.removeprefix("fd_")

        def run(caller: wasmtime.Caller, fd: int, *args: int) -> int:
            entry = self.fds.get(fd)
            path = None if entry is None else entry.path
            why: str | None = None
            if entry is not None and not entry.writable:
                why = "no directory containing it was granted" if entry.root is None else \
                    f"{_show(entry.root)} was granted read-only"
            elif entry is not None and entry.filtered:
                why = _outside_patterns(entry, "", entry.path, True)
            if entry is not None and why is not None:
                raise self._deny("security.fs_denied", f"{op} of {_show(entry.path)}: {why}", path=entry.path,
                                 write=True)
            errno = int(self._orig(name)(caller, fd, *args))
            if errno in _REFUSED:
                self._refused(op, [path], errno, True)
            return errno

        return run

    def _fd_readdir(self, caller: wasmtime.Caller, fd: int, buf: int, buf_len: int, cookie: int,
                    used_ptr: int) -> int:
        """``fd_readdir``; under a pattern grant, only the entries the guest may reach (and ``.`` / ``..``).

        wasmtime fills the guest's buffer; the entries that pass are kept, and wasmtime is asked again
        from the cookie after the last entry it wrote until the buffer is full or the directory ends --
        so a buffer smaller than the directory still means "more to come" exactly when there is more
        (wasi-libc takes a short buffer for the end). At most ``MAX_READDIR_SCAN`` entries are read in
        one call: a larger directory of names the guest may not see is a :class:`ResourceLimitError`.
        Whatever wasmtime wrote past the entries kept is zeroed before the guest runs again, an error or
        a refusal included: the guest may read its whole buffer, not only the part it is told is used.
        """
        entry = self.fds.get(fd)
        if entry is None or not entry.filtered:
            return int(self._orig("fd_readdir")(caller, fd, buf, buf_len, cookie, used_ptr))
        kept = bytearray()
        written = [0]  # how much of the buffer wasmtime filled (hidden names included)
        try:
            errno = self._readdir_kept(caller, entry, fd, buf, buf_len, cookie, used_ptr, kept, written)
        except BaseException:
            self._memory.write(buf, bytes(written[0]))
            raise
        if errno != 0:
            kept.clear()
        del kept[buf_len:]
        self._memory.write(buf, bytes(kept) + bytes(max(0, written[0] - len(kept))))
        if errno == 0:
            self._memory.write(used_ptr, struct.pack("<I", len(kept)))  # after the buffer: it may lie inside
        return errno

    def _readdir_kept(self, caller: wasmtime.Caller, entry: DirFd, fd: int, buf: int, buf_len: int, cookie: int,
                      used_ptr: int, kept: bytearray, written: list[int]) -> int:
        """Fill ``kept`` with the entries of ``fd`` from ``cookie`` the guest may see (see :meth:`_fd_readdir`);
        ``written[0]``: the most bytes wasmtime wrote to the buffer in one round. The errno of wasmtime."""
        scanned = 0
        while len(kept) < buf_len:
            errno = int(self._orig("fd_readdir")(caller, fd, buf, buf_len, cookie, used_ptr))
            if errno != 0:
                return errno
            (used,) = struct.unpack("<I", self._memory.read(used_ptr, 4))
            written[0] = max(written[0], min(used, buf_len))
            data = self._memory.read(buf, min(used, buf_len))
            offset, complete = 0, 0
            while offset + _DIRENT.size <= len(data):
                d_next, _, namlen, _ = _DIRENT.unpack_from(data, offset)
                end = offset + _DIRENT.size + namlen
                if end > len(data):
                    break  # cut off by the buffer's end: asked for again from the cookie before it
                name = bytes(data[offset + _DIRENT.size:end])
                if name in (b".", b"..") or _listed(entry, name):
                    kept += data[offset:end]
                cookie, offset, complete = d_next, end, complete + 1
            scanned += complete
            if used < buf_len:
                break  # the directory's end
            if complete == 0:
                # One entry larger than the whole buffer. A name the guest may not see is skipped (read into a
                # scratch area: not even its length goes out). For one it may see, wasi-libc reads the length
                # from the header and asks again with a larger buffer: only the header goes out, and the
                # buffer is filled (zeros) so that the guest knows there is more.
                peeked = self._peek_entry(caller, fd, cookie)
                if peeked is not None and peeked[1] not in (b".", b"..") and not _listed(entry, peeked[1]):
                    cookie, scanned = peeked[0], scanned + 1
                    if scanned >= MAX_READDIR_SCAN:
                        raise ResourceLimitError(
                            f"readdir of {_show(entry.path)}: more than {MAX_READDIR_SCAN} entries to filter in "
                            "one call", plugin=self._plugin, limit=MAX_READDIR_SCAN)
                    continue
                head = bytearray(buf_len - len(kept))
                if len(head) >= _DIRENT.size and len(data) >= _DIRENT.size:
                    d_next, _, namlen, _ = _DIRENT.unpack_from(data, 0)
                    _DIRENT.pack_into(head, 0, d_next, 0, namlen, 0)
                kept += head
                break
            if scanned >= MAX_READDIR_SCAN:
                raise ResourceLimitError(
                    f"readdir of {_show(entry.path)}: more than {MAX_READDIR_SCAN} entries to filter in one call",
                    plugin=self._plugin, limit=MAX_READDIR_SCAN)
        return 0

    def _peek_entry(self, caller: wasmtime.Caller, fd: int, cookie: int) -> tuple[int, bytes] | None:
        """(cookie after it, name) of the entry of ``fd`` at ``cookie``, read by wasmtime into a scratch area at
        the start of guest memory, restored at once (the guest is suspended in this call and never sees it);
        ``None`` if there is none or it does not fit."""
        span = _DIRENT.size + _MAX_NAME_BYTES + 4  # the entry, then the u32 length wasmtime writes
        if span > self._memory.memory_size():
            return None
        saved = self._memory.read(0, span)
        try:
            errno = int(self._orig("fd_readdir")(caller, fd, 0, span - 4, cookie, span - 4))
            (used,) = struct.unpack("<I", self._memory.read(span - 4, 4))
            data = self._memory.read(0, min(used, span - 4)) if errno == 0 else b""
        finally:
            self._memory.write(0, saved)
        if len(data) < _DIRENT.size:
            return None
        d_next, _, namlen, _ = _DIRENT.unpack_from(data, 0)
        if _DIRENT.size + namlen > len(data):
            return None
        return d_next, bytes(data[_DIRENT.size:_DIRENT.size + namlen])

    def _fd_close(self, caller: wasmtime.Caller, fd: int) -> int:
        errno = int(self._orig("fd_close")(caller, fd))
        if errno == 0:
            self.fds.pop(fd, None)
            self._forget(fd)
        return errno

    def _forget(self, fd: int) -> None:
        """``fd`` was closed: one descriptor fewer for the guest and for the host."""
        if fd in self.opened:
            self.opened.discard(fd)
            HOST_FILES.give(1)

    def _fd_renumber(self, caller: wasmtime.Caller, src: int, dst: int) -> int:
        errno = int(self._orig("fd_renumber")(caller, src, dst))
        if errno == 0 and src != dst:
            # dst was closed and src now has its number.
            moved = src in self.opened
            self.opened.discard(src)
            self._forget(dst)  # closed by the renumbering
            if moved:
                self.opened.add(dst)
            entry = self.fds.pop(src, None)
            if entry is None:
                self.fds.pop(dst, None)
            else:
                self.fds[dst] = entry
        return errno

