"""The cluster: a signed plugin registry and declarative deploys, on NATS JetStream alone.

Buckets (names in :mod:`sandbus.host.cluster.names`, opened by :mod:`sandbus.host.cluster.buckets`):

* ``sandbus-registry`` (KV) and ``sandbus-artifacts`` (object store): the registry (:class:`Registry`): one
  signed entry per ``name.version``, one module per entry, verified on every read (:func:`verify_artifact`);
* ``sandbus-deploys`` (KV): the desired state, one entry per plugin;
* ``sandbus-nodes`` (KV, entries expire): each node's liveness and actual state.

Names load on first use, so importing one module of the package does not load the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sandbus._lazy import lazy_attributes

if TYPE_CHECKING:
    from sandbus.host.cluster.buckets import ensure_deploys, ensure_nodes, ensure_registry
    from sandbus.host.cluster.entry import RegistryEntry
    from sandbus.host.cluster.keys import PublisherKey, keygen, load_seed
    from sandbus.host.cluster.registry import InstallReport, PluginSummary, Registry
    from sandbus.host.cluster.signing import verify_artifact

_WHERE = {
    "InstallReport": "sandbus.host.cluster.registry",
    "PluginSummary": "sandbus.host.cluster.registry",
    "PublisherKey": "sandbus.host.cluster.keys",
    "Registry": "sandbus.host.cluster.registry",
    "RegistryEntry": "sandbus.host.cluster.entry",
    "ensure_deploys": "sandbus.host.cluster.buckets",
    "ensure_nodes": "sandbus.host.cluster.buckets",
    "ensure_registry": "sandbus.host.cluster.buckets",
    "keygen": "sandbus.host.cluster.keys",
    "load_seed": "sandbus.host.cluster.keys",
    "verify_artifact": "sandbus.host.cluster.signing",
}

__all__ = [
    "InstallReport",
    "PluginSummary",
    "PublisherKey",
    "Registry",
    "RegistryEntry",
    "ensure_deploys",
    "ensure_nodes",
    "ensure_registry",
    "keygen",
    "load_seed",
    "verify_artifact",
]

if not TYPE_CHECKING:
    __getattr__, __dir__ = lazy_attributes(__name__, _WHERE)
