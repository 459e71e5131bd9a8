"""The crontab parser: graphile-worker's grammar and messages, kongtask's extensions."""

# Tables of exact messages and DST cases read best one case per line.
# ruff: noqa: E501

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kongtask.cron import (
    CronItem,
    CronItemOptions,
    ParsedCronItem,
    parse_cron_item,
    parse_cron_items,
    parse_crontab,
    render_cron_item,
    time_phrase_to_timedelta,
    validate_pattern,
)
from kongtask.errors import CrontabError

ALL_DATES = tuple(range(1, 32))
ALL_DOWS = tuple(range(7))
SUPPORTED = "supported keys are: 'id', 'fill', 'max', 'queue', 'jobKey', 'jobKeyMode', 'priority', 'tz', 'noOverlap', 'skipDates'."


def parse_one(line: str) -> ParsedCronItem:
    (item,) = parse_crontab(line)
    return item


@pytest.mark.parametrize(
    ("line", "minutes", "hours", "dates", "months", "dows"),
    [
        (
            "* * * * * foo",
            tuple(range(60)),
            tuple(range(24)),
            ALL_DATES,
            tuple(range(1, 13)),
            ALL_DOWS,
        ),
        (
            "*/15 */6 */10 */4 */2 foo",
            (0, 15, 30, 45),
            (0, 6, 12, 18),
            (1, 11, 21, 31),
            (1, 5, 9),
            (0, 2, 4, 6),
        ),
        ("5,1,5,3 1-3 31 12 7 foo", (1, 3, 5), (1, 2, 3), (31,), (12,), (0,)),
        ("0 0 * * 0-7 foo", (0,), (0,), ALL_DATES, tuple(range(1, 13)), ALL_DOWS),
        ("0 0 * * 6-7,1 foo", (0,), (0,), ALL_DATES, tuple(range(1, 13)), (0, 1, 6)),
        ("06 00 1 1 * foo", (6,), (0,), (1,), (1,), ALL_DOWS),
        ("*/999 * * * * foo", (0,), tuple(range(24)), ALL_DATES, tuple(range(1, 13)), ALL_DOWS),
        ("\t 1\u00a02\u30003\t4 5 foo  \r", (1,), (2,), (3,), (4,), (5,)),
    ],
)
def test_fields(line: str, minutes, hours, dates, months, dows) -> None:
    item = parse_one(line)
    assert (item.minutes, item.hours, item.dates, item.months, item.dows) == (
        minutes,
        hours,
        dates,
        months,
        dows,
    )
    assert item.task == item.identifier == "foo"
    assert item.payload is None
    assert item.options == CronItemOptions()


# Expected texts were produced by graphile-worker 0.17.3's parseCrontab.
@pytest.mark.parametrize(
    ("text", "message", "line", "column"),
    [
        ("60 * * * * foo", "Too large value '60' in minutes range in line 1 of crontab: expected values in the range 0-59.", 1, 1),
        ("\n\n* 24 * * * foo", "Too large value '24' in hours range in line 3 of crontab: expected values in the range 0-23.", 3, 3),
        ("* * 0 * * foo", "Too small value '0' in dates range in line 1 of crontab: expected values in the range 1-31.", 1, 5),
        ("* * * 13 * foo", "Too large value '13' in months range in line 1 of crontab: expected values in the range 1-12.", 1, 7),
        ("* * * * 8 foo", "Too large value '8' in days of week range in line 1 of crontab: expected values in the range 0-6.", 1, 9),
        ("* * * * 1,5-8 foo", "Too large value '8' in days of week range in line 1 of crontab: expected values in the range 0-6.", 1, 11),
        ("0-99 * * * * foo", "Too large value '60' in minutes range in line 1 of crontab: expected values in the range 0-59.", 1, 1),
        ("5-5 * * * * foo", "Invalid range '5-5' in minutes range in line 1 of crontab: destination is not larger than source", 1, 1),
        ("*/0 * * * * foo", "Invalid wildcard expression '*/0' in minutes range in line 1 of crontab: divisor '0' expected to be greater than zero", 1, 1),
        ("*/00 * * * * foo", "Invalid wildcard expression '*/00' in minutes range in line 1 of crontab: divisor '00' expected to be greater than zero", 1, 1),
        ("1-10/x * * * * foo", "Could not process line '1' of crontab: '1-10/x * * * * foo'; minute: 'x' is not a number", 1, 6),
        ("1-10/0 * * * * foo", "Invalid step '1-10/0' in minutes range in line 1 of crontab: step '0' expected to be greater than zero", 1, 1),
        ("10-1/2 * * * * foo", "Invalid range '10-1/2' in minutes range in line 1 of crontab: destination is not larger than source", 1, 1),
        ("0-60/5 * * * * foo", "Too large value '60' in minutes range in line 1 of crontab: expected values in the range 0-59.", 1, 1),
        ("* * JAN * * foo", "Unsupported syntax 'JAN' in dates range in line 1 of crontab: this doesn't appear to be a number, range or wildcard", 1, 5),
        ("* * * * 1,MON-JAN foo", "Unsupported syntax 'MON-JAN' in days of week range in line 1 of crontab: this doesn't appear to be a number, range or wildcard", 1, 11),
        ("1,,2 * * * * foo", "Unsupported syntax '' in minutes range in line 1 of crontab: this doesn't appear to be a number, range or wildcard", 1, 3),
        ("1111111111111111111111111 * * * * foo", "Too large value '1.1111111111111111e+24' in minutes range in line 1 of crontab: expected values in the range 0-59.", 1, 1),
        ("123456789012345678901 * * * * foo", "Too large value '123456789012345680000' in minutes range in line 1 of crontab: expected values in the range 0-59.", 1, 1),
        ("99999999999999999998-99999999999999999999 * * * * foo", "Invalid range '99999999999999999998-99999999999999999999' in minutes range in line 1 of crontab: destination is not larger than source", 1, 1),
        ("MON * * * * foo", "Unsupported syntax 'MON' in minutes range in line 1 of crontab: this doesn't appear to be a number, range or wildcard", 1, 1),
        ("# c\n  * * * * JAN foo", "Unsupported syntax 'JAN' in days of week range in line 2 of crontab: this doesn't appear to be a number, range or wildcard", 2, 11),
        ("* * * * MONDAY foo", "Could not process line '1' of crontab: '* * * * MONDAY foo'; day of week: 'MONDAY' is not a day name (SUN-SAT)", 1, 9),
        ("0 4 * * mon-fry report", "Could not process line '1' of crontab: '0 4 * * mon-fry report'; day of week: 'fry' is not a day name (SUN-SAT)", 1, 13),
        ("  0 4 * jam * report", "Could not process line '1' of crontab: '0 4 * jam * report'; month: 'jam' is not a month name (JAN-DEC)", 1, 9),
        ("0 4x * * * report", "Could not process line '1' of crontab: '0 4x * * * report'; hour: 'x' is not a number", 1, 4),
        ("0 4 1;2 * * report", "Could not process line '1' of crontab: '0 4 1;2 * * report'; day of month: ';' is not a number, '*', ',', '-' or '/'", 1, 6),
        ("0 4 * * report", "Could not process line '1' of crontab: '0 4 * * report'; expected five time fields then a task identifier, found 5 part(s)", 1, 15),
        ("* * * * *", "Could not process line '1' of crontab: '* * * * *'; expected five time fields then a task identifier, found 5 part(s)", 1, 10),
        ("* * * * * foo ?jobKey=a%00b", "Cron item on line 1 of crontab cannot be scheduled: the job key contains a NUL character (\\u0000), which PostgreSQL cannot store.", 1, 15),
        ("* * * * * foo ?jobKey=", "Cron item on line 1 of crontab cannot be scheduled: the job key is empty; PostgreSQL requires 1 to 512 characters.", 1, 15),
        ("* * * * * foo ?jobKey=" + "k" * 513, "Cron item on line 1 of crontab cannot be scheduled: the job key is 513 characters long; at most 512 fit.", 1, 15),
        ("* * * * * foo ?max=0", "Cron item on line 1 of crontab cannot be scheduled: max attempts 0 is outside 1..32767.", 1, 15),
        ("* * * * * foo ?priority=40000", "Cron item on line 1 of crontab cannot be scheduled: priority 40000 is outside -32768..32767.", 1, 15),
        ("* * * * * foo {s: 'x\\u0000y'}", "Cron item on line 1 of crontab cannot be scheduled: payload.s contains a NUL character (\\u0000), which PostgreSQL cannot store.", 1, 15),
        ("* * * * * foo {a: [1, NaN]}", "Cron item on line 1 of crontab cannot be scheduled: payload.a[1] is nan, which JSON cannot represent.", 1, 15),
        ("* * * * * foo ?skipDates=2024-02-30", "Options on line 1 of crontab contains invalid value for 'skipDates', value '2024-02-30' is not a list of YYYY-MM-DD dates.", 1, 15),
        ("@reboot foo", "Could not process line '1' of crontab: '@reboot foo'; '@reboot' is not a nickname kongtask knows (@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)", 1, 1),
        ("@Daily foo", "Could not process line '1' of crontab: '@Daily foo'; '@Daily' is not a nickname kongtask knows (@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)", 1, 1),
        ("@daily", "Could not process line '1' of crontab: '@daily'; a task identifier must follow '@daily'", 1, 7),
        ("* * * * * * foo", "Invalid command specification in line 1 of crontab.", 1, 11),
        ("* * * * * 1foo", "Invalid command specification in line 1 of crontab.", 1, 11),
        ("* * * * * foo {a:1} x", "Invalid command specification in line 1 of crontab.", 1, 11),
        ("* * * * * foo ?bar=1", f"Options on line 1 of crontab contains unsupported key 'bar'; {SUPPORTED}", 1, 15),
        ("* * * * * foo ?Id=x", f"Options on line 1 of crontab contains unsupported key 'Id'; {SUPPORTED}", 1, 15),
        ("* * * * * foo ?=x", f"Options on line 1 of crontab contains unsupported key ''; {SUPPORTED}", 1, 15),
        ("* * * * * foo ?5=x&id=$$", f"Options on line 1 of crontab contains unsupported key '5'; {SUPPORTED}", 1, 15),
        ("* * * * * foo ?id=a&id=b", "Options on line 1 of crontab contains invalid value for 'id', did you specify it more than once?", 1, 15),
        ("* * * * * foo ?max=x", "Options on line 1 of crontab contains invalid value for 'max', value 'x' is not compatible with this option.", 1, 15),
        ("* * * * * foo ?max=-1", "Options on line 1 of crontab contains invalid value for 'max', value '-1' is not compatible with this option.", 1, 15),
        ("* * * * * foo ?id=1a", "Options on line 1 of crontab contains invalid value for 'id', value '1a' is not compatible with this option.", 1, 15),
        ("* * * * * foo ?fill=1x", "Options on line 1 of crontab contains invalid value for 'fill', value '1x' is not compatible with this option.", 1, 15),
        ("* * * * * foo ?queue=a%20b", "Options on line 1 of crontab contains invalid value for 'queue', value 'a b' is not compatible with this option.", 1, 15),
        ("* * * * * foo ?jobKey=%0A", "Options on line 1 of crontab contains invalid value for 'jobKey', value '\n' is not compatible with this option.", 1, 15),
        ("* * * * * foo ?jobKeyMode=unsafe_dedupe", "Options on line 1 of crontab contains invalid value for 'jobKeyMode', value 'unsafe_dedupe' is not compatible with this option.", 1, 15),
        ("* * * * * foo ?priority=1.5", "Options on line 1 of crontab contains invalid value for 'priority', value '1.5' is not compatible with this option.", 1, 15),
        ("* * * * * foo ?tz=Mars/Olympus", "Options on line 1 of crontab contains invalid value for 'tz', value 'Mars/Olympus' is not a known time zone.", 1, 15),
        ("* * * * * foo ?tz=../etc/passwd", "Options on line 1 of crontab contains invalid value for 'tz', value '../etc/passwd' is not compatible with this option.", 1, 15),
        ("* * * * * foo\n* * * * * foo\n* * * * * foo\n* * * * * bar ?id=foo", "Invalid crontab; duplicate identifiers found: 'foo', 'foo', 'foo' - please use '?id=...' to specify unique identifiers for your cron items", 2, None),
        ("* * * * * b\n* * * * * a\r\n* * * * * x ?id=a", "Invalid crontab; duplicate identifiers found: 'a' - please use '?id=...' to specify unique identifiers for your cron items", 3, None),
    ],
)  # fmt: skip
def test_errors(text: str, message: str, line: int, column: int | None) -> None:
    with pytest.raises(CrontabError) as caught:
        parse_crontab(text)
    assert str(caught.value) == message
    assert caught.value.line == line
    assert caught.value.column == column


def test_json5_payloads() -> None:
    item = parse_one("0 4 * * * foo ?max=1 {a: 'x', b: [1, 2,], /* note */}")
    assert item.payload == {"a": "x", "b": [1, 2]}
    assert parse_one("* * * * * foo {'#': '# not a comment'}").payload == {"#": "# not a comment"}
    with pytest.raises(CrontabError) as caught:
        parse_crontab("\n* * * * * foo {a=1}")
    assert str(caught.value).startswith("Failed to parse JSON5 payload on line 2 of crontab: ")
    assert (caught.value.line, caught.value.column) == (2, 15)


def test_options() -> None:
    item = parse_one(
        "* * * * * foo ?id=my-id&fill=4w3d2h1m&max=3&queue=q:1&priority=-7&jobKey=k"
        "&jobKeyMode=preserve_run_at"
    )
    assert item.identifier == "my-id"
    assert item.options == CronItemOptions(
        backfill_period=timedelta(milliseconds=2685660000),
        max_attempts=3,
        queue_name="q:1",
        priority=-7,
        job_key="k",
        job_key_mode="preserve_run_at",
    )


@pytest.mark.parametrize(
    ("options", "job_key", "mode"),
    [
        ("jobKey=a+b%2Bc", "a b+c", "replace"),
        ("jobKey=%E9%zz%41", "\ufffd%zzA", "replace"),
        ("jobKey=%C3%A9", "\u00e9", "replace"),
        ("jobKey=a=b", "a=b", "replace"),
        ("&&jobKey=x&&", "x", "replace"),
        ("job%4Bey=x", "x", "replace"),
        ("jobKeyMode=replace", None, "replace"),
    ],
)
def test_option_decoding(options: str, job_key: str | None, mode: str | None) -> None:
    item = parse_one(f"* * * * * foo ?{options}")
    assert (item.options.job_key, item.options.job_key_mode) == (job_key, mode)


def test_only_the_first_thousand_option_parts_count() -> None:
    # Node's querystring stops after 1000 parts, so the unsupported key is never seen.
    assert parse_one("* * * * * foo ?" + "&" * 999 + "id=x&bogus=1").identifier == "x"


def test_nicknames_and_tz() -> None:
    expected = {
        "@yearly": ((0,), (0,), (1,), (1,), ALL_DOWS),
        "@annually": ((0,), (0,), (1,), (1,), ALL_DOWS),
        "@monthly": ((0,), (0,), (1,), tuple(range(1, 13)), ALL_DOWS),
        "@weekly": ((0,), (0,), ALL_DATES, tuple(range(1, 13)), (0,)),
        "@daily": ((0,), (0,), ALL_DATES, tuple(range(1, 13)), ALL_DOWS),
        "@midnight": ((0,), (0,), ALL_DATES, tuple(range(1, 13)), ALL_DOWS),
        "@hourly": ((0,), tuple(range(24)), ALL_DATES, tuple(range(1, 13)), ALL_DOWS),
    }
    for nickname, fields in expected.items():
        item = parse_one(f"{nickname} foo ?tz=Europe/Berlin {{x: 1}}")
        assert (item.minutes, item.hours, item.dates, item.months, item.dows) == fields
        assert item.tz == "Europe/Berlin"
        assert item.payload == {"x": 1}
    with pytest.raises(CrontabError, match="Invalid command specification in line 1"):
        parse_crontab("@daily 1foo")


def test_dom_dow_restriction_flags() -> None:
    assert not parse_one("* * 1-31 * 0-7 foo").dom_restricted
    assert not parse_one("* * */1 * 1-7 foo").dow_restricted
    item = parse_one("* * 1-30 * 1-6 foo")
    assert item.dom_restricted and item.dow_restricted


def test_programmatic_items() -> None:
    item = parse_cron_item(CronItem(task="send", match="0 4 * * 1", options={"maxAttempts": 2}))
    assert (item.identifier, item.payload, item.options.max_attempts) == ("send", {}, 2)
    assert item.dows == (1,)
    mapped = parse_cron_item(
        {"task": "t", "match": "@hourly", "identifier": "i", "payload": {"a": 1},
         "options": {"backfillPeriod": 60_000, "job_key": "k", "tz": "UTC"}}
    )  # fmt: skip
    assert mapped.options.backfill_period == timedelta(minutes=1)
    assert mapped.options.job_key_mode == "replace"
    assert mapped.minutes == (0,)
    assert parse_cron_item({"task": "t", "match": "* * * * *", "pattern": ""}).task == "t"
    assert mapped.condition_timeout_s == 5.0  # the default deadline
    timed = parse_cron_item(CronItem("t", "* * * * *", condition=bool, condition_timeout_s=2))
    assert timed.condition_timeout_s == 2.0


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"task": "t", "pattern": "* * * * *"}, "Please rename the 'pattern' property to 'match'"),
        ({"task": "t", "match": 5}, "Invalid 'match' configuration"),
        ({"task": "t", "match": " * * * * *"}, "Invalid cron pattern ' * * * * *' in parseCronItem call"),
        ({"task": "t", "match": "@reboot"}, "Invalid cron pattern '@reboot' in parseCronItem call; '@reboot' is not a nickname kongtask knows (@yearly, @annually, @monthly, @weekly, @daily, @midnight, @hourly)"),
        ({"task": "t", "match": "0 4 * * mon-fry"}, "Invalid cron pattern '0 4 * * mon-fry' in parseCronItem call; day of week: 'fry' is not a day name (SUN-SAT)"),
        ({"task": "t", "match": "0 4 * *"}, "Invalid cron pattern '0 4 * *' in parseCronItem call; expected five time fields, found 4 part(s)"),
        ({"task": "t", "match": "* 25 * * *"}, "Too large value '25' in hours range in parseCronItem call: expected values in the range 0-23."),
        ({"task": "", "match": "* * * * *"}, "Invalid 'task' in parseCronItem call: expected a non-empty string"),
        ({"task": "t", "match": "* * * * *", "options": {"maxAttempts": -1}}, "Invalid value for option 'max_attempts' in parseCronItem call: -1 is not compatible with this option."),
        ({"task": "t", "match": "* * * * *", "options": {"job_key_mode": "unsafe_dedupe"}}, "Invalid value for option 'job_key_mode' in parseCronItem call: 'unsafe_dedupe' is not compatible with this option."),
        ({"task": "t", "match": "* * * * *", "options": {"tz": "Nowhere/Land"}}, "Invalid value for option 'tz' in parseCronItem call: 'Nowhere/Land' is not compatible with this option (not a known time zone)."),
        ({"task": "t", "match": "* * * * *", "options": {"colour": 1}}, "Unsupported option 'colour' in parseCronItem call; supported options are: backfill_period, max_attempts, queue_name, priority, job_key, job_key_mode, tz, no_overlap, skip_dates."),
        (CronItem(task="t", match="* * * * *", options=CronItemOptions(queue_name="a b")), "Invalid value for option 'queue_name' in parseCronItem call: 'a b' is not compatible with this option."),
        ({"task": "t", "match": "* * * * *", "condition_timeout_s": 5}, "Invalid 'condition_timeout_s' in parseCronItem call: there is no condition to time"),
        (CronItem("t", "* * * * *", condition=bool, condition_timeout_s=0), "Invalid 'condition_timeout_s' in parseCronItem call: expected seconds, more than 0 and at most 30, got 0"),
        (CronItem("t", "* * * * *", condition=bool, condition_timeout_s=30.5), "Invalid 'condition_timeout_s' in parseCronItem call: expected seconds, more than 0 and at most 30, got 30.5"),
        (CronItem("t", "* * * * *", condition=bool, condition_timeout_s=float("nan")), "Invalid 'condition_timeout_s' in parseCronItem call: expected seconds, more than 0 and at most 30, got nan"),
        ({"task": "t", "match": "* * * * *", "condition": bool, "condition_timeout_s": True}, "Invalid 'condition_timeout_s' in parseCronItem call: expected seconds, more than 0 and at most 30, got True"),
    ],
)  # fmt: skip
def test_programmatic_errors(item: object, message: str) -> None:
    with pytest.raises(CrontabError) as caught:
        parse_cron_item(item)  # type: ignore[arg-type]
    assert str(caught.value) == message


def test_parse_cron_items_names_the_index() -> None:
    with pytest.raises(CrontabError) as caught:
        parse_cron_items([CronItem("a", "* * * * *"), CronItem("b", "* * 32 * *")])
    assert str(caught.value) == (
        "Too large value '32' in dates range in item 1 of parseCronItems call:"
        " expected values in the range 1-31."
    )
    assert caught.value.column == 5


def test_validate_pattern() -> None:
    validate_pattern("*/5 * * * 1-5")
    validate_pattern("@weekly")
    with pytest.raises(CrontabError, match="Invalid cron pattern 'x' in validate_pattern call"):
        validate_pattern("x")


def test_time_phrase() -> None:
    assert time_phrase_to_timedelta("4w3d2h1m") == timedelta(milliseconds=2685660000)
    assert time_phrase_to_timedelta("90s") == timedelta(seconds=90)
    assert time_phrase_to_timedelta("9" * 30 + "w") == timedelta.max
    with pytest.raises(CrontabError, match="Invalid time phrase '1h2', did not understand '2'"):
        time_phrase_to_timedelta("1h2")


_CRONTAB_ALPHABET = st.sampled_from(
    [*list("0123456789*/,- \t\r\n#@?&=%+{}[]:'\"aAzZ_"), "\xa0", "\u2028", "\ufeff", "\x1c"]
)
_PIECES = st.sampled_from(
    ["* * * * * foo", " ?id=", "&max=", "?tz=", "Europe/Berlin", "{a:1}", "{", "}", "\n", "%",
     "%E9", "@daily", "@hourly ", "jobKey", "fill=1d", "60", "*/0"]
)  # fmt: skip


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_PIECES, st.text(_CRONTAB_ALPHABET, max_size=8), st.text(max_size=4))))
def test_fuzz_only_crontab_errors(pieces: list[str]) -> None:
    text = "".join(pieces)
    try:
        items = parse_crontab(text)
    except CrontabError:
        return
    assert all(isinstance(item, ParsedCronItem) for item in items)


def _field(low: int, high: int) -> st.SearchStrategy[str]:
    number = st.integers(low, high).map(str)
    span = st.tuples(st.integers(low, high - 1), st.integers(1, high - low)).map(
        lambda p: f"{p[0]}-{min(high, p[0] + p[1])}"
    )
    star = st.one_of(st.just("*"), st.integers(1, high + 1).map(lambda n: f"*/{n}"))
    return st.lists(st.one_of(number, span, star), min_size=1, max_size=3).map(",".join)


PATTERNS = st.tuples(_field(0, 59), _field(0, 23), _field(1, 31), _field(1, 12), _field(0, 7)).map(
    " ".join
)

_OPTIONS = st.builds(
    CronItemOptions,
    backfill_period=st.integers(0, 10**7).map(lambda s: timedelta(seconds=s)),
    max_attempts=st.none() | st.integers(1, 30000),
    queue_name=st.none() | st.from_regex(r"[-a-zA-Z0-9_:]{1,10}", fullmatch=True),
    priority=st.none() | st.integers(-1000, 1000),
    job_key=st.none() | st.text(st.characters(exclude_categories=["Cs", "Zl", "Zp"],
                                              exclude_characters="\r\n\x00"), min_size=1, max_size=10),
    job_key_mode=st.none() | st.sampled_from(["replace", "preserve_run_at"]),
    tz=st.none() | st.sampled_from(["Europe/Berlin", "America/New_York", "UTC"]),
    no_overlap=st.booleans(),
    skip_dates=st.lists(st.dates(), max_size=3).map(lambda d: tuple(sorted(set(d)))),
)  # fmt: skip
_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=6)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


@settings(max_examples=300)
@given(
    pattern=PATTERNS,
    task=st.from_regex(r"[_a-zA-Z][_a-zA-Z0-9:/_-]{0,8}", fullmatch=True),
    identifier=st.none() | st.from_regex(r"[_a-zA-Z][-_a-zA-Z0-9]{0,8}", fullmatch=True),
    options=_OPTIONS,
    payload=st.none() | st.dictionaries(_TEXT, _JSON, max_size=3),
)
def test_round_trip(pattern, task, identifier, options, payload) -> None:
    item = parse_cron_item(
        {"task": task, "match": pattern, "identifier": identifier, "options": options, "payload": payload}
    )  # fmt: skip
    line = render_cron_item(item)
    again = parse_one(line)
    assert again == item, line
