"""The one error hierarchy of sandbus, shared by the host, the bus and clients.

Every error says *what* went wrong and *where* (the plugin, the file, the key,
the limit). Each class has a stable ``code`` that travels on the wire in reply
headers, so a client in another language can map it back, and says whether trying
again can help (``retryable``): a durable message whose error is not retryable is
dead-lettered at once instead of redelivered.

    SandbusError
    ├── SandboxError                 a plugin misbehaved or could not run
    │   ├── InvalidModuleError       not valid wasm / not our ABI version (ValueError)
    │   ├── AbiViolationError        missing export, bad signature, bad pointer, bad JSON
    │   ├── TrapError                the guest trapped (carries the wasm backtrace)
    │   ├── GuestError               the guest reported a failure itself (an Extism plugin's error_set)
    │   ├── ReplayDivergenceError    a replayed call asked the host for something the recording did not hold
    │   └── PluginInitError          init(config) or _initialize failed
    ├── ResourceLimitError           a limit held, and the call was stopped
    │   ├── OutOfFuelError
    │   ├── ExecutionTimeoutError    (TimeoutError)
    │   ├── MemoryLimitError
    │   ├── StackLimitError
    │   ├── PayloadTooLargeError     input or output above its cap
    │   ├── InstanceLimitError       every pooled instance stayed busy
    │   ├── HopLimitError            a plugin-to-plugin request chain grew too long (a cycle?); not retryable
    │   └── RateLimitError           a plugin sent more than its rate or per-call cap allows
    ├── SecurityViolationError       (PermissionError) a capability was not granted
    │   ├── SignatureError           an artifact is unsigned, its signature or digest does not match
    │   └── UntrustedPublisherError  an artifact is signed by a key the operator does not trust
    ├── PluginNotFoundError          (LookupError)
    │   └── PluginLoadingError       known, but still compiling or loading: try again shortly
    ├── ManifestError                (ValueError) names file and key
    ├── PolicyError                  operator policy file is invalid
    ├── DependencyError              missing / incompatible / cyclic dependencies
    ├── HostError                    the host failed (a bug in a host function), not the plugin
    ├── RegistryError                the plugin registry refused or failed; never retryable
    │   ├── ArtifactNotFoundError    (LookupError) no such plugin, version, or version in a range
    │   ├── VersionExistsError       a pushed version is already published (versions are immutable)
    │   └── InvalidArtifactError     (ValueError) a malformed registry entry, push input or key file
    ├── DeployError                  (ValueError) a deploy request is wrong (replicas < 0, a bad selector)
    ├── RequestError                 (ValueError) the caller's request is wrong; never retryable
    │   ├── InvalidJsonError         a body is not JSON, or nests deeper than 254 levels
    │   ├── InvalidEnvelopeError     an explicit PluginMessage envelope breaks a rule
    │   ├── UnknownFunctionError     the plugin exports no such function
    │   └── InvalidControlError      a control request's body is malformed
    └── BusError                     (ConnectionError) NATS-side failures
        ├── RequestTimeoutError      (TimeoutError) no reply in time
        └── NodeIdInUseError         another node already answers with this node id

A client's mistake (a ``RequestError``) never counts against a plugin: nodes count it in the
plugin's ``rejected`` and audit it as ``request.refused``.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AbiViolationError",
    "ArtifactNotFoundError",
    "BusError",
    "DependencyError",
    "DeployError",
    "ExecutionTimeoutError",
    "GuestError",
    "HopLimitError",
    "HostError",
    "InstanceLimitError",
    "InvalidArtifactError",
    "InvalidControlError",
    "InvalidEnvelopeError",
    "InvalidJsonError",
    "InvalidModuleError",
    "ManifestError",
    "MemoryLimitError",
    "NodeIdInUseError",
    "OutOfFuelError",
    "PayloadTooLargeError",
    "PluginInitError",
    "PluginLoadingError",
    "PluginNotFoundError",
    "PolicyError",
    "RateLimitError",
    "RegistryError",
    "ReplayDivergenceError",
    "RequestError",
    "RequestTimeoutError",
    "ResourceLimitError",
    "SandboxError",
    "SandbusError",
    "SecurityViolationError",
    "SignatureError",
    "StackLimitError",
    "TrapError",
    "UnknownFunctionError",
    "UntrustedPublisherError",
    "VersionExistsError",
    "error_class_for_code",
    "error_from_dict",
]


class SandbusError(Exception):
    """Root of every sandbus error.

    Parameters:
        message: what went wrong, in a sentence.
        plugin: the plugin involved, when there is one.
        details: machine-readable facts (limit values, paths, keys...).
    """

    code: ClassVar[str] = "sandbus.error"
    #: whether the same message may succeed when tried again (a timeout, a node dying, a busy plugin);
    #: False when it cannot (the request itself is wrong, a hop count that travels with the message).
    #: A class sets its rule; an instance may say more (an input above the plugin's cap stays above it).
    retryable: bool = True

    def __init__(self, message: str, *, plugin: str | None = None, **details: Any) -> None:
        self.message = message
        self.plugin = plugin
        self.details: dict[str, Any] = details
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = f"plugin {self.plugin!r}: " if self.plugin else ""
        return f"{where}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        """The wire form: what a reply carries in its error fields."""
        return {"code": self.code, "message": self.message, "plugin": self.plugin, "details": self.details}


class SandboxError(SandbusError):
    code = "sandbox.error"


class InvalidModuleError(SandboxError, ValueError):
    code = "sandbox.invalid_module"


class AbiViolationError(SandboxError):
    code = "sandbox.abi_violation"


class TrapError(SandboxError):
    """The guest trapped. ``backtrace`` lists the wasm frames, innermost first."""

    code = "sandbox.trap"

    def __init__(
        self, message: str, *, plugin: str | None = None, backtrace: list[str] | None = None, **details: Any
    ) -> None:
        self.backtrace = backtrace or []
        super().__init__(message, plugin=plugin, backtrace=self.backtrace, **details)


class GuestError(SandboxError):
    """The plugin ran to its end and reported a failure: an Extism plugin's function returned non-zero.

    The message is the plugin's own error text (bounded, control characters escaped); ``details`` carry
    ``function`` and ``return_code``. Not a trap: the instance stays in service, with its state.
    """

    code = "sandbox.guest_error"


class ReplayDivergenceError(SandboxError):
    """A replayed call asked the host for something other than what the recorded call asked for.

    Raised only by ``sandbus replay`` (never on the wire from a node). ``details``: ``index`` (the host
    call's position), ``expected`` and ``found`` (``module.name`` or ``"end"``), ``phase`` (``init`` or
    ``call``). Not retryable: the same record and module diverge the same way every time.
    """

    code = "sandbox.replay_divergence"
    retryable = False


class PluginInitError(SandboxError):
    code = "sandbox.init_failed"


class ResourceLimitError(SandbusError):
    code = "limit.exceeded"


class OutOfFuelError(ResourceLimitError):
    code = "limit.fuel"


class ExecutionTimeoutError(ResourceLimitError, TimeoutError):
    code = "limit.timeout"


class MemoryLimitError(ResourceLimitError):
    code = "limit.memory"


class StackLimitError(ResourceLimitError):
    code = "limit.stack"


class PayloadTooLargeError(ResourceLimitError):
    code = "limit.payload"


class InstanceLimitError(ResourceLimitError):
    code = "limit.instances"


class HopLimitError(ResourceLimitError):
    """A plugin's ``request`` or ``publish`` would have made a plugin-to-plugin chain longer than the hop limit.

    Chains are counted by the ``Sandbus-Hops`` header (docs/protocol.md), carried across requests,
    publishes and durable deliveries. The limit exists so that a cycle (a plugin requesting itself,
    A -> B -> A, a plugin publishing onto a topic it subscribes to) ends with this error instead of
    running for ever or tying up an instance per hop until every timeout has run out.
    """

    code = "limit.hops"
    retryable = False


class RateLimitError(ResourceLimitError):
    """A plugin's ``publish`` or ``request`` was refused: the plugin sent more than the operator policy
    allows (``[messaging] max_sends_per_second`` / ``send_burst`` per plugin, ``max_sends_per_call`` per
    call). The hop limit bounds how deep a chain of messages goes; this bounds how wide it fans out.
    """

    code = "limit.rate"


class SecurityViolationError(SandbusError, PermissionError):
    code = "security.violation"


class SignatureError(SecurityViolationError):
    """A registry artifact failed verification: no valid signature by its publisher, or its bytes (or its
    manifest) are not the ones that were signed (digest or size mismatch). Nothing of it is loaded or written."""

    code = "security.signature"
    retryable = False


class UntrustedPublisherError(SecurityViolationError):
    """A registry artifact is validly signed, by a key that is not among the trusted publishers (the operator
    policy's ``[registry] trusted_publishers``, or ``--trust``)."""

    code = "security.untrusted_publisher"
    retryable = False


class PluginNotFoundError(SandbusError, LookupError):
    code = "plugin.not_found"


class PluginLoadingError(PluginNotFoundError):
    """The plugin is known but not serving yet: it is still loading (a cold compile of a large module
    takes seconds). Retryable: the same call succeeds once the load ends, which ``sandbus ls`` shows."""

    code = "plugin.loading"


class ManifestError(SandbusError, ValueError):
    """A manifest is invalid. ``path`` is the file, ``key`` the dotted key at fault."""

    code = "manifest.invalid"

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        key: str | None = None,
        plugin: str | None = None,
        **details: Any,
    ) -> None:
        self.path = path
        self.key = key
        super().__init__(message, plugin=plugin, path=path, key=key, **details)

    def __str__(self) -> str:
        where = self.path or ""
        if self.key:
            where = f"{where}: [{self.key}]" if where else f"[{self.key}]"
        return f"{where}: {self.message}" if where else self.message


class PolicyError(SandbusError, ValueError):
    code = "policy.invalid"


class DependencyError(SandbusError):
    code = "plugin.dependency"


class HostError(SandbusError):
    """The host failed while serving a call: a host function raised something it should not have.

    Not the plugin's fault (it is counted apart from the plugin's errors): report it to the
    operator or the author of that host function.
    """

    code = "host.error"


class RegistryError(SandbusError):
    """The plugin registry (a JetStream KV index and object store) refused a request or failed.

    Not retryable: the same push, pull or install fails the same way until the registry changes.
    """

    code = "registry.error"
    retryable = False


class ArtifactNotFoundError(RegistryError, LookupError):
    """No such plugin in the registry, no such version, or no version in the range asked for (the message
    lists the versions there are)."""

    code = "registry.not_found"


class VersionExistsError(RegistryError):
    """A push of a version that is already published: versions are immutable, push a new one."""

    code = "registry.version_exists"


class InvalidArtifactError(RegistryError, ValueError):
    """A registry entry is malformed (wrong types, too large, too deep, not what its key says), or what was
    given to push is (a module or manifest that does not pass, a version with build metadata, a key file
    that is not a publisher seed)."""

    code = "registry.invalid"


class DeployError(SandbusError, ValueError):
    """A deploy request is wrong: replicas below 0, a malformed label selector... Never retryable."""

    code = "deploy.invalid"
    retryable = False


class RequestError(SandbusError, ValueError):
    """The caller's request is wrong (e.g. a function name that is not one subject token).

    Never the plugin's fault: a node counts it in the plugin's ``rejected``, not its ``errors``, and
    audits it as ``request.refused``. Sending the same request again fails the same way.
    """

    code = "request.invalid"
    retryable = False


class InvalidJsonError(RequestError):
    """A request or message body is not JSON, or nests deeper than 254 levels (what can be re-encoded)."""

    code = "request.invalid_json"


class InvalidEnvelopeError(RequestError):
    """A message sent as an explicit PluginMessage envelope breaks one of its rules (docs/protocol.md)."""

    code = "request.invalid_envelope"


class UnknownFunctionError(RequestError):
    """The request names a function the plugin does not export."""

    code = "request.unknown_function"


class InvalidControlError(RequestError):
    """A control request's body (``load`` / ``unload`` / ``reload``) is not what the verb takes."""

    code = "request.invalid_control"


class BusError(SandbusError, ConnectionError):
    code = "bus.error"


class RequestTimeoutError(BusError, TimeoutError):
    code = "bus.timeout"


class NodeIdInUseError(BusError):
    """A node would not start: another node already answers on the bus under the same node id."""

    code = "bus.node_id_in_use"


def _all_subclasses(cls: type[SandbusError]) -> list[type[SandbusError]]:
    out: list[type[SandbusError]] = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_class_for_code(code: str) -> type[SandbusError]:
    """Map a wire error code back to its class (unknown codes map to the root)."""
    for cls in _all_subclasses(SandbusError):
        if cls.code == code:
            return cls
    return SandbusError


#: characters of an error's message and plugin kept from a reply (a responder may be hostile: its
#: text is shown to people and logged)
MAX_REPLY_MESSAGE = 8192
_MAX_REPLY_NAME = 256


def _text(value: object, limit: int) -> str:
    text = value if isinstance(value, str) else "" if value is None else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def error_from_dict(data: dict[str, Any]) -> SandbusError:
    """Rebuild an error from its wire form (:meth:`SandbusError.to_dict`), as the right class.

    Total over whatever a responder sent: the wire form is whatever answered the request (not
    necessarily a node), so each field is taken only in its documented type (``details`` an object,
    ``backtrace`` a list of strings), the message and plugin are cut to a bounded length, and a
    ``details`` key that would collide with a constructor argument is dropped; never an exception
    other than the error itself.
    """
    cls = error_class_for_code(_text(data.get("code"), 64))
    raw = data.get("details")
    details = {k: v for k, v in raw.items() if k not in ("message", "plugin")} if isinstance(raw, dict) else {}
    plugin = data.get("plugin")
    err = cls.__new__(cls)
    # Subclass attributes their __init__ would have set, before __str__ needs them.
    if isinstance(err, ManifestError):
        path, key = details.get("path"), details.get("key")
        err.path = _text(path, 4096) if path is not None else None
        err.key = _text(key, _MAX_REPLY_NAME) if key is not None else None
    if isinstance(err, TrapError):
        frames = details.get("backtrace")
        err.backtrace = [_text(f, 1024) for f in frames[:256]] if isinstance(frames, list) else []
    SandbusError.__init__(err, _text(data.get("message"), MAX_REPLY_MESSAGE),
                          plugin=None if plugin is None else _text(plugin, _MAX_REPLY_NAME), **details)
    return err
