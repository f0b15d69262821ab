"""Operator policy: what a node lets plugins have, and the resolution of a manifest against it.

A manifest is a request written by an untrusted author; the policy is the operator's answer. The
resolution is deliberately simple to audit:

* a plugin gets what it asks for *and* the policy allows -- never more, and nothing it did not ask for;
* a **required** capability the policy refuses, or a resource above a ceiling, refuses the plugin
  (:class:`~sdk.errors.SecurityViolationError`), because running it crippled would fail later and
  less clearly; ceilings are never silently clamped for the same reason;
* an **optional** capability the policy refuses is simply not granted, and recorded in
  :attr:`Grant.denied_optional` so the operator can see why a feature is off;
* individual hosts and environment variables are intersected with the policy's allowlists (the
  refused ones are recorded too); a directory outside the policy's directories refuses the plugin,
  since a path that escapes is either a misconfiguration or an attack;
* the topics a plugin may publish to and the plugins it may request (``publish_topics``,
  ``request_plugins``) come with the ``messaging`` capability, or not at all.

Example policy::

    [capabilities]
    allowed = ["compute", "clock", "filesystem", "messaging"]

    [filesystem]
    readable = ["/srv/sandbus/data"]
    writable = ["/srv/sandbus/data/scratch"]

    [network]
    allowed_hosts = ["api.example.com:443", "*.internal"]

    [environment]
    allowed_vars = ["TZ"]

    [limits]        # ceilings: a manifest asking more is refused
    memory_mb = 256

    [defaults]      # used when the manifest is silent
    memory_mb = 64
"""

from __future__ import annotations

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

from host.manifest import (
    CAPABILITY_NAMES,
    CapabilityName,
    Manifest,
    _check_capabilities,
    _KeyedError,
    _read_toml,
    _translate,
    parse_host,
    request_matches,
    subject_matches,
)
from host.sandbox.config import MIB, Capabilities, DirGrant, Limits
from sdk.errors import PolicyError, SecurityViolationError

__all__ = [
    "RESOURCE_KEYS",
    "CapabilitiesPolicy",
    "Denial",
    "EnvironmentPolicy",
    "FilesystemPolicy",
    "Grant",
    "NetworkPolicy",
    "Policy",
    "ResourceValues",
    "load_policy",
    "resolve",
]

#: The ``[resources]`` / ``[limits]`` / ``[defaults]`` keys, in the order they are checked.
RESOURCE_KEYS: tuple[str, ...] = ("memory_mb", "timeout_seconds", "max_fuel", "max_instances")


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
    """``[network]``: ``host``, ``host:port``, ``*.domain`` or ``*.domain:port``. An entry without a
    port allows every port of that host."""

    allowed_hosts: tuple[StrictStr, ...] = ()

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for h in v:
            parse_host(h, allow_wildcard=True)
        return v


class EnvironmentPolicy(_Section):
    """``[environment]``: host variables a plugin may be shown (exact names)."""

    allowed_vars: tuple[StrictStr, ...] = ()


class ResourceValues(_Section):
    """One set of resource values: the ``[limits]`` ceilings or the ``[defaults]``."""

    memory_mb: StrictInt = Field(gt=0)
    timeout_seconds: StrictFloat = Field(gt=0)
    max_fuel: StrictInt = Field(gt=0)
    max_instances: StrictInt = Field(gt=0)


_CEILINGS = ResourceValues(memory_mb=256, timeout_seconds=30.0, max_fuel=10_000_000_000, max_instances=16)
_DEFAULTS = ResourceValues(memory_mb=64, timeout_seconds=5.0, max_fuel=1_000_000_000, max_instances=4)


class Policy(_Section):
    """A node's operator policy. :meth:`default` denies everything but ``compute``.

    Parameters:
        capabilities: capabilities that may be granted.
        filesystem: host directories plugin directories must lie in.
        network: hosts plugins may reach.
        environment: host variables plugins may read.
        limits: ceilings; a manifest asking for more is refused.
        defaults: values used when a manifest is silent. A default the file leaves out is the built-in
            default, lowered to the ceiling when the ceiling is lower.
    """

    capabilities: CapabilitiesPolicy = CapabilitiesPolicy()
    filesystem: FilesystemPolicy = FilesystemPolicy()
    network: NetworkPolicy = NetworkPolicy()
    environment: EnvironmentPolicy = EnvironmentPolicy()
    limits: ResourceValues = _CEILINGS
    defaults: ResourceValues = _DEFAULTS

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
        return self

    @classmethod
    def default(cls) -> Policy:
        """Deny by default: only ``compute``; ceilings 256 MB / 30 s / 10^10 fuel / 16 instances,
        defaults 64 MB / 5 s / 10^9 fuel / 4 instances; no directories, hosts or variables."""
        return cls()

    @property
    def source(self) -> str | None:
        """The file this policy was read from (``None`` for a built-in or constructed policy)."""
        return self._source

    def describe(self) -> str:
        """How error messages name this policy."""
        return f"policy {self._source}" if self._source else "the default policy"


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


@dataclass(frozen=True, slots=True)
class Grant:
    """What a plugin actually gets on this node: the input of the sandbox and the host functions.

    Parameters:
        manifest: the manifest this grant was resolved from.
        limits: enforced limits (manifest values, else policy defaults).
        capabilities: preopened directories, environment, clock and random for the sandbox.
        granted: capability names granted (asked ∩ allowed).
        network_hosts: manifest hosts the policy allows (``host`` or ``host:port``).
        publish_topics: subject patterns the plugin may publish to (empty without ``messaging``).
        request_plugins: ``request_plugins`` entries: the plugin functions it may call (empty without
            ``messaging``).
        denied_optional: what was asked for but not granted, with the reason.
    """

    manifest: Manifest
    limits: Limits
    capabilities: Capabilities
    granted: frozenset[str]
    network_hosts: tuple[str, ...] = ()
    publish_topics: tuple[str, ...] = ()
    request_plugins: tuple[str, ...] = ()
    denied_optional: tuple[Denial, ...] = ()

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
    return Limits(
        memory_bytes=values["memory_mb"] * MIB,
        timeout_s=float(values["timeout_seconds"]),
        fuel=values["max_fuel"],
        max_instances=values["max_instances"],
    )


def _resolve_dirs(manifest: Manifest, policy: Policy, data_root: Path) -> tuple[DirGrant, ...]:
    """Each entry becomes ``data_root/<entry>`` (symlinks followed), seen by the guest at ``/<entry>``;
    it must stay under the data root and inside a directory the policy allows for that access."""
    root = data_root.expanduser().resolve()
    writable_dirs = [d.resolve() for d in policy.filesystem.writable]
    readable_dirs = [d.resolve() for d in policy.filesystem.readable] + writable_dirs
    perms = manifest.permissions
    wanted = [(rel, True) for rel in perms.write_files]
    wanted += [(rel, False) for rel in perms.read_files if rel not in perms.write_files]
    grants: list[DirGrant] = []
    for rel, writable in wanted:
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
        grants.append(DirGrant(host=host, guest="/" + rel, writable=writable))
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
            or a directory falls outside the data root or the policy's directories.
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
                denied.append(Denial(f"environment variable {name!r}", "not in [environment] allowed_vars"))
            elif name in host_env:
                env[name] = host_env[name]
            else:
                env_unset.add(name)

    hosts: list[str] = []
    if "network" in granted:
        for entry in perms.network_hosts:
            if _host_allowed(entry, policy.network.allowed_hosts):
                hosts.append(entry)
            else:
                denied.append(Denial(f"network host {entry!r}", "not in [network] allowed_hosts"))

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
        network_hosts=tuple(hosts),
        publish_topics=perms.publish_topics if "messaging" in granted else (),
        request_plugins=perms.request_plugins if "messaging" in granted else (),
        denied_optional=tuple(denied),
    )
