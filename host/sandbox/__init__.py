"""The wasmtime sandbox: limits, capabilities, host functions, pooled fast calls. Free of NATS."""

from .abi import ABI_VERSION, DEFAULT_FUNCTION, ModuleInfo, inspect_module
from .audit import AuditEvent, AuditLevel, Auditor, AuditSink
from .cache import ModuleCache, default_cache_dir, is_component
from .component import ComponentInstance
from .config import MIB, Capabilities, DirGrant, Limits
from .hostfuncs import ABI_NAMESPACE, HostFunction, HostFunctions, builtin_host_functions
from .instance import BudgetExceeded, CallContext, PluginInstance
from .invoke import fast_path_available
from .pool import InstancePool
from .sandbox import CallResult, Sandbox, SandboxBuilder, run_plugin, shared_cache

__all__ = [
    "ABI_NAMESPACE",
    "ABI_VERSION",
    "AuditEvent",
    "AuditLevel",
    "AuditSink",
    "Auditor",
    "BudgetExceeded",
    "CallContext",
    "CallResult",
    "Capabilities",
    "ComponentInstance",
    "DEFAULT_FUNCTION",
    "DirGrant",
    "HostFunction",
    "HostFunctions",
    "InstancePool",
    "Limits",
    "MIB",
    "ModuleCache",
    "ModuleInfo",
    "PluginInstance",
    "Sandbox",
    "SandboxBuilder",
    "builtin_host_functions",
    "default_cache_dir",
    "fast_path_available",
    "inspect_module",
    "is_component",
    "run_plugin",
    "shared_cache",
]
