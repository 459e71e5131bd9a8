"""The web dashboard: queues, tasks, failing jobs, cron and pools, with actions.

``Dashboard`` is a WSGI app to mount in a host; ``serve`` runs it on its own
server; ``kongtask dashboard`` is the command. See :mod:`kongtask.dashboard.app`
for how the actions are protected.
"""

from .app import Dashboard
from .server import DashboardServer, serve

__all__ = ["Dashboard", "DashboardServer", "serve"]
