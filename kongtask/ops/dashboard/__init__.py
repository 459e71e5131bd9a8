"""The web dashboard: jobs (search, pages, bulk actions), running jobs, cron, pools, crashes.

``Dashboard`` is an ASGI app (Starlette) to mount in a host (``Dashboard.wsgi()``
for a WSGI host); ``serve`` runs it on uvicorn; ``kongtask dashboard`` is the
command. Needs the ``dashboard`` extra. See :mod:`kongtask.ops.dashboard.app`
for how the actions are protected.
"""

from kongtask.ops.dashboard.app import Dashboard
from kongtask.ops.dashboard.server import DashboardServer, serve

__all__ = ["Dashboard", "DashboardServer", "serve"]
