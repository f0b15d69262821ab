"""What a module file's sha256 and headers were, remembered by the file's identity, so a warm load
neither hashes nor reads a large module.

Hashing a 19 MB componentize-py guest costs ~12 ms and reading it ~5-10 ms, several times the rest
of a load from the compiled-module cache. The memo maps a file's *identity* -- device, inode, size,
``mtime_ns`` and ``ctime_ns`` -- to the digest and the header facts (host/sandbox/wasmscan.py) of the
bytes that were read under that identity. When the file still has that identity, its bytes are the
ones that were hashed, and a load whose compiled code is in the cache never reads the file.

Why that identity is sound (the trade-off, for the operator to know):

* any write to a file sets its ``ctime`` to the current time, and no system call lets a user set
  ``ctime`` (``utime`` sets ``mtime``/``atime`` and itself moves ``ctime`` to now): a file rewritten in
  place with the same size and a forged ``mtime`` still gets a new ``ctime``. Only someone who can set
  the system clock (root) or a file system that invents its own times (some network and FUSE file
  systems) can defeat it; on such a file system, turn the memo off (``ModuleCache(memo=False)`` or
  ``SANDBUS_FILE_MEMO=0``).
* one write does not move ``ctime``: a write through a shared writable mapping (``mmap``) to a page
  that was already mapped writable (the kernel stamps the file when the page first becomes writable,
  not at every store). The identity then still matches bytes that changed; such a hit is caught when
  the bytes are read (the compile reads them, and they must hash to the entry's digest), and the
  entry is then dropped (:meth:`FileMemo.forget`). A hit whose compiled code is cached runs the code
  of the digest it names, never bytes that were not hashed.
* a file replaced by another (``os.replace``, delete and create) has another inode, or, if the inode
  number is reused, the ``ctime`` of its creation.
* the kernel stamps files from a coarse clock (one tick, 1-10 ms), so a write in the same tick as the
  read that was hashed could leave ``ctime`` unchanged. A file whose ``ctime`` or ``mtime`` is less than
  :data:`RACY_S` old is therefore never memoised (git's "racily clean" rule), and the identity is taken
  from the descriptor before *and* after the read: if they differ, nothing is recorded.

The memo speeds up loads from a plugin directory only. Bytes from the network (the cluster registry)
are always hashed in full and their signatures verified: there is no file identity to trust there.

Entries live in the module cache's directory (one small JSON file per device and inode, written then
renamed) under the same trust checks as compiled code: whoever could forge an entry could also forge
the compiled code it leads to. An entry that fails a check or does not parse is ignored and replaced.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from sandbus.host.sandbox.cachefile import read_private, write_then_rename
from sandbus.host.sandbox.wasmscan import WasmFacts

__all__ = ["RACY_S", "FileIdentity", "FileMemo", "MemoEntry"]

log = logging.getLogger("sandbus.sandbox")

#: Files changed more recently than this are not memoised (the kernel's timestamps are coarse).
RACY_S = 2.0
_SUFFIX = ".id.json"
_MAX_ENTRY = 4096
#: Each fact the scanner gives and its type, read off :class:`WasmFacts` so that an entry written by this
#: version holds every fact (an entry from another version is read again from the file, never half-used).
_FACT_FIELDS: dict[str, type] = {f.name: {"int": int, "bool": bool}[str(f.type)] for f in fields(WasmFacts)}


class FileIdentity(NamedTuple):
    """What changes whenever a file's content can have changed (see the module docstring)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class MemoEntry:
    """The digest and header facts of the bytes a file held under one identity."""

    digest: str
    facts: WasmFacts


def _facts(raw: object) -> WasmFacts | None:
    if not isinstance(raw, dict) or set(raw) != set(_FACT_FIELDS):
        return None
    if not all(type(raw[k]) is t for k, t in _FACT_FIELDS.items()):
        return None
    return WasmFacts(**raw)


class FileMemo:
    """Digests of module files by identity, in memory and (with ``directory``) on disk.

    Parameters:
        directory: where entries are kept (the module cache's private directory, already checked by
            the cache); ``None``: in memory only.
        racy_s: files changed less than this many seconds ago are not memoised.
    """

    def __init__(self, directory: Path | None, *, racy_s: float = RACY_S) -> None:
        self.directory = directory
        self.racy_ns = int(racy_s * 1e9)
        self._memory: dict[FileIdentity, MemoEntry] = {}
        self._lock = threading.Lock()
        self.hits = 0

    def _path(self, ident: FileIdentity) -> Path:
        assert self.directory is not None
        return self.directory / f"{ident.dev}-{ident.ino}{_SUFFIX}"

    def get(self, ident: FileIdentity) -> MemoEntry | None:
        """The entry recorded for exactly this identity, or None."""
        with self._lock:
            entry = self._memory.get(ident)
        if entry is None:
            entry = self._read(ident)
            if entry is None:
                return None
            with self._lock:
                self._memory[ident] = entry
        self.hits += 1
        return entry

    def racy(self, ident: FileIdentity) -> bool:
        """Whether the file changed too recently for its identity to prove its content."""
        return time.time_ns() - max(ident.ctime_ns, ident.mtime_ns) < self.racy_ns

    def put(self, before: FileIdentity, after: FileIdentity, entry: MemoEntry) -> bool:
        """Remember ``entry`` for a file whose identity was ``before`` when its bytes were read and
        ``after`` once they were; only when the two agree and the file is not :meth:`racy`."""
        if before != after or self.racy(after):
            return False
        with self._lock:
            self._memory[after] = entry
        self._write(after, entry)
        return True

    def forget(self, ident: FileIdentity) -> None:
        """Drop the entry of this identity: the file was read and its bytes are not the entry's (a write
        that did not move ``ctime``, see the module docstring), so the next load hashes it again."""
        with self._lock:
            self._memory.pop(ident, None)
        if self.directory is not None:
            try:
                self._path(ident).unlink(missing_ok=True)
            except OSError as e:
                log.warning("the digest memo in %s cannot be written: %s", self.directory, e.strerror)

    def _read(self, ident: FileIdentity) -> MemoEntry | None:
        if self.directory is None:
            return None
        path = self._path(ident)
        raw, why = read_private(path, _MAX_ENTRY)
        if why is not None:
            log.warning("ignoring the digest memo entry %s: it %s", path, why)
        if raw is None or len(raw) > _MAX_ENTRY:
            return None
        try:
            data: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict) or data.get("identity") != list(ident):
            return None  # the inode now holds another file (or another version of it)
        digest, facts = data.get("digest"), _facts(data.get("facts"))
        if (not isinstance(digest, str) or len(digest) != 64 or facts is None
                or any(c not in "0123456789abcdef" for c in digest)):
            return None
        return MemoEntry(digest, facts)

    def _write(self, ident: FileIdentity, entry: MemoEntry) -> None:
        if self.directory is None:
            return
        data = orjson.dumps({"identity": list(ident), "digest": entry.digest, "facts": asdict(entry.facts)})
        write_then_rename(self.directory, self._path(ident), data, f"the digest memo in {self.directory}")
