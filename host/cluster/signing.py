"""Publisher keys and artifact signatures.

A publisher is an nkeys account key pair (:mod:`sandbus.host.cluster.keys`, whose names are re-exported
here): the seed signs, the public key is what an operator trusts and what each entry names.

A signature is ed25519 over :func:`signed_bytes`::

    b"sandbus-artifact-v1\\n" + name + b"\\n" + version + b"\\n" + sha256(wasm).hex() + b"\\n"
        + sha256(manifest_bytes).hex() + b"\\n"

so it vouches for the module *and* the manifest (its capabilities, resources, dependencies) under that
name and version: neither can be swapped, edited, or moved to another name or version without the seed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Collection
from typing import TYPE_CHECKING

import nacl.exceptions
import nacl.signing

from sandbus.host.cluster.entry import RegistryEntry, sha256_hex
from sandbus.host.cluster.keys import (
    MAX_KEY_FILE_BYTES,
    PublisherKey,
    check_public_key,
    keygen,
    load_public_key,
    load_seed,
)
from sandbus.sdk.errors import InvalidArtifactError, ManifestError, SignatureError, UntrustedPublisherError

if TYPE_CHECKING:
    from sandbus.host.lifecycle.manifest import Manifest

__all__ = [
    "MAX_KEY_FILE_BYTES",
    "PublisherKey",
    "check_public_key",
    "check_signature",
    "keygen",
    "load_public_key",
    "load_seed",
    "sign_artifact",
    "signed_bytes",
    "verify_artifact",
    "verify_entry",
]

_SIGNED_PREFIX = b"sandbus-artifact-v1\n"


def signed_bytes(name: str, version: str, wasm_sha256: str, manifest_sha256: str) -> bytes:
    """Exactly what a publisher signs for ``name@version``."""
    return b"".join((_SIGNED_PREFIX, name.encode(), b"\n", version.encode(), b"\n", wasm_sha256.encode(), b"\n",
                     manifest_sha256.encode(), b"\n"))


def sign_artifact(key: PublisherKey, name: str, version: str, wasm: bytes, manifest: bytes) -> str:
    """The entry's ``signature`` for this module and manifest: base64url without padding."""
    signature = key.sign(signed_bytes(name, version, sha256_hex(wasm), sha256_hex(manifest)))
    return base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


def _refuse(entry: RegistryEntry, message: str, **details: object) -> SignatureError:
    return SignatureError(f"{entry.ref}: {message}; refused", plugin=entry.name, version=entry.version,
                          publisher=entry.publisher, **details)


def _signature(entry: RegistryEntry) -> bytes:
    """The 64 signature bytes, from their one canonical encoding only: base64 leaves the last character's
    low bits free, and an entry whose text differs from its bytes' encoding is not the one that was written."""
    text = entry.signature
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 64 or base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != text:
        raise _refuse(entry, "its signature is not an ed25519 signature in canonical base64url")
    return raw


def check_signature(entry: RegistryEntry, trusted: Collection[str] | None) -> None:
    """What an entry alone can show, without its module or parsing its manifest: its manifest is the one
    signed, ``entry.publisher`` signed this name, version, module digest and manifest digest, and (unless
    ``trusted`` is None) the publisher is trusted. Cheap (a digest of at most 64 KiB and one ed25519 check):
    listings run it on every entry, so that an entry written without the publisher's key is never chosen.

    Raises:
        SignatureError: the manifest's digest differs, no valid signature by the publisher.
        UntrustedPublisherError: all of that holds, and the publisher is not in ``trusted``.
    """
    manifest_sha = sha256_hex(entry.manifest.encode("utf-8", "surrogatepass"))
    if manifest_sha != entry.manifest_sha256:
        raise _refuse(entry, "the manifest is not the one that was signed (its sha256 differs: edited after "
                             "signing)", expected=entry.manifest_sha256, actual=manifest_sha)
    try:
        raw_key = check_public_key(entry.publisher)
    except InvalidArtifactError as e:
        raise _refuse(entry, f"unsigned: {e.message}") from None
    signature = _signature(entry)
    try:
        nacl.signing.VerifyKey(raw_key).verify(signed_bytes(entry.name, entry.version, entry.sha256, manifest_sha),
                                               signature)
    except (ValueError, nacl.exceptions.CryptoError):
        raise _refuse(entry, f"the signature is not valid for publisher {entry.publisher} (signed by another "
                             "key, or the entry was edited)") from None
    if trusted is not None and entry.publisher not in trusted:
        reason = "no trusted publishers are configured" if not trusted else "it is not a trusted publisher"
        raise UntrustedPublisherError(
            f"{entry.ref} is signed by {entry.publisher}, and {reason} ([registry] trusted_publishers, --trust); "
            "refused", plugin=entry.name, version=entry.version, publisher=entry.publisher)


def verify_entry(entry: RegistryEntry, trusted: Collection[str] | None) -> Manifest:
    """:func:`check_signature`, then the signed manifest itself: valid, naming the entry's name and version,
    and with the description and tags the entry shows (those two are copies, outside the signature: a
    listing must not show words the publisher never signed). Returns the parsed manifest.

    A manifest is parsed only once its signature holds and its publisher is trusted.

    Raises:
        SignatureError / UntrustedPublisherError: as :func:`check_signature`; a signed manifest that is
            invalid, names another plugin or version, or whose description or tags differ from the entry's.
    """
    check_signature(entry, trusted)
    from sandbus.host.lifecycle.manifest import parse_manifest

    try:
        manifest = parse_manifest(entry.manifest, source=f"registry {entry.ref}")
    except ManifestError as e:  # signed, yet invalid: a publisher's bug, still not loadable
        raise _refuse(entry, f"its manifest is invalid: {e}") from None
    if (manifest.name, manifest.plugin.version) != (entry.name, entry.version):
        raise _refuse(entry, f"its manifest is {manifest.name}@{manifest.plugin.version}, not {entry.ref}")
    if (manifest.plugin.description, tuple(manifest.metadata.tags)) != (entry.description, entry.tags):
        raise _refuse(entry, "its description or tags are not the signed manifest's (the entry was edited)")
    return manifest


def verify_artifact(entry: RegistryEntry, wasm: bytes, trusted: Collection[str] | None) -> Manifest:
    """Check that ``wasm`` and the entry's manifest are what ``entry.publisher`` signed as ``entry.name@version``,
    and (unless ``trusted`` is None) that the publisher is trusted; return the parsed manifest. Verify the
    bytes you will use: a caller loads or writes exactly ``wasm``, never a copy read again later.

    Checks, in order: the module's size and sha256 against the entry, then :func:`verify_entry` (the
    manifest's digest, the signature, trust, the manifest's own name, version, description and tags). An
    empty ``trusted`` trusts no one.

    Raises:
        SignatureError: a size or digest mismatch (bytes replaced or edited), no valid signature by the
            publisher (signed by another key, a malformed key or signature), a manifest that names another
            plugin or version.
        UntrustedPublisherError: the signature holds, and the publisher is not in ``trusted``.
    """
    if len(wasm) != entry.size:
        raise _refuse(entry, f"the module is {len(wasm)} bytes, the entry says {entry.size}",
                      expected=entry.size, actual=len(wasm))
    actual = sha256_hex(wasm)
    if actual != entry.sha256:
        raise _refuse(entry, f"the module's sha256 is {actual}, the signed entry says {entry.sha256} "
                             "(the stored bytes were replaced)", expected=entry.sha256, actual=actual)
    return verify_entry(entry, trusted)
