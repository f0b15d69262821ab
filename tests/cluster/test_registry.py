"""The registry against a real JetStream server: push, search, resolve, fetch, install, and what a hostile
member of the account can write into its buckets."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NATS

from sandbus.host.cluster.entry import MAX_ENTRY_BYTES, RegistryEntry
from sandbus.host.cluster.keys import PublisherKey, keygen
from sandbus.host.cluster.names import ARTIFACTS_BUCKET, REGISTRY_BUCKET
from sandbus.host.cluster.registry import Registry
from sandbus.host.cluster.signing import sign_artifact
from sandbus.host.lifecycle.loader import MAX_MODULE_FILE_BYTES
from sandbus.sdk.errors import (
    ArtifactNotFoundError,
    DependencyError,
    InvalidArtifactError,
    SignatureError,
    UntrustedPublisherError,
    VersionExistsError,
)
from tests.cluster.conftest import PushFn, manifest_of


async def test_push_then_pull_round_trips_byte_exact(registry: Registry, push: PushFn, plugins_dir: Path,
                                                     publisher: PublisherKey) -> None:
    pushed = await push("text_processor", "1.0.0", source="text_processor")
    entry, wasm = await registry.pull("text_processor", {publisher.public_key})
    assert wasm == (plugins_dir / "text_processor.wasm").read_bytes()
    assert entry.manifest.encode() == manifest_of(plugins_dir, "text_processor")
    assert (entry.publisher, entry.size, entry.object) == (publisher.public_key, len(wasm),
                                                           "text_processor/1.0.0.wasm")
    assert entry.revision == pushed.revision > 0
    assert entry.description.startswith("Processes text")
    assert entry.tags == ("text", "example")


async def test_a_version_is_published_once(push: PushFn) -> None:
    await push("echo", "1.0.0")
    with pytest.raises(VersionExistsError, match="already published"):
        await push("echo", "1.0.0")
    with pytest.raises(VersionExistsError):
        await push("echo", "1.0.0", source="text_processor")  # other bytes: still refused


async def test_concurrent_pushes_of_one_version_leave_exactly_one_winner(registry: Registry, push: PushFn,
                                                                         plugins_dir: Path) -> None:
    results = await asyncio.gather(*(push("echo", "3.0.0", source=src) for src in ("echo", "text_processor")),
                                   return_exceptions=True)
    assert sorted(type(r).__name__ for r in results) == ["RegistryEntry", "VersionExistsError"]
    winner = next(r for r in results if isinstance(r, RegistryEntry))
    _, wasm = await registry.pull("echo@3.0.0")
    assert wasm == (plugins_dir / f"{'echo' if winner.size < 1000 else 'text_processor'}.wasm").read_bytes()


async def test_a_version_with_build_metadata_is_refused_saying_why(push: PushFn) -> None:
    with pytest.raises(InvalidArtifactError, match=r"build metadata.*cannot be part of a registry key"):
        await push("echo", "1.0.0+build.7")


async def test_a_push_whose_upload_never_finished_can_be_finished_but_not_replaced(
        nc: NATS, registry: Registry, push: PushFn) -> None:
    entry = await push("echo", "1.0.0")
    obs = await nc.jetstream().object_store(ARTIFACTS_BUCKET)
    await obs.delete(entry.object)
    with pytest.raises(ArtifactNotFoundError, match=r"not in the object store|deleted"):
        await registry.pull("echo")
    with pytest.raises(VersionExistsError):
        await push("echo", "1.0.0", source="text_processor")
    await push("echo", "1.0.0")  # the same signed artifact: its upload is finished
    await registry.pull("echo")


async def test_search_matches_name_description_and_tags_and_sorts_versions_by_semver(
        registry: Registry, push: PushFn) -> None:
    for version in ("1.10.0", "1.2.0", "1.9.0"):
        await push("echo", version)
    await push("text_processor", "0.1.0", source="text_processor")
    assert [s.name for s in await registry.search("ECHO")] == ["echo"]  # name (and a tag)
    assert [s.name for s in await registry.search("text DATA")] == ["text_processor"]  # description
    assert [s.name for s in await registry.search("Example")] == ["echo", "text_processor"]  # tags
    assert await registry.search("nothing like it") == []
    everything = await registry.search()
    assert [(s.name, s.versions, s.latest.version) for s in everything] == [
        ("echo", ("1.2.0", "1.9.0", "1.10.0"), "1.10.0"), ("text_processor", ("0.1.0",), "0.1.0")]


async def test_resolve_picks_the_highest_match_and_says_which_versions_exist(registry: Registry,
                                                                             push: PushFn) -> None:
    for version in ("0.9.0", "1.2.0", "1.3.5", "2.0.0", "2.1.0-rc.1"):
        await push("echo", version)
    assert (await registry.resolve("echo", "^1.2")).version == "1.3.5"
    assert (await registry.resolve("echo", "~1.2")).version == "1.2.0"
    assert (await registry.resolve("echo", "1.2.0")).version == "1.2.0"
    assert (await registry.resolve("echo")).version == "2.0.0"  # the highest release
    with pytest.raises(ArtifactNotFoundError, match=r"no version matches '\^3'; the registry has 0.9.0, 1.2.0, "
                                                    r"1.3.5, 2.0.0, 2.1.0-rc.1"):
        await registry.resolve("echo", "^3")
    with pytest.raises(ArtifactNotFoundError, match=r"no version 4.0.0; the registry has"):
        await registry.resolve("echo", "4.0.0")
    with pytest.raises(ArtifactNotFoundError, match="no such plugin") as err:
        await registry.resolve("greeter", "^1")
    assert err.value.plugin == "greeter"
    for bad in ("../echo", "echo.*", ">"):
        with pytest.raises(InvalidArtifactError, match="not a plugin name"):
            await registry.resolve(bad)
    with pytest.raises(InvalidArtifactError, match="not a version range"):
        await registry.resolve("echo", "^1; rm -rf")


# -- attacks on the buckets ---------------------------------------------------------------------------------

async def _rewrite(nc: NATS, entry: RegistryEntry, **changes: object) -> None:
    """Write the entry back with ``changes``, as anyone who may write the bucket can."""
    data = orjson.loads(entry.to_json())
    data.update(changes)
    kv = await nc.jetstream().key_value(REGISTRY_BUCKET)
    await kv.put(entry.key, orjson.dumps(data))


async def test_bytes_replaced_in_the_object_store_are_refused(nc: NATS, registry: Registry, push: PushFn) -> None:
    entry = await push("echo", "1.0.0")
    obs = await nc.jetstream().object_store(ARTIFACTS_BUCKET)
    original = (await obs.get(entry.object)).data or b""
    await obs.put(entry.object, original[:-1] + bytes([original[-1] ^ 0xFF]))  # same size, other bytes
    with pytest.raises(SignatureError, match=r"sha256.*replaced"):
        await registry.pull("echo")
    await obs.put(entry.object, original + b"\0" * 64)
    with pytest.raises(SignatureError, match="the stored object is 497 bytes"):
        await registry.pull("echo")


async def _forge_object(nc: NATS, name: str, nuid: str, chunks: list[bytes], *, size: int,
                        link: bool = False, count: int | None = None) -> None:
    """Write an object's chunks and a metadata message saying whatever we like (``count``: the chunk count it
    claims, by default the true one), with plain JetStream publishes."""
    js = nc.jetstream()
    for chunk in chunks:
        await js.publish(f"$O.{ARTIFACTS_BUCKET}.C.{nuid}", chunk)
    meta: dict[str, object] = {"name": name, "bucket": ARTIFACTS_BUCKET, "nuid": nuid, "size": size,
                               "chunks": len(chunks) if count is None else count, "digest": "SHA-256=" + "A" * 43 + "="}
    if link:
        meta["options"] = {"link": {"bucket": "elsewhere", "name": "x"}}
    subject = f"$O.{ARTIFACTS_BUCKET}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
    await js.publish(subject, orjson.dumps(meta), headers={"Nats-Rollup": "sub"})


async def test_an_object_larger_than_its_entry_is_refused_reading_no_further(
        nc: NATS, registry: Registry, push: PushFn) -> None:
    entry = await push("echo", "1.0.0")
    # metadata that lies about the size, over 8 MiB of chunks: the read stops at the first byte too many
    await _forge_object(nc, entry.object, "FORGED1", [b"\0" * (1024 * 1024)] * 8, size=entry.size, count=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(SignatureError, match=r"larger than the 433 bytes.*read no further"):
        await registry.pull("echo")
    assert loop.time() - started < 5


async def test_an_object_shorter_than_its_entry_or_without_chunks_is_refused_at_once(
        nc: NATS, registry: Registry, push: PushFn) -> None:
    entry = await push("echo", "1.0.0")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await _forge_object(nc, entry.object, "FORGED3", [], size=entry.size, count=1)
    with pytest.raises(SignatureError, match="ends after 0 of 433 bytes"):
        await registry.pull("echo")
    await _forge_object(nc, entry.object, "FORGED4", [b"\0asm"], size=entry.size)
    with pytest.raises(SignatureError, match="ends after 4 of 433 bytes"):
        await registry.pull("echo")
    assert loop.time() - started < 5  # known from the server's count, not from a timeout


async def test_an_entry_claiming_a_module_above_the_loader_cap_is_refused_before_any_read(
        nc: NATS, registry: Registry, push: PushFn) -> None:
    entry = await push("echo", "1.0.0")
    await _rewrite(nc, entry, size=MAX_MODULE_FILE_BYTES + 1)
    with pytest.raises(InvalidArtifactError, match="module cap"):
        await registry.pull("echo@1.0.0")
    with pytest.raises(ArtifactNotFoundError, match="no such plugin"):  # skipped in a listing
        await registry.pull("echo")


async def test_an_object_link_is_not_followed(nc: NATS, registry: Registry, push: PushFn) -> None:
    entry = await push("echo", "1.0.0")
    await _forge_object(nc, entry.object, "FORGED2", [], size=entry.size, link=True, count=1)
    with pytest.raises(SignatureError, match="link"):
        await registry.pull("echo")


async def test_an_entry_signed_by_another_key_is_refused(nc: NATS, registry: Registry, push: PushFn,
                                                         plugins_dir: Path, tmp_path: Path) -> None:
    entry = await push("echo", "1.0.0")
    other = keygen(tmp_path / "mallory.nk")
    forged = sign_artifact(other, "echo", "1.0.0", (plugins_dir / "echo.wasm").read_bytes(), entry.manifest.encode())
    await _rewrite(nc, entry, signature=forged)
    with pytest.raises(SignatureError, match="not valid for publisher"):
        await registry.pull("echo")


async def test_an_entry_whose_manifest_was_edited_after_signing_is_refused(nc: NATS, registry: Registry,
                                                                           push: PushFn) -> None:
    entry = await push("echo", "1.0.0")
    await _rewrite(nc, entry, manifest=entry.manifest.replace("memory_mb = 16", "memory_mb = 256"))
    with pytest.raises(SignatureError, match="edited after signing"):
        await registry.pull("echo")


async def test_an_untrusted_publisher_is_refused(registry: Registry, push: PushFn, tmp_path: Path) -> None:
    await push("echo", "1.0.0")
    with pytest.raises(UntrustedPublisherError, match="not a trusted publisher"):
        await registry.pull("echo", {keygen(tmp_path / "other.nk").public_key})
    with pytest.raises(UntrustedPublisherError, match="no trusted publishers"):
        await registry.pull("echo", frozenset())


async def test_malformed_entries_are_skipped_in_listings_and_invalid_by_name(
        nc: NATS, registry: Registry, push: PushFn, caplog: pytest.LogCaptureFixture) -> None:
    good = await push("echo", "1.0.0")
    kv = await nc.jetstream().key_value(REGISTRY_BUCKET)
    await kv.put("echo.2.0.0", b"[" * 3000 + b"]" * 3000)  # deep
    await kv.put("echo.3.0.0", orjson.dumps({**orjson.loads(good.to_json()), "version": "3.0.0", "size": "433"}))
    await kv.put("echo.4.0.0", b"\xff not json")
    await kv.put("echo.5.0.0", good.to_json())  # a valid entry under another version's key
    with caplog.at_level(logging.WARNING, logger="sandbus.registry"):
        assert [e.version for e in await registry.versions("echo")] == ["1.0.0"]
        assert [s.versions for s in await registry.search("echo")] == [("1.0.0",)]
        assert (await registry.resolve("echo", ">=1")).version == "1.0.0"
    assert sum("skipping a malformed" in r.getMessage() for r in caplog.records) >= 4
    for version, needle in (("2.0.0", "not JSON"), ("3.0.0", "'size' must be an integer"),
                            ("4.0.0", "not JSON"), ("5.0.0", "not what its key says")):
        with pytest.raises(InvalidArtifactError, match=needle):
            await registry.resolve("echo", version)


async def test_a_huge_entry_in_a_bucket_made_by_someone_else_is_refused_unread(
        nc: NATS, plugins_dir: Path, publisher: PublisherKey) -> None:
    js = nc.jetstream()
    kv = await js.create_key_value(bucket=REGISTRY_BUCKET, history=1)  # no value size cap on the server
    await kv.put("echo.9.0.0", b" " * (MAX_ENTRY_BYTES + 1))
    registry = await Registry.open(nc)  # binds the bucket that is there
    with pytest.raises(InvalidArtifactError, match="above the"):
        await registry.get("echo", "9.0.0")
    wasm = (plugins_dir / "echo.wasm").read_bytes()
    await registry.push(wasm, manifest_of(plugins_dir, "echo"), publisher)
    assert [e.version for e in await registry.versions("echo")] == ["1.0.0"]


# -- install ------------------------------------------------------------------------------------------------

async def test_install_brings_dependencies_from_the_registry_first(registry: Registry, push: PushFn,
                                                                   plugins_dir: Path, tmp_path: Path) -> None:
    for version in ("1.0.0", "1.1.0", "2.0.0"):
        await push("echo", version)
    await push("app", "1.0.0", source="text_processor", extra='[dependencies]\necho = "^1.0"\n')
    report = await registry.install("app", tmp_path / "plugins")
    assert [e.ref for e in report.installed] == ["echo@1.1.0", "app@1.0.0"]
    d = tmp_path / "plugins"
    assert (d / "echo.wasm").read_bytes() == (plugins_dir / "echo.wasm").read_bytes()
    assert (d / "app.wasm").read_bytes() == (plugins_dir / "text_processor.wasm").read_bytes()
    assert 'version = "1.1.0"' in (d / "echo.toml").read_text()
    assert sorted(p.name for p in d.iterdir()) == ["app.toml", "app.wasm", "echo.toml", "echo.wasm"]  # no temp


async def test_install_keeps_a_dependency_already_there_at_a_version_in_range(
        registry: Registry, push: PushFn, plugins_dir: Path, tmp_path: Path) -> None:
    await push("echo", "1.5.0")
    await push("app", "1.0.0", source="text_processor", extra='[dependencies]\necho = "^1.0"\n')
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "echo.wasm").write_bytes((plugins_dir / "echo.wasm").read_bytes())
    (d / "echo.toml").write_bytes(manifest_of(plugins_dir, "echo", version="1.0.0"))
    report = await registry.install("app@^1", d)
    assert report.kept == {"echo": "1.0.0"}
    assert [e.ref for e in report.installed] == ["app@1.0.0"]
    assert 'version = "1.0.0"' in (d / "echo.toml").read_text()


async def test_install_of_a_dependency_cycle_ends(registry: Registry, push: PushFn, tmp_path: Path) -> None:
    await push("ping", "1.0.0", extra='[dependencies]\npong = "^1"\n')
    await push("pong", "1.0.0", extra='[dependencies]\nping = "^1"\n')
    report = await asyncio.wait_for(registry.install("ping", tmp_path / "p"), 10)
    assert sorted(e.ref for e in report.installed) == ["ping@1.0.0", "pong@1.0.0"]


async def test_install_refuses_missing_and_conflicting_dependencies_and_skips_optional_ones(
        registry: Registry, push: PushFn, tmp_path: Path) -> None:
    await push("echo", "1.0.0")
    await push("needy", "1.0.0", extra='[dependencies]\nghost = "^1"\n')
    with pytest.raises(DependencyError, match=r"needy@1.0.0 requires ghost \^1: no such plugin"):
        await registry.install("needy", tmp_path / "a")
    assert not list((tmp_path / "a").iterdir())
    await push("lib", "1.0.0", extra='[dependencies]\necho = "^2"\n')
    await push("app", "1.0.0", extra='[dependencies]\necho = "^1"\nlib = "^1"\n')
    with pytest.raises(DependencyError, match=r"lib@1.0.0 requires echo \^2"):
        await registry.install("app", tmp_path / "b")
    await push("relaxed", "1.0.0", extra='[dependencies]\nghost = { version = "^1", optional = true }\n')
    report = await registry.install("relaxed", tmp_path / "c")
    assert list(report.skipped_optional) == ["ghost"]
    assert [e.ref for e in report.installed] == ["relaxed@1.0.0"]


async def test_install_verifies_everything_before_writing_anything(nc: NATS, registry: Registry, push: PushFn,
                                                                   tmp_path: Path, publisher: PublisherKey) -> None:
    dep = await push("echo", "1.0.0")
    await push("app", "1.0.0", source="text_processor", extra='[dependencies]\necho = "^1"\n')
    await _rewrite(nc, dep, manifest=dep.manifest.replace("max_instances = 8", "max_instances = 16"))
    with pytest.raises(SignatureError):
        await registry.install("app", tmp_path / "p", {publisher.public_key})
    assert not list((tmp_path / "p").iterdir())
    with pytest.raises(UntrustedPublisherError):
        await registry.install("app", tmp_path / "q", frozenset())
    assert not list((tmp_path / "q").iterdir())


async def test_install_replaces_files_atomically_and_never_writes_through_a_link(
        registry: Registry, push: PushFn, plugins_dir: Path, tmp_path: Path) -> None:
    await push("echo", "1.0.0")
    d = tmp_path / "plugins"
    d.mkdir()
    victim = tmp_path / "outside.wasm"
    victim.write_bytes(b"do not touch")
    (d / "echo.wasm").symlink_to(victim)
    (d / "echo.toml").write_text("old manifest")
    with open(d / "echo.toml", "rb") as old:
        await registry.install("echo", d)
        assert old.read() == b"old manifest"  # the old file was replaced by a rename, not written over
    assert victim.read_bytes() == b"do not touch"
    assert not (d / "echo.wasm").is_symlink()
    assert (d / "echo.wasm").read_bytes() == (plugins_dir / "echo.wasm").read_bytes()
    assert sorted(os.listdir(d)) == ["echo.toml", "echo.wasm"]


async def test_buckets_take_as_many_replicas_as_the_servers_can_keep(nc: NATS,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbus.host.cluster import buckets

    assert buckets.default_replicas(nc) == 1  # one server, no cluster
    monkeypatch.setattr(buckets, "default_replicas", lambda _nc: 3)  # as servers advertising several addresses
    kv, objects = await buckets.ensure_registry(nc.jetstream())
    assert (await kv.status()).stream_info.config.num_replicas == 1
    assert (await objects.status()).replicas == 1
    again, _ = await buckets.ensure_registry(nc.jetstream(), replicas=1)  # binds what is there
    assert again._name == kv._name
