"""The Django integration, end to end, in the example project under examples/django_project.

Every step runs the project's ``manage.py`` as a real subprocess against this
test's fresh database: Django's own migrations, enqueueing inside
``transaction.atomic()``, ``kongtask_worker --once`` and the dashboard view.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from kongtask.db.migrate import migrate

pytest.importorskip("django")
pytest.importorskip("django_tasks")

PROJECT = Path(__file__).resolve().parents[2] / "examples" / "django_project"


def manage(db_url: str, *args: str, code: str | None = None) -> str:
    """Run ``manage.py ARGS`` (``shell -c CODE`` when ``code`` is given); its stdout."""
    env = {**os.environ, "DATABASE_URL": db_url, "DJANGO_SETTINGS_MODULE": "site_config.settings"}
    command = [sys.executable, "manage.py", *args]
    if code is not None:
        command += ["shell", "--no-imports", "-c", code]
    done = subprocess.run(
        command, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def shell_json(db_url: str, code: str) -> Any:
    """Run ``code`` in ``manage.py shell``; it prints one JSON document as its last line."""
    return json.loads(manage(db_url, code=code).strip().splitlines()[-1])


@pytest.fixture
def project_db(db_url: str) -> str:
    """This test's fresh kongtask database with the example project's tables migrated."""
    manage(db_url, "migrate", "-v0")
    return db_url


def jobs(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "select t.identifier, j.priority, q.queue_name, j.payload::text, j.attempts,"
            " j.last_error from graphile_worker._private_jobs j"
            " join graphile_worker._private_tasks t on t.id = j.task_id"
            " left join graphile_worker._private_job_queues q on q.id = j.job_queue_id"
            " order by j.id"
        ).fetchall()


def greetings(db_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute("select name, attempt from greetings_greeting order by name").fetchall()


ENQUEUE = """
import json, psycopg
from django.db import connection, transaction
from greetings.tasks import greet, greet_async

def others_see():
    with psycopg.connect(DB) as other:
        return other.execute("select count(*) from graphile_worker.jobs").fetchone()[0]

with transaction.atomic():
    greet.enqueue("rolled back")
    transaction.set_rollback(True)
after_rollback = others_see()
with transaction.atomic():
    ann = greet.enqueue("ann")
    bob = greet_async.enqueue(name="bob")
    before_commit = others_see()
after_commit = others_see()
print(json.dumps({
    "after_rollback": after_rollback, "before_commit": before_commit,
    "after_commit": after_commit, "ids": [ann.id, bob.id],
    "status": greet.get_result(ann.id).status, "args": greet.get_result(ann.id).args,
}))
"""


def test_atomic_enqueue_commits_with_the_transaction_and_the_worker_runs_it(
    project_db: str,
) -> None:
    found = shell_json(project_db, f"DB = {project_db!r}\n" + ENQUEUE)
    assert found["after_rollback"] == 0
    assert found["before_commit"] == 0
    assert found["after_commit"] == 2
    assert found["status"] == "READY"
    assert found["args"] == ["ann"]
    assert jobs(project_db) == [
        ("greetings.tasks.greet", 0, None, '{"args":["ann"],"kwargs":{}}', 0, None),
        # Django priority 10 (sooner) is graphile priority -10; "mail" is a serial queue.
        (
            "greetings.tasks.greet_async",
            -10,
            "mail",
            '{"args":[],"kwargs":{"name":"bob"}}',
            0,
            None,
        ),
    ]

    out = manage(project_db, "kongtask_worker", "--once", "-j", "2", "--poll-interval", "1")
    assert "3 task(s)" in out
    assert greetings(project_db) == [("ann", 1), ("bob", 1)]
    assert jobs(project_db) == []

    # The jobs succeeded and are gone: kongtask keeps no results.
    gone = shell_json(
        project_db,
        "import json\nfrom greetings.tasks import greet\n"
        "from kongtask.contrib.django._compat import TaskResultDoesNotExist\n"
        f"ids = {found['ids']!r}\nmissing = []\n"
        "for i in ids:\n"
        "    try:\n        greet.get_backend().get_result(i)\n"
        "    except TaskResultDoesNotExist:\n        missing.append(i)\n"
        "print(json.dumps(missing))",
    )
    assert gone == found["ids"]


def test_a_failing_task_is_retried_and_its_result_shows_the_error(project_db: str) -> None:
    job_id = shell_json(
        project_db,
        "import json\nfrom greetings.tasks import refuse\n"
        "print(json.dumps(refuse.enqueue('zed').id))",
    )
    manage(project_db, "kongtask_worker", "--once")
    [(identifier, _, _, _, attempts, last_error)] = jobs(project_db)
    assert (identifier, attempts) == ("greetings.tasks.refuse", 1)
    assert "no greeting for zed" in last_error
    result = shell_json(
        project_db,
        "import json\nfrom greetings.tasks import refuse\n"
        f"r = refuse.get_result({job_id!r})\n"
        "print(json.dumps({'status': r.status, 'errors': [e.traceback for e in r.errors],"
        " 'attempts': r.attempts, 'finished': r.is_finished}))",
    )
    assert result["status"] == "READY"  # waiting for its retry
    assert result["attempts"] == 1
    assert not result["finished"]
    assert "no greeting for zed" in result["errors"][0]


BAD_INPUT = """
import json
from kongtask.contrib.django import KongtaskBackend
from kongtask.errors import ConfigurationError
from kongtask.contrib.django._compat import InvalidTask
from greetings.tasks import greet
errors = {}
try:
    KongtaskBackend("x", {"OPTIONS": {"DATABSE": "default"}})
except ConfigurationError as exc:
    errors["option"] = str(exc)
try:
    KongtaskBackend("x", {"OPTIONS": {"DATABASE": "nowhere"}}).enqueue(greet, ["a"], {})
except ConfigurationError as exc:
    errors["database"] = str(exc)
try:
    greet.enqueue(object())
except InvalidTask as exc:
    errors["args"] = str(exc)
try:
    greet.using(queue_name="elsewhere")
except InvalidTask as exc:
    errors["queue"] = str(exc)
print(json.dumps(errors))
"""


def test_bad_options_and_arguments_are_refused_and_add_nothing(project_db: str) -> None:
    errors = shell_json(project_db, BAD_INPUT)
    assert "unknown key(s) DATABSE" in errors["option"]
    assert "no database 'nowhere'" in errors["database"]
    assert "greetings.tasks.greet" in errors["args"]
    assert "not JSON-serialisable" in errors["args"]
    assert "elsewhere" in errors["queue"]
    assert jobs(project_db) == []


DASHBOARD = """
import json
from django.contrib.auth.models import User
from django.test import Client
client = Client()
seen = {}
response = client.get("/kongtask/")
seen["anonymous"] = [response.status_code, response.get("Location")]
response = client.post("/kongtask/actions/retry", {"job_id": "1"})
seen["anonymous_post"] = [response.status_code, response.get("Location")]
client.force_login(User.objects.create_user("member"))
seen["member"] = client.get("/kongtask/").status_code
client.force_login(User.objects.create_user("boss", is_staff=True))
response = client.get("/kongtask/")
page = response.content.decode()
seen["staff"] = [response.status_code, response["Content-Type"], "Overview" in page,
                 'href="/kongtask/jobs' in page, sorted(response.cookies)]
response = client.get("/kongtask/jobs?task=greetings.tasks.greet")
seen["jobs"] = [response.status_code, "greetings.tasks.greet" in response.content.decode()]
print(json.dumps(seen))
"""


def test_the_dashboard_refuses_anonymous_and_non_staff_users_and_serves_staff(
    project_db: str,
) -> None:
    shell_json(
        project_db,
        "import json\nfrom greetings.tasks import greet\n"
        "print(json.dumps(greet.enqueue('ann').id))",
    )
    seen = shell_json(project_db, DASHBOARD)
    assert seen["anonymous"] == [302, "/login/?next=/kongtask/"]
    assert seen["anonymous_post"] == [302, "/login/?next=/kongtask/actions/retry"]
    assert seen["member"] == 403
    status, content_type, overview, prefixed_links, cookies = seen["staff"]
    assert status == 200
    assert content_type.startswith("text/html")
    assert overview
    assert prefixed_links
    assert "kongtask_csrf" in cookies
    assert seen["jobs"] == [200, True]


DEFERRED = """
import json
from datetime import timedelta
from django.utils import timezone
from kongtask.contrib.django import KongtaskBackend
from greetings.tasks import greet
later = greet.using(run_after=timezone.now() + timedelta(hours=1)).enqueue("later")
KongtaskBackend("x", {"OPTIONS": {"MAX_ATTEMPTS": 3}}).enqueue(greet, ["three"], {})
print(json.dumps(later.id))
"""


def test_run_after_defers_the_job_and_max_attempts_is_applied(project_db: str) -> None:
    later_id = shell_json(project_db, DEFERRED)
    with psycopg.connect(project_db) as conn:
        rows = conn.execute(
            "select id = %s, max_attempts, run_at - now() > interval '50 minutes'"
            " from graphile_worker._private_jobs order by id",
            (int(later_id),),
        ).fetchall()
    assert rows == [(True, 25, True), (False, 3, False)]
    manage(project_db, "kongtask_worker", "--once")
    assert greetings(project_db) == [("three", 1)]
    assert [row[0] for row in jobs(project_db)] == ["greetings.tasks.greet"]  # the deferred one


def test_the_worker_runs_crontab_items_naming_django_tasks_and_stops_on_sigterm(
    project_db: str, tmp_path: Path
) -> None:
    crontab = tmp_path / "crontab"
    # A crontab names greetings.tasks.greet with ":" (graphile's grammar has no dots);
    # fill=2m backfills the last minutes at start, so a firing happens at once. A new
    # item is never backfilled to before it was first seen (it would fire only at the
    # next minute, up to a minute away): the item is known since five minutes ago.
    crontab.write_text('* * * * * greetings:tasks:greet ?fill=2m {"args":["cron"],"kwargs":{}}\n')
    with psycopg.connect(project_db, autocommit=True) as conn:
        migrate(conn)
        conn.execute(
            "insert into graphile_worker._private_known_crontabs (identifier, known_since)"
            " values ('greetings:tasks:greet', now() - interval '5 minutes')"
        )
    env = {**os.environ, "DATABASE_URL": project_db}
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "kongtask_worker", "--crontab", str(crontab)],
        cwd=PROJECT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not greetings(project_db) and time.monotonic() < deadline:
            assert worker.poll() is None, worker.communicate()
            time.sleep(0.2)
        assert greetings(project_db)[0] == ("cron", 1)
    finally:
        worker.send_signal(signal.SIGTERM)
        _out, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err
    # The firing's job was added under the crontab name, which the worker served.
    with psycopg.connect(project_db) as conn:
        assert conn.execute(
            "select count(*) from graphile_worker._private_tasks"
            " where identifier = 'greetings:tasks:greet'"
        ).fetchone() == (1,)
