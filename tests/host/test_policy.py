"""Operator policy files and the resolution of a manifest against a policy."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from sandbus.host.lifecycle.manifest import Manifest, parse_manifest
from sandbus.host.lifecycle.policy import Denial, Policy, load_policy, resolve
from sandbus.host.sandbox.config import MIB, DirGrant
from sandbus.sdk.errors import PolicyError, SecurityViolationError

HEADER = '[plugin]\nname = "orders"\nversion = "1.0.0"\n'


def manifest(body: str = "") -> Manifest:
    return parse_manifest(HEADER + textwrap.dedent(body), source="orders.toml")


def make_policy(**sections: object) -> Policy:
    return Policy.model_validate(sections)


def write_policy(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


def policy_error(tmp_path: Path, body: str) -> PolicyError:
    path = write_policy(tmp_path, body)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.details["path"] == str(path)
    assert str(path) in str(info.value)
    return info.value


# --- loading ---------------------------------------------------------------------------------------


def test_default_policy_denies_all_but_compute() -> None:
    p = Policy.default()
    assert p.capabilities.allowed == ("compute",)
    assert (p.limits.memory_mb, p.limits.timeout_seconds, p.limits.max_fuel, p.limits.max_instances) == (
        256,
        30.0,
        10_000_000_000,
        16,
    )
    assert (p.defaults.memory_mb, p.defaults.timeout_seconds, p.defaults.max_fuel) == (64, 5.0, 1_000_000_000)
    assert p.defaults.max_instances == 4
    assert p.filesystem.readable == p.filesystem.writable == ()
    assert p.network.allowed_hosts == p.environment.allowed_vars == ()
    assert p.describe() == "the default policy"


def test_load_full_policy(tmp_path: Path) -> None:
    path = write_policy(
        tmp_path,
        f"""
        [capabilities]
        allowed = ["compute", "clock", "filesystem"]
        [filesystem]
        readable = ["{tmp_path}/ro"]
        writable = ["{tmp_path}/rw"]
        [network]
        allowed_hosts = ["api.example.com:443", "*.internal"]
        [environment]
        allowed_vars = ["TZ"]
        [limits]
        memory_mb = 128
        timeout_seconds = 10
        [defaults]
        memory_mb = 16
        """,
    )
    p = load_policy(path)
    assert p.source == str(path)
    assert p.capabilities.allowed == ("compute", "clock", "filesystem")
    assert p.filesystem.readable == (tmp_path / "ro",)
    assert p.limits.memory_mb == 128
    assert p.limits.timeout_seconds == 10.0
    assert p.limits.max_fuel == 10_000_000_000  # unstated ceiling keeps the built-in value
    assert p.defaults.memory_mb == 16
    assert p.defaults.timeout_seconds == 5.0
    assert p.describe() == f"policy {path}"


def test_unstated_default_is_lowered_to_a_lower_ceiling(tmp_path: Path) -> None:
    p = load_policy(write_policy(tmp_path, "[limits]\nmemory_mb = 32\ntimeout_seconds = 1\n"))
    assert p.defaults.memory_mb == 32
    assert p.defaults.timeout_seconds == 1.0


def test_stated_default_above_ceiling_is_an_error(tmp_path: Path) -> None:
    err = policy_error(tmp_path, "[limits]\nmemory_mb = 32\n[defaults]\nmemory_mb = 64\n")
    assert err.details["key"] == "defaults.memory_mb"
    assert "default memory_mb = 64 is above the ceiling [limits] memory_mb = 32" in str(err)


def test_policy_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="policy file not found") as info:
        load_policy(tmp_path / "nope.toml")
    assert info.value.details["path"] == str(tmp_path / "nope.toml")


def test_policy_unparsable(tmp_path: Path) -> None:
    err = policy_error(tmp_path, "[limits\n")
    assert "not valid TOML at line 1" in str(err)


def test_policy_unknown_key_did_you_mean(tmp_path: Path) -> None:
    err = policy_error(tmp_path, "[network]\nallowed_host = []\n")
    assert err.details["key"] == "network.allowed_host"
    assert "unknown key 'allowed_host' in [network]; did you mean 'allowed_hosts'?" in str(err)


def test_policy_unknown_section_did_you_mean(tmp_path: Path) -> None:
    err = policy_error(tmp_path, "[limit]\nmemory_mb = 1\n")
    assert err.details["key"] == "limit"
    assert "did you mean 'limits'?" in str(err)


def test_policy_wrong_type(tmp_path: Path) -> None:
    err = policy_error(tmp_path, '[limits]\nmemory_mb = "lots"\n')
    assert err.details["key"] == "limits.memory_mb"
    assert "expected an integer, found 'lots' (str)" in str(err)


def test_policy_unknown_capability(tmp_path: Path) -> None:
    err = policy_error(tmp_path, '[capabilities]\nallowed = ["compute", "filesystm"]\n')
    assert err.details["key"] == "capabilities.allowed"
    assert "did you mean 'filesystem'?" in str(err)


def test_policy_relative_directory(tmp_path: Path) -> None:
    err = policy_error(tmp_path, '[filesystem]\nreadable = ["data"]\n')
    assert err.details["key"] == "filesystem.readable"
    assert "expected an absolute directory, found 'data'" in str(err)


def test_policy_bad_host_pattern(tmp_path: Path) -> None:
    err = policy_error(tmp_path, '[network]\nallowed_hosts = ["a.com:0"]\n')
    assert err.details["key"] == "network.allowed_hosts"
    assert "port must be a number from 1 to 65535" in str(err)


# --- resolution: capabilities ----------------------------------------------------------------------


def test_required_capability_refused(tmp_path: Path) -> None:
    m = manifest('[capabilities]\nrequired = ["compute", "network"]\n')
    with pytest.raises(SecurityViolationError) as info:
        resolve(m, Policy.default(), data_root=tmp_path, host_env={})
    err = info.value
    assert err.plugin == "orders"
    assert err.details["capability"] == "network"
    assert "requires capability 'network', which the default policy does not allow (allowed: compute)" in str(
        err
    )


def test_required_capability_refused_names_policy_file(tmp_path: Path) -> None:
    policy = load_policy(write_policy(tmp_path, '[capabilities]\nallowed = ["clock"]\n'))
    with pytest.raises(
        SecurityViolationError, match=re.escape(f"policy {tmp_path / 'policy.toml'} does not allow")
    ):
        resolve(manifest('[capabilities]\nrequired = ["random"]\n'), policy, data_root=tmp_path, host_env={})


def test_optional_capability_refused_is_not_granted(tmp_path: Path) -> None:
    m = manifest('[capabilities]\nrequired = ["compute"]\noptional = ["clock", "random"]\n')
    policy = make_policy(capabilities={"allowed": ("compute", "random")})
    grant = resolve(m, policy, data_root=tmp_path, host_env={})
    assert grant.granted == {"compute", "random"}
    assert grant.capabilities.random is True
    assert grant.capabilities.clock is False
    assert grant.denied_optional == (Denial("capability 'clock'", "not allowed by the default policy"),)
    assert str(grant.denied_optional[0]) == "capability 'clock': not allowed by the default policy"
    assert grant.allows("random")
    assert not grant.allows("clock")


def test_plugin_gets_nothing_it_did_not_ask_for(tmp_path: Path) -> None:
    policy = make_policy(capabilities={"allowed": ("compute", "clock", "random", "messaging")})
    grant = resolve(manifest(), policy, data_root=tmp_path, host_env={})
    assert grant.granted == frozenset()
    assert not grant.capabilities.clock
    assert not grant.capabilities.random


def test_extra_capabilities_reach_the_sandbox(tmp_path: Path) -> None:
    m = manifest('[capabilities]\nrequired = ["storage", "messaging", "clock"]\n')
    policy = make_policy(capabilities={"allowed": ("storage", "messaging", "clock")})
    caps = resolve(m, policy, data_root=tmp_path, host_env={}).capabilities
    assert caps.allows("storage")
    assert caps.allows("messaging")
    assert caps.allows("clock")
    assert not caps.allows("network")


# --- resolution: resources -------------------------------------------------------------------------


def test_defaults_applied_when_manifest_is_silent(tmp_path: Path) -> None:
    limits = resolve(manifest(), Policy.default(), data_root=tmp_path, host_env={}).limits
    assert limits.memory_bytes == 64 * MIB
    assert limits.timeout_s == 5.0
    assert limits.fuel == 1_000_000_000
    assert limits.max_instances == 4


def test_manifest_values_used_within_ceilings(tmp_path: Path) -> None:
    m = manifest("[resources]\nmemory_mb = 256\ntimeout_seconds = 0.5\nmax_fuel = 10\nmax_instances = 16\n")
    limits = resolve(m, Policy.default(), data_root=tmp_path, host_env={}).limits
    assert (limits.memory_bytes, limits.timeout_s, limits.fuel, limits.max_instances) == (
        256 * MIB,
        0.5,
        10,
        16,
    )


@pytest.mark.parametrize(
    ("body", "resource", "asked", "ceiling"),
    [
        ("memory_mb = 512", "memory_mb", 512, 256),
        ("timeout_seconds = 31", "timeout_seconds", 31.0, 30.0),
        ("max_fuel = 10_000_000_001", "max_fuel", 10_000_000_001, 10_000_000_000),
        ("max_instances = 17", "max_instances", 17, 16),
    ],
)
def test_resource_above_ceiling_refused(
    tmp_path: Path, body: str, resource: str, asked: float, ceiling: float
) -> None:
    with pytest.raises(SecurityViolationError) as info:
        resolve(manifest(f"[resources]\n{body}\n"), Policy.default(), data_root=tmp_path, host_env={})
    err = info.value
    assert err.plugin == "orders"
    assert (err.details["resource"], err.details["asked"], err.details["ceiling"]) == (
        resource,
        asked,
        ceiling,
    )
    assert f"asks for [resources] {resource} = {asked}, above the ceiling of {ceiling}" in str(err)
    assert f"the default policy [limits] {resource}" in str(err)


# --- resolution: filesystem ------------------------------------------------------------------------

FS = """
[capabilities]
required = ["filesystem"]
[permissions]
read_files = ["in", "shared/docs", "out"]
write_files = ["out"]
"""


def fs_policy(readable: list[Path], writable: list[Path]) -> Policy:
    return make_policy(
        capabilities={"allowed": ("compute", "filesystem")},
        filesystem={"readable": tuple(readable), "writable": tuple(writable)},
    )


def test_dirs_resolve_under_data_root_inside_policy_dirs(tmp_path: Path) -> None:
    root = tmp_path / "data" / "orders"
    grant = resolve(manifest(FS), fs_policy([tmp_path / "data"], [root / "out"]), data_root=root, host_env={})
    assert grant.capabilities.dirs == (
        DirGrant(host=root / "out", guest="/out", writable=True),
        DirGrant(host=root / "in", guest="/in", writable=False),
        DirGrant(host=root / "shared" / "docs", guest="/shared/docs", writable=False),
    )
    assert grant.capabilities.dirs[2].guest_path() == "/shared/docs"


def test_read_dir_outside_policy_dirs_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with pytest.raises(SecurityViolationError) as info:
        resolve(
            manifest(FS), fs_policy([tmp_path / "elsewhere"], [root / "out"]), data_root=root, host_env={}
        )
    message = str(info.value)
    # "out" is writable so readable too, "in" is the first one outside
    assert "read_files entry 'in' resolves to" in message
    assert "not inside a readable directory of the default policy" in message
    assert str(tmp_path / "elsewhere") in message
    assert info.value.details["path"] == "in"


def test_write_dir_needs_writable_policy_dir(tmp_path: Path) -> None:
    root = tmp_path / "data"
    with pytest.raises(
        SecurityViolationError, match=r"write_files entry 'out'.*not inside a writable directory"
    ):
        resolve(manifest(FS), fs_policy([root], []), data_root=root, host_env={})


def test_symlink_escaping_data_root_refused(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    (root / "in").symlink_to(tmp_path / "secret")
    m = manifest('[capabilities]\nrequired = ["filesystem"]\n[permissions]\nread_files = ["in"]\n')
    with pytest.raises(SecurityViolationError, match="outside the data root"):
        resolve(m, fs_policy([tmp_path], []), data_root=root, host_env={})


def test_optional_filesystem_refused_grants_no_dirs(tmp_path: Path) -> None:
    m = manifest('[capabilities]\noptional = ["filesystem"]\n[permissions]\nread_files = ["in"]\n')
    grant = resolve(m, Policy.default(), data_root=tmp_path, host_env={})
    assert grant.capabilities.dirs == ()
    assert [d.item for d in grant.denied_optional] == ["capability 'filesystem'"]


# --- resolution: environment, network, messaging ---------------------------------------------------


def test_env_only_allowlisted_vars_with_host_values(tmp_path: Path) -> None:
    m = manifest(
        '[capabilities]\nrequired = ["environment"]\n'
        '[permissions]\nenvironment_vars = ["TZ", "API_URL", "UNSET"]\n'
    )
    policy = make_policy(
        capabilities={"allowed": ("environment",)},
        environment={"allowed_vars": ("TZ", "API_URL", "UNSET")},
    )
    host_env = {"TZ": "UTC", "API_URL": "http://x", "SECRET": "hunter2", "HOME": "/root"}
    grant = resolve(m, policy, data_root=tmp_path, host_env=host_env)
    assert grant.capabilities.env == {"TZ": "UTC", "API_URL": "http://x"}
    assert grant.capabilities.env_unset == {"UNSET"}
    assert grant.denied_optional == ()


def test_env_var_outside_the_policy_refuses_the_plugin(tmp_path: Path) -> None:
    m = manifest('[capabilities]\nrequired = ["environment"]\n[permissions]\nenvironment_vars = ["TZ", "SECRET"]\n')
    policy = make_policy(capabilities={"allowed": ("environment",)}, environment={"allowed_vars": ("TZ",)})
    with pytest.raises(SecurityViolationError) as info:
        resolve(m, policy, data_root=tmp_path, host_env={"SECRET": "hunter2"})
    assert (info.value.details["permission"], info.value.details["entry"]) == ("environment_vars", "SECRET")
    assert "[environment] allowed_vars ('TZ')" in str(info.value)


def test_env_without_capability_is_empty(tmp_path: Path) -> None:
    m = manifest('[capabilities]\noptional = ["environment"]\n[permissions]\nenvironment_vars = ["TZ"]\n')
    policy = make_policy(environment={"allowed_vars": ("TZ",)})
    assert resolve(m, policy, data_root=tmp_path, host_env={"TZ": "UTC"}).capabilities.env == {}


def test_network_hosts_inside_the_policy(tmp_path: Path) -> None:
    m = manifest(
        '[capabilities]\nrequired = ["network"]\n[permissions]\nnetwork_hosts = '
        '["api.example.com:443", "db.internal:5432"]\n'
    )
    policy = make_policy(
        capabilities={"allowed": ("network",)},
        network={"allowed_hosts": ("API.example.com:443", "*.internal")},
    )
    grant = resolve(m, policy, data_root=tmp_path, host_env={})
    assert grant.network_hosts == ("api.example.com:443", "db.internal:5432")
    assert grant.denied_optional == ()
    assert grant.may_connect("api.example.com", 443)
    assert not grant.may_connect("api.example.com", 80)


@pytest.mark.parametrize("entry", ["api.example.com:80", "internal", "evil.com"])
def test_network_host_outside_the_policy_refuses_the_plugin(tmp_path: Path, entry: str) -> None:
    m = manifest(f'[capabilities]\nrequired = ["network"]\n[permissions]\nnetwork_hosts = ["{entry}"]\n')
    policy = make_policy(
        capabilities={"allowed": ("network",)},
        network={"allowed_hosts": ("API.example.com:443", "*.internal")},
    )
    with pytest.raises(SecurityViolationError, match=re.escape(f"network_hosts entry {entry!r} is not allowed")):
        resolve(m, policy, data_root=tmp_path, host_env={})


def test_network_host_without_port_needs_a_portless_policy_entry(tmp_path: Path) -> None:
    m = manifest('[capabilities]\nrequired = ["network"]\n[permissions]\nnetwork_hosts = ["a.com"]\n')
    narrow = make_policy(capabilities={"allowed": ("network",)}, network={"allowed_hosts": ("a.com:443",)})
    wide = make_policy(capabilities={"allowed": ("network",)}, network={"allowed_hosts": ("a.com",)})
    with pytest.raises(SecurityViolationError, match=re.escape("network_hosts entry 'a.com'")):
        resolve(m, narrow, data_root=tmp_path, host_env={})
    grant = resolve(m, wide, data_root=tmp_path, host_env={})
    assert grant.network_hosts == ("a.com",)
    assert grant.may_connect("A.com", 8443)


def test_publish_topics_kept_with_messaging(tmp_path: Path) -> None:
    m = manifest('[capabilities]\noptional = ["messaging"]\n[permissions]\npublish_topics = ["orders.*"]\n')
    allowed = make_policy(capabilities={"allowed": ("messaging",)}, messaging={"publish_topics": ("orders.>",)})
    grant = resolve(m, allowed, data_root=tmp_path, host_env={})
    assert grant.publish_topics == ("orders.*",)
    assert grant.may_publish("orders.new")
    assert not grant.may_publish("billing.new")
    refused = resolve(m, Policy.default(), data_root=tmp_path, host_env={})
    assert refused.publish_topics == ()
    assert not refused.may_publish("orders.new")


def test_request_plugins_kept_with_messaging(tmp_path: Path) -> None:
    m = manifest('[capabilities]\noptional = ["messaging"]\n[permissions]\n'
                 'request_plugins = ["pricing.quote", "audit"]\n')
    allowed = make_policy(capabilities={"allowed": ("messaging",)}, messaging={"request_plugins": ("pricing", "audit")})
    grant = resolve(m, allowed, data_root=tmp_path, host_env={})
    assert grant.request_plugins == ("pricing.quote", "audit")
    assert grant.may_request("pricing", "quote")
    assert not grant.may_request("pricing", "handle_request")
    assert grant.may_request("audit", "anything")
    assert not grant.may_request("billing", "handle_request")
    refused = resolve(m, Policy.default(), data_root=tmp_path, host_env={})
    assert refused.request_plugins == ()
    assert not refused.may_request("pricing", "quote")


def test_grant_keeps_manifest(tmp_path: Path) -> None:
    m = manifest()
    assert resolve(m, Policy.default(), data_root=tmp_path, host_env={}).manifest is m
