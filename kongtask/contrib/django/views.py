"""kongtask's dashboard served by Django, to staff users only.

The view hands the request to the dashboard's WSGI app (one per database and
schema, made on first use) with ``SCRIPT_NAME`` set to where it is mounted.
The dashboard keeps its own CSRF check on its POST actions, so Django's is
waived for this view only; Django's login and ``is_staff`` guard every request.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from functools import wraps
from http.cookies import SimpleCookie
from typing import Any

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django.views.decorators.csrf import csrf_exempt

from kongtask.contrib.django._compat import task_backends
from kongtask.contrib.django.backend import KongtaskBackend
from kongtask.contrib.django.connection import conninfo_for
from kongtask.ops.dashboard.app import Dashboard

__all__ = ["dashboard", "staff_required"]

_dashboards: dict[tuple[str, str], Dashboard] = {}
_dashboards_lock = threading.Lock()
_wsgi_apps: dict[int, Any] = {}  # id(dashboard) -> the dashboard as a WSGI app


def staff_required(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Send anonymous users to the login page and refuse (403) users who are not staff."""

    @wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        user = request.user
        if not user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        if not (user.is_active and user.is_staff):
            return HttpResponseForbidden("The kongtask dashboard is for staff users only.")
        return view(request, *args, **kwargs)

    return guarded


def _dashboard() -> Dashboard:
    """The dashboard over the database of the backend named by ``KONGTASK_DASHBOARD_BACKEND``."""
    alias = getattr(settings, "KONGTASK_DASHBOARD_BACKEND", "default")
    backend = task_backends[alias]
    if isinstance(backend, KongtaskBackend):
        database, schema = backend.database, backend.schema
    else:
        database, schema = "default", None
    key = (database, schema or "")
    with _dashboards_lock:
        found = _dashboards.get(key)
        if found is None:
            found = _dashboards[key] = Dashboard(conninfo_for(database), schema=schema)
            _wsgi_apps[id(found)] = found.wsgi()
        return found


@csrf_exempt  # type: ignore[untyped-decorator,unused-ignore]
@staff_required
def dashboard(request: HttpRequest, path: str = "") -> HttpResponse:
    """Serve one dashboard page or action; ``path`` is what follows the mount point."""
    environ = dict(request.META)
    full = request.path
    mount = full[: len(full) - len(path)] if path and full.endswith(path) else full
    environ["SCRIPT_NAME"] = mount.rstrip("/")
    environ["PATH_INFO"] = "/" + path
    body = request.body
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        started["status"], started["headers"] = status, headers

    app = _wsgi_apps[id(_dashboard())]
    chunks = app(environ, start_response)
    try:
        content = b"".join(chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
    code, _, reason = started["status"].partition(" ")
    response = HttpResponse(content, status=int(code), reason=reason or None)
    for name, value in started["headers"]:
        if name.lower() == "set-cookie":
            cookie: SimpleCookie = SimpleCookie()
            cookie.load(value)
            response.cookies.update(cookie)
        else:
            response[name] = value
    return response
