"""The plugin manager: discovery, dependencies, hot reload and per-plugin statistics.

``PluginManager`` owns a directory of plugins and serves calls to them; ``PluginWatcher`` turns
file-system events into reloads; ``PluginInfo`` is what ``list_plugins`` reports.
"""

from sandbus.host.lifecycle.loader import RUNTIME_VERSION, PluginVersion, check_plugin_name, scan_directory
from sandbus.host.lifecycle.manager import DEFAULT_MAX_PLUGINS, PluginManager
from sandbus.host.lifecycle.models import DiscoveryReport, PluginInfo, PluginStatus
from sandbus.host.lifecycle.stats import LatencyWindow, PluginStats, StatsSnapshot
from sandbus.host.lifecycle.watcher import PluginWatcher

__all__ = [
    "DEFAULT_MAX_PLUGINS",
    "DiscoveryReport",
    "LatencyWindow",
    "PluginInfo",
    "PluginManager",
    "PluginStats",
    "PluginStatus",
    "PluginVersion",
    "PluginWatcher",
    "RUNTIME_VERSION",
    "StatsSnapshot",
    "check_plugin_name",
    "scan_directory",
]
