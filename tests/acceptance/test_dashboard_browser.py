"""The dashboard in a real browser (Debian's chromium driven by Playwright) over a live worker.

Set ``KONGTASK_DASHBOARD_SCREENSHOT=docs/dashboard.png`` to save the
screenshot the README shows.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import kongtask
from kongtask.ops.dashboard import DashboardServer
from kongtask.ops.dashboard.app import source_lines
from tests.integration.ops_support import add, ids_by_sql, seed_every_state
from tests.integration.worker_support import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists() or shutil.which("chromium") is None,
    reason=f"Debian's chromium is not installed at {CHROMIUM} (apt-get install chromium)",
)


@pytest.fixture
def browser_page() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def count(conn: psycopg.Connection[Any], state: str) -> int:
    return len(ids_by_sql(conn, state))


def test_dashboard_shows_the_counts_and_retries_a_failed_job(
    db_url: str, db: psycopg.Connection[Any], browser_page: Any, tmp_path: Path
) -> None:
    seeded = seed_every_state(db)
    crontab = tmp_path / "crontab"
    crontab.write_text("0 3 * * * report ?id=nightly\n*/15 * * * * email ?id=digest\n")
    ran: list[int] = []
    ran_changed = threading.Condition()

    def email(payload: Any, helpers: Any) -> None:
        with ran_changed:
            ran.append(helpers.job.id)
            ran_changed.notify_all()

    def flaky(payload: Any, helpers: Any) -> None:
        raise RuntimeError("upstream returned 502")

    slow_started = threading.Event()

    def slow(payload: Any, helpers: Any) -> None:
        slow_started.set()
        helpers.abort_event.wait(60)

    with (
        kongtask.run(
            tasks={"email": email, "flaky": flaky, "slow": slow},
            connection_string=db_url,
            install_signal_handlers=False,
        ) as runner,
        DashboardServer(
            db_url,
            port=0,
            cron_items=kongtask.parse_crontab(crontab.read_text()),
            cron_lines=source_lines(
                crontab.read_text(), kongtask.parse_crontab(crontab.read_text())
            ),
        ) as dashboard,
    ):
        for _ in range(40):
            add(db, "email")
        for _ in range(3):
            add(db, "flaky", max_attempts=1)
        runner.join()  # the ready email jobs ran; the rest stays as seeded
        page = browser_page
        page.goto(dashboard.url)
        for state in ("ready", "scheduled", "running", "retrying", "failed"):
            shown = page.inner_text(f'#totals b[data-state="{state}"]')
            assert int(shown) == count(db, state), state
        assert count(db, "failed") == 5  # two seeded, three flaky
        assert "upstream returned 502" in page.inner_text("#failing")
        assert "nightly" in page.inner_text("#cron") and "digest" in page.inner_text("#cron")
        assert "web-1" in page.inner_text("#pools")
        if os.environ.get("KONGTASK_DASHBOARD_SCREENSHOT"):
            # The picture should show the finished jobs too: the pool's next
            # heartbeat records them.
            def finished_counted() -> bool:
                row = db.execute(
                    "select count(*) from graphile_worker._kongtask_task_stats"
                ).fetchone()
                return row is not None and row[0] > 0

            wait_until(finished_counted, timeout_s=30, what="the finished jobs to be recorded")
            page.goto(dashboard.url)
            page.screenshot(path=os.environ["KONGTASK_DASHBOARD_SCREENSHOT"], full_page=True)

        target = seeded["failed"][0]
        row = page.locator(f'#failing tr[data-job-id="{target}"]')
        row.get_by_role("button", name="Retry now").click()
        page.wait_for_selector(".flash")
        assert page.inner_text(".flash") == f"Retrying job {target} now"
        with ran_changed:
            assert ran_changed.wait_for(lambda: target in ran, 30), "the retried job did not run"
        runner.join()
        page.goto(dashboard.url + f"jobs/{target}")
        assert f"No job {target}" in page.inner_text("main")
        page.goto(dashboard.url)
        assert int(page.inner_text('#totals b[data-state="failed"]')) == count(db, "failed") == 4
        assert page.locator(f'#failing tr[data-job-id="{target}"]').count() == 0

        # Cancel a scheduled job from the job list, with a reason.
        waiting = seeded["scheduled"][0]
        page.goto(dashboard.url + "jobs?state=scheduled")
        row = page.locator(f'tr[data-job-id="{waiting}"]')
        cancel_form = row.locator('form[action$="/actions/cancel"]')
        cancel_form.locator('input[name="reason"]').fill("not needed")
        cancel_form.get_by_role("button", name="Cancel").click()
        page.wait_for_selector(".flash")
        assert page.inner_text(".flash") == (
            f"Cancelled job {waiting}: it was waiting and has failed permanently"
        )
        assert waiting in ids_by_sql(db, "failed")
        last_error = db.execute(
            "select last_error from graphile_worker._private_jobs where id = %s", (waiting,)
        ).fetchone()
        assert last_error == ("cancelled: not needed",)

        # Cancel a running job from its page: the pool aborts it and it fails for good.
        running = runner.add_job("slow", {})
        assert slow_started.wait(30), "the slow job did not start"
        page.goto(dashboard.url + f"jobs/{running.id}")
        page.locator("#actions").get_by_role("button", name="Cancel").click()
        page.wait_for_selector(".flash")
        assert page.inner_text(".flash").startswith(f"Job {running.id} is running: asked pool")
        wait_until(lambda: running.id in ids_by_sql(db, "failed"), what="the cancelled job to fail")
        page.goto(dashboard.url + f"jobs/{running.id}")
        assert "cancelled" in page.inner_text("main")

        # A bulk action on a selection: the confirmation says how many, then it acts.
        removable = [*seeded["scheduled"][1:], add(db, "email", run_at="2999-01-01T00:00:00Z")]
        page.goto(dashboard.url + "jobs?state=scheduled")
        for job_id in removable:
            page.locator(f'tr[data-job-id="{job_id}"] input[name="ids"]').check()
        page.select_option('#bulk select[name="op"]', "remove")
        page.click("#bulk-apply")
        assert page.inner_text("#confirm-count") == f"Remove {len(removable)} jobs?"
        assert all(job_id in ids_by_sql(db, "scheduled") for job_id in removable)
        page.click("#confirm-yes")
        page.wait_for_selector(".flash")
        assert (
            page.inner_text(".flash")
            == f"Remove: {len(removable)} of {len(removable)} jobs changed"
        )
        assert not set(removable) & set(ids_by_sql(db, "scheduled"))

        # Live updates: a job added elsewhere shows in the counts without a reload;
        # the operator can pause them.
        page.goto(dashboard.url)
        expect = pytest.importorskip("playwright.sync_api").expect
        page.wait_for_selector("body[data-updated]")  # the first live update arrived
        scheduled = count(db, "scheduled")
        shown = page.locator('#totals b[data-state="scheduled"]')
        assert int(shown.inner_text()) == scheduled
        add(db, "email", run_at="2999-01-01T00:00:00Z")
        expect(shown).to_have_text(str(scheduled + 1), timeout=20_000)
        page.click("#live-toggle")
        assert page.inner_text("#live") == "paused"
        assert page.inner_text("#live-toggle") == "Resume live updates"
        page.reload()  # the choice survives a reload
        assert page.inner_text("#live") == "paused"
        page.click("#live-toggle")
        expect(page.locator("#live")).to_have_text(re.compile("^live"), timeout=20_000)

        # A pause from the limits page: stored for the whole fleet, shown on the
        # overview with who paused it, then resumed with the row's button.
        page.goto(dashboard.url + "limits")
        page.select_option('#pause select[name="kind"]', "task")
        page.fill('#pause input[name="key"]', "email")
        page.click('#pause button[type="submit"]')
        page.wait_for_selector(".flash")
        assert page.inner_text(".flash") == "Paused task 'email' (by dashboard)"
        assert db.execute(
            "select key_kind, key, paused_by from graphile_worker._kongtask_pauses"
        ).fetchall() == [("task", "email", "dashboard")]
        page.goto(dashboard.url)
        assert "paused task email by dashboard" in page.inner_text('[data-paused="task:email"]')
        page.goto(dashboard.url + "limits")
        page.locator('tr[data-pause="task:email"]').get_by_role("button", name="Resume").click()
        page.wait_for_selector(".flash")
        assert page.inner_text(".flash") == "Resumed task 'email'"
        assert count_pauses(db) == 0


def count_pauses(db: psycopg.Connection[Any]) -> int:
    row = db.execute("select count(*) from graphile_worker._kongtask_pauses").fetchone()
    assert row is not None
    return int(row[0])
