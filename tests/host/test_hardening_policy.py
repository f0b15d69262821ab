"""The operator policy has the last word on every grant, and says so: messaging ceilings (deny by default,
sound intersection) and no silent clamping of anything a granted capability lists.

Resolution is tested directly (sandbus.host.lifecycle.policy.resolve) and through a real PluginManager loading the echo
plugin, so what an operator sees (the plugin refused with the reason, a ``policy.refused`` audit event,
the other plugins serving) is pinned too.
"""

from __future__ import annotations

import itertools
import re
import shutil
import textwrap
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbus.host.lifecycle import PluginManager, PluginStatus
from sandbus.host.lifecycle.manifest import (
    Manifest,
    check_request_pattern,
    check_subject,
    load_manifest,
    parse_manifest,
    request_matches,
    subject_matches,
)
from sandbus.host.lifecycle.policy import Policy, load_policy, request_covers, resolve, subject_covers
from sandbus.host.sandbox import ModuleCache
from sandbus.sdk.errors import ManifestError, PolicyError, SecurityViolationError
from tests.conftest import AuditLog

HEADER = '[plugin]\nname = "orders"\nversion = "1.0.0"\n'


def manifest(body: str) -> Manifest:
    return parse_manifest(HEADER + textwrap.dedent(body), source="orders.toml")


def policy(**sections: object) -> Policy:
    return Policy.model_validate(sections)


MESSAGING = {"allowed": ("compute", "messaging")}


# -- finding 18: messaging grants have ceilings ------------------------------------------------------


def test_f18_wildcard_messaging_grants_are_refused_without_ceilings(tmp_path: Path) -> None:
    m = manifest('[capabilities]\nrequired = ["messaging"]\n[permissions]\npublish_topics = [">"]\n'
                 'request_plugins = ["*"]\n')
    with pytest.raises(SecurityViolationError) as info:
        resolve(m, policy(capabilities=MESSAGING), data_root=tmp_path, host_env={})
    err = info.value
    assert (err.details["permission"], err.details["entry"]) == ("publish_topics", ">")
    assert "[messaging] publish_topics (none)" in str(err)
    only_requests = manifest('[capabilities]\nrequired = ["messaging"]\n[permissions]\nrequest_plugins = ["*"]\n')
    with pytest.raises(SecurityViolationError, match=r"request_plugins entry '\*' is not covered"):
        resolve(only_requests, policy(capabilities=MESSAGING), data_root=tmp_path, host_env={})


def test_f18_a_narrower_ceiling_does_not_grant_a_wider_pattern(tmp_path: Path) -> None:
    ceilings = policy(capabilities=MESSAGING, messaging={"publish_topics": ("orders.>",),
                                                         "request_plugins": ("pricing",)})
    for body, entry in (('publish_topics = [">"]', ">"), ('publish_topics = ["orders.*", "*.new"]', "*.new"),
                        ('request_plugins = ["*"]', "*"), ('request_plugins = ["*.quote"]', "*.quote")):
        m = manifest(f'[capabilities]\nrequired = ["messaging"]\n[permissions]\n{body}\n')
        with pytest.raises(SecurityViolationError) as info:
            resolve(m, ceilings, data_root=tmp_path, host_env={})
        assert info.value.details["entry"] == entry
    ok = manifest('[capabilities]\nrequired = ["messaging"]\n[permissions]\n'
                  'publish_topics = ["orders.*", "orders.new.eu", "orders.>"]\n'
                  'request_plugins = ["pricing.quote", "pricing"]\n')
    grant = resolve(ok, ceilings, data_root=tmp_path, host_env={})
    assert grant.publish_topics == ("orders.*", "orders.new.eu", "orders.>")
    assert grant.may_publish("orders.new")
    assert not grant.may_publish("billing.new")
    assert grant.request_plugins == ("pricing.quote", "pricing")


@pytest.mark.parametrize(("ceiling", "pattern", "covered"), [
    (">", ">", True), (">", "a.*.c", True), ("a.>", "a.b", True), ("a.>", "a.*.>", True),
    ("a.>", "a", False), ("a.>", ">", False), ("a.*", "a.b", True), ("a.*", "a.*", True),
    ("a.*", "a.>", False), ("a.b", "a.*", False), ("a.b", "a.b", True), ("a.b", "a.b.c", False),
    ("*.b", "a.b", True), ("*.>", "a.b.c", True), ("*", ">", False),
])
def test_f18_subject_coverage_is_sound(ceiling: str, pattern: str, covered: bool) -> None:
    assert subject_covers(ceiling, pattern) is covered


@pytest.mark.parametrize(("ceiling", "pattern", "covered"), [
    ("*", "*", True), ("*", "pricing.quote", True), ("pricing", "pricing.quote", True),
    ("pricing", "pricing.*", True), ("pricing.*", "pricing", True), ("pricing.quote", "pricing", False),
    ("pricing", "*", False), ("pricing", "billing", False), ("*.health", "pricing.health", True),
    ("*.health", "pricing", False), ("*.health", "*", False),
])
def test_f18_request_coverage_is_sound(ceiling: str, pattern: str, covered: bool) -> None:
    assert request_covers(ceiling, pattern) is covered


def test_f18_policy_ceilings_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[messaging]\npublish_topics = ["orders..x"]\n')
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.details["key"] == "messaging.publish_topics"
    path.write_text('[messaging]\nrequest_plugins = ["Pricing!"]\n')
    with pytest.raises(PolicyError):
        load_policy(path)
    path.write_text('[network]\nallow_addresses = ["localhost"]\n')
    with pytest.raises(PolicyError, match="allow_addresses"):
        load_policy(path)
    path.write_text('[messaging]\npublish_topics = ["orders.>"]\nrequest_plugins = ["pricing.quote"]\n'
                    '[network]\nallow_addresses = ["10.1.0.0/16", "::1"]\n')
    loaded = load_policy(path)
    assert loaded.messaging.publish_topics == ("orders.>",)
    assert [str(n) for n in loaded.network.networks()] == ["10.1.0.0/16", "::1/128"]


def test_f18_default_policy_has_no_messaging_ceilings() -> None:
    default = Policy.default()
    assert default.messaging.publish_topics == default.messaging.request_plugins == ()
    assert default.network.allow_addresses == ()


# -- finding 25: a requested grant the policy refuses is a load error ---------------------------------


@pytest.mark.parametrize(("capability", "permission", "entry", "policy_sections"), [
    ("network", "network_hosts", "api.example.com:443", {"network": {"allowed_hosts": ("other.com",)}}),
    ("environment", "environment_vars", "SECRET", {"environment": {"allowed_vars": ("TZ",)}}),
    ("messaging", "publish_topics", "billing.x", {"messaging": {"publish_topics": ("orders.>",)}}),
    ("messaging", "request_plugins", "billing", {"messaging": {"request_plugins": ("pricing",)}}),
])
def test_f25_a_refused_entry_is_never_silently_dropped(tmp_path: Path, capability: str, permission: str,
                                                       entry: str, policy_sections: dict[str, object]) -> None:
    for kind in ("required", "optional"):
        m = manifest(f'[capabilities]\n{kind} = ["{capability}"]\n[permissions]\n{permission} = ["{entry}"]\n')
        p = policy(capabilities={"allowed": ("compute", capability)}, **policy_sections)
        with pytest.raises(SecurityViolationError) as info:
            resolve(m, p, data_root=tmp_path, host_env={"SECRET": "x"})
        assert (info.value.details["permission"], info.value.details["entry"]) == (permission, entry)
        assert repr(entry) in str(info.value)


def test_f25_a_refused_optional_capability_takes_its_entries_with_it(tmp_path: Path) -> None:
    m = manifest('[capabilities]\noptional = ["network", "messaging"]\n[permissions]\n'
                 'network_hosts = ["api.example.com"]\npublish_topics = [">"]\n')
    grant = resolve(m, Policy.default(), data_root=tmp_path, host_env={})
    assert grant.network_hosts == ()
    assert grant.publish_topics == ()
    assert [d.item for d in grant.denied_optional] == ["capability 'network'", "capability 'messaging'"]


def _manager(tmp_path: Path, plugins_dir: Path, audit: AuditLog, toml: str, policy_text: str) -> PluginManager:
    d = tmp_path / "plugins"
    d.mkdir()
    shutil.copy(plugins_dir / "echo.wasm", d / "echo.wasm")
    shutil.copy(plugins_dir / "echo.toml", d / "echo.toml")
    shutil.copy(plugins_dir / "echo.wasm", d / "fetcher.wasm")
    (d / "fetcher.toml").write_text(toml)
    (tmp_path / "policy.toml").write_text(policy_text)
    return PluginManager(d, policy=load_policy(tmp_path / "policy.toml"), on_audit=audit,
                         cache=ModuleCache(tmp_path / "cache"))


FETCHER = """
[plugin]
name = "fetcher"
version = "1.0.0"
[capabilities]
required = ["compute", "network"]
[permissions]
network_hosts = ["api.example.com:443"]
"""


def test_f25_a_host_outside_the_policy_keeps_the_plugin_from_loading(tmp_path: Path, plugins_dir: Path,
                                                                     audit: AuditLog) -> None:
    manager = _manager(tmp_path, plugins_dir, audit, FETCHER,
                       '[capabilities]\nallowed = ["compute", "network"]\n[network]\nallowed_hosts = ["other.com"]\n')
    try:
        report = manager.discover_and_load()
        assert "echo" in report.loaded
        assert "fetcher" not in report.loaded
        info = manager.info("fetcher")
        assert info.status is PluginStatus.FAILED
        assert "network_hosts entry 'api.example.com:443' is not allowed" in (info.last_error or "")
        refused = [e for e in audit if e.kind == "policy.refused"]
        assert refused
        assert refused[0].plugin == "fetcher"
        assert manager.execute("echo", "handle_request", b'{"a":1}') == b'{"a":1}'  # the others serve
    finally:
        manager.close()


def test_f25_inside_the_policy_it_loads_with_everything_it_asked_for(tmp_path: Path, plugins_dir: Path,
                                                                     audit: AuditLog) -> None:
    manager = _manager(tmp_path, plugins_dir, audit, FETCHER, '[capabilities]\nallowed = ["compute", "network"]\n'
                       '[network]\nallowed_hosts = ["*.example.com"]\n')
    try:
        manager.discover_and_load()
        grant = manager.grant("fetcher")
        assert grant.network_hosts == ("api.example.com:443",)
        assert grant.may_connect("api.example.com", 443)
    finally:
        manager.close()


# -- finding 18: coverage checked against brute force -------------------------------------------------

_TOKENS = ("a", "b")
#: Concrete tokens: those the patterns use and one they never use, which '*' and '>' match and a literal
#: does not; subjects up to one token longer than any pattern, which only '>' reaches.
_UNIVERSE_TOKENS = (*_TOKENS, "z")
_MAX_PATTERN = 4


def _brute_match(pattern: str, subject: str) -> bool:
    """NATS matching written apart from sandbus.host.lifecycle.manifest: '*' one token, '>' one or more at the end."""
    regex = r"\.".join("[^.]+" if t == "*" else ".+" if t == ">" else re.escape(t) for t in pattern.split("."))
    return re.fullmatch(regex, subject) is not None


_SUBJECTS = [".".join(p) for n in range(1, _MAX_PATTERN + 2) for p in itertools.product(_UNIVERSE_TOKENS, repeat=n)]

_patterns = st.builds(
    lambda body, tail: ".".join(body + ([">"] if tail else [])),
    st.lists(st.sampled_from((*_TOKENS, "*")), min_size=0, max_size=_MAX_PATTERN - 1),
    st.booleans(),
).filter(bool)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(ceiling=_patterns, pattern=_patterns)
def test_f18_subject_covers_agrees_with_brute_force(ceiling: str, pattern: str) -> None:
    check_subject(ceiling)
    check_subject(pattern)
    expected = all(_brute_match(ceiling, s) for s in _SUBJECTS if _brute_match(pattern, s))
    assert subject_covers(ceiling, pattern) is expected, (ceiling, pattern)
    # And what a grant then allows at publish time is what the brute-force matcher allows.
    for s in _SUBJECTS:
        assert subject_matches(pattern, s) is _brute_match(pattern, s), (pattern, s)


_PLUGINS, _FUNCTIONS = ("p", "q"), ("f", "handle_request")
_TARGETS = [(p, f) for p in (*_PLUGINS, "r") for f in (*_FUNCTIONS, "g")]
_requests = st.one_of(
    st.just("*"),
    st.sampled_from(_PLUGINS),
    st.builds(lambda p, f: f"{p}.{f}", st.sampled_from((*_PLUGINS, "*")), st.sampled_from((*_FUNCTIONS, "*"))),
)


def _brute_request(entry: str, plugin: str, function: str) -> bool:
    p, _, f = entry.partition(".")
    return p in ("*", plugin) and f in ("", "*", function)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(ceiling=_requests, pattern=_requests)
def test_f18_request_covers_agrees_with_brute_force(ceiling: str, pattern: str) -> None:
    check_request_pattern(ceiling)
    check_request_pattern(pattern)
    expected = all(_brute_request(ceiling, p, f) for p, f in _TARGETS if _brute_request(pattern, p, f))
    assert request_covers(ceiling, pattern) is expected, (ceiling, pattern)
    for p, f in _TARGETS:
        assert request_matches(pattern, p, f) is _brute_request(pattern, p, f), (pattern, p, f)


@pytest.mark.parametrize("bad", ["a..b", "$JS.>", "a.>.b", "a*", ">.a", "", "a.", "a b", "a.b\n"])
def test_f18_ceilings_and_manifests_share_one_subject_rule(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f'[messaging]\npublish_topics = [{orjson.dumps(bad).decode()}]\n')
    with pytest.raises(PolicyError):
        load_policy(path)
    with pytest.raises(ManifestError, match=r"permissions\.publish_topics"):
        manifest(f'[capabilities]\nrequired = ["messaging"]\n[permissions]\npublish_topics = '
                 f'[{orjson.dumps(bad).decode()}]\n')


# -- finding 18: subscriptions have a ceiling too ------------------------------------------------------


def test_f18_subscriptions_to_everything_are_refused_without_a_ceiling(tmp_path: Path) -> None:
    """A compute-only plugin asking to hear every topic on the bus (``>``) does not load under the
    default policy, and the error names the topic and the policy key to set."""
    m = manifest('[capabilities]\nrequired = ["compute"]\n[subscriptions]\ntopics = [">"]\n')
    with pytest.raises(SecurityViolationError) as info:
        resolve(m, Policy.default(), data_root=tmp_path, host_env={})
    err = info.value
    assert (err.details["permission"], err.details["entry"]) == ("subscriptions.topics", ">")
    assert "[subscriptions] topics entry '>'" in str(err)
    assert "[messaging] subscribe_topics (none)" in str(err)
    assert Policy.default().messaging.subscribe_topics == ()


def test_f18_subscriptions_a_narrower_ceiling_does_not_grant_a_wider_topic(tmp_path: Path) -> None:
    ceiling = policy(messaging={"subscribe_topics": ("orders.>",)})
    for topics, entry in (('[">"]', ">"), ('["orders.*", "*.created"]', "*.created"), ('["orders"]', "orders")):
        m = manifest(f'[capabilities]\nrequired = ["compute"]\n[subscriptions]\ntopics = {topics}\n')
        with pytest.raises(SecurityViolationError) as info:
            resolve(m, ceiling, data_root=tmp_path, host_env={})
        assert info.value.details["entry"] == entry
    ok = manifest('[capabilities]\nrequired = ["compute"]\n[subscriptions]\ntopics = ["orders.*", "orders.new.eu"]\n')
    assert resolve(ok, ceiling, data_root=tmp_path, host_env={}).subscribe_topics == ("orders.*", "orders.new.eu")


@pytest.mark.parametrize("bad", ["a..b", "$JS.>", "a.>.b", "a*", "ordérs.x", "a.b\n"])
def test_f18_subscriptions_ceiling_uses_the_one_subject_rule(tmp_path: Path, bad: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(f'[messaging]\nsubscribe_topics = [{orjson.dumps(bad).decode()}]\n')
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.details["key"] == "messaging.subscribe_topics"


def test_f18_subscriptions_the_example_policy_grants_exactly_what_the_examples_need(tmp_path: Path) -> None:
    """``make run`` serves the example plugins under plugins/policy.toml: every example manifest
    resolves (order_logger with its orders.* subscription), and the policy names no topic or target
    beyond what they ask for."""
    root = Path(__file__).resolve().parents[2] / "plugins"
    example = load_policy(root / "policy.toml")
    manifests = [load_manifest(p) for p in sorted(root.glob("*/*.toml")) if p.parent.name != "build"]
    assert {m.name for m in manifests} >= {"echo", "order_logger", "text_processor"}
    grants = {m.name: resolve(m, example, data_root=tmp_path, host_env={}) for m in manifests}
    assert grants["order_logger"].subscribe_topics == ("orders.*",)
    asked = {t for g in grants.values() for t in g.subscribe_topics}
    assert set(example.messaging.subscribe_topics) == asked
    assert example.messaging.publish_topics == example.messaging.request_plugins == ()
    with pytest.raises(SecurityViolationError, match="subscribe_topics"):  # and the default policy refuses it
        resolve(next(m for m in manifests if m.name == "order_logger"), Policy.default(), data_root=tmp_path,
                host_env={})


# -- finding 20: send limits come from the policy ------------------------------------------------------


def test_f20_fan_out_send_limits_are_validated_and_granted(tmp_path: Path) -> None:
    default = Policy.default().messaging
    assert (default.max_sends_per_second, default.send_burst, default.max_sends_per_call) == (1000.0, 1000, 64)
    path = tmp_path / "policy.toml"
    for bad in ("max_sends_per_second = 0.0", "send_burst = 0", "max_sends_per_call = -1", 'send_burst = "9"'):
        path.write_text(f"[messaging]\n{bad}\n")
        with pytest.raises(PolicyError) as info:
            load_policy(path)
        assert info.value.details["key"] == f"messaging.{bad.split()[0]}"
    path.write_text("[messaging]\nmax_sends_per_second = 2.5\nsend_burst = 7\nmax_sends_per_call = 3\n")
    grant = resolve(manifest('[capabilities]\nrequired = ["compute"]\n'), load_policy(path), data_root=tmp_path,
                    host_env={})
    assert tuple(grant.send_limits) == (2.5, 7, 3)
