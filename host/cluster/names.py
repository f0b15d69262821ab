"""The names the cluster lives under: its JetStream buckets and their keys, and what may go in a key.

Every key is built here from a checked plugin name and version, never from raw input: a key is a NATS
subject underneath (``$KV.<bucket>.<key>``), so a ``.``, ``*`` or ``>`` that slipped into a name would
address other entries. Plugin names are manifest names (``^[a-z][a-z0-9_]{0,62}$``, so never a dot or a
wildcard); versions are semantic versions without build metadata (``+`` is not allowed in a key).
"""

from __future__ import annotations

import re
from typing import NamedTuple

import semantic_version

from sandbus.sdk.errors import InvalidArtifactError

__all__ = [
    "ARTIFACTS_BUCKET",
    "DEPLOYS_BUCKET",
    "DEPLOYS_HISTORY",
    "NODES_BUCKET",
    "NODES_HISTORY",
    "NODES_MAX_AGE_S",
    "REGISTRY_BUCKET",
    "REGISTRY_HISTORY",
    "PluginRef",
    "check_name",
    "check_range",
    "check_version",
    "object_name",
    "parse_ref",
    "registry_key",
    "version_filter",
]

#: KV bucket: the artifact index, key ``<name>.<version>`` (see :mod:`sandbus.host.cluster.entry`).
REGISTRY_BUCKET = "sandbus-registry"
REGISTRY_HISTORY = 1
#: Object store: the modules, object ``<name>/<version>.wasm``.
ARTIFACTS_BUCKET = "sandbus-artifacts"
#: KV bucket: the desired state, key ``<plugin>``.
DEPLOYS_BUCKET = "sandbus-deploys"
DEPLOYS_HISTORY = 5
#: KV bucket: each node's report (liveness and actual state), key ``<node_id>``; a report expires.
NODES_BUCKET = "sandbus-nodes"
NODES_HISTORY = 1
NODES_MAX_AGE_S = 30.0

# The manifest's own rule for a plugin name (sandbus.host.lifecycle.manifest): a NATS token and a file stem.
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
# What a version may hold before it is parsed: the characters of a semver without build metadata.
_VERSION_RE = re.compile(r"[0-9A-Za-z.\-]{1,128}")
# What a range may hold: as a manifest [dependencies] requirement (sandbus.host.lifecycle.manifest).
_RANGE_RE = re.compile(r"[0-9A-Za-z.+\-^~<>=*|x ]{1,256}")
#: Longest ``name@range`` reference taken from a command line.
MAX_REF_CHARS = 320


def _shown(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_name(name: object) -> str:
    """A plugin name as the registry keys it: a manifest name (lowercase letter, then lowercase letters,
    digits or ``_``, at most 63 characters).

    Raises:
        InvalidArtifactError: anything else (``../x``, ``a.b``, ``*``, ``>``, empty, not a string).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArtifactError(
            f"{_shown(name)} is not a plugin name (a lowercase letter, then lowercase letters, digits or '_', "
            "at most 63 characters; no '.', '/', '*' or '>')")
    return name


def check_version(version: object) -> str:
    """A semantic version the registry can key: ``MAJOR.MINOR.PATCH[-prerelease]``, no build metadata.

    Raises:
        InvalidArtifactError: not a semantic version, or one with ``+build`` metadata (a ``+`` cannot be part
            of a JetStream key, and build metadata does not order versions: publish ``1.2.0-rc.1`` or a new
            patch instead).
    """
    if isinstance(version, str) and "+" in version and len(version) <= 256:
        raise InvalidArtifactError(
            f"version {_shown(version)} has build metadata ('+...'): the registry refuses it, as a '+' cannot be "
            "part of a registry key and build metadata does not order versions; publish a pre-release "
            "('1.2.0-rc.1') or a new patch version instead", version=version)
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise InvalidArtifactError(f"{_shown(version)} is not a semantic version like '1.2.3'")
    try:
        semantic_version.Version(version)
    except Exception:  # the parser's errors on odd input are all "not a version"
        raise InvalidArtifactError(f"{_shown(version)} is not a semantic version like '1.2.3'") from None
    return version


def check_range(text: object) -> semantic_version.NpmSpec:
    """An npm-style range (``^1.2``, ``~1.2.3``, ``>=1.0 <2``, ``1.x``, ``*``, or an exact ``1.2.3``), the syntax
    and library of a manifest's ``[dependencies]``.

    Raises:
        InvalidArtifactError: anything else.
    """
    message = f"{_shown(text)} is not a version range like '^1.2', '~1.2.3', '>=1.0 <2' or '1.2.3'"
    if not isinstance(text, str) or not text.strip() or not _RANGE_RE.fullmatch(text):
        raise InvalidArtifactError(message)
    try:
        return semantic_version.NpmSpec(text)
    except Exception:  # the library raises AttributeError and others on some ranges: all are refusals
        raise InvalidArtifactError(message) from None


def registry_key(name: str, version: str) -> str:
    """The ``sandbus-registry`` key of one version: ``<name>.<version>`` (both checked)."""
    return f"{check_name(name)}.{check_version(version)}"


def version_filter(name: str) -> str:
    """The key filter of every version of ``name``: ``<name>.>`` (no other name can match it: names hold no dot)."""
    return f"{check_name(name)}.>"


def object_name(name: str, version: str) -> str:
    """The ``sandbus-artifacts`` object of one version: ``<name>/<version>.wasm``."""
    return f"{check_name(name)}/{check_version(version)}.wasm"


class PluginRef(NamedTuple):
    """``name@range`` as typed: the plugin and its range (``None``: the highest version)."""

    name: str
    range: str | None

    def spec(self) -> semantic_version.NpmSpec | None:
        return None if self.range is None else check_range(self.range)

    def __str__(self) -> str:
        return self.name if self.range is None else f"{self.name}@{self.range}"


def parse_ref(text: str) -> PluginRef:
    """``name`` or ``name@range`` (``greeter@^1.2``, ``greeter@1.2.0``), both parts checked.

    Raises:
        InvalidArtifactError: a name that is not a plugin name, a range that is not a range.
    """
    if not isinstance(text, str) or len(text) > MAX_REF_CHARS:
        raise InvalidArtifactError(f"{_shown(text)} is not a plugin reference like 'greeter' or 'greeter@^1.2'")
    name, at, range_text = text.partition("@")
    check_name(name)
    if not at:
        return PluginRef(name, None)
    check_range(range_text)
    return PluginRef(name, range_text)
