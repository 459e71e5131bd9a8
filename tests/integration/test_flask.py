"""The Flask example against real PostgreSQL: the request's transaction, the CLI worker,
the mounted dashboard; and the SQLAlchemy session path."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from examples.flask_app import create_app
from kongtask import ConfigurationError
from kongtask.contrib.flask import Kongtask, add_job

from .worker_support import wait_until


def one(db: psycopg.Connection[Any], query: str) -> Any:
    row = db.execute(query).fetchone()
    assert row is not None
    return row[0]


JOBS = "select count(*) from graphile_worker._private_jobs"


@pytest.fixture
def app(db_url: str) -> Iterator[Flask]:
    app = create_app(db_url)
    app.config["TESTING"] = True
    result = app.test_cli_runner().invoke(args=["init-db"])
    assert result.exit_code == 0, result.output
    yield app
    app.extensions["kongtask"].close()


def test_committed_request_runs_its_job_in_the_cli_worker(
    app: Flask, db: psycopg.Connection[Any]
) -> None:
    response = app.test_client().post("/orders", query_string={"item": "tea"})
    assert response.status_code == 200, response.text
    order = int(response.json["order"])  # type: ignore[index]
    # Committed before the response left: another session sees it at once.
    assert one(db, JOBS) == 1
    assert one(db, f"select receipt_sent from orders where id = {order}") is False

    result = app.test_cli_runner().invoke(args=["kongtask", "worker", "--once", "-j", "2"])
    assert result.exit_code == 0, result.output
    assert one(db, f"select receipt_sent from orders where id = {order}") is True
    assert one(db, JOBS) == 0


def test_error_response_after_enqueue_rolls_back(app: Flask, db: psycopg.Connection[Any]) -> None:
    response = app.test_client().post("/orders", query_string={"item": "tea", "fail": "1"})
    assert response.status_code == 409
    assert one(db, "select count(*) from orders") == 0
    assert one(db, JOBS) == 0


def test_exception_after_enqueue_rolls_back(app: Flask, db: psycopg.Connection[Any]) -> None:
    app.config["TESTING"] = False  # an unhandled exception becomes a 500, as in production
    response = app.test_client().post("/orders/crash")
    assert response.status_code == 500
    assert one(db, "select count(*) from orders") == 0
    assert one(db, JOBS) == 0
    # The request's connection went back to the pool with nothing left open.
    assert (
        one(
            db,
            "select count(*) from pg_stat_activity where datname = current_database() "
            "and state like 'idle in transaction%'",
        )
        == 0
    )
    assert app.test_client().post("/orders", query_string={"item": "tea"}).status_code == 200
    assert one(db, "select count(*) from orders") == 1


def test_dashboard_is_mounted(app: Flask) -> None:
    page = app.test_client().get("/kongtask/", base_url="http://127.0.0.1")
    assert page.status_code == 200
    assert 'href="/kongtask/' in page.text


def test_worker_cli_refuses_bad_concurrency(app: Flask) -> None:
    result = app.test_cli_runner().invoke(args=["kongtask", "worker", "-j", "0"])
    assert result.exit_code == 2
    assert "-j" in result.output


def test_sqlalchemy_session_transaction(db_url: str, db: psycopg.Connection[Any]) -> None:
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(db_url))
    session: scoped_session[Session] = scoped_session(sessionmaker(engine))
    app = Flask(__name__)
    app.config["KONGTASK_DATABASE_URL"] = db_url
    Kongtask(app, session=session)

    @app.post("/<int:n>")
    def enqueue(n: int) -> str:
        add_job("from_orm", {"n": n})
        if n == 2:
            session.rollback()
        else:
            session.commit()
        session.remove()
        return "ok"

    client = app.test_client()
    assert client.post("/1").status_code == 200
    assert client.post("/2").status_code == 200
    engine.dispose()
    assert one(db, "select array_agg(payload->>'n') from graphile_worker._private_jobs") == ["1"]


def test_add_job_needs_the_extension_and_a_url(db_url: str) -> None:
    bare = Flask(__name__)
    with bare.test_request_context(), pytest.raises(ConfigurationError, match="Kongtask\\(app\\)"):
        add_job("x")
    unset = Flask(__name__)
    Kongtask(unset)
    with unset.test_request_context(), pytest.raises(ConfigurationError) as raised:
        add_job("x")
    assert raised.value.name == "KONGTASK_DATABASE_URL"
    with pytest.raises(ConfigurationError, match="session"):
        Kongtask(session=object())


def test_bad_pool_size_is_refused(app: Flask, db: psycopg.Connection[Any]) -> None:
    app.config["KONGTASK_POOL_SIZE"] = 0
    app.config["TESTING"] = False
    with app.test_request_context(), pytest.raises(ConfigurationError) as raised:
        add_job("x")
    assert raised.value.name == "KONGTASK_POOL_SIZE"
    assert one(db, JOBS) == 0


def test_flask_kongtask_worker_runs_until_sigterm(
    app: Flask, db_url: str, db: psycopg.Connection[Any]
) -> None:
    env = {**os.environ, "KONGTASK_DATABASE_URL": db_url}
    worker = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "examples.flask_app", "kongtask", "worker"],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        response = app.test_client().post("/orders", query_string={"item": "tea"})
        assert response.status_code == 200
        wait_until(
            lambda: one(db, "select count(*) from orders where receipt_sent") == 1,
            what="the worker process to run the job",
        )
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0, output
    assert one(db, JOBS) == 0
