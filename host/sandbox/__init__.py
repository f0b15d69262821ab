"""The wasmtime sandbox: limits, capabilities, host functions, pooled fast calls. Free of NATS."""

from sandbus.host.sandbox.abi import ABI_VERSION, DEFAULT_FUNCTION, ModuleInfo, inspect_module
from sandbus.host.sandbox.audit import AuditEvent, AuditLevel, Auditor, AuditSink
from sandbus.host.sandbox.cache import ModuleCache, default_cache_dir, is_component
from sandbus.host.sandbox.component import ComponentInstance
from sandbus.host.sandbox.config import MIB, Capabilities, DirGrant, Limits
from sandbus.host.sandbox.hostfuncs import ABI_NAMESPACE, HostFunction, HostFunctions, builtin_host_functions
from sandbus.host.sandbox.instance import BudgetExceeded, CallContext, PluginInstance
from sandbus.host.sandbox.invoke import fast_path_available
from sandbus.host.sandbox.pool import InstancePool
from sandbus.host.sandbox.sandbox import CallResult, Sandbox, SandboxBuilder, run_plugin, shared_cache

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
