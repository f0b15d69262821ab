"""Writing a plugin's two files (``<name>.wasm`` + ``<name>.toml``) into a plugin directory, for ``pull`` and
``install``: never through a link, never half a pair, one writer per directory at a time.

Every file is written relative to a descriptor of the directory (a directory renamed or swapped for a link
meanwhile changes nothing), as a hidden temporary file created exclusively, synced, then renamed over the
old one (the rename replaces a link instead of writing through it). The pair is checked and renamed
together: when the second rename fails, the first file's old content is put back. Writers of one
directory take its ``flock`` (waiting at most :data:`DIRECTORY_LOCK_TIMEOUT_S`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from sandbus.host.cluster.entry import MAX_MANIFEST_BYTES, RegistryEntry
from sandbus.host.cluster.names import check_name
from sandbus.sdk.errors import InvalidArtifactError, ManifestError

__all__ = ["DIRECTORY_LOCK_TIMEOUT_S", "installed_version", "locked", "open_directory", "write_pair", "write_plugin"]

log = logging.getLogger("sandbus.registry")

#: Seconds ``install`` / ``write_plugin`` wait for another writer of the same plugin directory to finish.
DIRECTORY_LOCK_TIMEOUT_S = 10.0


def open_directory(directory: Path) -> int:
    """A descriptor of ``directory`` (created when missing): every file is then written relative to it, so a
    directory renamed or swapped for a link meanwhile changes nothing."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InvalidArtifactError(f"cannot use directory {str(directory)[:200]}: {e.strerror or e}",
                                   path=str(directory)) from e


def installed_version(dfd: int, name: str) -> str | None:
    """The version of ``name`` in the directory (both files present, regular, the manifest valid), else None."""
    from sandbus.host.lifecycle.manifest import parse_manifest

    try:
        if not stat.S_ISREG(os.stat(f"{name}.wasm", dir_fd=dfd, follow_symlinks=False).st_mode):
            return None
        fd = os.open(f"{name}.toml", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, MAX_MANIFEST_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_MANIFEST_BYTES:
        return None
    try:
        return parse_manifest(data.decode("utf-8"), expected_name=name).plugin.version
    except (ManifestError, UnicodeDecodeError):
        return None


def _write_temp(dfd: int, filename: str, data: bytes) -> str:
    """A new hidden temporary file beside ``filename`` (never one that exists, never through a link) holding
    ``data``, flushed to disk; its name."""
    tmp = f".{filename}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644,
                 dir_fd=dfd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    return tmp


def write_pair(dfd: int, entry: RegistryEntry, wasm: bytes) -> None:
    """``<name>.wasm`` and ``<name>.toml`` hold the verified module and the signed manifest, byte for byte, or
    the old pair is left as it was: both are written to temporary files first, then renamed over the old
    ones one right after the other (a plugin directory's watcher waits for a plugin's files to settle); when
    the manifest's rename fails, the old module is put back. A rename replaces a link at the name with the
    file itself: nothing is ever written where a link points."""
    name = check_name(entry.name)  # the file names come from a checked plugin name only
    wasm_name, toml_name = f"{name}.wasm", f"{name}.toml"
    temps: list[str] = []
    try:
        for filename in (wasm_name, toml_name):
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.stat(filename, dir_fd=dfd, follow_symlinks=False).st_mode):
                    raise IsADirectoryError(errno.EISDIR, "a directory is in the way", filename)
        temps.append(_write_temp(dfd, wasm_name, wasm))
        temps.append(_write_temp(dfd, toml_name, entry.manifest.encode("utf-8")))
        backup = _backup(dfd, wasm_name)
        os.replace(temps[0], wasm_name, src_dir_fd=dfd, dst_dir_fd=dfd)
        try:
            os.replace(temps[1], toml_name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError:
            with contextlib.suppress(OSError):
                if backup is None:
                    os.unlink(wasm_name, dir_fd=dfd)
                else:
                    os.replace(backup, wasm_name, src_dir_fd=dfd, dst_dir_fd=dfd)
            raise
        if backup is not None:
            temps.append(backup)
        with contextlib.suppress(OSError):
            os.fsync(dfd)
    except OSError as e:
        raise InvalidArtifactError(f"cannot write {wasm_name}/{toml_name}: {e.strerror or e}", plugin=name) from e
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)


def _backup(dfd: int, filename: str) -> str | None:
    """A second name (a hard link) for ``filename`` as it is now, to put it back; None when it does not exist
    (or the file system has no hard links)."""
    backup = f".{filename}.{secrets.token_hex(6)}.old"
    try:
        os.link(filename, backup, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
    except OSError:
        return None
    return backup


@contextlib.contextmanager
def locked(dfd: int, directory: Path) -> Iterator[None]:
    """Hold the plugin directory's lock (``flock`` on the directory itself): two installs or pulls into one
    directory, in any processes, write their pairs one after the other, never a module of one beside the
    manifest of the other. Waits at most :data:`DIRECTORY_LOCK_TIMEOUT_S`.

    Raises:
        InvalidArtifactError: another writer held the lock all that time.
    """
    deadline = time.monotonic() + DIRECTORY_LOCK_TIMEOUT_S
    while True:
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise InvalidArtifactError(f"{str(directory)[:200]} is being written by another install or pull "
                                           f"(waited {DIRECTORY_LOCK_TIMEOUT_S:.0f} s); try again",
                                           path=str(directory)) from None
            time.sleep(0.02)
        except OSError as e:  # a file system without locks: the pair's renames still follow each other
            log.debug("cannot lock %s: %s", str(directory)[:200], e)
            break
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(dfd, fcntl.LOCK_UN)


def write_plugin(directory: Path, entry: RegistryEntry, wasm: bytes) -> None:
    """Write ``<name>.wasm`` and ``<name>.toml`` of a verified ``entry`` into ``directory`` (created when
    missing), as a pair (:func:`write_pair`), under the directory's lock; never outside ``directory``,
    never through a link.

    Raises:
        InvalidArtifactError: the directory or a file cannot be written, or another writer holds it.
    """
    dfd = open_directory(Path(directory))
    try:
        with locked(dfd, Path(directory)):
            write_pair(dfd, entry, wasm)
    finally:
        os.close(dfd)
