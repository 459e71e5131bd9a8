"""A Flask app that enqueues kongtask jobs inside its own request transactions.

Run it (needs ``pip install 'kongtask[flask]'``)::

    export KONGTASK_DATABASE_URL=postgresql://postgres@127.0.0.1:5432/test
    flask --app examples.flask_app init-db                    # the orders table
    flask --app examples.flask_app run                        # the web app
    flask --app examples.flask_app kongtask worker -j 4       # the worker, its own process

``POST /orders?item=tea`` stores an order and enqueues ``send_receipt`` in the
request's transaction; ``?fail=1`` answers 409 after the enqueue and
``/orders/crash`` raises after it, so neither leaves an order or a job. The
dashboard answers under ``/kongtask/``.
"""

import os
from typing import Any

import psycopg
from flask import Flask, abort, request

import kongtask
from kongtask.contrib.flask import Kongtask, add_job, get_connection

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


@kongtask.task
def send_receipt(payload: dict[str, Any], helpers: kongtask.Helpers) -> None:
    """Marks the order's receipt as sent."""
    helpers.query(
        "update orders set receipt_sent = true where id = %(id)s", {"id": payload["order"]}
    )


def create_app(database_url: str) -> Flask:
    """The application over ``database_url``; its orders table is made here."""
    app = Flask(__name__)
    app.config["KONGTASK_DATABASE_URL"] = database_url
    kt = Kongtask(app, tasks=[send_receipt])
    kt.mount_dashboard(app, "/kongtask")

    @app.post("/orders")
    def create_order() -> dict[str, Any]:
        conn = get_connection()  # this request's transaction
        row = conn.execute(
            "insert into orders (item) values (%s) returning id", (request.args["item"],)
        ).fetchone()
        assert row is not None
        job = add_job(send_receipt, {"order": row[0]})
        if request.args.get("fail"):
            abort(409)  # an error response rolls the order and its job back
        return {"order": row[0], "job": job.id}

    @app.post("/orders/crash")
    def crash() -> dict[str, Any]:
        get_connection().execute("insert into orders (item) values ('lost')")
        add_job(send_receipt, {"order": 0})
        raise RuntimeError("crashed after the enqueue")

    @app.cli.command("init-db")
    def init_db() -> None:
        """Create the example's orders table (kongtask migrates its own schema)."""
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "create table if not exists orders "
                "(id serial primary key, item text not null, receipt_sent bool default false)"
            )

    return app


app = create_app(os.environ.get("KONGTASK_DATABASE_URL", DEFAULT_URL))
