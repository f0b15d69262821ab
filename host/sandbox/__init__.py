"""The wasmtime sandbox: limits, capabilities, host functions, pooled fast calls. Free of NATS.

Its names load on first use (:mod:`sandbus._lazy`): a module of this package that needs no wasmtime (the
terminal-safe text of :mod:`sandbus.host.sandbox.guest_text`, the audit records) imports without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandbus._lazy import lazy_attributes

if TYPE_CHECKING:
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

#: public name -> the module that defines it
_WHERE = {
    "ABI_NAMESPACE": "sandbus.host.sandbox.hostfuncs",
    "ABI_VERSION": "sandbus.host.sandbox.abi",
    "AuditEvent": "sandbus.host.sandbox.audit",
    "AuditLevel": "sandbus.host.sandbox.audit",
    "AuditSink": "sandbus.host.sandbox.audit",
    "Auditor": "sandbus.host.sandbox.audit",
    "BudgetExceeded": "sandbus.host.sandbox.instance",
    "CallContext": "sandbus.host.sandbox.instance",
    "CallResult": "sandbus.host.sandbox.sandbox",
    "Capabilities": "sandbus.host.sandbox.config",
    "ComponentInstance": "sandbus.host.sandbox.component",
    "DEFAULT_FUNCTION": "sandbus.host.sandbox.abi",
    "DirGrant": "sandbus.host.sandbox.config",
    "HostFunction": "sandbus.host.sandbox.hostfuncs",
    "HostFunctions": "sandbus.host.sandbox.hostfuncs",
    "InstancePool": "sandbus.host.sandbox.pool",
    "Limits": "sandbus.host.sandbox.config",
    "MIB": "sandbus.host.sandbox.config",
    "ModuleCache": "sandbus.host.sandbox.cache",
    "ModuleInfo": "sandbus.host.sandbox.abi",
    "PluginInstance": "sandbus.host.sandbox.instance",
    "Sandbox": "sandbus.host.sandbox.sandbox",
    "SandboxBuilder": "sandbus.host.sandbox.sandbox",
    "builtin_host_functions": "sandbus.host.sandbox.hostfuncs",
    "default_cache_dir": "sandbus.host.sandbox.cache",
    "fast_path_available": "sandbus.host.sandbox.invoke",
    "inspect_module": "sandbus.host.sandbox.abi",
    "is_component": "sandbus.host.sandbox.cache",
    "run_plugin": "sandbus.host.sandbox.sandbox",
    "shared_cache": "sandbus.host.sandbox.sandbox",
}

if not TYPE_CHECKING:  # type checkers see the imports above, and an unknown name is an error to them
    __getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
