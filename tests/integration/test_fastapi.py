"""The FastAPI example against real PostgreSQL: request transactions, the lifespan worker,
the mounted dashboard."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from examples.fastapi_app import create_app
from kongtask import ConfigurationError
from kongtask.contrib.starlette import Kongtask

from .worker_support import wait_until

#: The sessions of a Runner's pool (each announces ``pool-…`` as its application_name).
POOL_SESSIONS = (
    "select count(*) from pg_stat_activity "
    "where datname = current_database() and application_name like 'pool-%'"
)


def one(db: psycopg.Connection[Any], query: str) -> Any:
    row = db.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_committed_request_runs_its_job(db_url: str, db: psycopg.Connection[Any]) -> None:
    with TestClient(create_app(db_url)) as client:
        response = client.post("/orders", params={"item": "tea"})
        assert response.status_code == 200, response.text
        order = response.json()["order"]
        # The async handler, then the plain one it enqueued, ran on the lifespan's Runner.
        wait_until(
            lambda: one(db, "select sent from receipt_counter") == 1, what="both jobs to run"
        )
        assert one(db, f"select receipt_sent from orders where id = {int(order)}") is True
        # The completer records the outcomes just after the handlers' own writes.
        wait_until(
            lambda: one(db, "select count(*) from graphile_worker._private_jobs") == 0,
            what="both jobs to be recorded as completed",
        )
        assert one(db, POOL_SESSIONS) > 0
    # The lifespan drained the worker: its sessions leave the database.
    wait_until(lambda: one(db, POOL_SESSIONS) == 0, what="the Runner's sessions to close")


def test_request_failing_after_enqueue_leaves_nothing(
    db_url: str, db: psycopg.Connection[Any]
) -> None:
    app = create_app(db_url)
    with TestClient(app) as client:
        failed = client.post("/orders", params={"item": "tea", "fail": "1"})
        assert failed.status_code == 409
        # Committed by the response's time: the 2xx reply means the job exists.
        ok = client.post("/orders", params={"item": "milk"})
        assert ok.status_code == 200
        wait_until(lambda: one(db, "select sent from receipt_counter") == 1, what="the job")
        assert one(db, "select count(*) from orders") == 1
        assert one(db, "select item from orders") == "milk"
        assert one(db, "select count(*) from graphile_worker._private_jobs") == 0


def test_dashboard_is_mounted(db_url: str) -> None:
    with TestClient(create_app(db_url), base_url="http://127.0.0.1") as client:
        page = client.get("/kongtask/")
        assert page.status_code == 200
        assert "kongtask" in page.text.lower()
        assert 'href="/kongtask/' in page.text, "links must stay under the mount path"


def test_connection_outside_lifespan_is_a_clear_error(db_url: str) -> None:
    kt = Kongtask(db_url)
    with pytest.raises(ConfigurationError, match=r"lifespan=kt\.lifespan"):
        _ = kt.pool


def test_no_worker_when_asked(db_url: str, db: psycopg.Connection[Any]) -> None:
    kt = Kongtask(db_url, run_worker=False)
    app = FastAPI(lifespan=kt.lifespan)

    @app.post("/jobs")
    async def add(
        conn: psycopg.AsyncConnection[Any] = Depends(kt.connection, scope="function"),  # noqa: B008
    ) -> int:
        return (await kt.add_job(conn, "later")).id

    with TestClient(app) as client:
        assert kt.runner is None
        job_id = client.post("/jobs").json()
    # No worker ran it: the committed job waits in the queue.
    assert one(db, "select array_agg(id) from graphile_worker._private_jobs") == [job_id]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"pool_max_size": 0}, "pool_max_size"),
        ({"tasks": {"t": print}, "runner_options": {"concurency": 2}}, "runner_options"),
        ({"tasks": {"t": print}, "runner_options": {"schema": "x"}}, "runner_options"),
        ({"tasks": {"t": print}, "runner_options": {"concurrency": 0}}, "concurrency"),
        ({"runner_options": {"concurrency": 2}}, "runner_options"),
    ],
)
def test_bad_options_are_refused(db_url: str, kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Kongtask(db_url, **kwargs)
    assert raised.value.name == name


def test_plain_starlette_transaction(db_url: str, db: psycopg.Connection[Any]) -> None:
    kt = Kongtask(db_url, run_worker=False)

    async def enqueue(request: Request) -> PlainTextResponse:
        fail = request.query_params.get("fail") == "1"
        try:
            async with kt.transaction() as conn:
                await kt.add_job(conn, "plain", {"fail": fail})
                if fail:
                    raise LookupError("after the enqueue")
        except LookupError:
            return PlainTextResponse("rolled back", status_code=409)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/", enqueue, methods=["POST"])], lifespan=kt.lifespan)
    with TestClient(app) as client:
        assert client.post("/", params={"fail": "1"}).status_code == 409
        assert client.post("/").status_code == 200
        assert one(db, "select array_agg(payload->>'fail') from graphile_worker._private_jobs") == [
            "false"
        ]
