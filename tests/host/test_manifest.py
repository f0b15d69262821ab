"""Manifests: real files under tmp_path; every error names the file, the key and what was expected."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from sandbus.host.lifecycle.manifest import (
    CAPABILITY_NAMES,
    Manifest,
    check_subject,
    load_manifest,
    parse_host,
    parse_manifest,
    request_matches,
    subject_matches,
)
from sandbus.sdk.errors import ManifestError, SecurityViolationError

HEADER = """
[plugin]
name = "orders"
version = "1.4.0"
"""

FULL = """
[plugin]
name = "orders"
version = "1.4.0"
description = "Takes orders"
author = "Ada"
license = "Apache-2.0"
min_runtime_version = "0.1.0"
sha256 = "{sha}"

[capabilities]
required = ["compute", "messaging", "filesystem"]
optional = ["clock", "network", "environment"]

[permissions]
read_files = ["./in//data", "shared"]
write_files = ["out"]
network_hosts = ["api.example.com:443", "10.0.0.1", "[::1]:8080"]
environment_vars = ["TZ", "API_URL"]
publish_topics = ["orders.*", "audit.>"]

[resources]
memory_mb = 32
timeout_seconds = 2.5
max_fuel = 1_000_000
max_instances = 2

[dependencies]
pricing = "^2.1"
audit = {{ version = "~1.0", optional = true }}

[subscriptions]
topics = ["orders.new", "orders.*.cancel"]
durable = false

[metadata]
category = "commerce"
tags = ["orders", "demo"]

[config]
currency = "EUR"
limits = {{ max_items = 10, ratio = 0.5 }}
regions = ["eu", "us"]
"""


def write(tmp_path: Path, body: str, name: str = "orders") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def manifest_error(tmp_path: Path, body: str, name: str = "orders") -> ManifestError:
    path = write(tmp_path, body, name)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)
    return info.value


# --- valid -----------------------------------------------------------------------------------------


def test_full_manifest_round_trip(tmp_path: Path) -> None:
    wasm = b"\x00asm\x01\x00\x00\x00"
    sha = hashlib.sha256(wasm).hexdigest().upper()
    path = write(tmp_path, FULL.format(sha=sha))
    (tmp_path / "orders.wasm").write_bytes(wasm)

    m = load_manifest(path)

    assert m.name == "orders"
    assert str(m.version) == "1.4.0"
    assert m.source == str(path)
    assert m.plugin.sha256 == sha.lower()
    assert m.capabilities.required == ("compute", "messaging", "filesystem")
    assert m.capabilities.all == {"compute", "messaging", "filesystem", "clock", "network", "environment"}
    assert m.permissions.read_files == ("in/data", "shared")
    assert m.permissions.network_hosts == ("api.example.com:443", "10.0.0.1", "[::1]:8080")
    assert m.resources.timeout_seconds == 2.5
    assert m.resources.max_fuel == 1_000_000
    assert m.dependencies["pricing"].version == "^2.1"
    assert m.dependencies["pricing"].optional is False
    assert m.dependencies["audit"].optional is True
    assert m.subscriptions.durable is False
    assert m.metadata.tags == ("orders", "demo")
    assert m.config == {"currency": "EUR", "limits": {"max_items": 10, "ratio": 0.5}, "regions": ["eu", "us"]}
    # the same manifest, whether found through its .wasm or its .toml
    assert load_manifest(tmp_path / "orders.wasm") == m
    # and it survives a dump / validate round trip unchanged
    assert Manifest.model_validate(m.model_dump()).model_dump() == m.model_dump()
    assert parse_manifest(path.read_text(), source=str(path)) == m
    m.verify_wasm(wasm)


def test_minimal_manifest_defaults(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, HEADER))
    assert m.capabilities.required == ()
    assert m.resources.memory_mb is None
    assert m.dependencies == {}
    assert m.subscriptions.durable is True
    assert m.config == {}
    assert m.runtime_compatible("0.0.1")


def test_manifest_is_frozen(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, HEADER))
    with pytest.raises(ValueError, match="frozen"):
        m.plugin.name = "other"


def test_runtime_compatible() -> None:
    m = parse_manifest(HEADER + 'min_runtime_version = "0.3.0"\n')
    assert m.runtime_compatible("0.3.0")
    assert m.runtime_compatible("1.0.0")
    assert not m.runtime_compatible("0.2.9")


def test_wasm_digest_mismatch_is_a_security_violation() -> None:
    m = parse_manifest(HEADER + f'sha256 = "{"0" * 64}"\n')
    with pytest.raises(SecurityViolationError, match="sha256 mismatch") as info:
        m.verify_wasm(b"tampered")
    assert info.value.plugin == "orders"


# --- file-level errors -----------------------------------------------------------------------------


def test_missing_manifest(tmp_path: Path) -> None:
    (tmp_path / "orders.wasm").write_bytes(b"\x00asm")
    with pytest.raises(ManifestError) as info:
        load_manifest(tmp_path / "orders.wasm")
    assert info.value.path == str(tmp_path / "orders.toml")
    assert "manifest missing: expected orders.toml beside orders.wasm" in str(info.value)


def test_unparsable_toml_reports_line_and_column(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, '[plugin]\nname = "orders"\nversion = \n')
    assert "not valid TOML at line 3, column 11" in err.message
    assert err.key is None


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "orders.toml"
    path.write_bytes(b'[plugin]\nname = "\xff"\n')
    with pytest.raises(ManifestError, match="not UTF-8") as info:
        load_manifest(path)
    assert info.value.path == str(path)


def test_name_must_match_file_stem(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER, name="billing")
    assert err.key == "plugin.name"
    assert "'orders'" in err.message
    assert "expected 'billing'" in err.message


def test_expected_name_overrides_stem(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER, name="whatever")
    assert load_manifest(path, expected_name="orders").name == "orders"
    with pytest.raises(ManifestError, match="expected 'other'") as info:
        load_manifest(path, expected_name="other")
    assert info.value.key == "plugin.name"


# --- key-level errors ------------------------------------------------------------------------------


def test_missing_plugin_section(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, '[metadata]\ncategory = "x"\n')
    assert err.key == "plugin"
    assert "required section [plugin] is missing" in err.message


def test_missing_required_key(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, '[plugin]\nname = "orders"\n')
    assert err.key == "plugin.version"
    assert "required key 'version' is missing in [plugin]" in err.message


@pytest.mark.parametrize(
    ("body", "key", "expected", "found"),
    [
        ('[resources]\nmemory_mb = "64"\n', "resources.memory_mb", "expected an integer", "'64' (str)"),
        ("[resources]\nmemory_mb = true\n", "resources.memory_mb", "expected an integer", "True (bool)"),
        ("[resources]\nmax_fuel = 0\n", "resources.max_fuel", "expected a value greater than 0", "0 (int)"),
        ("[resources]\ntimeout_seconds = -1.5\n", "resources.timeout_seconds", "greater than 0", "-1.5"),
        ('[subscriptions]\ndurable = "yes"\n', "subscriptions.durable", "expected true or false", "'yes'"),
        ('[metadata]\ntags = "a"\n', "metadata.tags", "expected an array", "'a' (str)"),
        ('[metadata]\ntags = ["a", 2]\n', "metadata.tags", "tags[1]: expected a string", "2 (int)"),
        ("[plugin.description]\nx = 1\n", "plugin.description", "expected a string", "{'x': 1}"),
    ],
)
def test_wrong_types(tmp_path: Path, body: str, key: str, expected: str, found: str) -> None:
    err = manifest_error(tmp_path, HEADER + body)
    assert err.key == key
    assert expected in err.message
    assert f"found {found}" in err.message


def test_section_of_wrong_type(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, "resources = 5\n" + HEADER)
    assert err.key == "resources"
    assert "expected a table, found 5 (int)" in err.message


def test_every_error_of_a_manifest_is_listed(tmp_path: Path) -> None:
    err = manifest_error(
        tmp_path, HEADER + '[resources]\nmemory_mb = "1"\nmax_fuel = "2"\nmax_instances = 0\n'
    )
    assert err.key == "resources.memory_mb"
    lines = err.message.splitlines()
    assert lines[1:] == ["[resources.max_fuel]: expected an integer, found '2' (str)",
                         "[resources.max_instances]: expected a value greater than 0, found 0 (int)"]


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + 'verison = "1.0.0"\n')
    assert err.key == "plugin.verison"
    assert "unknown key 'verison' in [plugin]; did you mean 'version'?" in err.message


def test_unknown_key_in_dependency_table(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + '[dependencies]\npricing = { version = "1", optinal = true }\n')
    assert err.key == "dependencies.pricing.optinal"
    assert "did you mean 'optional'?" in err.message


def test_unknown_section_suggests_the_right_one(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + "[permission]\nread_files = []\n")
    assert err.key == "permission"
    assert "unknown section [permission]; did you mean 'permissions'?" in err.message


def test_unknown_section_without_close_match_lists_sections(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + "[zzz]\n")
    assert "did you mean" not in err.message
    assert "sections: plugin, capabilities, permissions" in err.message


def test_unknown_capability(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + '[capabilities]\nrequired = ["netwrk"]\n')
    assert err.key == "capabilities.required"
    assert "unknown capability 'netwrk'; did you mean 'network'?" in err.message
    assert all(c in err.message for c in CAPABILITY_NAMES)


def test_capability_both_required_and_optional(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + '[capabilities]\nrequired = ["clock"]\noptional = ["clock"]\n')
    assert err.key == "capabilities.optional"
    assert "'clock' listed as both required and optional" in err.message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.0", "version must be a semantic version like '1.2.3'"),
        ("v1.0.0", "found 'v1.0.0'"),
        ("01.0.0", "found '01.0.0'"),
    ],
)
def test_non_semver_version(tmp_path: Path, value: str, expected: str) -> None:
    err = manifest_error(tmp_path, f'[plugin]\nname = "orders"\nversion = "{value}"\n')
    assert err.key == "plugin.version"
    assert expected in err.message


def test_non_semver_min_runtime(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + 'min_runtime_version = "latest"\n')
    assert err.key == "plugin.min_runtime_version"
    assert "found 'latest'" in err.message


@pytest.mark.parametrize("name", ["Orders", "1orders", "or-ders", "o" * 64, ""])
def test_bad_plugin_name(tmp_path: Path, name: str) -> None:
    err = manifest_error(tmp_path, f'[plugin]\nname = "{name}"\nversion = "1.0.0"\n')
    assert err.key == "plugin.name"
    assert "^[a-z][a-z0-9_]{0,62}$" in err.message
    assert f"found {name!r}" in err.message


def test_bad_sha256(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + 'sha256 = "abc"\n')
    assert err.key == "plugin.sha256"
    assert "64 hexadecimal characters, found 'abc'" in err.message


# --- permissions -----------------------------------------------------------------------------------

FS = HEADER + '[capabilities]\nrequired = ["filesystem"]\n[permissions]\n'


@pytest.mark.parametrize("key", ["read_files", "write_files"])
@pytest.mark.parametrize("value", ["../x", "a/../../x", "a/.."])
def test_traversal_refused(tmp_path: Path, key: str, value: str) -> None:
    err = manifest_error(tmp_path, FS + f'{key} = ["ok", "{value}"]\n')
    assert err.key == f"permissions.{key}"
    assert f"path {value!r} contains a '..' component" in err.message


@pytest.mark.parametrize("value", ["/etc", "/", "\\\\server\\share", "C:/Windows"])
def test_absolute_path_refused(tmp_path: Path, value: str) -> None:
    err = manifest_error(tmp_path, FS + f"read_files = [{value!r}]\n")
    assert err.key == "permissions.read_files"
    assert "expected a path relative to the plugin's data root, found absolute path" in err.message


@pytest.mark.parametrize("value", [".", "./", ""])
def test_empty_path_refused(tmp_path: Path, value: str) -> None:
    err = manifest_error(tmp_path, FS + f'read_files = ["{value}"]\n')
    assert "expected a directory under the data root" in err.message


@pytest.mark.parametrize(
    ("field", "capability"),
    [
        ('read_files = ["a"]', "filesystem"),
        ('write_files = ["a"]', "filesystem"),
        ('network_hosts = ["a.com"]', "network"),
        ('environment_vars = ["TZ"]', "environment"),
        ('publish_topics = ["a"]', "messaging"),
        ('request_plugins = ["pricing"]', "messaging"),
    ],
)
def test_permission_asks_for_its_capability(tmp_path: Path, field: str, capability: str) -> None:
    """A permission list without its capability asks for it as optional (a policy that refuses it loads the
    plugin without it); one the manifest already requires stays required."""
    m = load_manifest(write(tmp_path, HEADER + f"[permissions]\n{field}\n"))
    assert m.capabilities.optional == (capability,)
    assert m.capabilities.required == ()
    required = load_manifest(write(tmp_path, HEADER + f'[capabilities]\nrequired = ["{capability}"]\n'
                                   f"[permissions]\n{field}\n"))
    assert required.capabilities.required == (capability,)
    assert required.capabilities.optional == ()


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("a.com:99999", "port must be a number from 1 to 65535, found '99999'"),
        ("a.com:http", "found 'http'"),
        ("*.a.com", "valid DNS name"),
        ("exa mple.com", "valid DNS name"),
        ("::1", "write IPv6 addresses as '[addr]:port'"),
        ("[nothex]:80", "must hold an IPv6 address"),
    ],
)
def test_bad_network_host(tmp_path: Path, host: str, expected: str) -> None:
    body = HEADER + f'[capabilities]\nrequired = ["network"]\n[permissions]\nnetwork_hosts = ["{host}"]\n'
    err = manifest_error(tmp_path, body)
    assert err.key == "permissions.network_hosts"
    assert expected in err.message


def test_bad_environment_var(tmp_path: Path) -> None:
    body = HEADER + '[capabilities]\nrequired = ["environment"]\n[permissions]\nenvironment_vars = ["A-B"]\n'
    err = manifest_error(tmp_path, body)
    assert err.key == "permissions.environment_vars"
    assert "environment variable name" in err.message
    assert "found 'A-B'" in err.message


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("a.>.b", "'>' may only be the last token"),
        ("a..b", "empty token"),
        ("a.b*", "must be whole tokens"),
        ("a b", "whitespace"),
        ("", "may not be empty"),
    ],
)
def test_bad_subscription_topic(tmp_path: Path, topic: str, expected: str) -> None:
    err = manifest_error(tmp_path, HEADER + f'[subscriptions]\ntopics = ["{topic}"]\n')
    assert err.key == "subscriptions.topics"
    assert expected in err.message


def test_bad_publish_topic(tmp_path: Path) -> None:
    body = HEADER + '[capabilities]\nrequired = ["messaging"]\n[permissions]\npublish_topics = [">.a"]\n'
    err = manifest_error(tmp_path, body)
    assert err.key == "permissions.publish_topics"


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("Pricing", "with a plugin name like 'pricing'"),
        ("", "with a plugin name like 'pricing'"),
        ("pricing.", "the function must be one name"),
        ("pricing.a.b", "the function must be one name"),
        ("pricing.a*", "the function must be one name"),
        ("pri*", "found 'pri*'"),
        ("> ", "with a plugin name"),
    ],
)
def test_bad_request_plugins_entry(tmp_path: Path, entry: str, expected: str) -> None:
    body = HEADER + f'[capabilities]\nrequired = ["messaging"]\n[permissions]\nrequest_plugins = ["{entry}"]\n'
    err = manifest_error(tmp_path, body)
    assert err.key == "permissions.request_plugins"
    assert "expected 'plugin', 'plugin.function', 'plugin.*' or '*'" in err.message
    assert expected in err.message


def test_request_plugins_entries() -> None:
    entries = ["pricing", "audit.*", "text_processor.handle_request", "*.health-check", "*", "pricing"]
    m = parse_manifest(HEADER + '[capabilities]\nrequired = ["messaging"]\n[permissions]\n'
                       f"request_plugins = {json.dumps(entries)}\n")
    assert m.permissions.request_plugins == tuple(entries[:-1])  # deduplicated
    assert request_matches("pricing", "pricing", "quote")
    assert request_matches("pricing.*", "pricing", "quote")
    assert request_matches("pricing.quote", "pricing", "quote")
    assert not request_matches("pricing.quote", "pricing", "handle_request")
    assert not request_matches("pricing", "pricing_v2", "quote")
    assert request_matches("*.health-check", "anything", "health-check")
    assert not request_matches("*.health-check", "anything", "handle_request")
    assert request_matches("*", "anything", "handle_request")


# --- dependencies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("requirement", ["^^1", "latest", "1.2.3.4", ""])
def test_bad_dependency_requirement(tmp_path: Path, requirement: str) -> None:
    err = manifest_error(tmp_path, HEADER + f'[dependencies]\npricing = "{requirement}"\n')
    assert err.key == "dependencies.pricing"
    assert "expected" in err.message
    assert "version requirement like '^1.2'" in err.message


def test_bad_dependency_requirement_in_table(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + '[dependencies]\npricing = { version = "^^1" }\n')
    assert err.key == "dependencies.pricing.version"
    assert "found '^^1'" in err.message


def test_dependency_of_wrong_type(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + "[dependencies]\npricing = 3\n")
    assert err.key == "dependencies.pricing"
    assert "expected a requirement string like '^1.2' or a table" in err.message
    assert "found int 3" in err.message


def test_bad_dependency_name(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + '[dependencies]\nPricing = "1"\n')
    assert err.key == "dependencies.Pricing"
    assert "dependency name must match" in err.message


def test_self_dependency(tmp_path: Path) -> None:
    err = manifest_error(tmp_path, HEADER + '[dependencies]\norders = "1"\n')
    assert err.key == "dependencies.orders"
    assert "lists itself as a dependency" in err.message


# --- helpers ---------------------------------------------------------------------------------------


def test_parse_manifest_reports_source() -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest("[plugin]\nname = \n", source="inline.toml")
    assert info.value.path == "inline.toml"
    assert "line 2" in str(info.value)


def test_subject_helpers() -> None:
    assert check_subject("a.*.>") == "a.*.>"
    assert subject_matches("orders.*", "orders.new")
    assert not subject_matches("orders.*", "orders.new.x")
    assert subject_matches("orders.>", "orders.new.x")
    assert not subject_matches("orders.>", "orders")
    assert subject_matches("a.b", "a.b")
    assert not subject_matches("a.b", "a.b.c")
    assert not subject_matches("orders.>", "orders.*")


def test_parse_host() -> None:
    assert parse_host("API.example.com:443") == ("api.example.com", 443)
    assert parse_host("10.0.0.1") == ("10.0.0.1", None)
    assert parse_host("[::1]:80") == ("::1", 80)
    assert parse_host("*.internal", allow_wildcard=True) == ("*.internal", None)
