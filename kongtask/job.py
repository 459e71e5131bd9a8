"""The job record: one row of the jobs table as Python sees it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["Job"]


@dataclass(frozen=True, slots=True)
class Job:
    """A job as stored in ``_private_jobs``, plus the identifier of its task.

    ``attempts`` counts the attempts started so far (a job being run is on
    attempt ``attempts``); a job is permanently failed once
    ``attempts >= max_attempts`` and it is not locked.
    """

    id: int
    job_queue_id: int | None
    task_id: int
    task_identifier: str
    payload: Any
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    key: str | None
    locked_at: datetime | None
    locked_by: str | None
    revision: int
    flags: dict[str, bool] | None
    is_available: bool

    @classmethod
    def from_row(cls, row: Mapping[str, Any], task_identifier: str | None = None) -> Job:
        """Build a job from a database row (a mapping of column name to value).

        ``task_identifier`` overrides (or supplies) the row's own column, for
        queries that return bare ``_private_jobs`` rows.
        """
        values: dict[str, Any] = {name: row.get(name) for name in _FIELD_NAMES}
        if task_identifier is not None:
            values["task_identifier"] = task_identifier
        return cls(**values)

    @classmethod
    def from_values(cls, values: Sequence[Any]) -> Job:
        """Build a job from its field values in declaration order, without checks.

        The claim path builds hundreds of jobs per statement; the frozen
        dataclass ``__init__`` costs several times as much as setting the
        slots directly, which this does. ``values`` must hold every field.
        """
        return _build(values)

    @property
    def is_permanently_failed(self) -> bool:
        """True when the job has used up its attempts and will not run again."""
        return self.attempts >= self.max_attempts and self.locked_at is None


_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(Job))


def _make_builder() -> Callable[[Sequence[Any]], Job]:
    """Compile ``_build``: one slot setter call per field, unrolled (as dataclasses do).

    Unrolled it costs half of a loop over the setters.
    """
    names = {f"_set_{name}": getattr(Job, name).__set__ for name in _FIELD_NAMES}
    lines = ["def _build(values):", "    job = _new(_Job)"]
    lines += [f"    _set_{name}(job, values[{i}])" for i, name in enumerate(_FIELD_NAMES)]
    lines.append("    return job")
    namespace: dict[str, Any] = {"_new": object.__new__, "_Job": Job, **names}
    exec("\n".join(lines), namespace)  # a fixed source built from the field names
    builder: Callable[[Sequence[Any]], Job] = namespace["_build"]
    return builder


_build = _make_builder()
