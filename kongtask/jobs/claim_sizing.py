"""Claim sizing: how many claimed jobs a pool keeps buffered beyond its running ones.

A buffered job is locked to this pool, so a pool whose handlers are slow must
not hoard: a buffer of 64 jobs of 100 ms at concurrency 16 is 0.4 s of work
that another pool with idle slots could have started at once. A pool of fast
jobs, on the other hand, needs a deep buffer so that its executors never
wait for the next claim. The rule, in :func:`buffer_target`: buffer enough
jobs to keep every executor busy for one claim's lead time (a claim round trip,
the completer's write that frees the pool's count, and a margin), and no more::

    target = clamp(ceil(concurrency * lead_s / average_run_s), floor, capacity)

With 100 ms handlers, 16 slots and a few milliseconds of lead that is the
floor (4 jobs, about 25 ms of work); with no-op handlers it is the whole
buffer, as before this rule. The claimer asks for the idle slots plus the
target minus what is buffered (:meth:`FetchPolicy.ask`).

Before any handler time is known (a pool that just started) the target is
the floor: a pool restarted into a backlog of slow jobs must not take a
whole buffer of them while other pools have slots free. A drain of fast
jobs loses one small first claim: the first outcome written sets the
measure, and with it the whole buffer.

:class:`ClaimSizing` keeps the moving averages (handler run time from the
completer's ``Finished`` reports, claim round trip from the claimer); it is
pure arithmetic, fed by the claimer, so its rows are table-tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ClaimSizing", "buffer_floor", "buffer_target"]

#: Added to the measured lead time: scheduling, the listener's notice, a busy core.
LEAD_MARGIN_S = 0.010

#: The weight of each new measurement in the moving averages.
SMOOTHING = 0.2


def buffer_floor(concurrency: int, capacity: int) -> int:
    """The fewest jobs the target asks to buffer: a quarter of the slots, 1 to 4.

    A few jobs ready cover a claim that is slower than usual without holding
    much back: at 16 slots of 100 ms jobs, 4 jobs are 25 ms of work.
    """
    return max(1, min(4, concurrency // 4, capacity))


def buffer_target(
    concurrency: int, capacity: int, average_run_s: float | None, lead_s: float
) -> int:
    """How many jobs to keep buffered beyond the running ones (1 to ``capacity``).

    ``average_run_s`` is the handlers' average run time (None: not measured
    yet, which gives the floor); ``lead_s`` how long it takes
    from a job's end until a claim it makes room for brings the next one.
    """
    floor = buffer_floor(concurrency, capacity)
    if average_run_s is None:
        return floor
    if average_run_s <= 0.0:
        return capacity
    wanted = concurrency * lead_s / average_run_s
    if wanted >= capacity:
        return capacity
    return max(floor, min(capacity, math.ceil(wanted)))


@dataclass
class ClaimSizing:
    """Moving averages of the handlers' run time and the claim's round trip."""

    concurrency: int
    capacity: int
    #: Average handler run time in seconds (None until an outcome with a run time).
    average_run_s: float | None = None
    #: Average claim round trip in seconds (None until the first claim answered).
    average_claim_s: float | None = None

    def note_runs(self, total_s: float, count: int) -> None:
        """Fold in ``count`` handler runs that took ``total_s`` seconds together."""
        if count <= 0:
            return
        mean = max(0.0, total_s) / count
        if self.average_run_s is None:
            self.average_run_s = mean
        else:
            # A batch of many runs weighs more than a batch of one, up to the whole.
            weight = 1.0 - (1.0 - SMOOTHING) ** count
            self.average_run_s += weight * (mean - self.average_run_s)

    def note_claim(self, seconds: float) -> None:
        """Fold in one claim's round trip."""
        seconds = max(0.0, seconds)
        if self.average_claim_s is None:
            self.average_claim_s = seconds
        else:
            self.average_claim_s += SMOOTHING * (seconds - self.average_claim_s)

    @property
    def lead_s(self) -> float:
        """From a job's end to the next job claimed for its slot: the completer's write
        (taken to cost about a claim), the claim, and :data:`LEAD_MARGIN_S`."""
        return 2.0 * (self.average_claim_s or 0.0) + LEAD_MARGIN_S

    def target(self) -> int:
        """The buffer target now (see :func:`buffer_target`)."""
        return buffer_target(self.concurrency, self.capacity, self.average_run_s, self.lead_s)
