"""The plugin registry: signed artifacts in a JetStream object store, indexed in a KV bucket.

``push`` validates a module and its manifest, signs them with the publisher's key, records the entry with
a KV *create* (atomic: a version held by a validly signed entry is refused, whoever pushes it, whenever),
then uploads the module. ``fetch`` reads a module back -- never more bytes than the entry's size nor more
chunks than its size allows, never through an object link -- and verifies it
(:func:`~sandbus.host.cluster.signing.verify_artifact`) before anyone sees it. ``resolve`` picks a version
with the npm-style ranges of manifest dependencies (``semantic_version.NpmSpec``) among the entries whose
signature holds (and, when asked, whose publisher is trusted). ``pull`` and ``install`` write verified files
into a directory as pairs (temporary files, then renames that never follow a link), under the directory's
lock; ``install`` brings the plugin's ``[dependencies]`` from the registry too.

Entries are read as untrusted input (:mod:`sandbus.host.cluster.entry`): in listings (``search``,
``versions``, a range) a malformed one is skipped with a warning; asked for by name and version, it is
an :class:`~sandbus.sdk.errors.InvalidArtifactError`. Anyone who may write the buckets can write entries
without a publisher's key: ``search`` does not list them, ``resolve`` never chooses them, ``push`` replaces them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import semantic_version

from sandbus.host.cluster.buckets import ensure_registry, jetstream_error
from sandbus.host.cluster.entry import (
    ENTRY_FORMAT,
    MAX_ARTIFACT_BYTES,
    MAX_ENTRY_BYTES,
    MAX_MANIFEST_BYTES,
    RegistryEntry,
    decode_entry,
    now_rfc3339,
    sha256_hex,
)
from sandbus.host.cluster.names import (
    ARTIFACTS_BUCKET,
    REGISTRY_BUCKET,
    PluginRef,
    check_name,
    check_range,
    check_version,
    object_name,
    parse_ref,
    registry_key,
    version_filter,
)
from sandbus.host.cluster.plugin_files import installed_version, locked, open_directory, write_pair
from sandbus.host.cluster.signing import (
    PublisherKey,
    check_signature,
    sign_artifact,
    verify_artifact,
    verify_entry,
)
from sandbus.sdk.errors import (
    ArtifactNotFoundError,
    DependencyError,
    InvalidArtifactError,
    ManifestError,
    RegistryError,
    SandbusError,
    SecurityViolationError,
    SignatureError,
    UntrustedPublisherError,
    VersionExistsError,
)

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue
    from nats.js.object_store import ObjectStore

    from sandbus.host.lifecycle.manifest import Manifest

__all__ = ["INSTALL_MAX_PLUGINS", "InstallReport", "PluginSummary", "Registry"]

log = logging.getLogger("sandbus.registry")

#: Most plugins one ``install`` brings (the plugin and everything it depends on, transitively).
INSTALL_MAX_PLUGINS = 64
#: Most entries one listing reads; a bucket with more is listed up to here, with a warning.
MAX_LISTED_ENTRIES = 100_000
#: Most bytes of entries one listing reads (what a listing may hold in memory).
MAX_LISTED_BYTES = 256 * 1024 * 1024
#: Most warnings about malformed entries one listing logs (then one line with the count).
MAX_ENTRY_WARNINGS = 10
#: Largest object metadata message read (nats-py's object info JSON is a few hundred bytes).
MAX_OBJECT_META_BYTES = 16 * 1024
#: Seconds to wait for the next message of a listing or chunk of an object (an object's read is bounded by
#: the entry's size).
CHUNK_TIMEOUT_S = 10.0
#: Smallest average chunk an object may be stored in. nats-py and the Go client write 128 KiB chunks; the
#: bound caps how many messages one read takes (a 64 MiB module: 65536), whatever its metadata says.
MIN_CHUNK_BYTES = 1024
_NUID_RE = re.compile(r"[A-Za-z0-9]{1,64}")
_WASM_MAGIC = b"\0asm"


@dataclass(frozen=True, slots=True)
class PluginSummary:
    """One plugin as ``search`` lists it: its versions (ascending) and its highest version's facts."""

    name: str
    versions: tuple[str, ...]
    latest: RegistryEntry

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "versions": list(self.versions), "description": self.latest.description,
                "tags": list(self.latest.tags), "publisher": self.latest.publisher, "size": self.latest.size,
                "latest": self.latest.version, "published_at": self.latest.published_at}


@dataclass(slots=True)
class InstallReport:
    """What ``install`` did: ``installed`` entries written (dependencies first, the plugin last), ``kept``
    dependencies already in the directory at a version that satisfies the range (name -> version),
    ``skipped_optional`` optional dependencies the registry does not have (name -> why)."""

    installed: list[RegistryEntry] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)
    skipped_optional: dict[str, str] = field(default_factory=dict)


def _semver(version: str) -> semantic_version.Version:
    return semantic_version.Version(version)


def _highest(entries: list[RegistryEntry]) -> RegistryEntry:
    """The highest release, or the highest pre-release when there is no release."""
    releases = [e for e in entries if not _semver(e.version).prerelease]
    return max(releases or entries, key=lambda e: _semver(e.version))


def _select(entries: list[RegistryEntry], spec: semantic_version.NpmSpec | None) -> RegistryEntry | None:
    """The entry ``spec`` picks (no spec: :func:`_highest`), or None."""
    if not entries:
        return None
    if spec is None:
        return _highest(entries)
    by_version = {_semver(e.version): e for e in entries}
    chosen = spec.select(by_version)
    return None if chosen is None else by_version[chosen]


def _later_format(value: bytes) -> bool:
    """Whether ``value`` is an entry of a later format than this version of sandbus reads: it cannot be judged
    here, so it is never taken for a value nobody signed."""
    if len(value) > MAX_ENTRY_BYTES:
        return False
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and type(data.get("format")) is int and data["format"] > ENTRY_FORMAT


def _exact_version(version_range: str) -> str | None:
    """The version an exact range (``1.2.3``, ``=1.2.3``) names, else None."""
    try:
        return check_version(version_range.strip().removeprefix("=").strip())
    except InvalidArtifactError:
        return None


def _validate_push(wasm: bytes, manifest_bytes: bytes, source: str) -> Manifest:
    from sandbus.host.lifecycle.manifest import parse_manifest

    if not 0 < len(wasm) <= MAX_ARTIFACT_BYTES:
        raise InvalidArtifactError(f"the module is {len(wasm)} bytes: it must be 1 to {MAX_ARTIFACT_BYTES} bytes")
    if not wasm.startswith(_WASM_MAGIC):
        raise InvalidArtifactError("the module is not WebAssembly (no \\0asm header)")
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise InvalidArtifactError(f"the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        text = manifest_bytes.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArtifactError(f"{source}: the manifest is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        manifest = parse_manifest(text, source=source)
    except ManifestError as e:
        raise InvalidArtifactError(f"the manifest is invalid: {e}", path=source) from None
    check_version(manifest.plugin.version)
    try:
        manifest.verify_wasm(wasm)
    except SecurityViolationError as e:
        raise InvalidArtifactError(f"{e.message}: push the module the manifest vouches for") from None
    return manifest


class Registry:
    """The registry on one NATS connection. Open it with :meth:`open`.

    Parameters:
        js: the connection's JetStream context.
        kv: the ``sandbus-registry`` index.
        objects: the ``sandbus-artifacts`` object store.
    """

    def __init__(self, js: JetStreamContext, kv: KeyValue, objects: ObjectStore) -> None:
        self._js = js
        self._kv = kv
        self._objects = objects

    @classmethod
    async def open(cls, nc: NatsClient, *, replicas: int | None = None) -> Registry:
        """Bind (or create) the registry's buckets on ``nc``.

        Raises:
            BusError: JetStream is not enabled, or refused.
        """
        js = nc.jetstream()
        kv, objects = await ensure_registry(js, replicas)
        return cls(js, kv, objects)

    # -- publishing ---------------------------------------------------------------------------------

    async def push(self, wasm: bytes, manifest: bytes, key: PublisherKey, *, source: str = "manifest") -> RegistryEntry:
        """Publish ``wasm`` with its ``manifest`` (the TOML bytes) as ``name@version`` from the manifest.

        The entry is created first -- the atomic claim on the version, so a module of a published version is
        never overwritten by a later push -- then the module is uploaded; a reader in between gets
        ``registry.not_found`` for the module. Pushing the same signed artifact again (same module, manifest
        and publisher) when its upload never finished completes it; a value under the key that no one
        validly signed does not hold the version (:meth:`_claim`).

        Raises:
            InvalidArtifactError: the module or manifest does not pass (size, not wasm, invalid manifest, a
                version with build metadata, a ``[plugin] sha256`` the module does not match).
            VersionExistsError: that version is published already (versions are immutable).
            BusError: JetStream failed; the entry is withdrawn again when the upload fails.
        """
        parsed = _validate_push(wasm, manifest, source)
        name, version = parsed.name, parsed.plugin.version
        entry = RegistryEntry(
            name=name, version=version, description=parsed.plugin.description, tags=parsed.metadata.tags,
            publisher=key.public_key, signature=sign_artifact(key, name, version, wasm, manifest),
            sha256=sha256_hex(wasm), size=len(wasm), manifest=manifest.decode("utf-8"),
            manifest_sha256=sha256_hex(manifest), object=object_name(name, version), published_at=now_rfc3339())
        verify_artifact(entry, wasm, None)  # what nodes will check, checked before anything is stored
        try:
            revision = await self._claim(entry)
        except SandbusError:
            raise
        except Exception as e:
            raise jetstream_error(e, f"cannot publish {entry.ref}") from e
        try:
            await self._objects.put(entry.object, wasm)
        except Exception as e:
            with contextlib.suppress(Exception):
                await self._kv.delete(entry.key, last=revision)
            raise jetstream_error(e, f"cannot upload {entry.ref}; the entry was withdrawn") from e
        return dataclasses.replace(entry, revision=revision)

    async def _claim(self, entry: RegistryEntry) -> int:
        """Record ``entry`` under its key; its revision.

        A version belongs to the first *validly signed* entry under its key. What else may be there: a
        value nobody signed (anyone who may write the bucket can write one, say to squat versions before
        they are published) is replaced; the same signed artifact whose module never arrived (a push that
        stopped half way) is rewritten, so that its upload is finished with the entry as its publisher made it.

        Raises:
            VersionExistsError: a validly signed entry holds the version (and its module is there, or it is
                another artifact).
        """
        import nats.js.errors

        for _ in range(3):  # a key deleted or rewritten between the calls below: claim it again
            try:
                return await self._kv.create(entry.key, entry.to_json())
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                found = await self._kv.get(entry.key)
            except nats.js.errors.KeyNotFoundError:
                continue
            revision = found.revision or 0
            value = found.value or b""
            try:
                existing = decode_entry(value, key=entry.key, revision=revision)
                check_signature(existing, None)
            except (InvalidArtifactError, SignatureError):
                existing = None
            taken = _later_format(value) or (existing is not None and (
                existing.signature != entry.signature or not await self._missing(existing)))
            if taken:
                raise VersionExistsError(
                    f"{entry.ref} is already published: versions are immutable, push a new version",
                    plugin=entry.name, version=entry.version)
            try:
                return await self._kv.update(entry.key, entry.to_json(), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
        raise VersionExistsError(f"{entry.ref} is being written by someone else at the same time; refused",
                                 plugin=entry.name, version=entry.version)

    async def _missing(self, entry: RegistryEntry) -> bool:
        """Whether ``entry``'s module is absent from the object store (or its metadata unreadable)."""
        try:
            await self._object_meta(entry)
        except (ArtifactNotFoundError, SignatureError):
            return True
        return False

    # -- reading the index ------------------------------------------------------------------------------

    async def get(self, name: str, version: str) -> RegistryEntry:
        """The entry of ``name@version``.

        Raises:
            ArtifactNotFoundError: no such version (the message lists the versions there are).
            InvalidArtifactError: the entry is malformed.
        """
        import nats.js.errors

        key = registry_key(name, version)
        try:
            found = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            found = None
        except Exception as e:
            raise jetstream_error(e, f"cannot read the registry entry {name}@{version}") from e
        if found is None or found.value is None:
            raise await self._not_found(name, f"no version {version}")
        return decode_entry(found.value, key=key, revision=found.revision or 0)

    async def entries(self, name: str | None = None, *, complete: bool = False) -> AsyncIterator[RegistryEntry]:
        """Every well-formed entry (of ``name`` only, when given), in the order the bucket keeps them.

        A malformed entry is skipped with a warning (at most :data:`MAX_ENTRY_WARNINGS` lines, then a count).
        A listing reads at most :data:`MAX_LISTED_ENTRIES` values and :data:`MAX_LISTED_BYTES`; past that it
        stops with a warning, or, when ``complete`` is asked for (a version is to be chosen from it: choosing
        from part of them could pick an older one), raises :class:`~sandbus.sdk.errors.RegistryError`.
        """
        keys = version_filter(name) if name is not None else ">"
        prefix = f"$KV.{REGISTRY_BUCKET}."
        skipped = seen = read = 0
        try:
            async with contextlib.aclosing(_messages(self._js, prefix + keys, f"KV_{REGISTRY_BUCKET}",
                                                     last_per_subject=True)) as messages:
                async for msg in messages:
                    seen += 1
                    read += len(msg.data)
                    if seen > MAX_LISTED_ENTRIES or read > MAX_LISTED_BYTES:
                        what = (f"the registry holds more than {MAX_LISTED_ENTRIES} entries or "
                                f"{MAX_LISTED_BYTES // 2**20} MiB" + (f" for {name}" if name else ""))
                        if complete:
                            raise RegistryError(f"{what}: refused to choose a version from part of them",
                                                plugin=name)
                        log.warning("%s: listed the first ones", what)
                        break
                    headers = msg.headers or {}
                    if "KV-Operation" in headers or "Nats-Marker-Reason" in headers:
                        continue  # a deleted or purged key
                    try:
                        entry = decode_entry(msg.data, key=msg.subject.removeprefix(prefix),
                                             revision=msg.metadata.sequence.stream)
                    except InvalidArtifactError as e:
                        skipped += 1
                        if skipped <= MAX_ENTRY_WARNINGS:
                            log.warning("skipping a malformed %s", e.message[:300])
                        continue
                    yield entry
        except SandbusError:
            raise
        except Exception as e:
            raise jetstream_error(e, "cannot list the registry") from e
        finally:
            if skipped > MAX_ENTRY_WARNINGS:
                log.warning("skipped %d malformed registry entries in all", skipped)

    async def versions(self, name: str) -> list[RegistryEntry]:
        """Every well-formed entry of ``name``, lowest version first (empty: no such plugin).

        Raises:
            RegistryError: more entries than a listing reads (:meth:`entries`).
        """
        check_name(name)
        found = [e async for e in self.entries(name, complete=True)]
        return sorted(found, key=lambda e: _semver(e.version))

    async def search(self, text: str | None = None) -> list[PluginSummary]:
        """Plugins whose name, description or tags contain ``text`` (case-insensitive; every plugin when
        ``text`` is empty or None), by name. A plugin matches when any of its versions does."""
        needle = (text or "").casefold()
        # Per plugin: its versions and its best entry so far (not every entry: listings stay small however many
        # versions, and manifests, the bucket holds).
        versions: dict[str, list[str]] = {}
        best: dict[str, RegistryEntry] = {}
        matched: set[str] = set()
        refused = 0
        async for entry in self.entries():
            try:  # what a listing shows is what a publisher signed: a forged or edited entry is not listed
                verify_entry(entry, None)
            except SecurityViolationError as e:
                refused += 1
                if refused <= MAX_ENTRY_WARNINGS:
                    log.warning("not listing %s", e.message[:300])
                continue
            versions.setdefault(entry.name, []).append(entry.version)
            current = best.get(entry.name)
            if current is None or _highest([current, entry]) is entry:
                best[entry.name] = entry
            if not needle or needle in entry.name.casefold() or needle in entry.description.casefold() or any(
                    needle in t.casefold() for t in entry.tags):
                matched.add(entry.name)
        if refused > MAX_ENTRY_WARNINGS:
            log.warning("did not list %d registry entries whose signature does not hold", refused)
        return [PluginSummary(name, tuple(sorted(versions[name], key=_semver)), best[name])
                for name in sorted(matched)]

    async def _not_found(self, name: str, what: str) -> ArtifactNotFoundError:
        versions = [e.version for e in await self.versions(name)]
        if not versions:
            return ArtifactNotFoundError("no such plugin in the registry", plugin=name)
        return ArtifactNotFoundError(f"{what}; the registry has {', '.join(versions)}", plugin=name,
                                     versions=versions)

    async def resolve(self, name: str, version_range: str | None = None, *,
                      trusted: Collection[str] | None = None) -> RegistryEntry:
        """The entry ``name@version_range`` means: the highest version in the range (an exact version is that
        entry); no range: the highest release (the highest pre-release when there is no release).

        Only entries whose signature holds (and, with ``trusted``, by a trusted publisher) are candidates: an
        entry written without the publisher's key -- or, with ``trusted``, pushed by anyone else -- never
        shadows the versions that are there. The chosen entry is then verified in full
        (:func:`~sandbus.host.cluster.signing.verify_entry`).

        Raises:
            ArtifactNotFoundError: no such plugin, or no version in the range (the message lists them).
            InvalidArtifactError: a malformed name or range, or the exact version asked for is malformed.
            SignatureError / UntrustedPublisherError: the exact version asked for, or the only entries in the
                range, do not pass.
        """
        check_name(name)
        spec = None
        if version_range is not None:
            spec = check_range(version_range)
            exact = _exact_version(version_range)
            if exact is not None:
                entry = await self.get(name, exact)
                verify_entry(entry, trusted)
                return entry
        entries = await self.versions(name)
        if not entries:
            raise ArtifactNotFoundError("no such plugin in the registry", plugin=name)
        usable: list[RegistryEntry] = []
        refused: dict[str, SecurityViolationError] = {}
        for entry in entries:
            try:
                check_signature(entry, trusted)
            except (SignatureError, UntrustedPublisherError) as e:
                refused[entry.version] = e
                continue
            usable.append(entry)
        chosen = _select(usable, spec)
        if chosen is not None:
            verify_entry(chosen, trusted)
            return chosen
        blocked = _select([e for e in entries if e.version in refused], spec)
        if blocked is not None:  # the range holds versions, none that may be used: say why, not "none"
            raise refused[blocked.version]
        listed = ", ".join(e.version for e in entries)
        raise ArtifactNotFoundError(f"no version matches {version_range!r}; the registry has {listed}",
                                    plugin=name, range=version_range, versions=[e.version for e in entries])

    # -- reading artifacts ------------------------------------------------------------------------------

    async def _object_meta(self, entry: RegistryEntry) -> dict[str, Any]:
        import base64

        import nats.js.errors

        meta_subject = f"$O.{ARTIFACTS_BUCKET}.M.{base64.urlsafe_b64encode(entry.object.encode()).decode()}"
        try:
            msg = await self._js.get_last_msg(f"OBJ_{ARTIFACTS_BUCKET}", meta_subject)
        except nats.js.errors.NotFoundError:
            raise ArtifactNotFoundError(f"{entry.ref}: the module {entry.object} is not in the object store "
                                        "(an upload that never finished?)", plugin=entry.name) from None
        except Exception as e:
            raise jetstream_error(e, f"cannot read {entry.ref}") from e
        data = msg.data or b""
        if len(data) > MAX_OBJECT_META_BYTES:
            raise SignatureError(f"{entry.ref}: the object's metadata is {len(data)} bytes; refused",
                                 plugin=entry.name)
        try:
            meta = orjson.loads(data)
        except orjson.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict) or meta.get("deleted") is True:
            raise ArtifactNotFoundError(f"{entry.ref}: the module {entry.object} was deleted from the object store",
                                        plugin=entry.name)
        return meta

    async def fetch(self, entry: RegistryEntry, trusted: Collection[str] | None = None) -> bytes:
        """The module of ``entry``, verified (:func:`~sandbus.host.cluster.signing.verify_artifact` with
        ``trusted``). Never reads more than ``entry.size`` bytes plus one chunk, nor more chunks than its
        metadata says (at most one per :data:`MIN_CHUNK_BYTES`), and never follows an object link (to another
        object or bucket).

        Raises:
            ArtifactNotFoundError: the object is missing or deleted.
            SignatureError: the object is larger or smaller than the entry says, in more or empty chunks, a
                link, or its digest or signature does not hold.
            UntrustedPublisherError: the publisher is not in ``trusted``.
        """
        return (await self._fetch_verified(entry, trusted))[0]

    async def _fetch_verified(self, entry: RegistryEntry,
                              trusted: Collection[str] | None) -> tuple[bytes, Manifest]:
        """:meth:`fetch`, and the verified manifest."""
        meta = await self._object_meta(entry)
        options = meta.get("options")
        if isinstance(options, dict) and options.get("link"):
            raise SignatureError(f"{entry.ref}: the object is a link to another object; refused", plugin=entry.name)
        size, nuid, count = meta.get("size"), meta.get("nuid"), meta.get("chunks")
        if type(size) is not int or size != entry.size:
            raise SignatureError(f"{entry.ref}: the stored object is {str(size)[:30]} bytes, the signed entry says "
                                 f"{entry.size}; refused", plugin=entry.name, expected=entry.size)
        if not isinstance(nuid, str) or not _NUID_RE.fullmatch(nuid):
            raise SignatureError(f"{entry.ref}: the object's metadata is malformed; refused", plugin=entry.name)
        most = -(-entry.size // MIN_CHUNK_BYTES)
        if type(count) is not int or not 1 <= count <= most:
            raise SignatureError(f"{entry.ref}: the object's metadata says {str(count)[:30]} chunks for "
                                 f"{entry.size} bytes (1 to {most}); refused", plugin=entry.name)
        data = await self._read_chunks(entry, nuid, count)
        return data, verify_artifact(entry, data, trusted)

    async def _read_chunks(self, entry: RegistryEntry, nuid: str, count: int) -> bytes:
        """The object's ``count`` chunks: never more bytes than the entry's size, never more messages than
        ``count``, never an empty chunk (which would make a read of any length carry no bytes)."""
        buf = bytearray()
        read = 0
        try:
            async with contextlib.aclosing(_messages(self._js, f"$O.{ARTIFACTS_BUCKET}.C.{nuid}",
                                                     f"OBJ_{ARTIFACTS_BUCKET}")) as chunks:
                async for msg in chunks:
                    read += 1
                    if len(buf) + len(msg.data) > entry.size:
                        raise SignatureError(f"{entry.ref}: the stored object is larger than the {entry.size} "
                                             "bytes the signed entry says; refused (read no further)",
                                             plugin=entry.name, expected=entry.size)
                    if read > count or not msg.data:
                        raise SignatureError(f"{entry.ref}: the stored object is not in the {count} chunks its "
                                             "metadata says; refused (read no further)", plugin=entry.name)
                    buf += msg.data
        except SandbusError:
            raise
        except Exception as e:
            raise jetstream_error(e, f"cannot read {entry.ref}") from e
        if len(buf) < entry.size:
            raise SignatureError(f"{entry.ref}: the object ends after {len(buf)} of {entry.size} bytes; refused",
                                 plugin=entry.name, expected=entry.size)
        return bytes(buf)

    async def pull(self, ref: str | PluginRef, trusted: Collection[str] | None = None) -> tuple[RegistryEntry, bytes]:
        """Resolve ``ref`` (``name`` or ``name@range``) among the entries of ``trusted`` publishers (any
        validly signed one when None) and fetch its module, verified."""
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        entry = await self.resolve(parsed.name, parsed.range, trusted=trusted)
        return entry, await self.fetch(entry, trusted)

    async def install(self, ref: str | PluginRef, directory: Path,
                      trusted: Collection[str] | None = None) -> InstallReport:
        """Install ``ref`` and its ``[dependencies]`` into the plugin ``directory`` (created if missing).

        A dependency already in the directory at a version its range allows is kept; otherwise it is resolved
        in the registry (the highest version in the range, among ``trusted`` publishers' when given). Each
        plugin is fetched and verified before its manifest is read for dependencies, and everything before
        anything is written; then each plugin's two files are written, dependencies first, while holding the
        directory's lock (:func:`~sandbus.host.cluster.plugin_files.write_plugin`).

        Raises:
            ArtifactNotFoundError / InvalidArtifactError: as :meth:`resolve`.
            DependencyError: a required dependency the registry cannot satisfy, two ranges for one plugin that
                no one version meets, or more than :data:`INSTALL_MAX_PLUGINS` plugins.
            SignatureError / UntrustedPublisherError: as :meth:`fetch`, for any of them.
            InvalidArtifactError: the directory cannot be written.
        """
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        dfd = open_directory(Path(directory))
        try:
            report = InstallReport()
            root = await self.resolve(parsed.name, parsed.range, trusted=trusted)
            chosen: dict[str, RegistryEntry] = {root.name: root}
            modules: list[tuple[RegistryEntry, bytes]] = []
            todo = [root]
            while todo:
                entry = todo.pop(0)
                wasm, manifest = await self._fetch_verified(entry, trusted)  # a signed manifest's dependencies only
                modules.append((entry, wasm))
                for dep, spec in manifest.dependencies.items():
                    if dep in chosen:
                        if not spec.allows(chosen[dep].version):
                            raise DependencyError(
                                f"{entry.ref} requires {dep} {spec.version}, but {chosen[dep].ref} is needed by "
                                "another plugin being installed", plugin=entry.name, dependency=dep)
                        continue
                    if dep in report.kept or dep in report.skipped_optional:
                        continue
                    local = installed_version(dfd, dep)
                    if local is not None and spec.allows(local):
                        report.kept[dep] = local
                        continue
                    try:
                        found = await self.resolve(dep, spec.version, trusted=trusted)
                    except (ArtifactNotFoundError, SecurityViolationError) as e:
                        if spec.optional:  # missing, or only there forged or by others: left out, saying why
                            report.skipped_optional[dep] = e.message
                            continue
                        if isinstance(e, SecurityViolationError):
                            raise
                        raise DependencyError(f"{entry.ref} requires {dep} {spec.version}: {e.message}",
                                              plugin=entry.name, dependency=dep, required=spec.version) from None
                    if len(chosen) >= INSTALL_MAX_PLUGINS:
                        raise DependencyError(f"installing {root.ref} would bring more than {INSTALL_MAX_PLUGINS} "
                                              "plugins; refused", plugin=root.name)
                    chosen[dep] = found
                    todo.append(found)
            with locked(dfd, Path(directory)):
                for entry, wasm in reversed(modules):
                    write_pair(dfd, entry, wasm)
                    report.installed.append(entry)
            return report
        finally:
            os.close(dfd)


async def _messages(js: JetStreamContext, subject: str, stream: str, *,
                    last_per_subject: bool = False) -> AsyncGenerator[Msg, None]:
    """The messages of ``stream`` on ``subject`` (the last of each subject only, when ``last_per_subject``)
    through an ordered consumer, up to the last one there was when it started (more written meanwhile are
    read too, until none is pending). Each message must arrive within :data:`CHUNK_TIMEOUT_S`.

    How many there are comes from the server's consumer info (delivered + pending), not from what this
    client has processed yet: nats-py's KV watcher decides "no entries" from the latter, and can end a
    listing before its first entry arrives.
    """
    from nats.js.api import DeliverPolicy

    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.LAST_PER_SUBJECT if last_per_subject else None)
    try:
        info = await sub.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        if (info.num_pending or 0) + delivered == 0:
            return
        while True:
            msg = await sub.next_msg(timeout=CHUNK_TIMEOUT_S)
            yield msg
            if msg.metadata.num_pending == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
