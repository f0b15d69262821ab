"""Plugin manifests: ``<name>.toml`` beside ``<name>.wasm``.

A manifest is what a plugin *asks for*; the operator policy (:mod:`sandbus.host.lifecycle.policy`) decides what
it *gets*.
Keeping the two apart means an untrusted author can never grant themselves anything: the worst a
manifest can do is be refused. Because manifests are written by hand, every mistake is reported as a
:class:`~sandbus.sdk.errors.ManifestError` naming the file, the dotted key, what was expected and what was
found -- and, for a misspelt key, the key that was probably meant.

Example::

    [plugin]
    name = "orders"
    version = "1.4.0"
    min_runtime_version = "0.1.0"
    repository = "https://github.com/example/orders"
    documentation = "https://docs.example.com/orders"

    [capabilities]
    required = ["messaging"]
    optional = ["clock"]

    [permissions]
    publish_topics = ["orders.*"]
    request_plugins = ["pricing.quote", "audit"]
    read_files = ["data/*.txt"]     # a glob only in the last component: the files directly in data/

    [resources]
    memory_mb = 32
    max_open_files = 16
    isolation = "per-call"          # a fresh instance for every call (default "pooled")
    max_var_bytes = 65536           # Extism plugins: what one instance's vars may hold

    [dependencies]
    pricing = "^2.1"
    audit = { version = "~1.0", optional = true }

    [build]                         # read by `sandbus build` only
    optimize = true
    target = "wasm32-wasi"
    features = ["simd"]

A permission list asks for its capability: ``read_files`` in a manifest whose ``[capabilities]`` does not
name ``filesystem`` adds ``filesystem`` to ``optional`` (likewise ``network_hosts`` -> ``network``,
``environment_vars`` -> ``environment``, ``publish_topics`` / ``request_plugins`` -> ``messaging``).
Optional, so a node whose policy does not allow it loads the plugin without it and says so.
"""

from __future__ import annotations

import difflib
import errno
import hashlib
import ipaddress
import os
import re
import stat
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, get_args, get_origin

import semantic_version
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from sandbus.host.sandbox.config import check_name_pattern, is_pattern
from sandbus.sdk.envelope import MAX_MEDIA_TYPE, valid_media_type
from sandbus.sdk.errors import ManifestError, SecurityViolationError
from sandbus.sdk.subjects import check_token, check_topic

__all__ = [
    "BUILD_FEATURES",
    "BUILD_TARGETS",
    "BuildSection",
    "CAPABILITY_NAMES",
    "CapabilitiesSection",
    "CapabilityName",
    "DependencySpec",
    "MAX_FILE_ENTRIES",
    "MAX_TOML_BYTES",
    "Manifest",
    "MetadataSection",
    "PermissionsSection",
    "PluginSection",
    "ResourcesSection",
    "SubscriptionsSection",
    "check_env_name",
    "check_request_pattern",
    "check_subject",
    "check_toml_shape",
    "check_url",
    "load_manifest",
    "loads_toml",
    "parse_host",
    "parse_manifest",
    "open_regular",
    "read_capped",
    "read_fd_capped",
    "request_matches",
    "split_file_pattern",
    "subject_matches",
]

CapabilityName = Literal[
    "compute", "filesystem", "environment", "clock", "random", "network", "storage", "messaging"
]
#: Every capability a manifest may name, in documentation order.
CAPABILITY_NAMES: tuple[str, ...] = get_args(CapabilityName)

# Every pattern is used with ``fullmatch``: ``re.match`` with ``$`` accepts a trailing newline.
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
_ENV_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,255}")
_LABEL_RE = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# A version or a version range is ASCII with no control characters (semantic_version itself matches with
# ``$`` and ``\d``, so it takes "1.2.3\n" and Arabic-Indic digits); a range may hold spaces (">=1.0 <2").
_VERSION_CHARS_RE = re.compile(r"[0-9A-Za-z.+\-]{1,256}")
_RANGE_CHARS_RE = re.compile(r"[0-9A-Za-z.+\-^~<>=*|x ]{1,256}")
#: Largest manifest or policy file read; TOML written by hand is a few KiB.
MAX_TOML_BYTES = 1024 * 1024
#: Longest ``repository`` / ``documentation`` URL (what browsers and registries reliably take).
MAX_URL_CHARS = 2048
#: Most ``read_files`` / ``write_files`` entries: each file-name glob among them is matched against every name
#: the plugin reaches (and every entry of a listing) while it waits in a file operation.
MAX_FILE_ENTRIES = 64
#: Most files one plugin instance may ask to have open at once (``[resources] max_open_files``).
MAX_OPEN_FILES_ASKED = 65536
#: Most bytes an Extism plugin's vars may be allowed per instance (``[resources] max_var_bytes``): 64 MiB.
MAX_VAR_BYTES = 64 * 1024 * 1024
#: ``[build] target`` values: the core-module target (``wasm32-wasi`` is the older name of
#: ``wasm32-wasip1``) and the component target of Python plugins.
BUILD_TARGETS: tuple[str, ...] = ("wasm32-wasi", "wasm32-wasip1", "wasm32-wasip2")
#: ``[build] features``: the WebAssembly proposals a plugin may be compiled to use -- those the node's
#: engine accepts (host/sandbox/engine.py).
BUILD_FEATURES: tuple[str, ...] = (
    "simd", "bulk-memory", "sign-ext", "nontrapping-fptoint", "mutable-globals", "multivalue", "reference-types",
)
_TOML_POS_RE = re.compile(r"at line (\d+), column (\d+)")


# --------------------------------------------------------------------------------------------------
# Shared validation helpers (also used by sandbus.host.lifecycle.policy)
# --------------------------------------------------------------------------------------------------


class _KeyedError(ValueError):
    """A validator error that knows its dotted key better than pydantic's ``loc`` does
    (model-level validators have an empty ``loc``)."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def _suggest(word: str, choices: typing.Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` when a close match exists, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_semver(value: str, what: str) -> str:
    if not _VERSION_CHARS_RE.fullmatch(value):
        raise ValueError(f"{what} must be a semantic version like '1.2.3' (MAJOR.MINOR.PATCH), found {value!r}")
    try:
        semantic_version.Version(value)
    except Exception:  # any error of the parser on odd input is a refusal, never a crash of the loader
        raise ValueError(
            f"{what} must be a semantic version like '1.2.3' (MAJOR.MINOR.PATCH), found {value!r}"
        ) from None
    return value


def _check_name(value: str, what: str = "plugin name") -> str:
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} must match ^[a-z][a-z0-9_]{{0,62}}$ (lowercase letter, then lowercase letters, "
            f"digits or '_', at most 63 characters), found {value!r}"
        )
    return value


def check_env_name(name: str) -> str:
    """An environment variable name a plugin may be granted: ``[A-Za-z_][A-Za-z0-9_]*``, at most 256
    characters (no ``=``, no whitespace: it becomes a ``NAME=value`` entry of the guest's environment).

    Raises:
        ValueError: saying what was expected and what was found.
    """
    if not _ENV_RE.fullmatch(name):
        raise ValueError(f"expected an environment variable name like 'API_URL', found {name!r}")
    return name


def _dedupe(values: typing.Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def check_subject(subject: str) -> str:
    """Validate a topic pattern (``[subscriptions] topics``, ``publish_topics``) and return it unchanged.

    This is :func:`sandbus.sdk.subjects.check_topic` with wildcards: the one rule the node, the client and
    ``sandbus plugins check`` share, so a manifest that validates is one a node can subscribe to.
    Tokens are ``[A-Za-z0-9_-]+`` separated by ``.``; ``*`` matches exactly one token and must be a
    whole token; ``>`` matches one or more trailing tokens and may only be the last token.

    Raises:
        ValueError: saying which rule the subject breaks.
    """
    return check_topic(subject, wildcards=True)


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether a concrete ``subject`` falls under ``pattern`` with NATS wildcard rules.

    A subject that itself contains wildcards never matches: publishing to a wildcard is not a thing.
    """
    sub = subject.split(".")
    if "*" in sub or ">" in sub:
        return False
    pat = pattern.split(".")
    for i, token in enumerate(pat):
        if token == ">":
            return len(sub) > i
        if i >= len(sub) or (token != "*" and token != sub[i]):
            return False
    return len(sub) == len(pat)


def check_request_pattern(pattern: str) -> str:
    """Validate a ``request_plugins`` entry and return it unchanged.

    An entry is ``PLUGIN`` (every function of that plugin) or ``PLUGIN.FUNCTION``; ``PLUGIN`` is a plugin
    name or ``*`` (any plugin), ``FUNCTION`` a function name or ``*`` (any function). So ``"pricing"`` and
    ``"pricing.*"`` mean the same, and ``"*"`` allows requests to every plugin.

    Raises:
        ValueError: saying which part is wrong, and what was expected.
    """
    expected = "expected 'plugin', 'plugin.function', 'plugin.*' or '*'"
    plugin, dot, function = pattern.partition(".")
    if plugin != "*" and not _NAME_RE.fullmatch(plugin):
        raise ValueError(f"{expected} with a plugin name like 'pricing' ([a-z][a-z0-9_]*), found {pattern!r}")
    if dot and function != "*":
        try:
            check_token(function, "function")
        except ValueError:
            raise ValueError(f"{expected}; the function must be one name of letters, digits, '_' or '-', "
                             f"found {pattern!r}") from None
    return pattern


def request_matches(pattern: str, plugin: str, function: str) -> bool:
    """Whether a ``request_plugins`` entry (see :func:`check_request_pattern`) allows ``plugin.function``."""
    p_plugin, dot, p_function = pattern.partition(".")
    if p_plugin not in ("*", plugin):
        return False
    return not dot or p_function in ("*", function)


def parse_host(entry: str, *, allow_wildcard: bool = False) -> tuple[str, int | None]:
    """Split ``"host"`` / ``"host:port"`` / ``"[v6]:port"`` into ``(host, port)``, validating both.

    Host names are lowercased (DNS is case-insensitive). ``allow_wildcard`` admits a leading ``*.``
    label (``*.example.com``), which the operator policy may use and a manifest may not.

    Raises:
        ValueError: saying what was expected and what was found.
    """
    expected = "expected 'host' or 'host:port'"
    port: int | None = None
    host = entry
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0:
            raise ValueError(f"{expected}, found {entry!r} (unclosed '[')")
        host, rest = entry[1:end], entry[end + 1 :]
        try:
            if "%" in host:  # a scope id names a local interface: free text, and no business in a grant
                raise ValueError(host)
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{expected}, found {entry!r} ('[...]' must hold an IPv6 address)") from None
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{expected}, found {entry!r}")
            port = _parse_port(rest[1:], entry)
        return host.lower(), port
    if entry.count(":") == 1:
        host, port_text = entry.split(":")
        port = _parse_port(port_text, entry)
    elif ":" in entry:
        raise ValueError(f"{expected}, found {entry!r} (write IPv6 addresses as '[addr]:port')")
    labels = host.split(".")
    if allow_wildcard and labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if len(host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"{expected} with a valid DNS name or IPv4 address, found {entry!r}")
    return host.lower(), port


def _parse_port(text: str, entry: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise ValueError(f"port must be a number from 1 to 65535, found {text!r} in {entry!r}")
    return int(text)


def _check_relative_path(value: str) -> str:
    """A path under the plugin's data root: relative, no ``..``, normalised (``./a//b`` -> ``a/b``)."""
    if "\x00" in value:
        raise ValueError(f"path {value!r} contains a NUL character")
    if not value.isprintable():
        raise ValueError(f"path {value!r} contains control characters")
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError(f"expected a path relative to the plugin's data root, found absolute path {value!r}")
    parts = PurePosixPath(value.replace("\\", "/")).parts
    if len(value) > 1024 or any(len(part.encode()) > 255 for part in parts):  # what file systems take: NAME_MAX
        raise ValueError(f"path {value[:40]!r}... is too long (at most 1024 characters, 255 bytes a name)")
    if ".." in parts:
        raise ValueError(f"path {value!r} contains a '..' component; paths must stay under the data root")
    if not parts:
        raise ValueError(f"expected a directory under the data root, found {value!r}")
    *dirs, last = parts
    bad = next((d for d in dirs if is_pattern(d)), None)
    if bad is not None:
        raise ValueError(f"path {value!r} has a glob in {bad!r}: a glob ('*', '?', '[...]') may only be in the "
                         "last component, as in 'data/*.txt'")
    if is_pattern(last):
        if not dirs:
            raise ValueError(f"path {value!r}: a glob names files in a directory under the data root, "
                             "as in 'data/*.txt'")
        if "**" in last:
            raise ValueError(f"path {value!r}: '**' (any depth) is not supported; a glob matches the files "
                             "directly in one directory, as in 'data/*.txt'")
        check_name_pattern(last)
    return "/".join(parts)


def split_file_pattern(entry: str) -> tuple[str, str | None]:
    """A validated ``read_files`` / ``write_files`` entry as (directory, file-name glob or ``None``).

    ``"data/*.txt"`` -> ``("data", "*.txt")``; ``"data"`` -> ``("data", None)``.
    """
    head, _, last = entry.rpartition("/")
    if head and is_pattern(last):
        return head, last
    return entry, None


def check_url(value: str, what: str) -> str:
    """An ``http(s)`` URL with a host, printable, at most :data:`MAX_URL_CHARS` characters, without
    credentials (shown to users by ``inspect`` and in plugin listings: no other scheme, so a link shown
    there never runs script or opens a local file).

    Raises:
        ValueError: saying what was expected and what was found.
    """
    if len(value) > MAX_URL_CHARS:
        raise ValueError(f"{what} must be a URL of at most {MAX_URL_CHARS} characters, found {len(value)}")
    if not value.isascii() or not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError(f"{what} must be an ASCII URL without spaces or control characters, found {value[:80]!r}")
    try:
        url = urllib.parse.urlsplit(value)
        host = url.hostname
        url.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"{what} must be an http(s) URL like 'https://example.com/x', found {value[:80]!r}") from None
    if url.scheme not in ("http", "https") or not host:
        raise ValueError(f"{what} must be an http(s) URL like 'https://example.com/x', found {value[:80]!r}")
    if url.username is not None or url.password is not None:
        raise ValueError(f"{what} must not carry a user name or password, found {value[:80]!r}")
    return value


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class _Section(BaseModel):
    """Base of every TOML table: immutable, and an unknown key is an error, not a silent no-op."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class PluginSection(_Section):
    """``[plugin]``: identity of the plugin.

    Parameters:
        name: must match ``^[a-z][a-z0-9_]{0,62}$`` and the file stem (it becomes a NATS token).
        version: semantic version of the plugin.
        description / author / license: free text, for humans and the CLI listing.
        repository / documentation: ``http(s)`` URLs of the source and of the docs, shown by
            ``sandbus inspect`` and in plugin listings (``PluginInfo``, ``sandbus ls --json``).
        min_runtime_version: the oldest sandbus runtime this plugin works with (``None``: any).
        sha256: hex digest of the ``.wasm``; when set, a binary that does not match is refused.
        content_type: for a plugin whose output is bytes (Extism), the media type of its successful
            replies (``None``: ``application/octet-stream``); a JSON plugin always replies
            ``application/json``, and a manifest declaring another type for one is refused at load.
    """

    name: StrictStr
    version: StrictStr
    description: StrictStr = Field(default="", max_length=4096)
    author: StrictStr = Field(default="", max_length=256)
    license: StrictStr = Field(default="", max_length=256)
    repository: StrictStr | None = None
    documentation: StrictStr | None = None
    min_runtime_version: StrictStr | None = None
    sha256: StrictStr | None = None
    content_type: StrictStr | None = None

    @field_validator("content_type")
    @classmethod
    def _content_type(cls, v: str | None) -> str | None:
        # Copied into every reply's headers: only a strict media type passes (no CR/LF, no control bytes).
        if v is not None and valid_media_type(v) is None:
            shown = repr(v[:64]) + ("..." if len(v) > 64 else "")
            raise ValueError(f"content_type must be a media type such as \"application/json\" or \"text/plain; "
                             f"charset=utf-8\" (type/subtype, optional ; key=value parameters, printable ASCII, "
                             f"at most {MAX_MEDIA_TYPE} characters), found {shown}")
        return v

    @field_validator("repository", "documentation")
    @classmethod
    def _url(cls, v: str | None, info: ValidationInfo) -> str | None:
        return None if v is None else check_url(v, str(info.field_name))

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v)

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        return _check_semver(v, "version")

    @field_validator("min_runtime_version")
    @classmethod
    def _min_runtime(cls, v: str | None) -> str | None:
        return None if v is None else _check_semver(v, "min_runtime_version")

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, v: str | None) -> str | None:
        if v is not None and not _SHA256_RE.fullmatch(v):
            raise ValueError(f"sha256 must be 64 hexadecimal characters, found {v!r} ({len(v)} characters)")
        return None if v is None else v.lower()


def _check_capabilities(values: Any) -> Any:
    if isinstance(values, list | tuple):
        for v in values:
            if isinstance(v, str) and v not in CAPABILITY_NAMES:
                raise ValueError(
                    f"unknown capability {v!r}{_suggest(v, CAPABILITY_NAMES)} "
                    f"(known: {', '.join(CAPABILITY_NAMES)})"
                )
    return values


class CapabilitiesSection(_Section):
    """``[capabilities]``: what the plugin needs (``required``: refused if denied) and what it can
    do without (``optional``: silently not granted if denied)."""

    required: tuple[CapabilityName, ...] = ()
    optional: tuple[CapabilityName, ...] = ()

    @field_validator("required", "optional", mode="before")
    @classmethod
    def _known(cls, v: Any) -> Any:
        return _check_capabilities(v)

    @field_validator("required", "optional")
    @classmethod
    def _unique(cls, v: tuple[CapabilityName, ...]) -> tuple[CapabilityName, ...]:
        return tuple(dict.fromkeys(v))

    @model_validator(mode="after")
    def _disjoint(self) -> CapabilitiesSection:
        both = sorted(set(self.required) & set(self.optional))
        if both:
            raise _KeyedError(
                f"{', '.join(map(repr, both))} listed as both required and optional; pick one",
                "capabilities.optional",
            )
        return self

    @property
    def all(self) -> frozenset[str]:
        """Required and optional capabilities together."""
        return frozenset(self.required) | frozenset(self.optional)


class PermissionsSection(_Section):
    """``[permissions]``: the concrete resources behind the capabilities.

    Parameters:
        read_files / write_files: directories relative to the plugin's data root (chosen by the
            operator at load time); absolute paths and ``..`` are refused. WASI preopens directories,
            so each entry names a directory -- or, with a glob in its last component (``data/*.txt``:
            ``*``, ``?``, ``[...]``), the files directly in a directory whose names match: the
            directory is granted, and the host refuses every other name in it (docs/abi.md). At most
            :data:`MAX_FILE_ENTRIES` entries each. Needs the ``filesystem`` capability (asked for as
            optional when not listed).
        network_hosts: ``"host"`` or ``"host:port"``; needs ``network`` (likewise implied).
        environment_vars: variable names the plugin may read; needs ``environment``.
        publish_topics: NATS subject patterns the plugin may publish to; needs ``messaging``.
        request_plugins: plugin functions the plugin may call with the ``request`` host function:
            ``"plugin"`` (every function), ``"plugin.function"``, ``"plugin.*"`` or ``"*"``; needs
            ``messaging``.
    """

    read_files: tuple[StrictStr, ...] = Field(default=(), max_length=MAX_FILE_ENTRIES)
    write_files: tuple[StrictStr, ...] = Field(default=(), max_length=MAX_FILE_ENTRIES)
    network_hosts: tuple[StrictStr, ...] = ()
    environment_vars: tuple[StrictStr, ...] = ()
    publish_topics: tuple[StrictStr, ...] = ()
    request_plugins: tuple[StrictStr, ...] = ()

    @field_validator("read_files", "write_files")
    @classmethod
    def _paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _dedupe(_check_relative_path(p) for p in v)

    @field_validator("network_hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for h in v:
            parse_host(h)
        return _dedupe(v)

    @field_validator("environment_vars")
    @classmethod
    def _env(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            check_env_name(name)
        return _dedupe(v)

    @field_validator("publish_topics")
    @classmethod
    def _topics(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _dedupe(check_subject(t) for t in v)

    @field_validator("request_plugins")
    @classmethod
    def _request_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _dedupe(check_request_pattern(p) for p in v)


class ResourcesSection(_Section):
    """``[resources]``: what the plugin asks for; each missing value means "the node's default".
    A value above the operator's ceiling gets the plugin refused, never silently clamped."""

    memory_mb: StrictInt | None = Field(default=None, gt=0, le=4096)  # a 32-bit guest addresses 4 GiB
    timeout_seconds: StrictFloat | None = Field(default=None, gt=0, le=1e9, allow_inf_nan=False)
    max_fuel: StrictInt | None = Field(default=None, gt=0, le=2**63 - 1)  # wasmtime counts fuel in an i64
    max_instances: StrictInt | None = Field(default=None, gt=0, le=65536)
    #: Files one instance may have open at once (each a host descriptor).
    max_open_files: StrictInt | None = Field(default=None, gt=0, le=MAX_OPEN_FILES_ASKED)
    #: "pooled" (warm instances serve call after call) or "per-call" (a fresh instance every call, so
    #: nothing one caller left in memory reaches the next); ``None``: the node's default.
    isolation: Literal["pooled", "per-call"] | None = None
    #: Extism plugins: bytes one instance's vars (``var_set``) may hold at once (Extism's
    #: ``memory.max_var_bytes``); above it ``var_set`` fails the call.
    max_var_bytes: StrictInt | None = Field(default=None, gt=0, le=MAX_VAR_BYTES)


class BuildSection(_Section):
    """``[build]``: how ``sandbus build`` compiles the plugin; nodes ignore it.

    It names no command: the build runs the language's own toolchain in the project directory, and
    these keys only choose among its flags (host/authoring/build.py).

    Parameters:
        optimize: an optimised build (C ``-O2``, AssemblyScript ``-O3``), or, when false, a debug build
            (``-O0 -g``, debug info kept).
        target: the target to build for (``wasm32-wasi`` / ``wasm32-wasip1`` for core modules,
            ``wasm32-wasip2`` for Python components); a project whose language builds the other
            kind is refused at build time.
        features: WebAssembly proposals the compiler may use (``simd``...), from :data:`BUILD_FEATURES`.
    """

    optimize: StrictBool = True
    target: StrictStr | None = None
    features: tuple[StrictStr, ...] = ()

    @field_validator("target")
    @classmethod
    def _target(cls, v: str | None) -> str | None:
        if v is not None and v not in BUILD_TARGETS:
            raise ValueError(f"unknown build target {v[:80]!r}{_suggest(v, BUILD_TARGETS)} "
                             f"(known: {', '.join(BUILD_TARGETS)})")
        return v

    @field_validator("features")
    @classmethod
    def _features(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for feature in v:
            if feature not in BUILD_FEATURES:
                raise ValueError(f"unknown wasm feature {feature[:80]!r}{_suggest(feature, BUILD_FEATURES)} "
                                 f"(known: {', '.join(BUILD_FEATURES)})")
        return _dedupe(v)


class DependencySpec(_Section):
    """One ``[dependencies]`` entry: ``name = "^1.2"`` or ``name = { version = "^1.2", optional = true }``.

    ``version`` is an npm-style range (``^1.2``, ``~1.2.3``, ``>=1.0 <2``, ``1.x``, ``*``).
    """

    version: StrictStr
    optional: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"version": data}
        if not isinstance(data, Mapping | DependencySpec):
            raise ValueError(
                "expected a requirement string like '^1.2' or a table like { version = \"^1.2\", "
                f"optional = true }}, found {type(data).__name__} {data!r}"
            )
        return data

    @field_validator("version")
    @classmethod
    def _requirement(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("expected a version requirement like '^1.2', found an empty string (use '*')")
        if not _RANGE_CHARS_RE.fullmatch(v):
            raise ValueError(
                f"expected an npm-style version requirement like '^1.2', '~1.2.3' or '>=1.0 <2', found {v!r}")
        try:
            semantic_version.NpmSpec(v)
        except Exception:  # the library raises AttributeError on some ranges ("1 - ^"): all are refusals
            raise ValueError(
                f"expected an npm-style version requirement like '^1.2', '~1.2.3' or '>=1.0 <2', found {v!r}"
            ) from None
        return v

    @property
    def spec(self) -> semantic_version.NpmSpec:
        """The parsed requirement."""
        return semantic_version.NpmSpec(self.version)

    def allows(self, version: str) -> bool:
        """Whether ``version`` satisfies this requirement."""
        return bool(semantic_version.Version(version) in self.spec)


class SubscriptionsSection(_Section):
    """``[subscriptions]``: topics delivered to the plugin; ``durable`` keeps a JetStream consumer so
    messages published while no node holds the plugin are delivered later."""

    topics: tuple[StrictStr, ...] = ()
    durable: StrictBool = True

    @field_validator("topics")
    @classmethod
    def _topics(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _dedupe(check_subject(t) for t in v)


class MetadataSection(_Section):
    """``[metadata]``: catalogue information, shown by ``inspect`` and in plugin listings; no effect on the runtime."""

    category: StrictStr = Field(default="", max_length=128)
    tags: tuple[Annotated[StrictStr, Field(max_length=64)], ...] = Field(default=(), max_length=64)


#: Which capability each permission list needs; a manifest that lists one without it asks for it as optional.
_PERMISSION_NEEDS: dict[str, str] = {
    "read_files": "filesystem",
    "write_files": "filesystem",
    "network_hosts": "network",
    "environment_vars": "environment",
    "publish_topics": "messaging",
    "request_plugins": "messaging",
}


class Manifest(_Section):
    """A validated plugin manifest. Build one with :func:`load_manifest` or :func:`parse_manifest`.

    Parameters:
        plugin: identity (``[plugin]``).
        capabilities: required and optional capabilities.
        permissions: files, hosts, variables and topics behind those capabilities.
        resources: limits asked for (``None``: node default).
        dependencies: other plugins this one calls, by name.
        subscriptions: topics delivered to the plugin.
        metadata: catalogue information.
        build: how ``sandbus build`` compiles it (no effect on a node).
        config: free-form table handed to the plugin's ``init(config)``. Not deep-frozen: treat as
            read-only.
    """

    plugin: PluginSection
    capabilities: CapabilitiesSection = CapabilitiesSection()
    permissions: PermissionsSection = PermissionsSection()
    resources: ResourcesSection = ResourcesSection()
    dependencies: dict[str, DependencySpec] = Field(default_factory=dict)
    subscriptions: SubscriptionsSection = SubscriptionsSection()
    metadata: MetadataSection = MetadataSection()
    build: BuildSection = BuildSection()
    config: dict[str, Any] = Field(default_factory=dict)

    _source: str | None = PrivateAttr(default=None)

    @field_validator("dependencies")
    @classmethod
    def _dependency_names(cls, v: dict[str, DependencySpec]) -> dict[str, DependencySpec]:
        for name in v:
            try:
                _check_name(name, "dependency name")
            except ValueError as exc:
                raise _KeyedError(str(exc), f"dependencies.{name}") from None
        return dict(sorted(v.items()))

    @model_validator(mode="before")
    @classmethod
    def _implied_capabilities(cls, data: Any) -> Any:
        """A permission list asks for its capability: one ``[capabilities]`` does not name becomes optional."""
        if not isinstance(data, Mapping):
            return data
        perms, caps = data.get("permissions"), data.get("capabilities", {})
        if not isinstance(perms, Mapping) or not isinstance(caps, Mapping):
            return data  # wrong types are reported by the fields
        required, optional = caps.get("required", ()), caps.get("optional", ())
        if not isinstance(required, list | tuple) or not isinstance(optional, list | tuple):
            return data
        implied = [capability for key, capability in _PERMISSION_NEEDS.items()
                   if perms.get(key) and capability not in required and capability not in optional]
        if not implied:
            return data
        return {**data, "capabilities": {**caps, "optional": [*optional, *dict.fromkeys(implied)]}}

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.plugin.name in self.dependencies:
            raise _KeyedError(
                f"plugin {self.plugin.name!r} lists itself as a dependency",
                f"dependencies.{self.plugin.name}",
            )
        return self

    @property
    def name(self) -> str:
        """The plugin name."""
        return self.plugin.name

    @property
    def version(self) -> semantic_version.Version:
        """The plugin version, parsed."""
        return semantic_version.Version(self.plugin.version)

    @property
    def source(self) -> str | None:
        """The file this manifest was read from (``None`` when parsed from a string)."""
        return self._source

    def runtime_compatible(self, runtime_version: str) -> bool:
        """Whether a runtime of ``runtime_version`` is at least ``min_runtime_version``.

        Raises:
            ValueError: ``runtime_version`` is not a semantic version.
        """
        if self.plugin.min_runtime_version is None:
            return True
        minimum = semantic_version.Version(self.plugin.min_runtime_version)
        return bool(semantic_version.Version(runtime_version) >= minimum)

    def verify_wasm(self, wasm: bytes) -> None:
        """Check the module bytes against ``[plugin] sha256`` (no-op when the manifest has none).

        Raises:
            SecurityViolationError: the digest differs -- the binary is not the one the manifest vouches
                for (tampered, or a stale build).
        """
        if self.plugin.sha256 is not None:
            self.verify_digest(hashlib.sha256(wasm).hexdigest())

    def verify_digest(self, actual: str) -> None:
        """:meth:`verify_wasm` on the module's sha256 (hex), computed once by the caller or known already."""
        expected = self.plugin.sha256
        if expected is None:
            return
        if actual != expected:
            raise SecurityViolationError(
                f"wasm sha256 mismatch: manifest expects {expected}, module has {actual}",
                plugin=self.name,
                expected=expected,
                actual=actual,
                manifest=self._source,
            )


# --------------------------------------------------------------------------------------------------
# Loading and error translation (shared with sandbus.host.lifecycle.policy)
# --------------------------------------------------------------------------------------------------

_ErrorFactory = Callable[[str, str | None], Exception]


def _toml_message(exc: tomllib.TOMLDecodeError) -> str:
    """tomllib says ``Invalid value (at line 3, column 9)``; lead with the position."""
    pos = _TOML_POS_RE.search(str(exc))
    where = f" at line {pos[1]}, column {pos[2]}" if pos else ""
    return f"not valid TOML{where}: {exc}"


def read_capped(path: Path, cap: int) -> tuple[bytes, str]:
    """At most ``cap + 1`` bytes of the regular file at ``path``, and the real path of what was read
    (:func:`open_regular` says what is refused and why).

    Raises:
        FileNotFoundError: nothing at ``path``.
        OSError: not a regular file (``EINVAL``), or it cannot be read (permissions, I/O).
    """
    fd, _, real = open_regular(path)
    try:
        return read_fd_capped(fd, cap), real
    finally:
        os.close(fd)


def open_regular(path: Path) -> tuple[int, os.stat_result, str]:
    """Open the regular file at ``path`` for reading: its descriptor (the caller closes it), its
    ``fstat``, and the real path of what was opened.

    Only a regular file is opened. A FIFO in its place would block ``open`` and ``read`` forever (a node
    that reads it never starts, a watcher never reloads again), a device such as ``/dev/zero`` never
    ends, a directory is not a file: each is refused before it is opened (``stat``) and again on the
    descriptor (``fstat``), which is opened non-blocking in case it was swapped in between. The real
    path is read back from the descriptor where the system says (``/proc/self/fd``), so a caller that
    checks where the bytes came from checks the file it read, not a name re-resolved later.

    Raises:
        FileNotFoundError: nothing at ``path``.
        OSError: not a regular file (``EINVAL``), or it cannot be opened (permissions, I/O).
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a directory, FIFO, socket or device)", str(path))
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file (a directory, FIFO, socket or device)", str(path))
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no procfs: the name resolved now (the check is then only as good as the name)
            real = os.path.realpath(path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st, real


def read_fd_capped(fd: int, cap: int) -> bytes:
    """At most ``cap + 1`` bytes from ``fd``: more than ``cap`` means too large, known without reading it all."""
    chunks: list[bytes] = []
    left = cap + 1
    while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


#: Deepest nesting of arrays and inline tables, and most components of one dotted key or table header.
#: Hand-written manifests and policies use a handful of each. tomllib recurses on nesting (deep
#: ``[[[...`` raises ``RecursionError``) and its cost for one dotted key grows with the square of its
#: length (a 40 KB ``a.a.a...`` key took 6 s and 1.5 GB; 400 KB exhausted memory), so both are bounded
#: before it parses anything. Many long dotted keys add up the same way (1 MiB of 31-part keys: 2 s,
#: 210 MiB), so the dots outside strings are counted too: a manifest has tens of them.
MAX_TOML_NESTING = 32
MAX_TOML_DOTS = 8192
_TOML_SKIP = re.compile(
    # A multi-line string may end in up to two extra quotes (TOML 1.0: ``"""a""""`` is ``a"``). A string
    # left open runs to the end of its line (or of the text): every match succeeds where it starts, so
    # the scan is linear (an open string that failed would be tried again from every quote inside it).
    r'"""(?:[^"\\]|\\.|"(?!""))*(?:"{3,5}|\Z)|\'\'\'(?:[^\']|\'(?!\'\'))*(?:\'{3,5}|\Z)'
    r'|"(?:[^"\\\n]|\\[^\n])*(?:"|$)|\'[^\'\n]*(?:\'|$)|#[^\n]*',
    re.DOTALL | re.MULTILINE,
)
_TOML_KEY = r'(?:[A-Za-z0-9_+-]+|"")'
_TOML_LONG_KEY = re.compile(rf"(?<![A-Za-z0-9_+-]){_TOML_KEY}(?:[ \t]*\.[ \t]*{_TOML_KEY}){{{MAX_TOML_NESTING},}}")
_TOML_BRACKET = re.compile(r"[\[\]{}]")


def check_toml_shape(text: str) -> None:
    """Refuse TOML nested deeper than :data:`MAX_TOML_NESTING`, or with more than :data:`MAX_TOML_DOTS`
    dots outside strings, before ``tomllib`` sees it.

    Strings and comments are blanked first (their dots and brackets are data); what is left is scanned
    for a dotted key with too many components and for brackets nested too deep.

    Raises:
        ValueError: saying which bound was exceeded and on which line.
    """
    bare = _TOML_SKIP.sub('""', text)
    if bare.count(".") > MAX_TOML_DOTS:
        raise ValueError(f"more than {MAX_TOML_DOTS} dotted keys and numbers (dots outside strings)")
    long_key = _TOML_LONG_KEY.search(bare)
    if long_key is not None:
        line = bare.count("\n", 0, long_key.start()) + 1
        raise ValueError(f"a dotted key or table name on line {line} has more than {MAX_TOML_NESTING} parts")
    depth = 0
    for bracket in _TOML_BRACKET.finditer(bare):
        depth = depth + 1 if bracket.group() in "[{" else max(0, depth - 1)
        if depth > MAX_TOML_NESTING:
            line = bare.count("\n", 0, bracket.start()) + 1
            raise ValueError(f"arrays or inline tables nested deeper than {MAX_TOML_NESTING} on line {line}")


def loads_toml(text: str) -> dict[str, Any]:
    """:func:`tomllib.loads` of ``text`` once :func:`check_toml_shape` passed (its ``ValueError`` is
    re-raised as a ``TOMLDecodeError``, so every caller has one error to turn into its own)."""
    try:
        check_toml_shape(text)
        data = tomllib.loads(text)
    except ValueError as exc:  # TOMLDecodeError is a ValueError
        raise tomllib.TOMLDecodeError(str(exc)) from None
    except RecursionError:  # a shape the scan above missed: still a refusal, never a crash
        raise tomllib.TOMLDecodeError(f"nested deeper than {MAX_TOML_NESTING}") from None
    if _depth(data) > 2 * MAX_TOML_NESTING:  # tables in tables through headers, keys and inline tables
        raise tomllib.TOMLDecodeError(f"tables and arrays nested deeper than {2 * MAX_TOML_NESTING}")
    return data


def _depth(value: object) -> int:
    """How deep tables and arrays nest in ``value`` (walked without recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _read_toml(path: Path, fail: _ErrorFactory) -> dict[str, Any]:
    """Parse a TOML file, turning every way it can go wrong into ``fail(message, key)``."""
    try:
        raw, _ = read_capped(path, MAX_TOML_BYTES)  # never more than the cap, never a FIFO or a device
        if len(raw) > MAX_TOML_BYTES:
            raise fail(f"file is larger than {MAX_TOML_BYTES} bytes; a manifest or policy is a few KiB", None)
        return loads_toml(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise fail(_toml_message(exc), None) from exc
    except UnicodeDecodeError as exc:
        raise fail(f"not valid TOML: the file is not UTF-8 ({exc.reason} at byte {exc.start})", None) from exc
    except OSError as exc:
        raise fail(f"cannot read file: {exc.strerror or exc}", None) from exc


def _unwrap(annotation: Any) -> Any:
    """Strip ``Annotated`` and ``X | None`` so the model (or container) type shows."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _allowed_keys(root: type[BaseModel], loc: tuple[str | int, ...]) -> list[str] | None:
    """The keys the model at ``loc`` accepts, by walking field annotations from ``root``."""
    current: Any = root
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if isinstance(current, type) and issubclass(current, BaseModel) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return None
            current = _unwrap(field.annotation)
            if get_origin(current) is dict:
                if not parts:
                    return None
                parts.pop(0)  # the table's own key (e.g. the dependency name)
                current = _unwrap(get_args(current)[1])
        else:
            return None
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return None


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


_EXPECTED: dict[str, str] = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "tuple_type": "expected an array",
    "list_type": "expected an array",
    "dict_type": "expected a table",
    "model_type": "expected a table",
    "model_attributes_type": "expected a table",
}


def _raw_at(data: Any, loc: tuple[str | int, ...]) -> Any:
    """The raw TOML value at ``loc`` (``None`` when the path does not exist)."""
    for part in loc:
        if isinstance(data, dict) and isinstance(part, str):
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


#: Most errors of one manifest spelled out; beyond them, how many more there are.
MAX_REPORTED_ERRORS = 50


def _translate(
    exc: ValidationError, root: type[BaseModel], data: Mapping[str, Any], fail: _ErrorFactory
) -> Exception:
    """Turn pydantic's errors into ``fail(message, dotted_key)``, worded in TOML terms (tables, arrays,
    keys). The first error gives the key; every other one follows on a line of its own, ``[key]: what``,
    up to :data:`MAX_REPORTED_ERRORS` of them, then how many more there are."""
    errors = exc.errors()
    described = [_error_text(err, root, data) for err in errors[:MAX_REPORTED_ERRORS]]
    key, message = described[0]
    lines = [message] + [f"[{k}]: {m}" if k else m for k, m in described[1:]]
    if len(errors) > len(described):
        more = len(errors) - len(described)
        lines.append(f"(and {more} more error{'s' if more > 1 else ''})")
    return fail("\n".join(lines), key)


def _error_text(err: ErrorDetails, root: type[BaseModel], data: Mapping[str, Any]) -> tuple[str | None, str]:
    """One pydantic error as (dotted key, message in TOML terms)."""
    loc = tuple(err["loc"])
    if len(loc) > 1 and isinstance(_raw_at(data, loc[:-1]), str):
        loc = loc[:-1]  # shorthand ``dep = "^1.2"`` stands for ``dep = { version = "^1.2" }``
    keys = [p for p in loc if isinstance(p, str)]
    key: str | None = ".".join(keys) or None
    kind = err["type"]
    if kind == "extra_forbidden":
        bad = str(loc[-1])
        allowed = _allowed_keys(root, loc[:-1]) or []
        if len(loc) == 1:
            what = f"unknown section [{bad}]" if isinstance(err["input"], dict) else f"unknown key {bad!r}"
            message = f"{what}{_suggest(bad, allowed)} (sections: {', '.join(allowed)})"
        else:
            section = ".".join(str(p) for p in loc[:-1])
            message = (
                f"unknown key {bad!r} in [{section}]{_suggest(bad, allowed)} (allowed: {', '.join(allowed)})"
            )
    elif kind == "missing":
        if _allowed_keys(root, loc) is not None:
            message = f"required section [{key}] is missing"
        else:
            section = ".".join(keys[:-1])
            message = f"required key {keys[-1]!r} is missing" + (f" in [{section}]" if section else "")
    elif kind in ("string_too_long", "too_long"):
        limit = (err.get("ctx") or {}).get("max_length")
        found = err["input"]
        size = len(found) if isinstance(found, str | list | tuple) else found
        message = f"expected at most {limit} {'characters' if kind == 'string_too_long' else 'entries'}, found {size}"
        index = next((p for p in loc if isinstance(p, int)), None)
        if index is not None:
            message = f"{keys[-1]}[{index}]: {message}"
    elif kind == "value_error":
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _KeyedError):
            key = cause.key
        message = str(cause) if cause is not None else err["msg"].removeprefix("Value error, ")
    else:
        rule = err["msg"].removeprefix("Input should be ")
        expected = _EXPECTED.get(kind) or (
            f"expected a value {rule}" if rule.startswith(("greater", "less")) else f"expected {rule}"
        )
        message = f"{expected}, found {_describe(err['input'])}"
        index = next((p for p in loc if isinstance(p, int)), None)
        if index is not None:
            message = f"{keys[-1]}[{index}]: {message}"
    return key, message


def _manifest_error(path: str | None) -> _ErrorFactory:
    def fail(message: str, key: str | None) -> Exception:
        return ManifestError(message, path=path, key=key)

    return fail


def _validate(data: dict[str, Any], source: str | None, expected_name: str | None) -> Manifest:
    fail = _manifest_error(source)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        raise _translate(exc, Manifest, data, fail) from None
    manifest._source = source
    if expected_name is not None and manifest.name != expected_name:
        raise ManifestError(
            f"plugin name {manifest.name!r} does not match the file: expected {expected_name!r}",
            path=source,
            key="plugin.name",
            plugin=manifest.name,
        )
    return manifest


def load_manifest(path: Path, *, expected_name: str | None = None) -> Manifest:
    """Read and validate a manifest.

    ``path`` is the ``.toml`` file, or the ``.wasm`` it sits beside. The plugin name must equal
    ``expected_name`` when given, else the file stem: the file name is how the manager finds a plugin,
    the manifest name is how the bus routes to it, and the two must never disagree.

    Raises:
        ManifestError: with ``path``, the dotted ``key`` at fault, and what was expected vs found.
    """
    path = Path(path)
    if path.suffix == ".wasm":
        path = path.with_suffix(".toml")
    source = str(path)
    if not path.exists():
        stem = path.stem
        raise ManifestError(
            f"manifest missing: expected {stem}.toml beside {stem}.wasm", path=source, plugin=stem
        )
    data = _read_toml(path, _manifest_error(source))
    return _validate(data, source, expected_name if expected_name is not None else path.stem)


def parse_manifest(text: str, *, source: str | None = None, expected_name: str | None = None) -> Manifest:
    """Validate manifest TOML given as a string (tests, ``sandbus validate -``, tooling).

    Raises:
        ManifestError: as :func:`load_manifest`; ``path`` is ``source``.
    """
    try:
        data = loads_toml(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(_toml_message(exc), path=source) from exc
    return _validate(data, source, expected_name)
