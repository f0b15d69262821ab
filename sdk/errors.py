"""The one error hierarchy of sandbus, shared by the host, the bus and clients.

Every error says *what* went wrong and *where* (the plugin, the file, the key,
the limit). Each class has a stable ``code`` that travels on the wire in reply
headers, so a client in another language can map it back.

    SandbusError
    ├── SandboxError                 a plugin misbehaved or could not run
    │   ├── InvalidModuleError       not valid wasm / not our ABI version (ValueError)
    │   ├── AbiViolationError        missing export, bad signature, bad pointer, bad JSON
    │   ├── TrapError                the guest trapped (carries the wasm backtrace)
    │   └── PluginInitError          init(config) or _initialize failed
    ├── ResourceLimitError           a limit held, and the call was stopped
    │   ├── OutOfFuelError
    │   ├── ExecutionTimeoutError    (TimeoutError)
    │   ├── MemoryLimitError
    │   ├── StackLimitError
    │   ├── PayloadTooLargeError     input or output above its cap
    │   ├── InstanceLimitError       every pooled instance stayed busy
    │   ├── HopLimitError            a plugin-to-plugin request chain grew too long (a cycle?)
    │   └── RateLimitError           a plugin sent more than its rate or per-call cap allows
    ├── SecurityViolationError       (PermissionError) a capability was not granted
    ├── PluginNotFoundError          (LookupError)
    ├── ManifestError                (ValueError) names file and key
    ├── PolicyError                  operator policy file is invalid
    ├── DependencyError              missing / incompatible / cyclic dependencies
    ├── HostError                    the host failed (a bug in a host function), not the plugin
    └── BusError                     (ConnectionError) NATS-side failures
        └── RequestTimeoutError      (TimeoutError) no reply in time
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AbiViolationError",
    "BusError",
    "DependencyError",
    "ExecutionTimeoutError",
    "HopLimitError",
    "HostError",
    "InstanceLimitError",
    "InvalidModuleError",
    "ManifestError",
    "MemoryLimitError",
    "OutOfFuelError",
    "PayloadTooLargeError",
    "PluginInitError",
    "PluginNotFoundError",
    "PolicyError",
    "RateLimitError",
    "RequestTimeoutError",
    "ResourceLimitError",
    "SandboxError",
    "SandbusError",
    "SecurityViolationError",
    "StackLimitError",
    "TrapError",
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


class RateLimitError(ResourceLimitError):
    """A plugin's ``publish`` or ``request`` was refused: the plugin sent more than the operator policy
    allows (``[messaging] max_sends_per_second`` / ``send_burst`` per plugin, ``max_sends_per_call`` per
    call). The hop limit bounds how deep a chain of messages goes; this bounds how wide it fans out.
    """

    code = "limit.rate"


class SecurityViolationError(SandbusError, PermissionError):
    code = "security.violation"


class PluginNotFoundError(SandbusError, LookupError):
    code = "plugin.not_found"


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


class BusError(SandbusError, ConnectionError):
    code = "bus.error"


class RequestTimeoutError(BusError, TimeoutError):
    code = "bus.timeout"


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


def error_from_dict(data: dict[str, Any]) -> SandbusError:
    """Rebuild an error from its wire form (:meth:`SandbusError.to_dict`), as the right class."""
    cls = error_class_for_code(str(data.get("code", "")))
    details = dict(data.get("details") or {})
    err = cls.__new__(cls)
    # Subclass attributes their __init__ would have set, before __str__ needs them.
    if isinstance(err, ManifestError):
        err.path = details.get("path")
        err.key = details.get("key")
    if isinstance(err, TrapError):
        err.backtrace = list(details.get("backtrace") or [])
    SandbusError.__init__(err, str(data.get("message", "")), plugin=data.get("plugin"), **details)
    return err
