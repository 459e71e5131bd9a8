"""Cancelling a job: what the request looks like and how a pool hears about it.

``WorkerUtils.cancel_job`` runs one statement (``cancel_job`` in
``db/sql/jobs.sql``): a job nobody holds is failed for good at once; a job a
pool holds is left to that pool, which is told by ``NOTIFY`` on
:data:`CANCEL_CHANNEL` with a JSON payload naming the schema, the job, the
holding pool and the reason. The pool's listener hands the notice to the
executors, which set the job's abort event and fail it for good when its
handler ends (or at its timeout). Node graphile-worker pools do not listen on
this channel: a job one of them holds runs on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from kongtask.errors import InvalidJobError, cancel_message

__all__ = [
    "CANCEL_CHANNEL",
    "CANCEL_OUTCOMES",
    "MAX_REASON_LENGTH",
    "CancelNotice",
    "CancelResult",
    "cancel_params",
    "cancel_result",
    "check_cancel",
    "read_notice",
]

#: The channel a cancel of a held job is announced on (kongtask pools LISTEN to it).
CANCEL_CHANNEL = "kongtask:cancel"

#: A reason travels in the NOTIFY payload (at most 8000 bytes): keep it short.
MAX_REASON_LENGTH = 1000

CancelOutcome = Literal["cancelled", "signalled", "missing", "finished"]

#: What a cancel did: failed a waiting job for good, told the pool running it,
#: found no job (never existed, or completed and deleted), or found the job
#: already failed for good.
CANCEL_OUTCOMES: tuple[CancelOutcome, ...] = ("cancelled", "signalled", "missing", "finished")

_DESCRIPTIONS = {
    "cancelled": "cancelled (it was waiting; failed permanently)",
    "signalled": "signalled pool {pool} to abort it (it is running; it fails permanently "
    "when its handler ends)",
    "missing": "no such job (it never existed, or it completed)",
    "finished": "already failed permanently; nothing to cancel",
}


@dataclass(frozen=True, slots=True)
class CancelResult:
    """What ``WorkerUtils.cancel_job`` did to one job (``outcome`` in :data:`CANCEL_OUTCOMES`).

    ``pool_id`` is the pool that held the job when it was signalled.
    """

    job_id: int
    outcome: CancelOutcome
    pool_id: str | None = None

    def describe(self) -> str:
        """One line for people: the job and what happened to it."""
        return f"job {self.job_id}: " + _DESCRIPTIONS[self.outcome].format(pool=self.pool_id)


@dataclass(frozen=True, slots=True)
class CancelNotice:
    """A cancel a pool heard of: the job it holds and the ``last_error`` to fail it with."""

    job_id: int
    message: str


def check_cancel(job_id: Any, reason: Any) -> None:
    """Refuse a job id that is not a positive bigint, or a reason that is not short text."""
    if isinstance(job_id, bool) or not isinstance(job_id, int) or not 0 < job_id < 2**63:
        raise InvalidJobError(
            f"cancel_job: the job id must be a positive integer, got {job_id!r}",
            field="job_id",
            value=job_id,
        )
    if reason is None:
        return
    if not isinstance(reason, str):
        raise InvalidJobError(
            f"cancel_job: reason must be a string or None, got {type(reason).__name__}",
            field="reason",
            value=reason,
        )
    if len(reason) > MAX_REASON_LENGTH or "\x00" in reason:
        raise InvalidJobError(
            f"cancel_job: reason must be at most {MAX_REASON_LENGTH} characters with no NUL "
            f"character (got {len(reason)} characters)",
            field="reason",
            value=reason[:80],
        )


def cancel_params(job_id: Any, reason: Any, schema: str) -> dict[str, Any]:
    """The ``cancel_job`` statement's parameters, after :func:`check_cancel`."""
    check_cancel(job_id, reason)
    return {"id": job_id, "message": cancel_message(reason), "schema": schema}


def cancel_result(job_id: int, row: Sequence[Any] | None) -> CancelResult:
    """What the ``cancel_job`` statement's one row (outcome, holding pool) says."""
    assert row is not None  # the statement always returns one row
    outcome, pool_id = row
    return CancelResult(job_id, outcome, pool_id if outcome == "signalled" else None)


def read_notice(data: dict[str, Any], schema: str, pool_id: str) -> CancelNotice | None:
    """The notice in a decoded ``kongtask:cancel`` payload if it is for this pool, else None."""
    if data.get("schema") != schema or data.get("pool") != pool_id:
        return None
    job_id = data.get("id")
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        return None
    message = data.get("message")
    if not isinstance(message, str) or not message.startswith("cancelled"):
        return None
    return CancelNotice(job_id, message)
