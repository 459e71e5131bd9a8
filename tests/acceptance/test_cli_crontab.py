"""``kongtask crontab check|next`` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from kongtask.ops.cli.crontab import main
from tests.conftest import to_uri


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kongtask", "crontab", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_lists_items(tmp_path: Path) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("# nightly\n0 4 * * * backup ?id=nightly\n@hourly ping\n")
    result = run("check", str(crontab))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "line 2: nightly -> task backup",
        "line 3: ping -> task ping  [kongtask only: nickname '@hourly']",
        "OK: 2 item(s)",
        "A Node graphile-worker would refuse line(s) 3 (kongtask extensions)",
    ]


def test_check_refuses_items_the_database_cannot_store(tmp_path: Path) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("* * * * * fine\n* * * * * bad ?jobKey=a%00b\n")
    result = run("check", str(crontab))
    assert result.returncode == 1
    assert "(line 2, column 15)" in result.stderr
    assert "the job key contains a NUL character" in result.stderr
    crontab.write_text("* * * * * fine\n* * * * * worse {s: 'x\\u0000y'}\n")
    result = run("check", str(crontab))
    assert result.returncode == 1
    assert "(line 2, column 17)" in result.stderr
    assert "payload.s contains a NUL character" in result.stderr


def test_next_without_now_reads_the_wall_clock(tmp_path: Path, capsys: object) -> None:
    from freezegun import freeze_time

    crontab = tmp_path / "crontab"
    crontab.write_text("30 6 * * mon-fri standup\n")
    with freeze_time("2024-01-05 12:00:00"):  # a Friday; pure code, no threads
        assert main(["next", str(crontab), "-n", "2"]) == 0
    out = capsys.readouterr().out.splitlines()  # type: ignore[attr-defined]
    assert out == ["standup (standup):", "  2024-01-08 06:30 UTC", "  2024-01-09 06:30 UTC"]


def test_check_reports_line_and_column(tmp_path: Path) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("# ok\n* * * * * fine\n* 25 * * * broken\n")
    result = run("check", str(crontab))
    assert result.returncode == 1
    assert "line 3" in result.stderr
    assert "Too large value '25' in hours range in line 3 of crontab" in result.stderr


def test_check_missing_file(tmp_path: Path) -> None:
    result = run("check", str(tmp_path / "nope"))
    assert result.returncode == 1
    assert "Failed to read crontab file" in result.stderr


def test_next_prints_zone_and_utc(tmp_path: Path, capsys: object) -> None:
    crontab = tmp_path / "crontab"
    crontab.write_text("0 9 * * * report ?tz=Europe/Berlin\n")
    now = datetime(2021, 3, 27, 12, 0, tzinfo=UTC)  # Berlin springs forward on the 28th
    assert main(["next", str(crontab), "-n", "2"], now=now) == 0
    out = capsys.readouterr().out.splitlines()  # type: ignore[attr-defined]
    assert out == [
        "report (report, tz Europe/Berlin):",
        "  2021-03-28 07:00 UTC  (2021-03-28 09:00 CEST)",
        "  2021-03-29 07:00 UTC  (2021-03-29 09:00 CEST)",
    ]


def test_once_refuses_a_bad_crontab(tmp_path: Path, db_url: str) -> None:
    crontab = tmp_path / "bad_crontab"
    crontab.write_text("0 4 * * mon-fry report\n")
    tasks = tmp_path / "tasks.py"  # the worker has tasks: only the crontab is wrong
    tasks.write_text("def report(payload, helpers):\n    pass\n")
    result = subprocess.run(
        [sys.executable, "-m", "kongtask", "-c", to_uri(db_url), "--once", "--tasks",
         str(tasks), "--crontab", str(crontab)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"kongtask: error: {crontab}: Could not process line '1' of crontab:"
        " '0 4 * * mon-fry report'; day of week: 'fry' is not a day name (SUN-SAT)"
    )
