"""The plugin manager: discovery, dependencies, hot reload and per-plugin statistics.

``PluginManager`` owns a directory of plugins and serves calls to them; ``PluginWatcher`` turns
file-system events into reloads; ``PluginInfo`` is what ``list_plugins`` reports.
"""

from .loader import RUNTIME_VERSION, PluginVersion, check_plugin_name, scan_directory
from .manager import DEFAULT_MAX_PLUGINS, PluginManager
from .models import DiscoveryReport, PluginInfo, PluginStatus
from .stats import LatencyWindow, PluginStats, StatsSnapshot
from .watcher import PluginWatcher

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
