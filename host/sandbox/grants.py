"""Granted directories held open: a grant is an identity, not a path.

A plugin's directory grants are opened once, when its sandbox is built, and every instance the
sandbox ever creates is given those same directories -- never their names resolved again. Names
are what a guest can change: with two nested grants (``work`` writable, ``work/out``) it can rename
``out`` away and put a symlink ``out -> ../../..`` in its place; an instance that re-opened
``work/out`` by name would follow it out of every grant. Opening once closes that kind of attack
for every way of changing the tree (rename, symlink, unlink, replace).

API (used for core modules by instance.py and for components by component.py)::

    grants = GrantSet(capabilities.dirs, plugin="name", auditor=auditor)   # opens every grant now
    opened = grants.preopen(wasi_config, checked=True)  # preopen_dir for each grant, in order; checked:
                                            # the caller enforces file-name patterns (else refused)
    for g in opened:                        # OpenGrant: .grant (DirGrant), .guest_path, .writable,
        ...                                 #            .fd (held), .preopen_path ("/proc/self/fd/N")
    grants.close()                          # Sandbox.close; also done when the set is collected

How a grant is opened: the operator's path is resolved once with ``realpath`` (a symlink the
*operator* wrote is honoured) -- by :class:`DirGrant` when the grant is made, which is also the path
the operator policy checked -- then opened component by component from ``/``, each component
relative to its parent's descriptor with ``O_NOFOLLOW | O_DIRECTORY``. A symlink met on the way
means the tree changed between the two steps (a race): that is refused with a
:class:`SecurityViolationError` and a critical ``security.fs_denied`` audit event. A missing or
unreadable directory is a :class:`SandboxError`.

How an instance gets the identity: wasmtime's ``WasiConfig.preopen_dir`` only takes a path, and
opens it at once. It is given ``/proc/self/fd/N`` (``/dev/fd/N`` where there is no ``/proc``), a
"magic link" the kernel resolves to the directory held by descriptor ``N`` whatever its name is
now: after a rename it is the moved directory, after a removal it is the removed (empty, dead)
directory, in which nothing can be created. ``GrantSet`` checks once, when it opens, that this
path reaches the held directory (same device and inode), and refuses to work otherwise.
``preopen`` and ``close`` share a lock, so a descriptor number is never reused under a
``preopen`` that is still running.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import tempfile
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import wasmtime

from sandbus.host.sandbox.audit import AuditLevel, Auditor
from sandbus.host.sandbox.config import DirGrant, show_patterns
from sandbus.sdk.errors import SandboxError, SecurityViolationError

__all__ = ["GrantSet", "OpenGrant", "decoy_root", "open_beneath_root", "open_no_symlinks"]

log = logging.getLogger("sandbus.sandbox")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# The directories on the way are only searched, like a kernel path walk does: O_PATH needs no read
# permission on them (a grant beneath a 0711 home directory must open as it did by name).
_WALK_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


@dataclass(frozen=True)
class OpenGrant:
    """One granted directory, held open for the life of its :class:`GrantSet`.

    Parameters:
        grant: what the operator granted.
        fd: the host descriptor of the directory (owned by the set; do not close it).
        preopen_path: a path that reaches *this* directory, for ``WasiConfig.preopen_dir``.
    """

    grant: DirGrant
    fd: int
    preopen_path: str

    @property
    def guest_path(self) -> str:
        return self.grant.guest_path()

    @property
    def writable(self) -> bool:
        return self.grant.writable


def _fd_path(fd: int) -> str:
    base = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
    return f"{base}/{fd}"


def open_beneath_root(path: str | os.PathLike[str]) -> int:
    """Open the directory ``realpath(path)`` with no symlink in any component; return its descriptor.

    Raises:
        SecurityViolationError: a component is a symlink (the tree changed after ``realpath``).
        SandboxError: the directory is missing, not a directory, or cannot be opened.
    """
    return open_no_symlinks(os.path.realpath(path))


def open_no_symlinks(real: str) -> int:
    """Open the absolute directory path ``real`` component by component from "/", each with
    ``O_NOFOLLOW`` beneath its parent's descriptor; a symlink anywhere is refused (see above). Only the
    last component is opened for reading; those on the way are only searched (``O_PATH``)."""
    if not real.startswith("/") or ".." in PurePosixPath(real).parts:
        raise SandboxError(f"granted directory {real!r} is not an absolute path without '..'", path=real)
    names = PurePosixPath(real).parts[1:]
    fd = os.open("/", _WALK_FLAGS if names else _DIR_FLAGS)
    try:
        for i, name in enumerate(names):
            flags = _DIR_FLAGS if i == len(names) - 1 else _WALK_FLAGS
            try:
                child = os.open(name, flags | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno == errno.ELOOP or (e.errno == errno.ENOTDIR and _is_symlink(fd, name)):
                    raise SecurityViolationError(
                        f"granted directory {real} changed while being opened: {name!r} is now a symlink",
                        path=real, component=name) from e
                raise SandboxError(f"granted directory {real} cannot be opened: {e.strerror}",
                                   path=real) from e
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _close_all(fds: list[int]) -> None:
    while fds:
        with contextlib.suppress(OSError):
            os.close(fds.pop())


class GrantSet:
    """The directories of one sandbox, opened once (see the module docstring). Thread-safe.

    Parameters:
        dirs: the grants, in order (the order of ``preopen``).
        plugin: the plugin's name, for errors and audit events.
        auditor: where a refused grant is reported (critical ``security.fs_denied``).

    Raises:
        SecurityViolationError / SandboxError: see :func:`open_beneath_root`; nothing stays open.
    """

    def __init__(self, dirs: Iterable[DirGrant], *, plugin: str, auditor: Auditor | None = None) -> None:
        self.plugin = plugin
        self._auditor = auditor
        self._lock = threading.Lock()
        self._fds: list[int] = []
        opened: list[OpenGrant] = []
        try:
            for grant in dirs:
                try:
                    # DirGrant resolved the operator's path when it was made: what the policy checked is
                    # what is opened here, and a symlink that appeared since is refused, not followed.
                    fd = open_no_symlinks(os.fspath(grant.host))
                except SecurityViolationError as e:
                    e.plugin = plugin
                    e.args = (str(e),)
                    if auditor is not None:
                        auditor.emit(AuditLevel.CRITICAL, "security.fs_denied", plugin, e.message, **e.details)
                    raise
                except SandboxError as e:
                    e.plugin = plugin
                    e.args = (str(e),)
                    raise
                self._fds.append(fd)
                opened.append(OpenGrant(grant, fd, self._checked_path(fd, grant)))
        except BaseException:
            _close_all(self._fds)
            raise
        self._grants = tuple(opened)
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_all, self._fds)
        _warn_nested(self._grants, plugin)

    def _checked_path(self, fd: int, grant: DirGrant) -> str:
        path = _fd_path(fd)
        try:
            held, seen = os.fstat(fd), os.stat(path)
        except OSError as e:
            raise SandboxError(f"cannot reach the held directory of grant {grant.host} through {path}: "
                               f"{e.strerror}", plugin=self.plugin, path=str(grant.host)) from e
        if (held.st_dev, held.st_ino) != (seen.st_dev, seen.st_ino):
            raise SandboxError(f"{path} does not reach the held directory of grant {grant.host} on this "
                               "platform; directory grants are not supported here",
                               plugin=self.plugin, path=str(grant.host))
        return path

    @property
    def grants(self) -> tuple[OpenGrant, ...]:
        return self._grants

    def __len__(self) -> int:
        return len(self._grants)

    def __iter__(self) -> Iterator[OpenGrant]:
        return iter(self._grants)

    @property
    def closed(self) -> bool:
        return self._closed

    def preopen(self, config: wasmtime.WasiConfig, *, checked: bool = False) -> tuple[OpenGrant, ...]:
        """Preopen every grant into ``config`` (in order) by identity; return them.

        ``checked``: the caller checks every file operation against each grant's file-name patterns
        (core modules, host/sandbox/fsguard.py). Without it a grant *with* patterns is refused: wasmtime
        would give the guest the whole directory, and a grant is never silently widened.

        Raises:
            SandboxError: the set is closed (its sandbox was closed), or wasmtime refused a directory.
            SecurityViolationError: a grant has file-name patterns and ``checked`` is false (audited
                ``security.fs_denied``).
        """
        with self._lock:
            if self._closed:
                raise SandboxError("the sandbox's directory grants are closed", plugin=self.plugin)
            if not checked:
                self._refuse_patterns()
            for g in self._grants:
                try:
                    config.preopen_dir(g.preopen_path, g.guest_path, fs_mutable=g.writable)
                except wasmtime.WasmtimeError as e:
                    raise SandboxError(f"cannot preopen the granted directory {g.grant.host}: {e}",
                                       plugin=self.plugin, path=str(g.grant.host)) from e
            return self._grants

    def _refuse_patterns(self) -> None:
        for g in self._grants:
            if g.grant.filtered:
                message = (f"the grant of {g.guest_path} by file-name pattern ({show_patterns(g.grant.patterns)}) "
                           "cannot be enforced for a component (its file operations cannot be checked one by one); "
                           "grant the whole directory instead")
                if self._auditor is not None:
                    self._auditor.emit(AuditLevel.CRITICAL, "security.fs_denied", self.plugin, message,
                                       path=g.guest_path, patterns=list(g.grant.patterns))
                raise SecurityViolationError(message, plugin=self.plugin, path=g.guest_path,
                                             patterns=list(g.grant.patterns))

    def close(self) -> None:
        """Close every held directory; later ``preopen`` calls fail. Idempotent."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> GrantSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_decoy_lock = threading.Lock()
_decoy_path: str | None = None


def decoy_root() -> str:
    """A path for ``preopen_dir`` that reaches an empty directory in which nothing can be created.

    Core modules get it as "/", so that every path outside the grants reaches the host (which refuses
    it, audited) instead of being refused silently by wasi-libc. Like a grant it is an identity: made
    once per process, held open and removed at once, so there is no name left that anyone could
    rename or replace with a symlink.
    """
    global _decoy_path
    with _decoy_lock:
        if _decoy_path is None:
            made = tempfile.mkdtemp(prefix="sandbus-deny-")
            os.chmod(made, 0o500)
            fd = open_beneath_root(made)
            os.rmdir(made)
            _decoy_path = _fd_path(fd)
        return _decoy_path


def _warn_nested(grants: tuple[OpenGrant, ...], plugin: str) -> None:
    """Say so when a read-only grant lies inside a writable one: grants add up (docs/abi.md), so the
    outer grant can still write there under other names."""
    for inner in grants:
        if inner.writable:
            continue
        for outer in grants:
            if outer.writable and outer is not inner and inner.grant.host.is_relative_to(outer.grant.host):
                log.warning("plugin %r: read-only grant %s lies inside writable grant %s; it is writable "
                            "through the outer grant", plugin, inner.grant.host, outer.grant.host)
