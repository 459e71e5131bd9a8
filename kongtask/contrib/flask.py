"""kongtask in a Flask application: configuration, enqueue in the request's transaction, CLI.

``Kongtask(app)`` (or ``init_app``) reads ``KONGTASK_DATABASE_URL`` and
``KONGTASK_SCHEMA`` from ``app.config`` and adds ``flask kongtask worker``.
:func:`add_job` inserts the job in the request's own transaction: the
SQLAlchemy session's when the extension was given one, else a psycopg
connection kept in ``g`` for the request (:func:`get_connection`), committed
before the response leaves when it succeeds and rolled back otherwise. Needs
the ``flask`` extra.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import click
import psycopg
from flask import Flask, Response, current_app, g
from flask.cli import AppGroup
from psycopg_pool import ConnectionPool
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from kongtask.declared import Task
from kongtask.errors import ConfigurationError
from kongtask.job import Job
from kongtask.ops.dashboard import Dashboard
from kongtask.runner import Runner, run_once
from kongtask.worker_utils import add_job as _add_job

__all__ = ["Kongtask", "add_job", "get_connection"]

_EXTENSION = "kongtask"
_G_CONNECTION = "_kongtask_connection"


class Kongtask:
    """The Flask extension: ``Kongtask(app, tasks=...)`` or ``Kongtask(tasks=...).init_app(app)``.

    ``tasks`` (a task map or declared tasks) is what ``flask kongtask worker``
    runs. ``session`` is a SQLAlchemy session (a ``scoped_session`` such as
    Flask-SQLAlchemy's ``db.session``) whose transaction :func:`add_job` joins;
    the app commits that session itself. Without it each request borrows one
    psycopg connection from a per-process pool (:func:`get_connection`).
    """

    def __init__(
        self,
        app: Flask | None = None,
        *,
        tasks: Mapping[str, Callable[..., Any]] | Iterable[Task] | None = None,
        session: Any = None,
    ) -> None:
        if session is not None and not callable(getattr(session, "connection", None)):
            raise ConfigurationError(
                "session must be a SQLAlchemy Session or scoped_session (it has no "
                f".connection()), got {type(session).__name__}",
                name="session",
            )
        self.tasks = tasks
        self.session = session
        self.dashboards: list[Dashboard] = []
        self._pools: dict[str, tuple[int, ConnectionPool[Any]]] = {}
        self._pools_lock = threading.Lock()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the extension, its request hooks and the ``kongtask`` CLI group on ``app``."""
        app.config.setdefault("KONGTASK_DATABASE_URL", None)
        app.config.setdefault("KONGTASK_SCHEMA", None)
        app.extensions[_EXTENSION] = self
        app.after_request(_finish_request)
        app.teardown_request(_close_connection)
        app.cli.add_command(_cli_group(self))

    def mount_dashboard(self, app: Flask, path: str = "/kongtask", **options: Any) -> Dashboard:
        """Serve the dashboard under ``path`` of ``app``'s WSGI app; returns it (to ``close()``).

        ``options`` are :class:`~kongtask.ops.dashboard.Dashboard`'s (``token``,
        ``allowed_hosts``, ...). Its connection pool opens at its first request.
        """
        if not isinstance(path, str) or not path.startswith("/") or path.endswith("/"):
            raise ConfigurationError(
                f"path must start with '/' and not end with one, got {path!r}", name="path"
            )
        dashboard = Dashboard(
            self.database_url(app), schema=app.config["KONGTASK_SCHEMA"], **options
        )
        self.dashboards.append(dashboard)
        app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {path: dashboard.wsgi()})  # type: ignore[method-assign]
        return dashboard

    def close(self) -> None:
        """Close the request connection pools and the mounted dashboards' (at shutdown)."""
        with self._pools_lock:
            pools, self._pools = list(self._pools.values()), {}
        for pid, pool in pools:
            if pid == os.getpid():
                pool.close()
        for dashboard in self.dashboards:
            dashboard.close()

    def pool(self, app: Flask) -> ConnectionPool[Any]:
        """The request connection pool of ``app``'s database in this process.

        Opened at the first request, so a server that forks after loading the
        app gives each worker process its own; a pool found in a forked child
        is left alone (its sockets belong to the parent) and a new one opens.
        """
        url = self.database_url(app)
        with self._pools_lock:
            found = self._pools.get(url)
            if found is not None and found[0] == os.getpid():
                return found[1]
            size = app.config.get("KONGTASK_POOL_SIZE", 10)
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise ConfigurationError(
                    f"app.config['KONGTASK_POOL_SIZE'] must be an int >= 1, got {size!r}",
                    name="KONGTASK_POOL_SIZE",
                )
            pool: ConnectionPool[Any] = ConnectionPool(
                url, min_size=1, max_size=size, open=False, name="kongtask-requests"
            )
            pool.open(wait=True)
            self._pools[url] = (os.getpid(), pool)
            return pool

    def database_url(self, app: Flask) -> str:
        """``KONGTASK_DATABASE_URL`` of ``app``, or a ConfigurationError naming it."""
        url = app.config.get("KONGTASK_DATABASE_URL")
        if not isinstance(url, str) or not url:
            raise ConfigurationError(
                "app.config['KONGTASK_DATABASE_URL'] must be a non-empty connection string",
                name="KONGTASK_DATABASE_URL",
            )
        return url


def _extension() -> Kongtask:
    extension = current_app.extensions.get(_EXTENSION)
    if not isinstance(extension, Kongtask):
        raise ConfigurationError(
            "kongtask is not set up on this app: call Kongtask(app) or init_app(app)",
            name="app",
        )
    return extension


def _schema() -> str | None:
    schema = current_app.config.get("KONGTASK_SCHEMA")
    if schema is not None and not isinstance(schema, str):
        raise ConfigurationError(
            "app.config['KONGTASK_SCHEMA'] must be a string or None", name="KONGTASK_SCHEMA"
        )
    return schema


def get_connection() -> psycopg.Connection[Any]:
    """The request's psycopg connection (opened on first use; one transaction per request).

    Write the request's own rows on it too: they and the jobs commit together
    when the response is a success (status below 400) and roll back otherwise.
    """
    held = g.get(_G_CONNECTION)
    if held is None:
        pool = _extension().pool(current_app)
        held = (pool, pool.getconn())
        setattr(g, _G_CONNECTION, held)
    return held[1]  # type: ignore[no-any-return]


def _driver_connection(session: Any) -> psycopg.Connection[Any]:
    dbapi = session.connection().connection.driver_connection
    if not isinstance(dbapi, psycopg.Connection):
        raise ConfigurationError(
            "the SQLAlchemy session must use the psycopg (3) driver "
            f"(postgresql+psycopg://...), its connection is a {type(dbapi).__module__} one",
            name="session",
        )
    return dbapi


def add_job(identifier: str | Task, payload: Any = None, **spec: Any) -> Job:
    """Add a job in the current request's transaction (see :class:`Kongtask`).

    Takes the arguments of :func:`kongtask.add_job` (``queue``, ``run_at``,
    ``job_key``, ...); the job exists once that transaction commits.
    """
    extension = _extension()
    if extension.session is not None:
        conn = _driver_connection(extension.session)
    else:
        conn = get_connection()
    return _add_job(identifier, payload, connection=conn, schema=_schema(), **spec)


def _finish_request(response: Response) -> Response:
    # Commit before the response leaves, so a client told "200" can rely on the
    # job; a failed commit raises here and the client gets a 500 instead.
    held = g.get(_G_CONNECTION)
    if held is not None:
        conn = held[1]
        if response.status_code < 400:
            conn.commit()
        else:
            conn.rollback()
    return response


def _close_connection(error: BaseException | None) -> None:
    # Whatever the request left open is rolled back: after_request has already
    # committed a success, and the pool rolls back a connection it gets back
    # inside a transaction.
    held = g.pop(_G_CONNECTION, None)
    if held is not None:
        pool, conn = held
        if error is not None and not conn.closed:
            conn.rollback()
        pool.putconn(conn)


def _cli_group(extension: Kongtask) -> AppGroup:
    group = AppGroup("kongtask", help="kongtask job queue commands.")

    @group.command("worker")
    @click.option("--once", is_flag=True, help="Run every job runnable now, then exit.")
    @click.option(
        "-j",
        "--jobs",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Number of jobs to run concurrently.",
    )
    def worker(once: bool, jobs: int) -> None:
        """Run a kongtask worker for this app's tasks until SIGINT/SIGTERM (or --once)."""
        if extension.tasks is None:
            raise click.UsageError("no tasks: create the extension as Kongtask(app, tasks=...)")
        options: dict[str, Any] = {
            "tasks": extension.tasks,
            "connection_string": extension.database_url(current_app),
            "schema": _schema(),
            "concurrency": jobs,
        }
        if once:
            run_once(**options)
            return
        runner = Runner(**options).start()
        runner.wait()

    return group
