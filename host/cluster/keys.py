"""Publisher keys: nkeys **account** key pairs, made, read and checked.

The seed (``SA...``, 58 characters) signs; the public key (``A...``, 56 characters) is what an operator trusts
(``[registry] trusted_publishers``) and what each registry entry names. Keys are decoded here in full --
base32, the CRC-16 nkeys appends, the type prefix -- since the ``nkeys`` package checks neither the checksum
of a seed nor anything of a public key. Nothing here imports the lifecycle: the operator policy checks its
keys with :func:`check_public_key`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import nacl.signing
import nkeys  # type: ignore[import-untyped]

from sandbus.sdk.errors import InvalidArtifactError

__all__ = ["MAX_KEY_FILE_BYTES", "PublisherKey", "check_public_key", "keygen", "load_public_key", "load_seed"]

#: Largest seed or public key file read (a key is under 60 characters; a file may add a newline or two).
MAX_KEY_FILE_BYTES = 4096
_KINDS = {
    nkeys.PREFIX_BYTE_ACCOUNT: "an account key (A...)",
    nkeys.PREFIX_BYTE_USER: "a user key (U...)",
    nkeys.PREFIX_BYTE_OPERATOR: "an operator key (O...)",
    nkeys.PREFIX_BYTE_SERVER: "a server key (N...)",
    nkeys.PREFIX_BYTE_CLUSTER: "a cluster key (C...)",
}


def _shown(text: object) -> str:
    shown = repr(text)
    return shown if len(shown) <= 70 else shown[:66] + "...'"


def _b32(text: str) -> bytes | None:
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        return None


def _crc_ok(raw: bytes) -> bool:
    return len(raw) > 2 and nkeys.crc16(bytearray(raw[:-2])).to_bytes(2, "little") == raw[-2:]


def check_public_key(key: object) -> bytes:
    """The 32 raw ed25519 bytes of an nkeys account public key (``A...``).

    Raises:
        InvalidArtifactError: not a string of 56 base32 characters, a bad checksum, or a key of another type
            (user, operator, server...), each said so.
    """
    if not isinstance(key, str) or len(key) != 56 or not key.isascii():
        raise InvalidArtifactError(f"{_shown(key)} is not an nkeys account public key (56 characters, A...)")
    raw = _b32(key)
    if raw is None or len(raw) != 35 or not _crc_ok(raw):
        raise InvalidArtifactError(f"{_shown(key)} is not an nkeys public key (bad encoding or checksum)")
    if raw[0] != nkeys.PREFIX_BYTE_ACCOUNT:
        kind = _KINDS.get(raw[0], "not a public key")
        raise InvalidArtifactError(
            f"{_shown(key)} is {kind}; a publisher is an account key (A...), as `sandbus keygen` makes")
    return raw[1:33]


@dataclass(frozen=True, slots=True, repr=False)
class PublisherKey:
    """A publisher's signing key (from its seed). ``repr`` shows only the public key."""

    public_key: str
    _signing: nacl.signing.SigningKey

    def sign(self, data: bytes) -> bytes:
        return bytes(self._signing.sign(data).signature)

    def __repr__(self) -> str:
        return f"PublisherKey({self.public_key})"


def _seed_key(text: str, source: str) -> PublisherKey:
    if len(text) != 58 or not text.isascii():
        raise InvalidArtifactError(f"{source} is not an nkeys seed (58 characters, SA...)")
    raw = _b32(text)
    if raw is None or len(raw) != 36 or not _crc_ok(raw):
        raise InvalidArtifactError(f"{source} is not an nkeys seed (bad encoding or checksum)")
    if raw[0] & 0xF8 != nkeys.PREFIX_BYTE_SEED:
        raise InvalidArtifactError(f"{source} is not an nkeys seed (it does not start with 'S')")
    kind = (raw[0] & 0x07) << 5 | (raw[1] & 0xF8) >> 3
    if kind != nkeys.PREFIX_BYTE_ACCOUNT:
        raise InvalidArtifactError(
            f"{source} is the seed of {_KINDS.get(kind, 'an unknown key type')}, not of an account key (SA...): "
            "make a publisher key with `sandbus keygen`")
    signing = nacl.signing.SigningKey(raw[2:34])
    public = bytes([nkeys.PREFIX_BYTE_ACCOUNT]) + bytes(signing.verify_key)
    encoded = base64.b32encode(public + nkeys.crc16(bytearray(public)).to_bytes(2, "little")).decode()
    return PublisherKey(encoded.rstrip("="), signing)


def _read_key_file(path: Path, what: str) -> str:
    """The stripped ASCII text of a small key file; a FIFO or device is never opened for reading."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise InvalidArtifactError(f"cannot read {what} {str(path)[:200]}: {e.strerror or e}", path=str(path)) from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArtifactError(f"{what} {str(path)[:200]} is not a regular file", path=str(path))
        data = os.read(fd, MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise InvalidArtifactError(f"cannot read {what} {str(path)[:200]}: {e.strerror or e}", path=str(path)) from e
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE_BYTES:
        raise InvalidArtifactError(f"{what} {str(path)[:200]} is larger than {MAX_KEY_FILE_BYTES} bytes: "
                                   "not a key file", path=str(path))
    try:
        return data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InvalidArtifactError(f"{what} {str(path)[:200]} is not a key file (not ASCII text)",
                                   path=str(path)) from None


def load_seed(path: Path) -> PublisherKey:
    """The publisher key in a seed file (as written by :func:`keygen`).

    Raises:
        InvalidArtifactError: unreadable, not a regular file, too large, not an nkeys seed, a bad checksum, or
            the seed of another key type (a user seed ``SU...``, say).
    """
    text = _read_key_file(Path(path), "seed file")
    return _seed_key(text, f"seed file {str(path)[:200]}")


def load_public_key(path: Path) -> str:
    """The account public key in a ``.pub`` file (or any file holding one), checked.

    Raises:
        InvalidArtifactError: unreadable, or not an account public key.
    """
    text = _read_key_file(Path(path), "public key file")
    check_public_key(text)
    return text


def _check_directory(directory: Path) -> None:
    """Refuse a directory where others may replace or remove our files: writable by all, without the sticky bit
    (``/tmp`` has it, and is fine)."""
    try:
        mode = os.stat(directory).st_mode
    except OSError:
        return  # missing: the create below says so
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise InvalidArtifactError(
            f"{str(directory)[:200]} may be written by anyone (mode {stat.S_IMODE(mode):o}, no sticky bit): anyone "
            "could replace the key files there; choose a private directory", path=str(directory))


def keygen(path: Path) -> PublisherKey:
    """Write a new account seed to ``path`` (mode 0600) and its public key to ``path.pub``; return the key.

    Neither file is overwritten: both are created exclusively, so an existing key is never replaced (or
    written through a symlink); when ``path.pub`` exists the seed is removed again. A directory anyone may
    write to without the sticky bit is refused: anyone could replace the ``.pub`` an operator later trusts.

    Raises:
        InvalidArtifactError: a file exists already, or cannot be created; an unsafe directory.
    """
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    _check_directory(path.parent)
    signing = nacl.signing.SigningKey.generate()
    seed = nkeys.encode_seed(bytes(signing), nkeys.PREFIX_BYTE_ACCOUNT)
    key = _seed_key(seed.decode(), "new seed")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for target in (path, pub):
        if os.path.lexists(target):
            raise InvalidArtifactError(f"{str(target)[:200]} exists already: a key is never overwritten "
                                       "(choose another -o, or remove it yourself)", path=str(target))
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        raise InvalidArtifactError(f"cannot create {str(path)[:200]}: {e.strerror or e}", path=str(path)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask made of it; the file opened, not what the path is now
            f.write(seed + b"\n")
        try:
            pfd = os.open(pub, flags, 0o644)
        except OSError as e:
            raise InvalidArtifactError(f"cannot create {str(pub)[:200]}: {e.strerror or e}", path=str(pub)) from e
        with os.fdopen(pfd, "wb") as f:
            f.write(key.public_key.encode() + b"\n")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return key
