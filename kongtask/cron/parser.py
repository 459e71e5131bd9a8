"""Parse crontab text and programmatic cron items into ``ParsedCronItem`` values.

The grammar, the accepted and rejected lines and every error message follow
graphile-worker 0.17.3 (five UTC fields, a task identifier, ``?options``, a JSON5
payload). kongtask-only extensions, which a Node worker cannot read: the nicknames
``@yearly``/``@annually``, ``@monthly``, ``@weekly``, ``@daily``/``@midnight`` and
``@hourly`` in place of the five fields, and the ``tz=Area/City`` option.

Whatever string it is given, the parser raises only ``CrontabError``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import json5

from kongtask.cron._jscompat import JS_DOT, JS_WS, js_number_text, js_parse_int, js_trim
from kongtask.cron.options import (
    kongtask_option_keys,
    options_from_mapping,
    parse_crontab_options,
)
from kongtask.cron.storable import unstorable_reason
from kongtask.cron.types import (
    DEFAULT_CONDITION_TIMEOUT_S,
    FIELDS,
    MAX_CONDITION_TIMEOUT_S,
    Condition,
    CronField,
    CronItem,
    CronItemOptions,
    ParsedCronItem,
)
from kongtask.errors import CrontabError

__all__ = [
    "NICKNAMES",
    "parse_cron_item",
    "parse_cron_items",
    "parse_crontab",
    "validate_pattern",
]

logger = logging.getLogger(__name__)

#: kongtask-only nicknames and the five fields each stands for.
NICKNAMES: dict[str, str] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_S = f"[{JS_WS}]"
_MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_NAME_ALTERNATIVES = "|".join(_MONTH_NAMES + _DAY_NAMES)
# graphile-worker's field is [0-9*/,-]+; kongtask also reads month and weekday names
# there (any case), and nothing else, so other lines keep graphile-worker's message.
_F = f"((?:[0-9*/,-]|(?i:{_NAME_ALTERNATIVES}))+)"
_TIME_PARTS = re.compile(f"{_F}{_S}+{_F}{_S}+{_F}{_S}+{_F}{_S}+{_F}")
_LINE_PARTS = re.compile(f"{_F}{_S}+{_F}{_S}+{_F}{_S}+{_F}{_S}+{_F}{_S}+({JS_DOT}*)")
_NICKNAME_LINE = re.compile(f"(@[a-z]+){_S}+({JS_DOT}*)")
_COMMAND = re.compile(
    f"([_a-zA-Z][_a-zA-Z0-9:/_-]*)(?:{_S}+\\?([^{JS_WS}]+))?(?:{_S}+(\\{{{JS_DOT}*\\}}))?"
)
_NUMBER = re.compile(r"[0-9]+")
_RANGE = re.compile(r"([0-9]+)-([0-9]+)")
_WILDCARD = re.compile(r"\*(?:/([0-9]+))?")
# kongtask extensions: a value or name, an optional "-end", an optional "/step".
_EXTENDED = re.compile(r"([0-9]+|[A-Za-z]{3})(?:-([0-9]+|[A-Za-z]{3}))?(?:/([0-9]+))?")
_LEADING_WS = re.compile(f"[{JS_WS}]*")

Fields = tuple[tuple[int, ...], ...]


class _PartError(Exception):
    """A bad part of a field; ``offset`` is its position within the field text."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


def _name_value(token: str, spec: CronField, *, range_end: bool) -> float | None:
    """A number token's value, a month or weekday name's number, or None if not valid here."""
    if token.isdigit():
        return js_parse_int(token)
    lowered = token.lower()
    if spec.label == "months" and lowered in _MONTH_NAMES:
        return float(_MONTH_NAMES.index(lowered) + 1)
    if spec.label == "days of week" and lowered in _DAY_NAMES:
        value = _DAY_NAMES.index(lowered)
        return 7.0 if range_end and value == 0 else float(value)  # FRI-SUN
    return None


def _parse_field(
    text: str, spec: CronField, location: str, notes: list[str] | None = None
) -> tuple[int, ...]:
    """Parse one comma list of numbers, ranges and wildcards into sorted unique values.

    graphile-worker's forms first, with its messages; then kongtask's extensions
    (``1-10/2``, ``5/10``, ``JAN``, ``mon-fri``), each noted in ``notes``.
    """
    low, high = spec.low, spec.high
    wrap = spec.label == "days of week"  # 7 is Sunday too
    loc = f"{spec.label} range in {location}"
    numbers: set[int] = set()
    offset = 0
    for part in text.split(","):
        part_offset = offset
        offset += len(part) + 1

        def add(number: float, part_offset: int = part_offset) -> None:
            wrapped = low if wrap and number == high + 1 else number
            expected = f"expected values in the range {low}-{high}."
            if wrapped > high:
                raise _PartError(
                    f"Too large value '{js_number_text(number)}' in {loc}: {expected}", part_offset
                )
            if wrapped < low:
                raise _PartError(
                    f"Too small value '{js_number_text(number)}' in {loc}: {expected}", part_offset
                )
            numbers.add(int(wrapped))

        def add_range(
            start: float, end: float, step: float, part: str = part, part_offset: int = part_offset
        ) -> None:
            if end <= start:
                raise _PartError(
                    f"Invalid range '{part}' in {loc}: destination is not larger than source",
                    part_offset,
                )
            if step > 1 and (end > high + 1 or (end == high + 1 and not wrap)):
                add(end)  # raises: a stepped range names its bad end, not a step past it
            value = start
            while value <= end:  # add() raises within a few steps past ``high``
                add(value)
                value += step

        if _NUMBER.fullmatch(part):
            add(js_parse_int(part))
        elif match := _RANGE.fullmatch(part):
            add_range(js_parse_int(match.group(1)), js_parse_int(match.group(2)), 1.0)
        elif match := _WILDCARD.fullmatch(part):
            divisor = js_parse_int(match.group(1)) if match.group(1) else 1.0
            if divisor < 1:
                raise _PartError(
                    f"Invalid wildcard expression '{part}' in {loc}: divisor"
                    f" '{match.group(1)}' expected to be greater than zero",
                    part_offset,
                )
            numbers.update(range(low, high + 1, int(min(divisor, high + 1))))
        elif (match := _EXTENDED.fullmatch(part)) and (
            start := _name_value(match.group(1), spec, range_end=False)
        ) is not None:
            end_text, step_text = match.group(2), match.group(3)
            end = None if end_text is None else _name_value(end_text, spec, range_end=True)
            if end_text is not None and end is None:
                raise _PartError(_unsupported(part, loc), part_offset)
            step = js_parse_int(step_text) if step_text is not None else 1.0
            if step < 1:
                raise _PartError(
                    f"Invalid step '{part}' in {loc}: step '{step_text}' expected to be"
                    " greater than zero",
                    part_offset,
                )
            if step_text is None and end is None:
                add(start)  # a name
            elif end is None:
                add(start)  # 5/10: from 5 to the field's maximum
                numbers.update(range(int(start), high + 1, int(min(step, high + 1))))
            else:
                add_range(start, end, min(step, high + 2))
            if notes is not None:
                notes.append(f"'{part}' in {spec.label}")
        else:
            raise _PartError(_unsupported(part, loc), part_offset)
    return tuple(sorted(numbers))


def _unsupported(part: str, loc: str) -> str:
    return (
        f"Unsupported syntax '{part}' in {loc}: this doesn't appear to be a number,"
        " range or wildcard"
    )


def _parse_fields(
    match: re.Match[str],
    location: str,
    line: int | None,
    column_base: int,
    notes: list[str] | None = None,
) -> Fields:
    """Parse the five captured fields; ``column_base`` is the 1-based column of the match."""
    parsed = []
    for index, spec in enumerate(FIELDS, start=1):
        try:
            parsed.append(_parse_field(match.group(index), spec, location, notes))
        except _PartError as error:
            column = column_base + match.start(index) + error.offset
            raise CrontabError(error.message, line=line, column=column, source=location) from None
    return tuple(parsed)


# What each field is called in the detail of a "Could not process line" error.
_FIELD_NAMES = ("minute", "hour", "day of month", "month", "day of week")
_WORD = re.compile(f"[^{JS_WS}]+")
_FIELD_TOKEN = re.compile(r"[0-9]+|[A-Za-z]+|.", re.DOTALL)
_ONE_FIELD = re.compile(_F)


def _token_problem(token: str, field: int) -> str:
    """Why ``token`` (the first bad piece of a field) cannot be read there."""
    if token.isalpha():
        if field == 3:
            return f"'{token}' is not a month name (JAN-DEC)"
        if field == 4:
            return f"'{token}' is not a day name (SUN-SAT)"
        return f"'{token}' is not a number"
    return f"'{token}' is not a number, '*', ',', '-' or '/'"


def _diagnose(text: str, *, command: bool) -> tuple[str, int] | None:
    """Say which field (and which token in it) keeps a line or pattern from parsing.

    Returns the detail and the token's 0-based offset in ``text``, or None when no
    single token is to blame. ``command``: a task identifier must follow the fields.
    """
    words = list(_WORD.finditer(text))
    if words and words[0].group().startswith("@"):
        nickname = words[0].group()
        if nickname not in NICKNAMES:
            known = ", ".join(NICKNAMES)
            return f"'{nickname}' is not a nickname kongtask knows ({known})", words[0].start()
        if command and len(words) == 1:
            return f"a task identifier must follow '{nickname}'", words[0].end()
        return None
    # A line with too few words most likely lacks a field, not the task: its
    # last word is then read as the task.
    fields = words[:5] if not command or len(words) > 5 else words[:-1]
    for index, word in enumerate(fields):
        if _ONE_FIELD.fullmatch(word.group()):
            continue
        for piece in _FIELD_TOKEN.finditer(word.group()):
            if not _ONE_FIELD.fullmatch(piece.group()):
                problem = _token_problem(piece.group(), index)
                return f"{_FIELD_NAMES[index]}: {problem}", word.start() + piece.start()
        return None  # pragma: no cover - a field whose every piece is valid is valid
    end = words[-1].end() if words else 0
    if command and len(words) < 6:
        return (
            f"expected five time fields then a task identifier, found {len(words)} part(s)",
            end,
        )
    if len(words) != 5 and not command:
        return f"expected five time fields, found {len(words)} part(s)", end
    return None


def _fields_of_pattern(pattern: str, source: str, notes: list[str] | None = None) -> Fields:
    """Parse a programmatic pattern (five fields or a kongtask nickname)."""
    text = NICKNAMES.get(pattern, pattern)
    match = _TIME_PARTS.fullmatch(text)
    if match is None:
        found = _diagnose(pattern, command=False)
        detail = f"; {found[0]}" if found else ""
        column = found[1] + 1 if found else None
        raise CrontabError(
            f"Invalid cron pattern '{pattern}' in {source}{detail}", column=column, source=source
        )
    if notes is not None and text is not pattern:
        notes.append(f"nickname '{pattern}'")
    try:
        return _parse_fields(match, source, None, 1, notes)
    except CrontabError as error:
        if text is not pattern:  # a nickname's fields cannot be wrong, but be safe
            error.column = None
        raise


def validate_pattern(pattern: str) -> None:
    """Raise ``CrontabError`` unless ``pattern`` is five valid fields or a nickname."""
    if not isinstance(pattern, str):
        raise CrontabError(f"Invalid cron pattern {pattern!r}: expected a string")
    _fields_of_pattern(pattern, "validate_pattern call")


_NOT_JSON = object()
_SURROGATE = re.compile("[\ud800-\udfff]")


def _join_surrogates(value: Any) -> Any:
    """Join ``"\\ud83d\\ude00"``-style escape pairs, which the json5 package leaves split."""
    if isinstance(value, str):
        if not _SURROGATE.search(value):
            return value
        units = value.encode("utf-16-le", "surrogatepass")
        return units.decode("utf-16-le", "surrogatepass")
    if isinstance(value, list):
        return [_join_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_join_surrogates(k): _join_surrogates(v) for k, v in value.items()}
    return value


def _parse_payload(text: str | None, line_number: int, column: int) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        # Plain JSON is JSON5 too, and the C parser is ~100x faster than json5's.
        payload = json.loads(text)
    except Exception:
        payload = _NOT_JSON
    try:
        if payload is _NOT_JSON:
            payload = json5.loads(text)
    except Exception as error:  # json5 raises ValueError, RecursionError, ...
        raise CrontabError(
            f"Failed to parse JSON5 payload on line {line_number} of crontab: {error}",
            line=line_number,
            column=column,
        ) from None
    payload = _join_surrogates(payload)
    if not isinstance(payload, dict):  # pragma: no cover - the grammar demands {...}
        raise CrontabError(
            f"Failed to parse JSON5 payload on line {line_number} of crontab: not an object",
            line=line_number,
            column=column,
        )
    return payload


def _parse_line(raw: str, line: str, line_number: int) -> ParsedCronItem:
    """Parse one trimmed, non-comment line; columns count from the raw line."""
    base = len(_LEADING_WS.match(raw).group(0)) + 1  # type: ignore[union-attr]
    location = f"line {line_number} of crontab"
    notes: list[str] = []
    nickname = _NICKNAME_LINE.fullmatch(line)
    if nickname is not None and nickname.group(1) in NICKNAMES:
        fields_match = _TIME_PARTS.fullmatch(NICKNAMES[nickname.group(1)])
        assert fields_match is not None
        fields = _parse_fields(fields_match, location, line_number, base)
        notes.append(f"nickname '{nickname.group(1)}'")
        command, command_column = nickname.group(2), base + nickname.start(2)
    else:
        match = _LINE_PARTS.fullmatch(line)
        if match is None:
            found = _diagnose(line, command=True)
            raise CrontabError(
                f"Could not process line '{line_number}' of crontab: '{line}'"
                + (f"; {found[0]}" if found else ""),
                line=line_number,
                column=base + found[1] if found else base,
            )
        fields = _parse_fields(match, location, line_number, base, notes)
        command, command_column = match.group(6), base + match.start(6)
    parts = _COMMAND.fullmatch(command)
    if parts is None:
        raise CrontabError(
            f"Invalid command specification in line {line_number} of crontab.",
            line=line_number,
            column=command_column,
        )
    task, options_text, payload_text = parts.groups()
    options_column = command_column + parts.start(2) - 1 if options_text else None
    options, identifier = parse_crontab_options(options_text, line_number, options_column)
    notes.extend(f"option '{key}'" for key in kongtask_option_keys(options_text))
    payload_column = command_column + parts.start(3)
    payload = _parse_payload(payload_text, line_number, payload_column)
    item = _build(task, identifier or task, fields, options, payload, line_number, tuple(notes))
    problem = unstorable_reason(item)
    if problem is not None:
        column = payload_column if problem.startswith(("payload", "a key in")) else options_column
        raise CrontabError(
            f"Cron item on line {line_number} of crontab cannot be scheduled: {problem}.",
            line=line_number,
            column=column,
        )
    return item


def _build(
    task: str,
    identifier: str,
    fields: Fields,
    options: CronItemOptions,
    payload: dict[str, Any] | None,
    line_number: int | None,
    extensions: tuple[str, ...] = (),
    condition: Condition | None = None,
    condition_timeout_s: float = DEFAULT_CONDITION_TIMEOUT_S,
) -> ParsedCronItem:
    minutes, hours, dates, months, dows = fields
    return ParsedCronItem(
        identifier=identifier,
        task=task,
        minutes=minutes,
        hours=hours,
        dates=dates,
        months=months,
        dows=dows,
        options=options,
        payload=payload,
        source_line=line_number,
        extensions=extensions,
        condition=condition,
        condition_timeout_s=condition_timeout_s,
        origin="crontab" if line_number is not None else "code",
    )


def parse_crontab(text: str) -> list[ParsedCronItem]:
    """Parse crontab text; blank lines and lines starting with ``#`` are skipped.

    Identifiers (the ``id`` option, else the task) must be unique across the file.
    """
    if not isinstance(text, str):
        raise CrontabError(f"A crontab must be a string, not {type(text).__name__}")
    items: list[ParsedCronItem] = []
    for line_number, raw in enumerate(re.split(r"\r?\n", text), start=1):
        line = js_trim(raw)
        if not line or line.startswith("#"):
            continue
        items.append(_parse_line(raw, line, line_number))
    identifiers = sorted(item.identifier for item in items)
    duplicates = [ident for i, ident in enumerate(identifiers) if i and ident == identifiers[i - 1]]
    if duplicates:
        # Point at the second line that uses the first duplicated identifier.
        first = [item.source_line for item in items if item.identifier == duplicates[0]][1]
        listed = "', '".join(duplicates)
        raise CrontabError(
            f"Invalid crontab; duplicate identifiers found: '{listed}' - please"
            " use '?id=...' to specify unique identifiers for your cron items",
            line=first,
        )
    logger.debug("parsed %d cron items", len(items))
    return items


def _js_truthy(value: Any) -> bool:
    """JavaScript truthiness (``[]`` and ``{}`` are truthy there, ``NaN`` is not)."""
    if value is None or value is False:
        return False
    if isinstance(value, int | float):
        return value == value and value != 0
    if isinstance(value, str):
        return value != ""
    return True


def parse_cron_item(
    item: CronItem | Mapping[str, Any], source: str = "parseCronItem call"
) -> ParsedCronItem:
    """Validate one programmatic item (a ``CronItem`` or a mapping with the same keys).

    Unlike graphile-worker, options are checked by the crontab rules (see
    :func:`kongtask.cron.options.options_from_mapping`); there is no duplicate check.
    """
    task: Any
    match: Any
    options: Any
    if isinstance(item, CronItem):
        task, match, options = item.task, item.match, item.options
        payload: Any = {} if item.payload is None else item.payload
        identifier: Any = item.identifier
        condition: Any = item.condition
        timeout: Any = item.condition_timeout_s
    elif isinstance(item, Mapping):
        if _js_truthy(item.get("pattern")):
            raise CrontabError("Please rename the 'pattern' property to 'match'", source=source)
        task, match, options = item.get("task"), item.get("match"), item.get("options")
        payload = item.get("payload", {})
        identifier = item.get("identifier")
        condition = item.get("condition")
        timeout = item.get("condition_timeout_s")
    else:
        raise CrontabError(
            f"Invalid cron item in {source}: expected a CronItem or a mapping, got"
            f" {type(item).__name__}",
            source=source,
        )
    if not isinstance(match, str):
        raise CrontabError("Invalid 'match' configuration", source=source)
    notes: list[str] = []
    fields = _fields_of_pattern(match, source, notes)
    if not isinstance(task, str) or not task:
        raise CrontabError(
            f"Invalid 'task' in {source}: expected a non-empty string", source=source
        )
    identifier = task if identifier is None else identifier
    if not isinstance(identifier, str) or not identifier:
        raise CrontabError(
            f"Invalid 'identifier' in {source}: expected a non-empty string", source=source
        )
    if payload is not None and not isinstance(payload, Mapping):
        raise CrontabError(f"Invalid 'payload' in {source}: expected a mapping", source=source)
    if condition is not None and not callable(condition):
        raise CrontabError(
            f"Invalid 'condition' in {source}: expected a callable taking a Firing",
            source=source,
        )
    if timeout is not None:
        _check_condition_timeout(timeout, condition, source)
    parsed_options = options_from_mapping(options, source)
    parsed = _build(
        task,
        identifier,
        fields,
        parsed_options,
        None if payload is None else dict(payload),
        None,
        tuple(notes),
        condition,
        DEFAULT_CONDITION_TIMEOUT_S if timeout is None else float(timeout),
    )
    problem = unstorable_reason(parsed)
    if problem is not None:
        raise CrontabError(f"Cron item in {source} cannot be scheduled: {problem}.", source=source)
    return parsed


def _check_condition_timeout(timeout: Any, condition: Any, source: str) -> None:
    """A deadline in (0, MAX_CONDITION_TIMEOUT_S] seconds, given with a condition."""
    if condition is None:
        raise CrontabError(
            f"Invalid 'condition_timeout_s' in {source}: there is no condition to time",
            source=source,
        )
    number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if not number or not 0 < timeout <= MAX_CONDITION_TIMEOUT_S:
        raise CrontabError(
            f"Invalid 'condition_timeout_s' in {source}: expected seconds, more than 0 and"
            f" at most {MAX_CONDITION_TIMEOUT_S:g}, got {timeout!r}",
            source=source,
        )


def parse_cron_items(items: Sequence[CronItem | Mapping[str, Any]]) -> list[ParsedCronItem]:
    """Validate a list of programmatic items; errors name the item's index."""
    return [
        parse_cron_item(item, f"item {index} of parseCronItems call")
        for index, item in enumerate(items)
    ]
