"""No password in anything kongtask prints or logs, whatever form the connection string takes.

Each case runs the real ``kongtask`` command and greps everything it wrote
(stdout and stderr, with debug logging on) for the password and for every
fragment of it libpq might quote.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from kongtask.db.conninfo import RedactingFilter, open_database, redact
from kongtask.ops.cli import main as cli
from tests.conftest import to_uri

PASSWORD = "TopSecret123"


def kongtask(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    base = {key: value for key, value in os.environ.items() if not key.startswith(("PG", "DATA"))}
    return subprocess.run(
        [sys.executable, "-m", "kongtask", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**base, "KONGTASK_DEBUG": "1", **(env or {})},
        cwd=cwd,
        check=False,
    )


def assert_clean(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    output = result.stdout + result.stderr
    for fragment in (PASSWORD, *fragments):
        assert fragment not in output, f"{fragment!r} leaked:\n{output}"
    return output


def _server(db_url: str) -> dict[str, Any]:
    params = conninfo_to_dict(db_url)
    return {"host": params.get("host", "127.0.0.1"), "port": params.get("port", 5432)}


# (how the connection string is given, the string, fragments that must not appear)
BAD_STRINGS = {
    "url-bad-percent": (f"postgresql://postgres:{PASSWORD}%zz@127.0.0.1:1/x", ["%zz"]),
    "url-space": (f"postgresql://postgres:{PASSWORD} more@127.0.0.1:1/x", ["more@"]),
    "url-nul-escape": (f"postgresql://postgres:{PASSWORD}%00x@127.0.0.1:1/x", []),
    "url-bare-at": (f"postgresql://postgres:{PASSWORD}@xyz789@127.0.0.1:1/x", ["xyz789"]),
    "keyword-space": (f"host=127.0.0.1 port=1 password={PASSWORD} words_after", ["words_after"]),
    "keyword-unterminated": (f"host=127.0.0.1 password='{PASSWORD}", []),
    "keyword-refused": (f"host=127.0.0.1 port=1 password={PASSWORD}", []),
}


@pytest.mark.parametrize("case", sorted(BAD_STRINGS))
@pytest.mark.parametrize("via", ["flag", "DATABASE_URL"])
def test_bad_connection_strings_never_echo_the_password(case: str, via: str) -> None:
    conninfo, fragments = BAD_STRINGS[case]
    if via == "flag":
        result = kongtask("--schema-only", "-c", conninfo)
    else:
        result = kongtask("--schema-only", env={"DATABASE_URL": conninfo})
    output = assert_clean(result, *fragments)
    assert result.returncode == 1, output
    assert output.startswith("kongtask: error: ") or "\nkongtask: error: " in output, output


def test_pgpassword_and_env_vars_never_show(db_url: str) -> None:
    server = _server(db_url)
    env = {
        "PGPASSWORD": PASSWORD,
        "PGDATABASE": "kt_no_such_database",
        "PGHOST": str(server["host"]),
        "PGPORT": str(server["port"]),
        "PGUSER": "postgres",
    }
    result = kongtask("--schema-only", env=env)
    output = assert_clean(result)
    assert result.returncode == 1 and "kt_no_such_database" in output, output


def test_a_working_worker_with_a_password_logs_none_of_it(db_url: str, tmp_path: Path) -> None:
    # Trust authentication ignores the password, so it can be anything.
    url = to_uri(db_url).replace("postgres@", f"postgres:{PASSWORD}%25x@", 1)
    assert f":{PASSWORD}%25x@" in url
    (tmp_path / "tasks.py").write_text(
        "import os\n"
        "def echo(payload, helpers):\n"
        "    helpers.logger.info('connected via %s', os.environ['DATABASE_URL'])\n"
        "    print('printed', os.environ['DATABASE_URL'])\n"
        "    raise RuntimeError('failing with ' + os.environ['DATABASE_URL'])\n"
    )
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("select graphile_worker.add_job('echo', '{}')")
    result = kongtask("--once", "--tasks", str(tmp_path / "tasks.py"), env={"DATABASE_URL": url})
    output = assert_clean(result, f"{PASSWORD}%25x", f"{PASSWORD}%x")
    assert result.returncode == 0, output
    assert "connected via postgresql://postgres:***@" in output, output
    assert "failing with postgresql://postgres:***@" in output, output
    with psycopg.connect(db_url) as conn:
        (last_error,) = conn.execute("select last_error from graphile_worker.jobs").fetchone()  # type: ignore[misc]
    # What the handler chose to put in its own error is its business (stored as given).
    assert PASSWORD in last_error


def test_an_exception_escaping_the_cli_is_one_redacted_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    conninfo = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x"

    def explode(args: Any) -> int:
        raise RuntimeError(f"something broke while using {conninfo} ({PASSWORD})")

    monkeypatch.setattr(cli, "_run_worker", explode)
    monkeypatch.delenv("KONGTASK_DEBUG", raising=False)
    monkeypatch.delenv("GRAPHILE_LOGGER_DEBUG", raising=False)
    # main() configures the "kongtask" logger for a process of its own; put it
    # back, or later tests would log into this test's closed capture stream.
    package_logger = logging.getLogger("kongtask")
    saved = (list(package_logger.handlers), package_logger.level, package_logger.propagate)
    try:
        assert cli.main(["-c", conninfo]) == cli.EXIT_ERROR
    finally:
        package_logger.handlers[:] = saved[0]
        package_logger.setLevel(saved[1])
        package_logger.propagate = saved[2]
    captured = capsys.readouterr()
    assert PASSWORD not in captured.out + captured.err
    assert captured.err == (
        "kongtask: error: unexpected RuntimeError: something broke while using "
        "postgresql://postgres:***@127.0.0.1:1/x (***)\n"
    )


def test_library_log_records_and_errors_carry_no_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="kongtask")
    with open_database(f"postgresql://postgres:{PASSWORD}@xyz789@127.0.0.1:1/x"):
        pass
    with pytest.raises(Exception) as raised, open_database(f"host=x password={PASSWORD} more"):
        pass
    assert "using database host=***@127.0.0.1" in caplog.text
    assert PASSWORD not in caplog.text and "xyz789" not in caplog.text
    assert PASSWORD not in str(raised.value) and "more" not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_redacting_filter_for_an_application_s_own_handlers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    conninfo = f"host=db password='{PASSWORD} x' user=app"
    handler_filter = RedactingFilter([conninfo], environ={})
    logger = logging.getLogger("tests.redaction")
    caplog.handler.addFilter(handler_filter)
    try:
        logger.warning("connecting with %s", conninfo)
        try:
            raise ValueError(f"refused {PASSWORD} x")
        except ValueError:
            logger.exception("failed")
    finally:
        caplog.handler.removeFilter(handler_filter)
    assert PASSWORD not in caplog.text
    assert "connecting with host=db password=*** user=app" in caplog.text
    assert redact(f"PGPASSWORD={PASSWORD}", environ={}) == "PGPASSWORD=***"
