"""The web dashboard: queues, tasks, failing jobs, cron and pools, with actions.

``Dashboard`` is a WSGI app to mount in a host; ``serve`` runs it on its own
server; ``kongtask dashboard`` is the command. See :mod:`kongtask.ops.dashboard.app`
for how the actions are protected.
"""

from kongtask.ops.dashboard.app import Dashboard
from kongtask.ops.dashboard.server import DashboardServer, serve

__all__ = ["Dashboard", "DashboardServer", "serve"]
