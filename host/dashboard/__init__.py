"""``sandbus dashboard``: one process that watches the cluster for every browser that opens it.

The process holds one NATS connection and one view of the cluster (:class:`~.collector.Collector`):
it polls each node's ``stats`` on a fixed interval, follows the audit subjects and the plugin log
subjects, and reads the deploy buckets. Browsers get that view from memory (:class:`~.hub.Hub`), so
the load on the nodes does not grow with the number of open pages. The page itself
(``static/``) is plain HTML, CSS and JavaScript: nothing to build, nothing fetched from elsewhere.

Everything shown comes from the bus and is treated as hostile: it is bounded and type-checked here
(:mod:`.validate`), and the page writes it only as text. Control (reload / unload) is off unless the
process is started with ``allow_control``; then every control request must carry the per-process
token, come from the page's own origin, and name this server in its ``Host`` header
(:mod:`.security`).
"""

from __future__ import annotations

from sandbus.host.dashboard.collector import Collector
from sandbus.host.dashboard.hub import Hub
from sandbus.host.dashboard.server import DashboardConfig, make_app, serve

__all__ = ["Collector", "DashboardConfig", "Hub", "make_app", "serve"]
