"""Operator policy: what a node lets plugins have, and the resolution of a manifest against it.

A manifest is a request written by an untrusted author; the policy is the operator's answer. The
resolution is deliberately simple to audit:

* a plugin gets what it asks for *and* the policy allows -- never more, and nothing it did not ask for;
* a **required** capability the policy refuses, or a resource above a ceiling, refuses the plugin
  (:class:`~sandbus.sdk.errors.SecurityViolationError`), because running it crippled would fail later and
  less clearly; ceilings are never silently clamped for the same reason;
* an **optional** capability the policy refuses is simply not granted (nor anything the manifest
  lists under it), and recorded in :attr:`Grant.denied_optional` so the operator can see why a
  feature is off;
* under a capability that *is* granted, every entry the manifest asks for -- a directory, an
  environment variable, a network host, a topic to publish to, a plugin to request -- must be allowed
  by the policy, or the plugin is refused naming that entry. Nothing is dropped quietly: a plugin
  that loads has everything it asked for under its granted capabilities;
* the topics a plugin may publish to and the plugins it may request (``publish_topics``,
  ``request_plugins``) come with the ``messaging`` capability and must each be *covered* by a pattern
  of the policy's ``[messaging]`` ceilings (deny by default: no ceiling, no topic): a manifest
  ``orders.*`` is covered by a policy ``orders.>``, a manifest ``>`` by nothing but ``>``;
* the topics a plugin subscribes to (``[subscriptions] topics``) need no capability, but each must be
  covered by ``[messaging] subscribe_topics`` the same way (deny by default): receiving every message
  on the bus is as much a grant as sending to it;
* what a plugin sends (``publish`` and ``request``) is rate limited per plugin by a token bucket
  (``[messaging] max_sends_per_second``, ``send_burst``) and capped per call (``max_sends_per_call``):
  the hop limit bounds how deep a chain of messages goes, these bound how wide it fans out;
* a network host names where a plugin may connect, and ``[network] allow_addresses`` which
  addresses a granted name may resolve to beyond the public internet: private, loopback,
  link-local and other special ranges are refused unless listed there (see host/node/netguard.py).

Example policy::

    [capabilities]
    allowed = ["compute", "clock", "filesystem", "messaging"]

    [filesystem]
    readable = ["/srv/sandbus/data"]
    writable = ["/srv/sandbus/data/scratch"]

    [network]
    allowed_hosts = ["api.example.com:443", "*.internal"]
    allow_addresses = ["10.1.0.0/16"]   # private ranges *.internal may resolve to

    [messaging]     # ceilings for publish_topics / request_plugins / [subscriptions] topics
    publish_topics = ["orders.>", "audit.*"]
    request_plugins = ["pricing", "audit.log"]
    subscribe_topics = ["orders.*"]
    max_sends_per_second = 1000.0   # per plugin (token bucket), with a burst of send_burst
    send_burst = 1000
    max_sends_per_call = 64

    [environment]
    allowed_vars = ["TZ"]

    [limits]        # ceilings: a manifest asking more is refused
    memory_mb = 256
    max_open_files = 1024   # files one instance may have open at once
    max_var_bytes = 1048576 # Extism plugins: bytes one instance's vars may hold
    isolation = "per-call"  # required: a fresh instance for every call; a manifest asking "pooled" is refused

    [defaults]      # used when the manifest is silent
    memory_mb = 64

    [registry]      # publishers whose signed artifacts a cluster node loads (nkeys account public keys)
    trusted_publishers = ["AAI2JU2FD2SEQ5VTWD4WJAQYUF2MGPMKSN3PNOUKIJ3U6Y5NQ4IBU7CP"]

    [debug]         # plugins compiled with debug info for gdb/lldb on this node (slower; docs/guide.md)
    plugins = ["pricing"]

    [record]        # calls of these plugins that trap are recorded, to replay offline (sandbus replay)
    plugins = ["pricing"]
    directory = "/var/lib/sandbus/records"
    max_bytes = 1048576     # the largest record
    max_records = 100       # records kept per plugin; beyond, traps are not recorded

Debug info is the operator's alone to give: no manifest key asks for it, and a plugin listed under
``[debug] plugins`` gets it whatever its manifest says (``Limits.debug_info``; the load is audited).

A cluster node (``sandbus node --cluster``) verifies every artifact it fetches from the registry against
``[registry] trusted_publishers``; with none listed (the default) it loads no artifact at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from sandbus.host.lifecycle.manifest import (
    CAPABILITY_NAMES,
    MAX_VAR_BYTES,
    CapabilityName,
    Manifest,
    _check_capabilities,
    _check_name,
    _KeyedError,
    _read_toml,
    _translate,
    check_env_name,
    check_request_pattern,
    check_subject,
    parse_host,
    request_matches,
    split_file_pattern,
    subject_matches,
)
from sandbus.host.node.netguard import IPNetwork
from sandbus.host.sandbox.config import ISOLATION_MODES, MIB, Capabilities, DirGrant, Isolation, Limits
from sandbus.host.sandbox.record import MAX_RECORD_BYTES, RecordSettings
from sandbus.sdk.errors import PolicyError, SecurityViolationError

__all__ = [
    "RESOURCE_KEYS",
    "CapabilitiesPolicy",
    "DebugPolicy",
    "Denial",
    "EnvironmentPolicy",
    "FilesystemPolicy",
    "Grant",
    "IPNetwork",
    "MessagingPolicy",
    "NetworkPolicy",
    "Policy",
    "RecordPolicy",
    "RegistryPolicy",
    "ResourceValues",
    "SendLimits",
    "load_policy",
    "request_covers",
    "resolve",
    "subject_covers",
]

#: The ``[resources]`` / ``[limits]`` / ``[defaults]`` keys, in the order they are checked.
RESOURCE_KEYS: tuple[str, ...] = ("memory_mb", "timeout_seconds", "max_fuel", "max_instances", "max_open_files",
                                  "max_var_bytes")


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CapabilitiesPolicy(_Section):
    """``[capabilities]``: the capabilities plugins on this node may be granted."""

    allowed: tuple[CapabilityName, ...] = ("compute",)

    @field_validator("allowed", mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        return _check_capabilities(v)


class FilesystemPolicy(_Section):
    """``[filesystem]``: absolute host directories under which plugin directories may be granted.
    A writable directory is also readable."""

    readable: tuple[Path, ...] = ()
    writable: tuple[Path, ...] = ()

    @field_validator("readable", "writable")
    @classmethod
    def _absolute(cls, v: tuple[Path, ...]) -> tuple[Path, ...]:
        for p in v:
            if not p.is_absolute():
                raise ValueError(f"expected an absolute directory, found {str(p)!r}")
        return v


class NetworkPolicy(_Section):
    """``[network]``.

    ``allowed_hosts``: ``host``, ``host:port``, ``*.domain`` or ``*.domain:port``. An entry without a
    port allows every port of that host.

    ``allow_addresses``: addresses or networks (``"127.0.0.1"``, ``"10.1.0.0/16"``, ``"fd00::/8"``) a
    granted host may resolve to although they are not public (private, loopback, link-local, shared,
    reserved, multicast, cloud metadata). Without an entry here, a granted name that resolves into
    such a range is refused at connect time.
    """

    allowed_hosts: tuple[StrictStr, ...] = ()
    allow_addresses: tuple[StrictStr, ...] = ()

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for h in v:
            parse_host(h, allow_wildcard=True)
        return v

    @field_validator("allow_addresses")
    @classmethod
    def _addresses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for a in v:
            try:
                ipaddress.ip_network(a, strict=True)
            except ValueError as e:
                raise ValueError(f"expected an IP address or network like '10.0.0.0/8', found {a!r}: {e}") from None
        return v

    def networks(self) -> tuple[IPNetwork, ...]:
        """``allow_addresses`` as networks."""
        return tuple(ipaddress.ip_network(a) for a in self.allow_addresses)


class MessagingPolicy(_Section):
    """``[messaging]``: ceilings for what plugins may publish to, request and subscribe to, and how fast
    they may send.

    ``publish_topics``: NATS subject patterns; a manifest's ``publish_topics`` entry must be covered by
    one of them (every subject it matches is matched by the ceiling). ``request_plugins``: entries as in
    a manifest (``"pricing"``, ``"pricing.quote"``, ``"pricing.*"``, ``"*"``), covering a manifest's
    ``request_plugins`` the same way. ``subscribe_topics``: subject patterns covering a manifest's
    ``[subscriptions] topics``. All three default to nothing: a node grants no topic and no target
    until its operator names them.

    ``max_sends_per_second`` / ``send_burst``: a token bucket per plugin (and per node process) over
    everything it sends with ``publish`` and ``request``; ``max_sends_per_call``: how many of those one
    call may make. A send beyond either fails the call with ``RateLimitError`` (``limit.rate``). The
    defaults (1,000 a second, a burst of 1,000, 64 a call) are far above what an event-driven plugin
    sends, yet keep one plugin to a small share of what a node can publish (hundreds of thousands of
    core messages, tens of thousands of JetStream messages a second) and stop a plugin that publishes
    several messages per message it receives from multiplying them within the hop limit.
    """

    publish_topics: tuple[StrictStr, ...] = ()
    request_plugins: tuple[StrictStr, ...] = ()
    subscribe_topics: tuple[StrictStr, ...] = ()
    max_sends_per_second: StrictFloat = Field(default=1000.0, gt=0)
    send_burst: StrictInt = Field(default=1000, gt=0)
    max_sends_per_call: StrictInt = Field(default=64, gt=0)

    @field_validator("publish_topics", "subscribe_topics")
    @classmethod
    def _topics(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for t in v:
            check_subject(t)
        return v

    @field_validator("request_plugins")
    @classmethod
    def _targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for t in v:
            check_request_pattern(t)
        return v


class EnvironmentPolicy(_Section):
    """``[environment]``: host variables a plugin may be shown (exact names)."""

    allowed_vars: tuple[StrictStr, ...] = ()

    @field_validator("allowed_vars")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            check_env_name(name)
        return v


class RegistryPolicy(_Section):
    """``[registry]``: whose artifacts a cluster node loads from the plugin registry.

    ``trusted_publishers``: nkeys account public keys (``A...``, 56 characters, as ``sandbus keygen`` writes
    to ``<seed>.pub``). An artifact is loaded only when it is validly signed by one of them. Empty (the
    default): a cluster node trusts no publisher and loads nothing from the registry.
    """

    trusted_publishers: tuple[StrictStr, ...] = ()

    @field_validator("trusted_publishers")
    @classmethod
    def _keys(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from sandbus.host.cluster.keys import check_public_key
        from sandbus.sdk.errors import InvalidArtifactError

        for i, key in enumerate(v):
            try:
                check_public_key(key)
            except InvalidArtifactError as e:
                raise _KeyedError(e.message, f"registry.trusted_publishers[{i}]") from None
        return tuple(dict.fromkeys(v))


def _plugin_names(names: tuple[str, ...], key: str) -> tuple[str, ...]:
    """A policy list of plugin names: each a valid plugin name (the error names ``key[i]``), duplicates dropped."""
    for i, name in enumerate(names):
        try:
            _check_name(name)
        except ValueError as e:
            raise _KeyedError(str(e), f"{key}[{i}]") from None
    return tuple(dict.fromkeys(names))


class DebugPolicy(_Section):
    """``[debug]``: the plugins this node compiles with debug info, so that a native debugger attached to the
    node (gdb, lldb) can break in their source (docs/guide.md). Their code is unoptimised and compiled at
    every load (never cached on disk): list a plugin while you debug it, not for good. Empty (the default):
    none. ``isolation = "per-call"`` plugins cannot be debugged (their load is refused while listed)."""

    plugins: tuple[StrictStr, ...] = ()

    @field_validator("plugins")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _plugin_names(v, "debug.plugins")


class RecordPolicy(_Section):
    """``[record]``: the plugins whose failed calls (a trap, a limit, an ABI violation) this node records
    into ``directory``, each as one file that ``sandbus replay`` runs again offline (host/sandbox/record.py).
    A record holds the call's input and every result the plugin received from the host: keep the directory
    private (it is created with mode 0700, each record 0600; an existing directory that is a symlink, is
    another user's, or that others may write to is not used: each failed call is then audited as
    ``record.failed`` instead, at most once an interval). Recording costs every call of a listed plugin
    the keeping of its host calls (docs/guide.md). Only pooled core modules can be recorded: a listed
    component, Extism plugin or per-call plugin is refused at load."""

    plugins: tuple[StrictStr, ...] = ()
    directory: Path | None = None
    max_bytes: StrictInt = Field(default=1024 * 1024, gt=0, le=MAX_RECORD_BYTES)
    max_records: StrictInt = Field(default=100, gt=0, le=1_000_000)

    @field_validator("plugins")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _plugin_names(v, "record.plugins")

    @field_validator("directory")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise _KeyedError(f"must be an absolute path, found {str(v)!r}", "record.directory")
        return v

    @model_validator(mode="after")
    def _directory_given(self) -> RecordPolicy:
        if self.plugins and self.directory is None:
            raise _KeyedError("plugins are listed, but no directory to write their records into", "record.directory")
        return self

    def settings_for(self, plugin: str) -> RecordSettings | None:
        """Where and how ``plugin``'s failed calls are recorded; None when it is not listed."""
        if plugin not in self.plugins or self.directory is None:
            return None
        return RecordSettings(self.directory, self.max_bytes, self.max_records)


class ResourceValues(_Section):
    """One set of resource values: the ``[limits]`` ceilings or the ``[defaults]``.

    ``isolation`` is a floor, not a ceiling: ``[limits] isolation = "per-call"`` requires every plugin to
    run a fresh instance per call (a manifest asking for "pooled" is refused; a silent one gets
    "per-call"); ``[defaults] isolation`` is what a silent manifest gets otherwise.
    """

    memory_mb: StrictInt = Field(gt=0, le=4096)  # a 32-bit guest's whole address space (Limits.memory_bytes)
    timeout_seconds: StrictFloat = Field(gt=0, le=1e9, allow_inf_nan=False)  # as Limits.timeout_s
    max_fuel: StrictInt = Field(gt=0, le=2**63 - 1)  # Limits.fuel: wasmtime counts fuel in an i64
    max_instances: StrictInt = Field(gt=0, le=65536)  # as Limits.max_instances
    max_open_files: StrictInt = Field(gt=0, le=65536)
    max_var_bytes: StrictInt = Field(gt=0, le=MAX_VAR_BYTES)  # Extism vars per instance (Limits.max_var_bytes)
    isolation: Isolation = "pooled"


_CEILINGS = ResourceValues(memory_mb=256, timeout_seconds=30.0, max_fuel=10_000_000_000, max_instances=16,
                           max_open_files=1024, max_var_bytes=16 * MIB)
_DEFAULTS = ResourceValues(memory_mb=64, timeout_seconds=5.0, max_fuel=1_000_000_000, max_instances=4,
                           max_open_files=256, max_var_bytes=MIB)


class Policy(_Section):
    """A node's operator policy. :meth:`default` denies everything but ``compute``.

    Parameters:
        capabilities: capabilities that may be granted.
        filesystem: host directories plugin directories must lie in.
        network: hosts plugins may reach, and the non-public addresses they may resolve to.
        messaging: topics plugins may publish to and plugins they may request (ceilings).
        environment: host variables plugins may read.
        limits: ceilings; a manifest asking for more is refused.
        defaults: values used when a manifest is silent. A default the file leaves out is the built-in
            default, lowered to the ceiling when the ceiling is lower.
        registry: the publishers whose registry artifacts a cluster node loads.
        debug: the plugins compiled with debug info for a native debugger.
        record: the plugins whose failed calls are recorded, and where.
    """

    capabilities: CapabilitiesPolicy = CapabilitiesPolicy()
    filesystem: FilesystemPolicy = FilesystemPolicy()
    network: NetworkPolicy = NetworkPolicy()
    messaging: MessagingPolicy = MessagingPolicy()
    environment: EnvironmentPolicy = EnvironmentPolicy()
    limits: ResourceValues = _CEILINGS
    defaults: ResourceValues = _DEFAULTS
    registry: RegistryPolicy = RegistryPolicy()
    debug: DebugPolicy = DebugPolicy()
    record: RecordPolicy = RecordPolicy()

    _source: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _fill_resources(cls, data: Any) -> Any:
        """Let ``[limits]`` and ``[defaults]`` be partial: missing keys take the built-in values, and an
        unstated default never exceeds a stated ceiling."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        limits, defaults = data.get("limits", {}), data.get("defaults", {})
        if isinstance(limits, Mapping):
            limits = {**_CEILINGS.model_dump(), **limits}
            data["limits"] = limits
        if isinstance(defaults, Mapping):
            filled = dict(_DEFAULTS.model_dump())
            if isinstance(limits, Mapping):
                for key, ceiling in limits.items():
                    if key in filled and _is_number(ceiling) and ceiling < filled[key]:
                        filled[key] = ceiling
                if limits.get("isolation") in ISOLATION_MODES:  # a required isolation is the default too
                    filled["isolation"] = limits["isolation"]
            data["defaults"] = {**filled, **defaults}
        return data

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> Policy:
        for key in RESOURCE_KEYS:
            default, ceiling = getattr(self.defaults, key), getattr(self.limits, key)
            if default > ceiling:
                raise _KeyedError(
                    f"default {key} = {default} is above the ceiling [limits] {key} = {ceiling}",
                    f"defaults.{key}",
                )
        if _weaker(self.defaults.isolation, self.limits.isolation):
            raise _KeyedError(
                f"default isolation = {self.defaults.isolation!r} is weaker than the required "
                f"[limits] isolation = {self.limits.isolation!r}",
                "defaults.isolation",
            )
        return self

    @classmethod
    def default(cls) -> Policy:
        """Deny by default: only ``compute``; ceilings 256 MB / 30 s / 10^10 fuel / 16 instances / 1,024 open
        files, defaults 64 MB / 5 s / 10^9 fuel / 4 instances / 256 open files; no directories, hosts,
        addresses, variables, topics to publish or subscribe to, or request targets; 1,000 sends a second
        (burst 1,000), 64 a call."""
        return cls()

    @property
    def source(self) -> str | None:
        """The file this policy was read from (``None`` for a built-in or constructed policy)."""
        return self._source

    def describe(self) -> str:
        """How error messages name this policy."""
        return f"policy {self._source}" if self._source else "the default policy"


def _weaker(asked: Isolation, required: Isolation) -> bool:
    """Whether ``asked`` isolates calls less than ``required`` does."""
    return ISOLATION_MODES.index(asked) < ISOLATION_MODES.index(required)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _policy_error(path: str) -> Any:
    def fail(message: str, key: str | None) -> Exception:
        where = f"{path}: [{key}]" if key else path
        return PolicyError(f"{where}: {message}", path=path, key=key)

    return fail


def load_policy(path: Path) -> Policy:
    """Read and validate an operator policy file. Sections left out keep :meth:`Policy.default`'s values.

    Raises:
        PolicyError: naming the file and the dotted key (``details["path"]``, ``details["key"]``), what
            was expected and what was found; a misspelt key gets a "did you mean" hint.
    """
    path = Path(path)
    source = str(path)
    fail = _policy_error(source)
    if not path.exists():
        raise fail("policy file not found", None)
    data = _read_toml(path, fail)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise _translate(exc, Policy, data, fail) from None
    policy._source = source
    return policy


# --------------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------------


class Denial(NamedTuple):
    """Something a plugin asked for optionally and did not get, and why."""

    item: str
    reason: str

    def __str__(self) -> str:
        return f"{self.item}: {self.reason}"


class SendLimits(NamedTuple):
    """The ``[messaging]`` bounds on what a plugin sends (see :class:`MessagingPolicy`)."""

    per_second: float = 1000.0
    burst: int = 1000
    per_call: int = 64


_DEFAULT_SEND_LIMITS = SendLimits()


@dataclass(frozen=True, slots=True)
class Grant:
    """What a plugin actually gets on this node: the input of the sandbox and the host functions.

    Parameters:
        manifest: the manifest this grant was resolved from.
        limits: enforced limits (manifest values, else policy defaults).
        capabilities: preopened directories, environment, clock and random for the sandbox.
        granted: capability names granted (asked ∩ allowed).
        network_hosts: manifest hosts the policy allows (``host`` or ``host:port``).
        network_addresses: non-public networks a granted host may resolve to (the policy's
            ``[network] allow_addresses``; empty without ``network``).
        publish_topics: subject patterns the plugin may publish to (empty without ``messaging``).
        request_plugins: ``request_plugins`` entries: the plugin functions it may call (empty without
            ``messaging``).
        subscribe_topics: the ``[subscriptions] topics`` it is delivered (each covered by the policy).
        send_limits: how fast, and how many per call, it may ``publish`` and ``request``.
        denied_optional: what was asked for but not granted, with the reason.
        record: where the plugin's failed calls are recorded (the policy's ``[record]``), or None.
    """

    manifest: Manifest
    limits: Limits
    capabilities: Capabilities
    granted: frozenset[str]
    network_hosts: tuple[str, ...] = ()
    network_addresses: tuple[IPNetwork, ...] = ()
    publish_topics: tuple[str, ...] = ()
    request_plugins: tuple[str, ...] = ()
    subscribe_topics: tuple[str, ...] = ()
    send_limits: SendLimits = _DEFAULT_SEND_LIMITS
    denied_optional: tuple[Denial, ...] = ()
    record: RecordSettings | None = None

    def allows(self, capability: str) -> bool:
        """Whether ``capability`` was granted (host functions check this before acting)."""
        return capability in self.granted

    def may_publish(self, subject: str) -> bool:
        """Whether the plugin may publish to the concrete ``subject``."""
        return any(subject_matches(p, subject) for p in self.publish_topics)

    def may_request(self, plugin: str, function: str) -> bool:
        """Whether the plugin may call ``function`` of ``plugin`` with the ``request`` host function."""
        return any(request_matches(p, plugin, function) for p in self.request_plugins)

    def may_connect(self, host: str, port: int) -> bool:
        """Whether the plugin may open a connection to ``host:port``."""
        host = host.lower()
        for entry in self.network_hosts:
            h, p = parse_host(entry)
            if h == host and (p is None or p == port):
                return True
        return False


def _refuse(manifest: Manifest, message: str, **details: Any) -> SecurityViolationError:
    return SecurityViolationError(message, plugin=manifest.name, manifest=manifest.source, **details)


def _resolve_limits(manifest: Manifest, policy: Policy) -> Limits:
    values: dict[str, Any] = {}
    for key in RESOURCE_KEYS:
        asked = getattr(manifest.resources, key)
        ceiling = getattr(policy.limits, key)
        if asked is not None and asked > ceiling:
            raise _refuse(
                manifest,
                f"asks for [resources] {key} = {asked}, above the ceiling of {ceiling} "
                f"set by {policy.describe()} [limits] {key}",
                resource=key,
                asked=asked,
                ceiling=ceiling,
                policy=policy.source,
            )
        values[key] = asked if asked is not None else getattr(policy.defaults, key)
    isolation = manifest.resources.isolation
    required = policy.limits.isolation
    if isolation is not None and _weaker(isolation, required):
        raise _refuse(
            manifest,
            f"asks for [resources] isolation = {isolation!r}, but {policy.describe()} [limits] isolation "
            f"requires {required!r} (a fresh instance for every call)",
            resource="isolation",
            asked=isolation,
            required=required,
            policy=policy.source,
        )
    return Limits(
        debug_info=manifest.name in policy.debug.plugins,
        isolation=isolation if isolation is not None else policy.defaults.isolation,
        memory_bytes=values["memory_mb"] * MIB,
        timeout_s=float(values["timeout_seconds"]),
        fuel=values["max_fuel"],
        max_instances=values["max_instances"],
        max_open_files=values["max_open_files"],
        max_var_bytes=values["max_var_bytes"],
    )


class _DirWanted:
    """What the entries naming one directory ask for together (``data``, ``data/*.txt``...)."""

    def __init__(self) -> None:
        self.whole_read = self.whole_write = False
        self.read: list[str] = []
        self.write: list[str] = []

    def add(self, pattern: str | None, writable: bool) -> None:
        if pattern is None:
            self.whole_write |= writable
            self.whole_read |= not writable
        else:
            (self.write if writable else self.read).append(pattern)

    @property
    def writable(self) -> bool:
        return self.whole_write or bool(self.write)

    def patterns(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(read patterns, write patterns) of the grant: see :class:`DirGrant`."""
        if self.whole_write:
            return (), ()
        readable = () if self.whole_read else tuple(dict.fromkeys((*self.read, *self.write)))
        return readable, tuple(dict.fromkeys(self.write))


def _resolve_dirs(manifest: Manifest, policy: Policy, data_root: Path) -> tuple[DirGrant, ...]:
    """Each entry becomes ``data_root/<entry>`` (symlinks followed), seen by the guest at ``/<entry>``;
    it must stay under the data root and inside a directory the policy allows for that access.

    Entries naming the same directory make one grant: a whole directory (``data``) beats its globs
    (``data/*.txt``) for that access, and globs add up (read ``data/*.txt`` and write ``data/*.json``:
    both readable, only ``*.json`` writable)."""
    root = data_root.expanduser().resolve()
    writable_dirs = [d.resolve() for d in policy.filesystem.writable]
    readable_dirs = [d.resolve() for d in policy.filesystem.readable] + writable_dirs
    perms = manifest.permissions
    by_dir: dict[str, _DirWanted] = {}
    for entries, writable in ((perms.write_files, True), (perms.read_files, False)):
        for entry in entries:
            directory, pattern = split_file_pattern(entry)
            by_dir.setdefault(directory, _DirWanted()).add(pattern, writable)
    grants: list[DirGrant] = []
    for rel, want in by_dir.items():
        writable = want.writable
        key = "write_files" if writable else "read_files"
        host = (root / rel).resolve()
        if not host.is_relative_to(root):
            raise _refuse(
                manifest,
                f"[permissions] {key} entry {rel!r} resolves to {host}, outside the data root {root} "
                "(a symlink escapes it)",
                path=rel,
                resolved=str(host),
            )
        allowed = writable_dirs if writable else readable_dirs
        if not any(host.is_relative_to(d) for d in allowed):
            kind = "writable" if writable else "readable"
            listed = ", ".join(str(d) for d in allowed) or "none"
            raise _refuse(
                manifest,
                f"[permissions] {key} entry {rel!r} resolves to {host}, which is not inside a {kind} "
                f"directory of {policy.describe()} ({kind}: {listed})",
                path=rel,
                resolved=str(host),
                policy=policy.source,
            )
        patterns, write_patterns = want.patterns()
        grants.append(DirGrant(host=host, guest="/" + rel, writable=writable, patterns=patterns,
                               write_patterns=write_patterns))
    return tuple(grants)


#: Capabilities the sandbox models with dedicated fields; the rest travel in ``Capabilities.extra``.
_SANDBOX_BUILTIN = frozenset({"compute", "clock", "random", "filesystem", "environment"})


def _host_allowed(entry: str, patterns: tuple[str, ...]) -> bool:
    host, port = parse_host(entry)
    for pattern in patterns:
        p_host, p_port = parse_host(pattern, allow_wildcard=True)
        if p_port is not None and p_port != port:
            continue  # also when the manifest names no port: it asked for every port
        if p_host == host or (p_host.startswith("*.") and host.endswith(p_host[1:])):
            return True
    return False


def subject_covers(ceiling: str, pattern: str) -> bool:
    """Whether every subject ``pattern`` matches is also matched by ``ceiling`` (NATS wildcards).

    Sound, not merely overlapping: ``orders.>`` covers ``orders.*`` and ``orders.new.eu``; ``orders.*``
    does not cover ``orders.>`` (it misses ``orders.a.b``), and nothing but ``>`` covers ``>``.
    """
    pat, ceil = pattern.split("."), ceiling.split(".")
    for i, token in enumerate(ceil):
        if token == ">":
            return len(pat) > i  # one or more tokens left in the pattern, whatever they are
        if i >= len(pat) or pat[i] == ">":
            return False  # the pattern is shorter, or matches any length from here
        if token != "*" and token != pat[i]:
            return False  # a literal covers only the same literal (not '*')
    return len(pat) == len(ceil)


def request_covers(ceiling: str, pattern: str) -> bool:
    """Whether every ``plugin.function`` a ``request_plugins`` entry allows, ``ceiling`` allows too."""
    c_plugin, _, c_function = ceiling.partition(".")
    p_plugin, _, p_function = pattern.partition(".")
    c_function, p_function = c_function or "*", p_function or "*"
    if c_plugin != "*" and c_plugin != p_plugin:
        return False
    return c_function == "*" or c_function == p_function


def _refuse_entry(manifest: Manifest, policy: Policy, key: str, entry: str, where: str, listed: tuple[str, ...],
                  why: str, section: str = "permissions") -> SecurityViolationError:
    shown = ", ".join(repr(x) for x in listed) or "none"
    return _refuse(
        manifest,
        f"[{section}] {key} entry {entry!r} {why} {policy.describe()} {where} ({shown}); "
        "a plugin gets everything it asks for or does not load",
        permission=key if section == "permissions" else f"{section}.{key}",
        entry=entry,
        policy=policy.source,
    )


def resolve(manifest: Manifest, policy: Policy, *, data_root: Path, host_env: Mapping[str, str]) -> Grant:
    """Decide what ``manifest`` gets under ``policy``.

    Parameters:
        manifest: the plugin's request.
        policy: the node's policy.
        data_root: this plugin's data directory; ``read_files``/``write_files`` resolve under it.
        host_env: where environment values come from (usually ``os.environ``); an allowed variable
            missing here is simply absent in the guest.

    Raises:
        SecurityViolationError: a required capability is not allowed, a resource is above its ceiling,
            a directory falls outside the data root or the policy's directories, or an environment
            variable, network host, publish topic or request target of a granted capability is not
            allowed by the policy, or a subscription topic is not covered by ``[messaging]
            subscribe_topics`` (``details["permission"]`` and ``details["entry"]`` name it).
    """
    allowed = frozenset(policy.capabilities.allowed)
    for capability in manifest.capabilities.required:
        if capability not in allowed:
            raise _refuse(
                manifest,
                f"requires capability {capability!r}, which {policy.describe()} does not allow "
                f"(allowed: {', '.join(c for c in CAPABILITY_NAMES if c in allowed) or 'none'})",
                capability=capability,
                policy=policy.source,
            )
    denied = [
        Denial(f"capability {c!r}", f"not allowed by {policy.describe()}")
        for c in manifest.capabilities.optional
        if c not in allowed
    ]
    granted = manifest.capabilities.all & allowed
    limits = _resolve_limits(manifest, policy)
    perms = manifest.permissions

    dirs = _resolve_dirs(manifest, policy, data_root) if "filesystem" in granted else ()

    env: dict[str, str] = {}
    env_unset: set[str] = set()
    if "environment" in granted:
        for name in perms.environment_vars:
            if name not in policy.environment.allowed_vars:
                raise _refuse_entry(manifest, policy, "environment_vars", name, "[environment] allowed_vars",
                                    policy.environment.allowed_vars, "is not allowed by")
            if name in host_env:
                env[name] = host_env[name]
            else:
                env_unset.add(name)

    addresses: tuple[IPNetwork, ...] = ()
    if "network" in granted:
        for entry in perms.network_hosts:
            if not _host_allowed(entry, policy.network.allowed_hosts):
                raise _refuse_entry(manifest, policy, "network_hosts", entry, "[network] allowed_hosts",
                                    policy.network.allowed_hosts, "is not allowed by")
        addresses = policy.network.networks()

    topics: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    ceilings = policy.messaging
    if "messaging" in granted:
        for topic in perms.publish_topics:
            if not any(subject_covers(c, topic) for c in ceilings.publish_topics):
                raise _refuse_entry(manifest, policy, "publish_topics", topic, "[messaging] publish_topics",
                                    ceilings.publish_topics, "is not covered by a pattern of")
        for target in perms.request_plugins:
            if not any(request_covers(c, target) for c in ceilings.request_plugins):
                raise _refuse_entry(manifest, policy, "request_plugins", target, "[messaging] request_plugins",
                                    ceilings.request_plugins, "is not covered by an entry of")
        topics, targets = perms.publish_topics, perms.request_plugins

    # Subscriptions need no capability (receiving is computing), but what a plugin hears is a grant too.
    for topic in manifest.subscriptions.topics:
        if not any(subject_covers(c, topic) for c in ceilings.subscribe_topics):
            raise _refuse_entry(manifest, policy, "topics", topic, "[messaging] subscribe_topics",
                                ceilings.subscribe_topics, "is not covered by a pattern of",
                                section="subscriptions")
    return Grant(
        manifest=manifest,
        limits=limits,
        capabilities=Capabilities(
            dirs=dirs,
            env=env,
            env_unset=frozenset(env_unset),
            clock="clock" in granted,
            random="random" in granted,
            extra=granted - _SANDBOX_BUILTIN,
        ),
        granted=granted,
        network_hosts=perms.network_hosts if "network" in granted else (),
        network_addresses=addresses,
        publish_topics=topics,
        request_plugins=targets,
        subscribe_topics=manifest.subscriptions.topics,
        send_limits=SendLimits(ceilings.max_sends_per_second, ceilings.send_burst, ceilings.max_sends_per_call),
        denied_optional=tuple(denied),
        record=policy.record.settings_for(manifest.name),
    )
