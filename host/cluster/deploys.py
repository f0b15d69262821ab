"""Desired state: which plugin, at which version, on how many nodes, with which labels.

A deploy is one JSON value in the ``sandbus-deploys`` bucket, keyed by plugin name::

    {"format": 1, "plugin": "greeter", "range": "^1.2", "version": "1.2.0", "previous": "1.1.0",
     "replicas": 2, "labels": {"region": "eu"}, "deployed_at": "2026-12-02T16:00:00.000Z"}

``version`` is resolved from ``range`` when the deploy is made, so every node loads the same version;
``previous`` is the version it replaced, where a failing rollout goes back to; ``replicas`` ``null``
means every matching node. Anyone allowed to write the bucket can write anything into it, so a value
read back is bounded and validated like any other untrusted input (:func:`parse_deploy`): a value that
is not a valid deploy is skipped by the nodes (and shown as invalid by ``status``), never acted on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from sandbus.host.cluster import names
from sandbus.host.cluster.buckets import ensure_deploys
from sandbus.host.cluster.entry import now_rfc3339
from sandbus.host.cluster.kvwatch import current_values
from sandbus.host.cluster.names import DEPLOYS_BUCKET
from sandbus.sdk.errors import DeployError, InvalidArtifactError

__all__ = [
    "MAX_DEPLOY_BYTES",
    "MAX_LABELS",
    "MAX_REPLICAS",
    "Deploy",
    "DeployStore",
    "check_labels",
    "check_plugin",
    "check_range",
    "check_replicas",
    "check_version",
    "parse_deploy",
    "parse_label_args",
]

log = logging.getLogger("sandbus.cluster")

#: The largest deploy value read from the bucket (a real one is about 250 bytes).
MAX_DEPLOY_BYTES = 16 * 1024
#: Labels on a node or in a selector; each key and value at most 63 characters.
MAX_LABELS = 32
#: Replicas a deploy may ask for (a sanity bound, far above any cluster).
MAX_REPLICAS = 10_000
# Kubernetes-like: a key may carry a prefix ("topology.example/zone"), a value is plain.
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._/-]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE_RE = re.compile(r"([A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")


def _as_deploy_error(check: Callable[[object], object], value: object) -> None:
    """The registry's checks of names, versions and ranges, as the deploy's error."""
    try:
        check(value)
    except InvalidArtifactError as e:
        raise DeployError(e.message) from None


def check_plugin(name: object) -> str:
    """A plugin name as manifests spell them (``^[a-z][a-z0-9_]{0,62}$``), else :class:`DeployError`."""
    _as_deploy_error(names.check_name, name)
    assert isinstance(name, str)
    return name


def check_version(version: object, what: str = "version") -> str:
    """A semantic version without build metadata (``+`` cannot be part of a bucket key)."""
    if version is None:
        raise DeployError(f"{what} is missing")
    _as_deploy_error(names.check_version, version)
    assert isinstance(version, str)
    return version


def check_range(text: object) -> str:
    """A version range in the syntax of manifest dependencies (``^1.2``, ``>=1.0 <2``, ``1.2.3``, ``*``)."""
    _as_deploy_error(names.check_range, text)
    assert isinstance(text, str)
    return text


def check_labels(labels: object, what: str = "labels") -> dict[str, str]:
    """A mapping of label keys to values, bounded and validated (see :func:`parse_label_args`)."""
    if not isinstance(labels, Mapping):
        raise DeployError(f"{what} must be an object of strings, found {_shown(labels)}")
    if len(labels) > MAX_LABELS:
        raise DeployError(f"{what}: at most {MAX_LABELS} labels, found {len(labels)}")
    out: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not _LABEL_KEY_RE.fullmatch(key):
            raise DeployError(f"{what}: {_shown(key)} is not a label key (letters, digits, '.', '_', '-', '/'; "
                              "at most 63 characters, starting and ending with a letter or digit)")
        if not isinstance(value, str) or not _LABEL_VALUE_RE.fullmatch(value):
            raise DeployError(f"{what}: the value of {key!r} ({_shown(value)}) is not a label value (letters, "
                              "digits, '.', '_', '-'; at most 63 characters)")
        out[key] = value
    return out


def parse_label_args(items: Iterable[str], what: str = "--label") -> dict[str, str]:
    """``["region=eu", "disk=ssd"]`` (command-line ``--label k=v``) as a validated mapping.

    Raises:
        DeployError: an item without ``=``, a key given twice, or a key or value that is not a label.
    """
    labels: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise DeployError(f"{what} {_shown(item)}: expected KEY=VALUE")
        if key in labels:
            raise DeployError(f"{what}: the key {_shown(key)} is given twice")
        labels[key] = value
    return check_labels(labels, what)


@dataclass(frozen=True)
class Deploy:
    """One deploy as stored (see the module's docstring); ``revision`` is the bucket's revision of it
    (0 before it is stored), which the nodes' reports refer to."""

    plugin: str
    range: str
    version: str
    previous: str | None = None
    replicas: int | None = 1
    labels: Mapping[str, str] = field(default_factory=dict)
    deployed_at: str = field(default_factory=now_rfc3339)
    revision: int = 0

    def __post_init__(self) -> None:
        check_plugin(self.plugin)
        check_range(self.range)
        check_version(self.version)
        if self.previous is not None:
            check_version(self.previous, "previous")
        check_replicas(self.replicas)
        check_labels(self.labels, "labels")
        if not isinstance(self.deployed_at, str) or len(self.deployed_at) > 64:
            raise DeployError(f"deployed_at must be an RFC 3339 time, found {_shown(self.deployed_at)}")

    def to_json(self) -> bytes:
        return orjson.dumps({"format": 1, "plugin": self.plugin, "range": self.range, "version": self.version,
                             "previous": self.previous, "replicas": self.replicas, "labels": dict(self.labels),
                             "deployed_at": self.deployed_at})


def check_replicas(replicas: object) -> int | None:
    """``None`` (every matching node) or a whole number from 0 to :data:`MAX_REPLICAS`."""
    if replicas is None:
        return None
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= MAX_REPLICAS:
        raise DeployError(f"replicas must be a whole number from 0 to {MAX_REPLICAS} (or every node), "
                          f"found {_shown(replicas)}")
    return replicas


def parse_deploy(raw: bytes | None, *, key: str | None = None, revision: int = 0) -> Deploy:
    """A deploy value read from the bucket, bounded and validated.

    Raises:
        DeployError: too large, not JSON, an unknown format, a wrong type, or a plugin that is not its key.
    """
    if raw is None:
        raise DeployError("the deploy has no value")
    if len(raw) > MAX_DEPLOY_BYTES:
        raise DeployError(f"the deploy value is {len(raw)} bytes, more than {MAX_DEPLOY_BYTES}")
    try:
        data: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise DeployError(f"the deploy value is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise DeployError("the deploy value is not a JSON object")
    fields: dict[str, Any] = data
    if _field(fields, "format") != 1:
        raise DeployError(f"unknown deploy format {_shown(fields.get('format'))} (this node reads format 1)")
    # Each field is checked by the constructor (any type may arrive here).
    deploy = Deploy(plugin=_field(fields, "plugin"), range=_field(fields, "range"),
                    version=_field(fields, "version"), previous=_field(fields, "previous"),
                    replicas=_field(fields, "replicas"), labels=_field(fields, "labels", {}),
                    deployed_at=_field(fields, "deployed_at", ""), revision=revision)
    if key is not None and deploy.plugin != key:
        raise DeployError(f"the deploy under key {_shown(key)} names plugin {deploy.plugin!r}")
    return deploy


def _field(fields: dict[str, Any], key: str, default: Any = None) -> Any:
    """A field of an untrusted object, of whatever type it has (the caller checks it)."""
    return fields.get(key, default)


def _shown(value: object) -> str:
    """A value for an error message: repr, cut to 80 characters (it may be anything, of any size)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class DeployStore:
    """The deploy bucket: put, get, list, delete (and the bucket for watching).

    Parameters:
        kv: the ``sandbus-deploys`` bucket (see :meth:`open`).
    """

    def __init__(self, kv: KeyValue, js: JetStreamContext) -> None:
        self.kv = kv
        self.js = js

    @classmethod
    async def open(cls, js: JetStreamContext, *, replicas: int | None = None) -> DeployStore:
        """The store over the deploy bucket, created on first use."""
        return cls(await ensure_deploys(js, replicas=replicas), js)

    async def put(self, deploy: Deploy) -> int:
        """Store ``deploy`` (replacing the plugin's current one); returns its revision."""
        return int(await self.kv.put(deploy.plugin, deploy.to_json()))

    async def get(self, plugin: str) -> Deploy | None:
        """The plugin's deploy, or ``None`` when it has none.

        Raises:
            DeployError: the stored value is not a valid deploy.
        """
        check_plugin(plugin)
        try:
            entry = await self.kv.get(plugin)
        except KeyNotFoundError:  # also a deleted key's marker
            return None
        return parse_deploy(entry.value, key=plugin, revision=int(entry.revision or 0))

    async def list(self, timeout: float = 5.0) -> tuple[list[Deploy], dict[str, str]]:
        """Every deploy, by plugin, and the keys whose values are not valid deploys (with why).

        Raises:
            TimeoutError: the bucket did not list its values within ``timeout``.
        """
        deploys: list[Deploy] = []
        invalid: dict[str, str] = {}
        for entry in sorted(await current_values(self.js, DEPLOYS_BUCKET, timeout), key=lambda e: e.key):
            try:
                deploys.append(parse_deploy(entry.value, key=entry.key, revision=entry.revision))
            except DeployError as e:
                invalid[entry.key[:80]] = e.message
        return deploys, invalid

    async def delete(self, plugin: str) -> bool:
        """Remove the plugin's deploy; False when it had none."""
        if await self.get_raw_revision(plugin) is None:
            return False
        await self.kv.delete(plugin)
        return True

    async def get_raw_revision(self, plugin: str) -> int | None:
        """The revision of the plugin's key, valid or not (``None``: no deploy)."""
        check_plugin(plugin)
        try:
            entry = await self.kv.get(plugin)
        except KeyNotFoundError:
            return None
        return int(entry.revision or 0)
