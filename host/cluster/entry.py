"""One registry entry: the JSON value of ``sandbus-registry`` key ``<name>.<version>``.

::

    {"format": 1, "name": "greeter", "version": "1.2.0", "description": "...", "tags": ["..."],
     "publisher": "A...", "signature": "<base64url, no padding>", "sha256": "<hex>", "size": 1234,
     "manifest": "<TOML text>", "manifest_sha256": "<hex>", "object": "greeter/1.2.0.wasm",
     "published_at": "2026-12-02T16:00:00Z"}

Anyone who may write the bucket can write anything into it, so a value read back is untrusted input:
its size is capped before it is decoded, and every field is checked for its type and shape (an unknown
key, a wrong type, a name or version that is not the key's, an object that is not the one the name and
version give, a size above the module cap are all :class:`~sandbus.sdk.errors.InvalidArtifactError`).
A valid entry is only well formed: whether its signature and digests hold is
:func:`sandbus.host.cluster.signing.verify_artifact`'s question.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from sandbus.host.cluster.names import check_name, check_version, object_name, registry_key
from sandbus.host.lifecycle.loader import MAX_MODULE_FILE_BYTES
from sandbus.sdk.errors import InvalidArtifactError

__all__ = [
    "ENTRY_FORMAT",
    "MAX_ARTIFACT_BYTES",
    "MAX_ENTRY_BYTES",
    "MAX_MANIFEST_BYTES",
    "RegistryEntry",
    "decode_entry",
    "now_rfc3339",
    "sha256_hex",
]

ENTRY_FORMAT = 1
#: Largest module the registry takes or hands out: what a node's loader reads from a plugin directory.
MAX_ARTIFACT_BYTES = MAX_MODULE_FILE_BYTES
#: Largest manifest in an entry. A manifest is a few KiB; the loader's own cap (1 MiB) is for files on disk.
MAX_MANIFEST_BYTES = 64 * 1024
#: Largest entry value read back (the manifest, JSON-escaped, and the rest): also the bucket's max value size.
MAX_ENTRY_BYTES = 512 * 1024
MAX_DESCRIPTION_CHARS = 4096
MAX_TAGS = 64
MAX_TAG_CHARS = 64

_HEX64 = re.compile(r"[0-9a-f]{64}")
# An nkeys account public key: 'A' and 55 more base32 characters (checked cryptographically by signing.py).
_ACCOUNT_KEY = re.compile(r"A[A-Z2-7]{55}")
# An ed25519 signature (64 bytes) in base64url without padding.
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{86}")
_FIELDS = ("format", "name", "version", "description", "tags", "publisher", "signature", "sha256", "size",
           "manifest", "manifest_sha256", "object", "published_at")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now_rfc3339() -> str:
    """The current UTC time, RFC 3339 with a ``Z`` and milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """A well-formed registry entry (its fields are the JSON keys).

    Parameters:
        name / version: the plugin and its version (the key is ``<name>.<version>``).
        description / tags: from the manifest (``[plugin] description``, ``[metadata] tags``), for search.
        publisher: the nkeys account public key (``A...``) that signed it.
        signature: ed25519 over :func:`~sandbus.host.cluster.signing.signed_bytes`, base64url without padding.
        sha256 / size: of the module.
        manifest / manifest_sha256: the manifest's TOML text and the sha256 of its UTF-8 bytes.
        object: the object holding the module in ``sandbus-artifacts``.
        published_at: when it was pushed (RFC 3339 UTC).
        revision: the KV revision it was read at (0 for an entry not read from the bucket); not in the JSON.
    """

    name: str
    version: str
    description: str
    tags: tuple[str, ...]
    publisher: str
    signature: str
    sha256: str
    size: int
    manifest: str
    manifest_sha256: str
    object: str
    published_at: str
    revision: int = 0

    @property
    def key(self) -> str:
        return registry_key(self.name, self.version)

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"format": ENTRY_FORMAT, **asdict(self)}
        del data["revision"]
        data["tags"] = list(self.tags)
        return orjson.dumps({k: data[k] for k in _FIELDS})


def _fail(key: str | None, message: str) -> InvalidArtifactError:
    where = f"registry entry {key!r}" if key else "registry entry"
    return InvalidArtifactError(f"{where}: {message}", key=key)


def _string(data: dict[str, Any], field: str, key: str | None, *, limit: int) -> str:
    value = data.get(field)
    if not isinstance(value, str):
        raise _fail(key, f"{field!r} must be a string, found {type(value).__name__}")
    if len(value) > limit:
        raise _fail(key, f"{field!r} is longer than {limit} characters")
    return value


def _pattern(data: dict[str, Any], field: str, key: str | None, pattern: re.Pattern[str], what: str) -> str:
    value = _string(data, field, key, limit=256)
    if not pattern.fullmatch(value):
        raise _fail(key, f"{field!r} must be {what}")
    return value


def decode_entry(raw: bytes, *, key: str | None = None, revision: int = 0) -> RegistryEntry:
    """Parse and validate one entry value (``key``: the KV key it was read under, which it must match).

    Raises:
        InvalidArtifactError: too large, not a JSON object, an unknown or missing key, a wrong type or shape,
            a name/version other than the key's, an ``object`` other than ``<name>/<version>.wasm``.
    """
    if len(raw) > MAX_ENTRY_BYTES:
        raise _fail(key, f"the value is {len(raw)} bytes, above the {MAX_ENTRY_BYTES}-byte cap")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise _fail(key, f"not JSON ({e})") from None
    if not isinstance(data, dict):
        raise _fail(key, f"must be a JSON object, found {type(data).__name__}")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise _fail(key, f"unknown key(s) {', '.join(repr(k[:40]) for k in unknown[:5])}")
    missing = [f for f in _FIELDS if f not in data]
    if missing:
        raise _fail(key, f"missing key(s) {', '.join(map(repr, missing))}")
    if type(data["format"]) is not int or data["format"] != ENTRY_FORMAT:
        raise _fail(key, f"'format' must be {ENTRY_FORMAT}")
    try:
        name = check_name(data["name"])
        version = check_version(data["version"])
    except InvalidArtifactError as e:
        raise _fail(key, e.message) from None
    if key is not None and key != f"{name}.{version}":
        raise _fail(key, f"holds {name}@{version}, not what its key says")
    tags = data["tags"]
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise _fail(key, f"'tags' must be a list of at most {MAX_TAGS} strings")
    if not all(isinstance(t, str) and len(t) <= MAX_TAG_CHARS for t in tags):
        raise _fail(key, f"'tags' must hold strings of at most {MAX_TAG_CHARS} characters")
    size = data["size"]
    if type(size) is not int or not 0 < size <= MAX_ARTIFACT_BYTES:
        raise _fail(key, f"'size' must be an integer from 1 to {MAX_ARTIFACT_BYTES} (the module cap)")
    manifest = _string(data, "manifest", key, limit=MAX_MANIFEST_BYTES)
    if len(manifest.encode("utf-8", "surrogatepass")) > MAX_MANIFEST_BYTES:
        raise _fail(key, f"'manifest' is larger than {MAX_MANIFEST_BYTES} bytes")
    obj = _string(data, "object", key, limit=256)
    if obj != object_name(name, version):
        raise _fail(key, f"'object' must be {object_name(name, version)!r}")
    published_at = _string(data, "published_at", key, limit=64)
    try:
        datetime.fromisoformat(published_at)
    except ValueError:
        raise _fail(key, "'published_at' must be an RFC 3339 time") from None
    return RegistryEntry(
        name=name,
        version=version,
        description=_string(data, "description", key, limit=MAX_DESCRIPTION_CHARS),
        tags=tuple(tags),
        publisher=_pattern(data, "publisher", key, _ACCOUNT_KEY, "an nkeys account public key (A...)"),
        signature=_pattern(data, "signature", key, _SIGNATURE, "an ed25519 signature in base64url (86 characters)"),
        sha256=_pattern(data, "sha256", key, _HEX64, "64 lowercase hexadecimal characters"),
        size=size,
        manifest=manifest,
        manifest_sha256=_pattern(data, "manifest_sha256", key, _HEX64, "64 lowercase hexadecimal characters"),
        object=obj,
        published_at=published_at,
        revision=revision,
    )
