"""Publisher keys, signatures, entries and the policy's trusted publishers, without a server."""

from __future__ import annotations

import base64
import dataclasses
import os
import re
import stat
from pathlib import Path

import nacl.signing
import nkeys  # type: ignore[import-untyped]
import orjson
import pytest

from sandbus.host.cluster.entry import MAX_ENTRY_BYTES, RegistryEntry, decode_entry, sha256_hex
from sandbus.host.cluster.keys import PublisherKey, check_public_key, keygen, load_public_key, load_seed
from sandbus.host.cluster.names import check_version, object_name, parse_ref
from sandbus.host.cluster.signing import sign_artifact, signed_bytes, verify_artifact
from sandbus.host.lifecycle.manifest import parse_manifest
from sandbus.host.lifecycle.policy import load_policy
from sandbus.sdk.errors import InvalidArtifactError, PolicyError, SignatureError, UntrustedPublisherError
from tests.cluster.conftest import manifest_of


def _seed_of(prefix: int) -> str:
    return nkeys.encode_seed(bytes(nacl.signing.SigningKey.generate()), prefix).decode()  # type: ignore[no-any-return]


def _entry(key: PublisherKey, wasm: bytes, manifest: bytes, name: str = "echo",
           version: str = "1.0.0") -> RegistryEntry:
    """The entry push would make: its description and tags are the manifest's."""
    parsed = parse_manifest(manifest.decode())
    return RegistryEntry(name=name, version=version, description=parsed.plugin.description,
                         tags=tuple(parsed.metadata.tags), publisher=key.public_key,
                         signature=sign_artifact(key, name, version, wasm, manifest), sha256=sha256_hex(wasm),
                         size=len(wasm), manifest=manifest.decode(), manifest_sha256=sha256_hex(manifest),
                         object=object_name(name, version), published_at="2026-12-02T16:00:00.000Z")


# -- keys ----------------------------------------------------------------------------------------------------

def test_keygen_writes_a_0600_account_seed_and_a_pub_that_matches_it(tmp_path: Path) -> None:
    key = keygen(tmp_path / "p.nk")
    seed = (tmp_path / "p.nk").read_bytes().strip()
    assert stat.S_IMODE(os.stat(tmp_path / "p.nk").st_mode) == 0o600
    assert seed.startswith(b"SA")
    assert len(seed) == 58
    pub = (tmp_path / "p.nk.pub").read_text().strip()
    assert pub == key.public_key == load_seed(tmp_path / "p.nk").public_key == load_public_key(tmp_path / "p.nk.pub")
    assert nkeys.from_seed(seed).public_key.decode() == pub  # the NATS world reads it the same way
    assert pub.startswith("A")
    assert len(pub) == 56


def test_keygen_never_overwrites_a_seed_a_pub_or_a_link(tmp_path: Path) -> None:
    (tmp_path / "a.nk").write_text("precious")
    with pytest.raises(InvalidArtifactError, match="exists already"):
        keygen(tmp_path / "a.nk")
    assert (tmp_path / "a.nk").read_text() == "precious"
    (tmp_path / "b.nk.pub").write_text("other")
    with pytest.raises(InvalidArtifactError, match="exists already"):
        keygen(tmp_path / "b.nk")
    assert not (tmp_path / "b.nk").exists()  # no seed left without its .pub
    target = tmp_path / "target"
    (tmp_path / "c.nk").symlink_to(target)
    with pytest.raises(InvalidArtifactError, match="exists already"):
        keygen(tmp_path / "c.nk")
    assert not target.exists()


@pytest.mark.parametrize(("content", "needle"), [
    (b"garbage", "not an nkeys seed"),
    (b"\xff\xfe" * 29, "not ASCII"),
    (b"x" * 5000, "larger than"),
    (b"", "not an nkeys seed"),
])
def test_a_seed_file_of_garbage_is_refused(tmp_path: Path, content: bytes, needle: str) -> None:
    (tmp_path / "s.nk").write_bytes(content)
    with pytest.raises(InvalidArtifactError, match=needle):
        load_seed(tmp_path / "s.nk")


def test_a_seed_of_another_key_type_a_public_key_or_a_bad_checksum_is_refused(tmp_path: Path) -> None:
    (tmp_path / "user.nk").write_text(_seed_of(nkeys.PREFIX_BYTE_USER))
    with pytest.raises(InvalidArtifactError, match="a user key"):
        load_seed(tmp_path / "user.nk")
    good = keygen(tmp_path / "good.nk")
    (tmp_path / "pub-as-seed").write_text(good.public_key)
    with pytest.raises(InvalidArtifactError, match="not an nkeys seed"):
        load_seed(tmp_path / "pub-as-seed")
    seed = (tmp_path / "good.nk").read_text().strip()
    flipped = seed[:10] + ("B" if seed[10] != "B" else "C") + seed[11:]
    (tmp_path / "flipped.nk").write_text(flipped)
    with pytest.raises(InvalidArtifactError, match="checksum"):
        load_seed(tmp_path / "flipped.nk")


def test_a_seed_path_that_is_missing_a_directory_or_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    with pytest.raises(InvalidArtifactError, match="cannot read"):
        load_seed(tmp_path / "missing.nk")
    with pytest.raises(InvalidArtifactError, match=r"not a regular file|cannot read"):
        load_seed(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InvalidArtifactError, match="not a regular file"):
        load_seed(tmp_path / "fifo")


def test_public_keys_of_another_type_or_with_a_bad_checksum_are_refused(tmp_path: Path) -> None:
    user = nkeys.from_seed(_seed_of(nkeys.PREFIX_BYTE_USER).encode()).public_key.decode()
    with pytest.raises(InvalidArtifactError, match="a user key"):
        check_public_key(user)
    key = keygen(tmp_path / "k.nk").public_key
    assert len(check_public_key(key)) == 32
    with pytest.raises(InvalidArtifactError, match="checksum"):
        check_public_key(key[:-1] + ("A" if key[-1] != "A" else "B"))
    for bad in ("", "A" * 55 + "B", (tmp_path / "k.nk").read_text().strip(), None, 42, key + " "):
        with pytest.raises(InvalidArtifactError):
            check_public_key(bad)


# -- names ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref", ["../etc", "echo/../x", "echo.*", "echo.>", ">", "*", "Echo", ".echo", "a b",
                                 "echo@^1@2", "echo@;rm", "", "x" * 400])
def test_a_reference_that_is_not_a_name_and_range_is_refused(ref: str) -> None:
    with pytest.raises(InvalidArtifactError):
        parse_ref(ref)


def test_a_version_with_build_metadata_is_refused_saying_why() -> None:
    with pytest.raises(InvalidArtifactError, match=r"build metadata.*'\+' cannot be part of a registry key"):
        check_version("1.2.0+build.5")
    assert check_version("1.2.0-rc.1") == "1.2.0-rc.1"
    assert parse_ref("greeter@^1.2") == ("greeter", "^1.2")


# -- signatures ----------------------------------------------------------------------------------------------

def test_signed_bytes_are_exactly_the_documented_ones() -> None:
    assert signed_bytes("echo", "1.0.0", "a" * 64, "b" * 64) == (
        b"sandbus-artifact-v1\necho\n1.0.0\n" + b"a" * 64 + b"\n" + b"b" * 64 + b"\n")


@pytest.fixture
def signed(tmp_path: Path, plugins_dir: Path) -> tuple[PublisherKey, RegistryEntry, bytes]:
    key = keygen(tmp_path / "p.nk")
    wasm = (plugins_dir / "echo.wasm").read_bytes()
    return key, _entry(key, wasm, manifest_of(plugins_dir, "echo")), wasm


def test_a_valid_artifact_passes_and_its_publisher_may_be_required(
        signed: tuple[PublisherKey, RegistryEntry, bytes]) -> None:
    key, entry, wasm = signed
    verify_artifact(entry, wasm, None)
    verify_artifact(entry, wasm, {key.public_key})


def test_replaced_bytes_are_refused(signed: tuple[PublisherKey, RegistryEntry, bytes]) -> None:
    _, entry, wasm = signed
    with pytest.raises(SignatureError, match="sha256"):
        verify_artifact(entry, wasm[:-1] + bytes([wasm[-1] ^ 1]), None)
    with pytest.raises(SignatureError, match="bytes"):
        verify_artifact(entry, wasm + b"\0", None)


def test_a_signature_by_another_key_is_refused(tmp_path: Path,
                                                signed: tuple[PublisherKey, RegistryEntry, bytes]) -> None:
    key, entry, wasm = signed
    other = keygen(tmp_path / "other.nk")
    forged = dataclasses.replace(entry, signature=sign_artifact(other, entry.name, entry.version, wasm,
                                                                entry.manifest.encode()))
    with pytest.raises(SignatureError, match="not valid for publisher"):
        verify_artifact(forged, wasm, None)
    # ...and claiming to be the other key with the original signature fails the same way
    with pytest.raises(SignatureError, match="not valid for publisher"):
        verify_artifact(dataclasses.replace(entry, publisher=other.public_key), wasm, None)
    with pytest.raises(SignatureError, match="unsigned"):
        verify_artifact(dataclasses.replace(entry, publisher="A" * 55 + "B"), wasm, None)
    assert key.public_key != other.public_key


def test_a_manifest_edited_after_signing_is_refused(signed: tuple[PublisherKey, RegistryEntry, bytes]) -> None:
    _, entry, wasm = signed
    grabby = entry.manifest.replace('required = ["compute"]', 'required = ["compute", "network"]')
    assert grabby != entry.manifest
    with pytest.raises(SignatureError, match="edited after signing"):
        verify_artifact(dataclasses.replace(entry, manifest=grabby), wasm, None)
    # recomputing the manifest's digest does not help: the signature covers it
    with pytest.raises(SignatureError, match="not valid for publisher"):
        verify_artifact(dataclasses.replace(entry, manifest=grabby, manifest_sha256=sha256_hex(grabby.encode())),
                        wasm, None)


def test_a_signed_entry_moved_to_another_version_is_refused(
        signed: tuple[PublisherKey, RegistryEntry, bytes]) -> None:
    _, entry, wasm = signed
    with pytest.raises(SignatureError, match="not valid for publisher"):
        verify_artifact(dataclasses.replace(entry, version="9.9.9", object=object_name("echo", "9.9.9")), wasm, None)


def test_a_manifest_naming_another_version_is_refused_even_when_signed(
        tmp_path: Path, plugins_dir: Path) -> None:
    key = keygen(tmp_path / "p.nk")
    wasm = (plugins_dir / "echo.wasm").read_bytes()
    entry = _entry(key, wasm, manifest_of(plugins_dir, "echo", version="2.0.0"), version="1.0.0")
    with pytest.raises(SignatureError, match=r"its manifest is echo@2.0.0"):
        verify_artifact(entry, wasm, None)


def test_an_untrusted_publisher_is_refused_and_no_trusted_publishers_trusts_no_one(
        tmp_path: Path, signed: tuple[PublisherKey, RegistryEntry, bytes]) -> None:
    _, entry, wasm = signed
    other = keygen(tmp_path / "other.nk").public_key
    with pytest.raises(UntrustedPublisherError, match="not a trusted publisher"):
        verify_artifact(entry, wasm, {other})
    with pytest.raises(UntrustedPublisherError, match="no trusted publishers"):
        verify_artifact(entry, wasm, frozenset())


# -- entries -------------------------------------------------------------------------------------------------

def test_an_entry_round_trips_through_its_json(signed: tuple[PublisherKey, RegistryEntry, bytes]) -> None:
    _, entry, _ = signed
    assert decode_entry(entry.to_json(), key="echo.1.0.0", revision=3) == dataclasses.replace(entry, revision=3)


def _mutated(entry: RegistryEntry, **changes: object) -> bytes:
    data = orjson.loads(entry.to_json())
    data.update(changes)
    return orjson.dumps(data)


@pytest.mark.parametrize(("changes", "needle"), [
    ({"size": "433"}, "'size' must be an integer"),
    ({"size": True}, "'size' must be an integer"),
    ({"size": 10**12}, "module cap"),
    ({"tags": {"a": 1}}, "'tags' must be a list"),
    ({"tags": ["x" * 100]}, "'tags' must hold strings"),
    ({"description": ["nested"] * 3}, "'description' must be a string"),
    ({"publisher": "UAAAA"}, "account public key"),
    ({"signature": 5}, "'signature' must be a string"),
    ({"object": "other/1.0.0.wasm"}, "'object' must be 'echo/1.0.0.wasm'"),
    ({"name": "../x"}, "not a plugin name"),
    ({"version": "1.0.0+b"}, "build metadata"),
    ({"format": 2}, "'format' must be 1"),
    ({"extra": 1}, "unknown key"),
    ({"published_at": "yesterday"}, "RFC 3339"),
    ({"manifest": "x" * (65 * 1024)}, "longer than"),
])
def test_an_entry_of_the_wrong_shape_is_invalid(signed: tuple[PublisherKey, RegistryEntry, bytes],
                                                changes: dict[str, object], needle: str) -> None:
    _, entry, _ = signed
    with pytest.raises(InvalidArtifactError, match=needle):
        decode_entry(_mutated(entry, **changes))


def test_a_huge_or_deep_entry_or_one_under_another_key_is_invalid(
        signed: tuple[PublisherKey, RegistryEntry, bytes]) -> None:
    _, entry, _ = signed
    with pytest.raises(InvalidArtifactError, match="above the"):
        decode_entry(b" " * (MAX_ENTRY_BYTES + 1) + entry.to_json())
    with pytest.raises(InvalidArtifactError, match="not JSON"):
        decode_entry(b"[" * 5000 + b"]" * 5000)
    deep = re.sub(rb'"tags":\[[^]]*\]', b'"tags":' + b"[" * 1000 + b"]" * 1000, entry.to_json())
    assert deep != entry.to_json()
    with pytest.raises(InvalidArtifactError, match="'tags' must hold strings"):
        decode_entry(deep)
    with pytest.raises(InvalidArtifactError, match="must be a JSON object"):
        decode_entry(b"[1, 2]")
    with pytest.raises(InvalidArtifactError, match="not what its key says"):
        decode_entry(entry.to_json(), key="echo.2.0.0")


# -- policy --------------------------------------------------------------------------------------------------

def test_the_policy_takes_account_keys_and_names_a_bad_one_by_position(tmp_path: Path) -> None:
    good = keygen(tmp_path / "p.nk").public_key
    user = nkeys.from_seed(_seed_of(nkeys.PREFIX_BYTE_USER).encode()).public_key.decode()
    (tmp_path / "ok.toml").write_text(f'[registry]\ntrusted_publishers = ["{good}", "{good}"]\n')
    assert load_policy(tmp_path / "ok.toml").registry.trusted_publishers == (good,)
    (tmp_path / "bad.toml").write_text(f'[registry]\ntrusted_publishers = ["{good}", "{user}"]\n')
    with pytest.raises(PolicyError, match=r"\[registry.trusted_publishers\[1\]\].*a user key") as err:
        load_policy(tmp_path / "bad.toml")
    assert err.value.details["key"] == "registry.trusted_publishers[1]"
    (tmp_path / "typo.toml").write_text('[registry]\ntrusted_publisher = []\n')
    with pytest.raises(PolicyError, match="did you mean 'trusted_publishers'"):
        load_policy(tmp_path / "typo.toml")
    (tmp_path / "none.toml").write_text("")
    assert load_policy(tmp_path / "none.toml").registry.trusted_publishers == ()


def test_a_signature_is_base64url_without_padding(signed: tuple[PublisherKey, RegistryEntry, bytes]) -> None:
    _, entry, _ = signed
    assert "=" not in entry.signature
    assert len(base64.urlsafe_b64decode(entry.signature + "==")) == 64
