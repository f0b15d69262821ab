"""Attacks on the signed registry by a member of the NATS account (who may write its buckets but holds no
publisher's key), by a hostile publisher (who holds a key of their own), and by a careless user at the
command line. Each test names what must hold; each failed before the registry was hardened against it."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import fcntl
import logging
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client as NATS

from sandbus.host.cluster import plugin_files
from sandbus.host.cluster import registry as registry_module
from sandbus.host.cluster.entry import RegistryEntry, sha256_hex
from sandbus.host.cluster.keys import PublisherKey, keygen
from sandbus.host.cluster.names import ARTIFACTS_BUCKET, REGISTRY_BUCKET
from sandbus.host.cluster.registry import Registry
from sandbus.host.cluster.signing import sign_artifact, verify_artifact
from sandbus.sdk.errors import (
    ArtifactNotFoundError,
    BusError,
    InvalidArtifactError,
    RegistryError,
    SignatureError,
    UntrustedPublisherError,
    VersionExistsError,
)
from tests.cluster.conftest import PushFn, Run, manifest_of, run_nats

ROOT = Path(__file__).resolve().parents[2]


async def _put_entry(nc: NATS, key: str, data: dict[str, object] | bytes) -> None:
    """Write a registry value as any account member can: a plain KV put."""
    kv = await nc.jetstream().key_value(REGISTRY_BUCKET)
    await kv.put(key, data if isinstance(data, bytes) else orjson.dumps(data))


def _moved(entry: RegistryEntry, version: str) -> dict[str, object]:
    """``entry``'s JSON moved to another version: well formed, but its signature covers the old version."""
    data = orjson.loads(entry.to_json())
    data.update(version=version, object=f"{entry.name}/{version}.wasm")
    return data


# -- resolution: who may decide which version is chosen -------------------------------------------------------

async def test_an_entry_written_without_a_key_never_shadows_the_signed_versions(
        nc: NATS, registry: Registry, push: PushFn, plugins_dir: Path) -> None:
    await push("echo", "1.0.0")
    await _put_entry(nc, "echo.9.0.0", _moved(await registry.get("echo", "1.0.0"), "9.0.0"))
    await _put_entry(nc, "echo.1.5.0", _moved(await registry.get("echo", "1.0.0"), "1.5.0"))
    assert (await registry.resolve("echo")).version == "1.0.0"
    assert (await registry.resolve("echo", "^1")).version == "1.0.0"
    entry, wasm = await registry.pull("echo@>=1")
    assert (entry.version, wasm) == ("1.0.0", (plugins_dir / "echo.wasm").read_bytes())
    assert [s.versions for s in await registry.search("echo")] == [("1.0.0",)]  # not listed either
    with pytest.raises(SignatureError, match="not valid for publisher"):  # asked for by name: refused, saying why
        await registry.resolve("echo", "9.0.0")
    with pytest.raises(SignatureError, match="not valid for publisher"):  # the only match in the range
        await registry.resolve("echo", "^9")


async def test_with_trusted_publishers_another_publishers_higher_version_is_not_chosen(
        registry: Registry, push: PushFn, publisher: PublisherKey, tmp_path: Path) -> None:
    mallory = keygen(tmp_path / "mallory.nk")
    await push("echo", "1.0.0")
    await push("echo", "1.9.0", key=mallory)  # validly signed, by a key the operator does not trust
    await push("app", "1.0.0", source="text_processor", extra='[dependencies]\necho = "^1"\n')
    trusted = {publisher.public_key}
    entry, _ = await registry.pull("echo", trusted)
    assert entry.version == "1.0.0"
    report = await registry.install("app", tmp_path / "plugins", trusted)  # the dependency too
    assert [e.ref for e in report.installed] == ["echo@1.0.0", "app@1.0.0"]
    with pytest.raises(UntrustedPublisherError, match="not a trusted publisher"):
        await registry.pull("echo@1.9.0", trusted)
    with pytest.raises(UntrustedPublisherError, match="not a trusted publisher"):  # what matches, and why not
        await registry.pull("echo@~1.9", trusted)
    assert (await registry.resolve("echo")).version == "1.9.0"  # no trust asked for: any valid signature


async def test_a_dependency_only_another_publisher_offers_is_refused_or_left_out_if_optional(
        registry: Registry, push: PushFn, publisher: PublisherKey, tmp_path: Path) -> None:
    mallory = keygen(tmp_path / "mallory.nk")
    await push("lib", "1.0.0", key=mallory)
    await push("app", "1.0.0", extra='[dependencies]\nlib = "^1"\n')
    await push("relaxed", "1.0.0", extra='[dependencies]\nlib = { version = "^1", optional = true }\n')
    trusted = {publisher.public_key}
    with pytest.raises(UntrustedPublisherError, match=r"lib@1\.0\.0 is signed by"):
        await registry.install("app", tmp_path / "a", trusted)
    assert os.listdir(tmp_path / "a") == []
    report = await registry.install("relaxed", tmp_path / "b", trusted)
    assert "not a trusted publisher" in report.skipped_optional["lib"]
    assert [e.ref for e in report.installed] == ["relaxed@1.0.0"]


async def test_a_listing_too_long_to_read_whole_is_not_used_to_choose_a_version(
        nc: NATS, registry: Registry, push: PushFn, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    await push("echo", "1.0.0")
    for patch in range(1, 4):  # cheap values under the plugin's keys, written before its next release
        await _put_entry(nc, f"echo.1.0.{patch}", b"x")
    await push("echo", "2.0.0")
    monkeypatch.setattr(registry_module, "MAX_LISTED_ENTRIES", 4)  # as 100 000 such values would
    with pytest.raises(RegistryError, match="refused to choose a version from part of them"):
        await registry.resolve("echo")  # not 1.0.0, the newest one read before the cut
    with caplog.at_level(logging.WARNING, logger="sandbus.registry"):
        assert [s.versions for s in await registry.search()] == [("1.0.0",)]  # a listing may be partial...
    assert "listed the first ones" in caplog.text  # ...saying so


async def test_description_and_tags_edited_in_the_bucket_are_not_shown_or_accepted(
        nc: NATS, registry: Registry, push: PushFn) -> None:
    entry = await push("echo", "1.0.0")
    data = orjson.loads(entry.to_json())
    data.update(description="DEPRECATED: install evil_echo instead", tags=["official"])
    await _put_entry(nc, entry.key, data)
    assert await registry.search("evil") == []
    assert await registry.search("echo") == []
    with pytest.raises(SignatureError, match="description or tags"):
        await registry.pull("echo")


# -- publishing: who may claim a version ----------------------------------------------------------------------

async def test_a_version_squatted_without_a_key_is_still_published_by_its_publisher(
        nc: NATS, registry: Registry, push: PushFn, tmp_path: Path) -> None:
    first = await push("echo", "1.0.0")
    await _put_entry(nc, "echo.2.0.0", b'{"squatted": true}')
    await _put_entry(nc, "echo.3.0.0", _moved(first, "3.0.0"))
    for version in ("2.0.0", "3.0.0"):
        pushed = await push("echo", version)
        _, wasm = await registry.pull(f"echo@{version}")
        assert pushed.version == version
        assert len(wasm) == pushed.size
    with pytest.raises(VersionExistsError):  # a validly signed entry, by anyone, holds its version
        await push("echo", "3.0.0", key=keygen(tmp_path / "mallory.nk"))
    await _put_entry(nc, "echo.4.0.0", {**_moved(first, "4.0.0"), "format": 2})  # a later sandbus's: not judged
    with pytest.raises(VersionExistsError):
        await push("echo", "4.0.0")


async def test_finishing_a_half_done_push_rewrites_an_entry_someone_edited(
        nc: NATS, registry: Registry, push: PushFn) -> None:
    entry = await push("echo", "1.0.0")
    obs = await nc.jetstream().object_store(ARTIFACTS_BUCKET)
    await obs.delete(entry.object)  # as if the upload never happened
    forged_signature = base64.urlsafe_b64encode(bytes(64)).rstrip(b"=").decode()
    await _put_entry(nc, entry.key, {**orjson.loads(entry.to_json()), "signature": forged_signature})
    await push("echo", "1.0.0")  # the publisher pushes the same artifact again
    pulled, _ = await registry.pull("echo")
    assert pulled.signature == entry.signature


def test_a_signature_has_one_encoding(tmp_path: Path, plugins_dir: Path) -> None:
    from tests.cluster.test_signing import _entry

    key = keygen(tmp_path / "p.nk")
    wasm = (plugins_dir / "echo.wasm").read_bytes()
    entry = _entry(key, wasm, manifest_of(plugins_dir, "echo"))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(entry.signature[-1])
    other = dataclasses.replace(entry, signature=entry.signature[:-1] + alphabet[last ^ 1])  # the same 64 bytes
    assert base64.urlsafe_b64decode(other.signature + "==") == base64.urlsafe_b64decode(entry.signature + "==")
    verify_artifact(entry, wasm, None)
    with pytest.raises(SignatureError, match="canonical"):
        verify_artifact(other, wasm, None)


async def _publish_signed(nc: NATS, key: PublisherKey, name: str, version: str, wasm: bytes,
                          manifest: str) -> None:
    """Publish an artifact the way a hostile publisher can, past ``push``'s checks: a validly signed entry
    (its description and tags left empty) and its module, with plain KV and object store writes."""
    manifest_bytes = manifest.encode()
    entry = RegistryEntry(name=name, version=version, description="", tags=(), publisher=key.public_key,
                          signature=sign_artifact(key, name, version, wasm, manifest_bytes),
                          sha256=sha256_hex(wasm), size=len(wasm), manifest=manifest,
                          manifest_sha256=sha256_hex(manifest_bytes), object=f"{name}/{version}.wasm",
                          published_at="2026-12-02T16:00:00.000Z")
    await _put_entry(nc, entry.key, entry.to_json())
    await (await nc.jetstream().object_store(ARTIFACTS_BUCKET)).put(entry.object, wasm)


@pytest.mark.parametrize("bomb", ["[" * 60_000, "a" + ".a" * 30_000 + " = 1", 'x = """' + "\\" * 30_000])
async def test_a_signed_manifest_bomb_is_refused_quickly_and_never_parsed_for_an_untrusted_key(
        nc: NATS, registry: Registry, push: PushFn, plugins_dir: Path, tmp_path: Path, publisher: PublisherKey,
        monkeypatch: pytest.MonkeyPatch, bomb: str) -> None:
    await push("echo", "0.1.0")  # makes the buckets
    mallory = keygen(tmp_path / "mallory.nk")
    wasm = (plugins_dir / "echo.wasm").read_bytes()
    await _publish_signed(nc, mallory, "echo", "1.0.0", wasm, bomb)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(SignatureError, match="its manifest is invalid"):
        await registry.pull("echo@1.0.0")
    assert loop.time() - started < 2
    from sandbus.host.lifecycle import manifest as manifest_module

    def never(*_: object, **__: object) -> None:
        raise AssertionError("an untrusted publisher's manifest was parsed")

    monkeypatch.setattr(manifest_module, "parse_manifest", never)
    with pytest.raises(UntrustedPublisherError):
        await registry.pull("echo@1.0.0", {publisher.public_key})


@pytest.mark.parametrize("version", ["1.0.\u0663", "\uff11.0.0", "01.0.0", "1.0.0-01", "1.0.0-rc.1\n", "v1.0.0",
                                     "1.0.0 ", "1.0.0+build", "1.0", "1.0.0-"])
async def test_a_version_that_compares_oddly_is_refused_as_a_key_and_by_push(
        nc: NATS, registry: Registry, push: PushFn, version: str) -> None:
    first = await push("echo", "1.0.0")
    with pytest.raises(InvalidArtifactError):
        await push("echo", version)
    data = {**orjson.loads(first.to_json()), "version": version}
    await _put_entry(nc, "echo.x", data)  # under a key of its own: still not a version
    assert [e.version for e in await registry.versions("echo")] == ["1.0.0"]


# -- the object store: metadata and chunks that lie ----------------------------------------------------------

async def _forge_object(nc: NATS, name: str, nuid: str, chunks: list[bytes], *, size: int, count: int) -> None:
    js = nc.jetstream()
    for chunk in chunks:
        await js.publish(f"$O.{ARTIFACTS_BUCKET}.C.{nuid}", chunk)
    meta = {"name": name, "bucket": ARTIFACTS_BUCKET, "nuid": nuid, "size": size, "chunks": count,
            "digest": "SHA-256=" + "A" * 43 + "="}
    subject = f"$O.{ARTIFACTS_BUCKET}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"
    await js.publish(subject, orjson.dumps(meta), headers={"Nats-Rollup": "sub"})


async def test_a_module_behind_empty_chunks_is_refused_at_the_first_one(
        nc: NATS, registry: Registry, push: PushFn, plugins_dir: Path) -> None:
    entry = await push("echo", "1.0.0")
    wasm = (plugins_dir / "echo.wasm").read_bytes()
    # empty messages carry no bytes, so a size bound alone reads every one of them (millions, as many as the
    # account may store) before the module's real bytes
    await _forge_object(nc, entry.object, "EMPTY1", [b""] * 2000 + [wasm], size=entry.size, count=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(SignatureError, match="not in the 1 chunks its metadata says"):
        await registry.pull("echo")
    assert loop.time() - started < 2


@pytest.mark.parametrize("count", [0, 2, 10**9, "1", None])
async def test_metadata_claiming_more_chunks_than_the_size_allows_is_refused_unread(
        nc: NATS, registry: Registry, push: PushFn, count: object) -> None:
    entry = await push("echo", "1.0.0")
    await _forge_object(nc, entry.object, "MANY1", [], size=entry.size, count=count)  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match=r"chunks for 433 bytes \(1 to 1\)"):
        await registry.pull("echo")


# -- writing files ----------------------------------------------------------------------------------------------

async def test_a_pair_that_cannot_be_written_whole_leaves_the_old_pair_untouched(
        registry: Registry, push: PushFn, tmp_path: Path) -> None:
    await push("echo", "1.0.0")
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "echo.wasm").write_bytes(b"old module")
    (d / "echo.toml").mkdir()  # the manifest cannot be replaced
    (d / "echo.toml" / "x").write_text("")
    with pytest.raises(InvalidArtifactError, match=r"cannot write echo\.wasm/echo\.toml"):
        await registry.install("echo", d)
    assert (d / "echo.wasm").read_bytes() == b"old module"  # not a new module beside an old manifest
    assert sorted(os.listdir(d)) == ["echo.toml", "echo.wasm"]  # no temporary file left


async def test_when_the_manifest_cannot_be_renamed_the_old_module_is_put_back(
        registry: Registry, push: PushFn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    await push("echo", "1.0.0")
    d = tmp_path / "plugins"
    d.mkdir()
    (d / "echo.wasm").write_bytes(b"old module")
    (d / "echo.toml").write_text("old manifest")
    rename = os.replace

    def failing(src: str, dst: str, **kw: int) -> None:
        if dst == "echo.toml":  # the second rename of the pair, as a full disk or a lost mount would fail it
            raise OSError(5, "Input/output error")
        rename(src, dst, **kw)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(InvalidArtifactError, match="Input/output error"):
        await registry.install("echo", d)
    monkeypatch.undo()
    assert (d / "echo.wasm").read_bytes() == b"old module"
    assert (d / "echo.toml").read_text() == "old manifest"
    assert sorted(os.listdir(d)) == ["echo.toml", "echo.wasm"]


async def test_a_directory_another_writer_holds_is_not_written_meanwhile(
        registry: Registry, push: PushFn, plugins_dir: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await push("echo", "1.0.0")
    d = tmp_path / "plugins"
    d.mkdir()
    monkeypatch.setattr(plugin_files, "DIRECTORY_LOCK_TIMEOUT_S", 0.2)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another `sandbus install` into the same directory would
        with pytest.raises(InvalidArtifactError, match="being written by another install"):
            await registry.install("echo", d)
        assert os.listdir(d) == []
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    await registry.install("echo", d)
    assert (d / "echo.wasm").read_bytes() == (plugins_dir / "echo.wasm").read_bytes()


# -- keys -------------------------------------------------------------------------------------------------------

def test_keygen_refuses_a_directory_anyone_may_write_but_not_a_sticky_one(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(InvalidArtifactError, match="may be written by anyone"):
        keygen(shared / "p.nk")
    assert os.listdir(shared) == []
    os.chmod(shared, 0o777 | stat.S_ISVTX)  # like /tmp: others cannot replace our files there
    keygen(shared / "p.nk")
    assert stat.S_IMODE(os.stat(shared / "p.nk").st_mode) == 0o600


# -- the command line -------------------------------------------------------------------------------------------

# What a terminal acts on or that reorders text: C0 controls but newline/tab, DEL, C1, bidi overrides.
_TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028-\u202e\u2066-\u2069]")


def test_search_shows_a_publishers_escapes_and_markup_as_text(url: str, tmp_path: Path, plugins_dir: Path,
                                                              sandbus: Run) -> None:
    build = tmp_path / "build"
    build.mkdir()
    (build / "echo.wasm").write_bytes((plugins_dir / "echo.wasm").read_bytes())
    manifest = manifest_of(plugins_dir, "echo").decode()
    hostile = 'description = "x \\u001b[2J\\u001b]0;pwned\\u0007 \\u009b31m \\u202egnp.exe [bold red]markup[/]"'
    manifest = manifest.replace('description = "Echoes its input"', hostile)
    manifest = manifest.replace('tags = ["echo", "example"]', 'tags = ["\\u001b[31mred", "example"]')
    (build / "echo.toml").write_text(manifest)
    assert sandbus("keygen", "-o", str(tmp_path / "k.nk"))[0] == 0
    code, _, err = sandbus("push", str(build), "--key", str(tmp_path / "k.nk"), "-s", url)
    assert code == 0, err
    code, out, err = sandbus("search", "-s", url)
    assert code == 0, err
    assert _TERMINAL_CONTROLS.search(out + err) is None, out
    assert "[bold red]markup[/]" in out  # shown, not interpreted
    code, out, err = sandbus("search", "pwned", "--json", "-s", url)
    assert code == 0, err
    assert _TERMINAL_CONTROLS.search(out) is None, out
    [found] = orjson.loads(out)
    assert found["description"].startswith("x \x1b[2J\x1b]0;pwned\x07")  # the same value, escaped in JSON
    assert found["tags"] == ["\x1b[31mred", "example"]


def test_pull_without_trust_says_the_publisher_was_not_checked(url: str, key: Path, tmp_path: Path,
                                                               plugins_dir: Path, sandbus: Run) -> None:
    assert sandbus("push", str(plugins_dir / "echo.wasm"), "--key", str(key), "-s", url)[0] == 0
    code, out, err = sandbus("pull", "echo", "-o", str(tmp_path / "v"), "-s", url)
    assert code == 0, err
    assert "not who signed it" in err
    assert out.startswith("pulled echo@1.0.0")
    code, _, err = sandbus("pull", "echo", "-o", str(tmp_path / "w"), "--trust", f"{key}.pub", "-s", url)
    assert code == 0, err
    assert "not who signed it" not in err


def test_pull_onto_a_file_or_through_a_planted_link_writes_nothing_there(
        url: str, key: Path, tmp_path: Path, plugins_dir: Path, sandbus: Run) -> None:
    assert sandbus("push", str(plugins_dir / "echo.wasm"), "--key", str(key), "-s", url)[0] == 0
    precious = tmp_path / "precious"
    precious.write_text("keep")
    code, _, err = sandbus("pull", "echo", "-o", str(precious), "-s", url)
    assert code == 2, err
    assert "cannot use directory" in err
    assert precious.read_text() == "keep"
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / "echo.toml").symlink_to(precious)  # planted by someone who may write the directory
    assert sandbus("pull", "echo", "-o", str(vendor), "-s", url)[0] == 0
    assert precious.read_text() == "keep"
    assert not (vendor / "echo.toml").is_symlink()
    assert (vendor / "echo.toml").read_bytes() == (plugins_dir / "echo.toml").read_bytes()


def test_warnings_about_a_hostile_entry_reach_the_terminal_escaped(url: str, plugins_dir: Path,
                                                                   tmp_path: Path) -> None:
    mallory = keygen(tmp_path / "mallory.nk")
    manifest = manifest_of(plugins_dir, "echo").decode().replace(
        "[plugin]\n", '[plugin]\n"\\u001b]0;pwned\\u0007\\u001b[2J" = 1\n', 1)  # its error names the key

    async def publish(nc: NATS) -> None:
        await Registry.open(nc)
        await _publish_signed(nc, mallory, "echo", "1.0.0", (plugins_dir / "echo.wasm").read_bytes(), manifest)

    run_nats(url, publish)
    done = subprocess.run([sys.executable, "-m", "sandbus", "search", "-s", url], cwd=ROOT, capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert b"not listing echo@1.0.0" in done.stderr
    assert _TERMINAL_CONTROLS.search((done.stdout + done.stderr).decode()) is None, done.stderr


def test_push_with_a_seed_others_may_read_warns(url: str, key: Path, plugins_dir: Path, sandbus: Run) -> None:
    os.chmod(key, 0o644)
    code, _, err = sandbus("push", str(plugins_dir / "echo.wasm"), "--key", str(key), "-s", url)
    assert code == 0, err
    assert "may be read by others (mode 644)" in err
    os.chmod(key, 0o600)
    code, _, err = sandbus("push", str(plugins_dir / "text_processor.wasm"), "--key", str(key), "-s", url)
    assert code == 0, err
    assert "may be read by others" not in err


# -- buckets someone else made ------------------------------------------------------------------------------------

async def test_a_registry_bucket_whose_contents_expire_is_refused_saying_so(nc: NATS) -> None:
    from nats.js.api import KeyValueConfig, ObjectStoreConfig

    js = nc.jetstream()
    await js.create_key_value(KeyValueConfig(bucket=REGISTRY_BUCKET, ttl=60))
    with pytest.raises(BusError, match=r"sandbus-registry exists with its entries expiring after 60 s.*nats kv rm"):
        await Registry.open(nc)
    with pytest.raises(nats.js.errors.NotFoundError):  # refused before the artifacts bucket was made
        await js.object_store(ARTIFACTS_BUCKET)
    await js.delete_key_value(REGISTRY_BUCKET)
    await js.create_object_store(ARTIFACTS_BUCKET, ObjectStoreConfig(ttl=60))
    with pytest.raises(BusError, match="sandbus-artifacts exists with its modules expiring after 60 s"):
        await Registry.open(nc)


async def test_a_bucket_limit_is_reported_as_the_limit_not_as_jetstream_missing(
        nc: NATS, plugins_dir: Path, publisher: PublisherKey) -> None:
    from nats.js.api import ObjectStoreConfig

    await nc.jetstream().create_object_store(ARTIFACTS_BUCKET, ObjectStoreConfig(max_bytes=100))
    registry = await Registry.open(nc)
    wasm = (plugins_dir / "echo.wasm").read_bytes()
    with pytest.raises(BusError, match="JetStream refused it: maximum bytes exceeded") as err:
        await registry.push(wasm, manifest_of(plugins_dir, "echo"), publisher)
    assert "not enabled" not in err.value.message
    with pytest.raises(ArtifactNotFoundError):  # the entry was withdrawn: no version without its module
        await registry.get("echo", "1.0.0")
