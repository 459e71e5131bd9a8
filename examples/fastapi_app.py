"""A FastAPI app that enqueues kongtask jobs inside its own request transactions.

Run it (needs ``pip install 'kongtask[fastapi]' uvicorn``)::

    KONGTASK_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test \\
        uvicorn examples.fastapi_app:app

``POST /orders`` stores an order and enqueues ``send_receipt`` in the same
transaction; ``POST /orders?fail=1`` fails after the enqueue, so neither the
order nor its job exists. The worker runs in the app's lifespan (fine for a
small app; in production run ``kongtask`` as its own process and pass
``run_worker=False``); the dashboard answers under ``/kongtask/``.
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, HTTPException

import kongtask
from kongtask.contrib.starlette import Kongtask

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


@kongtask.task
async def send_receipt(payload: dict[str, Any], helpers: kongtask.AsyncHelpers) -> None:
    """An async handler: marks the order's receipt as sent."""
    await helpers.query_async(
        "update orders set receipt_sent = true where id = %(id)s", {"id": payload["order"]}
    )
    await helpers.add_job_async("count_receipt", {"order": payload["order"]})


@kongtask.task
def count_receipt(payload: dict[str, Any], helpers: kongtask.Helpers) -> None:
    """A plain (thread) handler: counts the receipts sent."""
    helpers.query("update receipt_counter set sent = sent + 1")


def create_app(database_url: str) -> FastAPI:
    """The application over ``database_url`` (its orders table is made at startup)."""
    kt = Kongtask(
        database_url, tasks=[send_receipt, count_receipt], runner_options={"concurrency": 2}
    )
    Connection = Annotated[psycopg.AsyncConnection[Any], Depends(kt.connection, scope="function")]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(
                "create table if not exists orders "
                "(id serial primary key, item text not null, receipt_sent bool default false)"
            )
            await conn.execute("create table if not exists receipt_counter (sent int not null)")
            await conn.execute(
                "insert into receipt_counter select 0 "
                "where not exists (select from receipt_counter)"
            )
        async with kt.lifespan(app):
            yield

    app = FastAPI(lifespan=lifespan)
    app.mount("/kongtask", kt.dashboard())

    @app.post("/orders")
    async def create_order(item: str, conn: Connection, fail: bool = False) -> dict[str, Any]:
        cur = await conn.execute("insert into orders (item) values (%s) returning id", (item,))
        row = await cur.fetchone()
        assert row is not None
        job = await kt.add_job(conn, send_receipt, {"order": row[0]})
        if fail:
            # Anything raised after the enqueue rolls back the order and its job together.
            raise HTTPException(status_code=409, detail="out of stock")
        return {"order": row[0], "job": job.id}

    return app


app = create_app(os.environ.get("KONGTASK_DATABASE_URL", DEFAULT_URL))
