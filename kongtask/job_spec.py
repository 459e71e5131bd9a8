"""What a caller may ask for when adding a job, checked before any database work.

Every check here mirrors a constraint the database would enforce (or a value
graphile-worker's functions would reject), so bad input fails fast, with the
argument named, and nothing is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from json.encoder import encode_basestring_ascii as _encode_basestring_ascii
from typing import Any

from kongtask.db.timestamps import unwritable
from kongtask.errors import InvalidJobError
from kongtask.validate import check_int, check_text, job_error

__all__ = ["JOB_KEY_MODES", "JobSpec", "encode_payload"]

try:  # CPython's accelerator behind json.dumps (absent on some other interpreters)
    from json.encoder import c_make_encoder as _c_make_encoder  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    _c_make_encoder = None

#: Values ``job_key_mode`` accepts (``unsafe_dedupe`` only for single jobs).
JOB_KEY_MODES = ("replace", "preserve_run_at", "unsafe_dedupe")

_SMALLINT_MIN, _SMALLINT_MAX = -32768, 32767
_MAX_IDENTIFIER_LENGTH = 128
_MAX_KEY_LENGTH = 512


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job to add, validated on construction.

    ``payload`` must be JSON-serialisable (``None`` means ``{}``); ``run_at``
    must be timezone-aware and within the years 1 to 9999 in UTC (``None``
    means now, on the database's clock);
    ``flags`` are stored as ``{flag: true}`` for ``forbidden_flags`` to match.
    """

    identifier: str
    payload: Any = None
    queue_name: str | None = None
    run_at: datetime | None = None
    max_attempts: int | None = None
    job_key: str | None = None
    job_key_mode: str | None = None
    priority: int | None = None
    flags: Sequence[str] | None = field(default=None)
    #: The payload as JSON text, encoded once when the spec is checked.
    payload_json: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_text(
            "identifier", self.identifier, max_length=_MAX_IDENTIFIER_LENGTH, error=job_error
        )
        object.__setattr__(self, "payload_json", encode_payload(self.payload))
        if self.queue_name is not None:
            check_text(
                "queue_name", self.queue_name, max_length=_MAX_IDENTIFIER_LENGTH, error=job_error
            )
        if self.run_at is not None:
            if not isinstance(self.run_at, datetime):
                raise InvalidJobError(
                    f"run_at must be a datetime, got {type(self.run_at).__name__}",
                    field="run_at",
                    value=self.run_at,
                )
            if self.run_at.utcoffset() is None:
                raise InvalidJobError(
                    f"run_at must be timezone-aware (got naive {self.run_at.isoformat()}); "
                    "use datetime.now(timezone.utc) or attach a tzinfo",
                    field="run_at",
                    value=self.run_at,
                )
            # PostgreSQL would store it, but nobody could load it back.
            reason = unwritable(self.run_at)
            if reason is not None:
                raise InvalidJobError(f"run_at: {reason}", field="run_at", value=self.run_at)
        if self.max_attempts is not None:
            check_int("max_attempts", self.max_attempts, 1, _SMALLINT_MAX, error=job_error)
        if self.job_key is not None:
            check_text("job_key", self.job_key, max_length=_MAX_KEY_LENGTH, error=job_error)
        if self.job_key_mode is not None and self.job_key_mode not in JOB_KEY_MODES:
            raise InvalidJobError(
                f"job_key_mode must be one of {', '.join(map(repr, JOB_KEY_MODES))}, "
                f"got {self.job_key_mode!r}",
                field="job_key_mode",
                value=self.job_key_mode,
            )
        if self.priority is not None:
            check_int("priority", self.priority, _SMALLINT_MIN, _SMALLINT_MAX, error=job_error)
        if self.flags is not None:
            if isinstance(self.flags, str | bytes) or not isinstance(self.flags, Iterable):
                raise InvalidJobError(
                    f"flags must be a list of strings, got {self.flags!r}",
                    field="flags",
                    value=self.flags,
                )
            flags = tuple(self.flags)
            for flag in flags:
                check_text("flags", flag, error=job_error)
            object.__setattr__(self, "flags", flags)

    @classmethod
    def coerce(cls, spec: JobSpec | Mapping[str, Any], index: int | None = None) -> JobSpec:
        """Accept a ``JobSpec`` or a mapping of its fields (for ``add_jobs``); the
        mapping's ``identifier`` may be a declared :class:`kongtask.Task`."""
        if isinstance(spec, JobSpec):
            return spec
        if not isinstance(spec, Mapping):
            where = f" at index {index}" if index is not None else ""
            raise InvalidJobError(
                f"job spec{where} must be a JobSpec or a mapping, got {type(spec).__name__}",
                field="specs",
                value=spec,
            )
        if not _SPEC_FIELDS.issuperset(spec):
            unknown = set(spec) - _SPEC_FIELDS
            where = f" at index {index}" if index is not None else ""
            raise InvalidJobError(
                f"job spec{where} has unknown field(s): {', '.join(sorted(unknown))}",
                field="specs",
                value=spec,
            )
        try:
            identifier = spec.get("identifier")
            if identifier is not None and not isinstance(identifier, str):
                # A declared task in place of its name: its defaults apply. (Imported
                # here: kongtask.declared builds on this module.)
                from kongtask.declared import Task

                if isinstance(identifier, Task):
                    fields = {name: value for name, value in spec.items() if name != "identifier"}
                    return identifier.spec(**fields)
            return cls(**spec)
        except InvalidJobError as error:
            if index is None:
                raise
            # add_jobs: say which spec, keep naming the field.
            raise InvalidJobError(
                f"job spec at index {index}: {error}", field=error.field, value=error.value
            ) from None

    def json_spec_text(self) -> str:
        """This spec as the JSON text of one ``job_spec`` record, reusing ``payload_json``.

        Fields left unset are omitted (``json_populate_recordset`` makes them
        null), and the payload is not encoded a second time: for ``add_jobs`` of
        many small jobs, encoding was most of the client's work.
        """
        parts = ['{"identifier":', json.dumps(self.identifier), ',"payload":', self.payload_json]
        if self.queue_name is not None:
            parts += [',"queue_name":', json.dumps(self.queue_name)]
        if self.run_at is not None:
            parts += [',"run_at":"', self.run_at.isoformat(), '"']
        if self.max_attempts is not None:
            parts += [',"max_attempts":', str(self.max_attempts)]
        if self.job_key is not None:
            parts += [',"job_key":', json.dumps(self.job_key)]
        if self.priority is not None:
            parts += [',"priority":', str(self.priority)]
        if self.flags is not None:
            parts += [',"flags":', json.dumps(list(self.flags))]
        parts.append("}")
        return "".join(parts)


_SPEC_FIELDS = frozenset(
    name for name, spec_field in JobSpec.__dataclass_fields__.items() if spec_field.init
)


def encode_payload(payload: Any) -> str:
    """Serialise a payload to JSON text, or raise ``InvalidJobError`` naming the problem.

    NaN and infinities are refused because PostgreSQL's json type rejects them;
    strings (values or keys) holding NUL or lone surrogates because PostgreSQL
    cannot turn them into text or jsonb: ``add_jobs``, job-key batch merging
    and any ``payload->>'key'`` would fail on such a job later.
    """
    if payload is None:
        return "{}"
    try:
        text = _encode_compact(payload)
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidJobError(
            f"payload is not JSON-serialisable: {exc}", field="payload", value=payload
        ) from exc
    # json.dumps escapes every non-ASCII character, so both faults show as
    # escapes; only then is the payload walked to find (and name) the string.
    if "\\u0000" in text or _SURROGATE_ESCAPE.search(text):
        _check_payload_strings(payload)
    return text


def _not_serialisable(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _encode_compact(payload: Any) -> str:
    """``json.dumps(payload, allow_nan=False, separators=(",", ":"))``, the same text.

    ``json.dumps`` with arguments builds a ``JSONEncoder`` on every call, which
    cost more than the encoding of a small payload; this calls the C encoder
    that ``JSONEncoder`` itself uses (with a fresh circular-reference memo per
    call, so threads never share one), and falls back to ``json.dumps`` where
    the C accelerator is missing.
    """
    if _c_make_encoder is None:
        return json.dumps(payload, allow_nan=False, separators=(",", ":"))
    encoder = _c_make_encoder(
        {}, _not_serialisable, _encode_basestring_ascii, None, ":", ",", False, False, False
    )
    return "".join(encoder(payload, 0))


_SURROGATE_ESCAPE = re.compile(r"\\ud[89a-f]", re.IGNORECASE)


def _check_payload_strings(payload: Any) -> None:
    """Raise ``InvalidJobError`` naming the first string PostgreSQL could not store."""
    stack: list[tuple[Any, str]] = [(payload, "payload")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_payload_text(value, path, payload)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str):
                    _check_payload_text(key, f"a key of {path}", payload)
                stack.append((item, f"{path}[{key!r}]"))
        elif isinstance(value, list | tuple):
            stack.extend((item, f"{path}[{index}]") for index, item in enumerate(value))


def _check_payload_text(text: str, path: str, payload: Any) -> None:
    if "\x00" in text:
        problem = f"a NUL character (U+0000) at position {text.index(chr(0))}"
    else:
        try:
            text.encode("utf-8")
            return
        except UnicodeEncodeError as exc:
            problem = f"a lone surrogate (U+{ord(text[exc.start]):04X}) at position {exc.start}"
    if len(path) > 200:
        path = path[:200] + "…"
    raise InvalidJobError(
        f"payload cannot be stored: {path} contains {problem}; PostgreSQL text and jsonb "
        "cannot hold it",
        field="payload",
        value=payload,
    )
