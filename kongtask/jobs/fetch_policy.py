"""The fetch policy: when the claimer claims, as a small pure state machine.

Every reason to claim (or not) arrives here as a typed event: what the last
claim answered, the local buffer running low, an insert notice, a named queue
released by a finished job, the poll timer, a start-up or join wake-up, and
shutdown. :meth:`FetchPolicy.step` folds the event into the state and says
whether to claim now. It does no I/O and reads no clock, so every rule is a
row in a table test (``tests/unit/test_fetch_policy.py``), and the claimer is
the only thing that acts on it.

The rules:

* A claim that filled all it asked for (its own rows, not jobs adopted from a
  lost answer) means more is waiting: claim again when the buffer falls to
  the low-water mark.
* A short or empty claim took everything runnable then: claim again only when
  something new may be runnable (an insert notice, a released queue, a poll,
  a wake-up), and then as soon as the buffer has room. While a caller waits
  for idleness (``Runner.join``, run-once mode) an empty buffer after a short
  claim also claims, and the last held job finishing confirms with a claim.
* News that arrives while a claim is in flight is remembered and acted on
  right after its answer, never dropped.
* With a :class:`~kongtask.jobs.claim_sizing.ClaimSizing` (every worker has
  one unless ``size_claims=False``), the buffer is kept to its target rather
  than the whole capacity: a claim asks for the idle slots plus the target
  minus what is buffered (:meth:`FetchPolicy.ask`), "room" means fewer than
  the target buffered, and the low-water mark is half the target. News alone
  does not make a sized pool without an idle slot claim: it would only buffer
  the new jobs while another pool may start them now; the next ``Finished``
  does. So a pool of slow jobs holds
  about one claim's lead time of work beyond its running jobs, and the
  rest stays in the database for pools with idle slots; a pool of fast jobs
  has a target of the whole buffer and claims as it always did.
* While the pool holds ``max_held`` jobs or more (claimed, not yet recorded:
  buffered, running, or waiting for the completer) it does not claim; the
  completer's ``Finished`` reports release it. Without this bound a worker
  whose handlers outrun the database claims without limit, and the outcomes
  waiting to be written grow until a shutdown cannot flush them in time.
* After shutdown nothing claims again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from kongtask.jobs.claim_sizing import ClaimSizing

__all__ = [
    "Action",
    "Answer",
    "BufferLow",
    "ClaimAnswered",
    "ClaimFailed",
    "FetchEvent",
    "FetchPolicy",
    "Finished",
    "InsertNotified",
    "PollDue",
    "Recheck",
    "Returned",
    "Shutdown",
    "Wake",
]


class Action(enum.Enum):
    """What the claimer should do after an event."""

    CLAIM = "claim"
    WAIT = "wait"


class Answer(enum.Enum):
    """What the last claim said about the database."""

    #: It got all it asked for: more is probably waiting.
    MORE = "more"
    #: It got some, fewer than asked: it took everything runnable then.
    SHORT = "short"
    #: Nothing was runnable (also the state before the first claim).
    NONE = "none"


class ClaimAnswered(NamedTuple):
    """A claim returned ``claimed`` rows of its own, having asked for ``asked``, in ``took_s``.

    ``seen`` is how many candidate rows the claim examined before keeping
    one job per named queue; when it reached ``asked`` more may be waiting
    even if fewer were kept. ``adopted`` jobs (locked by a claim whose answer
    was lost) are held and buffered like the others but say nothing about
    whether more is waiting.
    """

    claimed: int
    asked: int
    seen: int = -1
    adopted: int = 0
    took_s: float | None = None


class ClaimFailed(NamedTuple):
    """The claim statement failed for good (after its retries); the poll will try again."""


class BufferLow(NamedTuple):
    """An executor saw the buffer fall to the level the claimer asked to hear about."""


class InsertNotified(NamedTuple):
    """A ``jobs:insert`` notice (or a LISTEN reconnect, after which notices may be missed)."""


class PollDue(NamedTuple):
    """The poll timer fired: look again (jobs whose ``run_at`` passed send no notice)."""


class Wake(NamedTuple):
    """Look again now: start-up, a join request, the lock sweep, a finished claim error."""


class Finished(NamedTuple):
    """``jobs`` held jobs were recorded as completed or failed.

    ``released`` says some of them held a named queue, whose next job may be
    runnable now. ``timed`` of them had a handler run, ``run_s`` seconds in all
    (the claim sizing's measure).
    """

    jobs: int
    released: bool = False
    run_s: float = 0.0
    timed: int = 0


class Returned(NamedTuple):
    """``jobs`` buffered jobs were given back unstarted (TTL or a failed hand-over)."""

    jobs: int


class Recheck(NamedTuple):
    """Decide again with nothing new (the claimer's note to itself between two claims)."""


class Shutdown(NamedTuple):
    """The pool is stopping: never claim again."""


FetchEvent = (
    ClaimAnswered
    | ClaimFailed
    | BufferLow
    | InsertNotified
    | PollDue
    | Wake
    | Finished
    | Returned
    | Recheck
    | Shutdown
)

_NEWS = (InsertNotified, PollDue, Wake)


@dataclass
class FetchPolicy:
    """The state the claim decision depends on (one per claimer)."""

    #: How many jobs the local buffer holds at most.
    capacity: int
    #: Claim again after a full claim once the buffer holds this many or fewer.
    low_water: int
    #: Run-once mode: always look until a claim comes back empty with nothing held.
    once: bool = False
    #: Claim nothing while this many jobs are held (0: four times the capacity).
    max_held: int = 0
    answer: Answer = Answer.NONE
    #: Something may have become runnable since the last claim started.
    news: bool = False
    in_flight: bool = False
    stopping: bool = False
    #: Jobs claimed and not yet recorded as finished or returned.
    held: int = 0
    #: Callers waiting for idleness (``Runner.join``).
    joins: int = 0
    #: Sizes claims from the measured handler time (None: always fill the buffer).
    sizing: ClaimSizing | None = None

    @property
    def limit(self) -> int:
        """How many jobs the buffer should hold at most now (the sizing's target)."""
        sizing = self.sizing
        if sizing is None:
            return self.capacity
        return min(self.capacity, sizing.target())

    def ask(self, buffered: int) -> int:
        """How many jobs a claim should ask for with ``buffered`` jobs in the buffer.

        The idle slots (the concurrency less the held jobs not buffered, an
        estimate: outcomes not yet written count as running) plus the buffer's
        target less what it holds, never more than the buffer has room for.
        """
        room = self.capacity - buffered
        sizing = self.sizing
        if sizing is None:
            return room
        limit = self.limit
        if limit >= self.capacity:
            return room
        return max(0, min(room, self._idle_slots(buffered) + limit - buffered))

    def _idle_slots(self, buffered: int) -> int:
        """Slots free now, by the count of held jobs (unwritten outcomes count as running)."""
        assert self.sizing is not None
        return max(0, self.sizing.concurrency - max(0, self.held - buffered))

    def _busy(self, limit: int, buffered: int) -> bool:
        """A sized pool with no idle slot: news is for pools that can start the jobs now.

        A claim on news would only buffer them behind running jobs while another
        pool may have slots free; the news is kept, and the next ``Finished``
        (a slot freed) decides again.
        """
        return limit < self.capacity and self._idle_slots(buffered) == 0

    def _low_level(self, limit: int) -> int:
        """The low-water mark for ``limit``: half a sized buffer, else the configured mark."""
        if limit >= self.capacity:
            return self.low_water
        return min(self.low_water, limit // 2)

    @property
    def eager(self) -> bool:
        """True while someone waits to learn that nothing runnable is left."""
        return self.once or self.joins > 0

    @property
    def idle(self) -> bool:
        """The last claim found nothing and this pool holds nothing: all runnable work is done.

        Only meaningful right after a :class:`ClaimAnswered` (the claimer checks it then).
        """
        return self.answer is Answer.NONE and not self.in_flight and self.held <= 0

    def claim_started(self) -> None:
        """Record that a claim is on its way (news from now on is news for the next one)."""
        self.in_flight = True
        self.news = False

    def step(self, event: FetchEvent, buffered: int) -> Action:
        """Fold ``event`` into the state; ``buffered`` is the buffer's length now."""
        if isinstance(event, ClaimAnswered):
            self.in_flight = False
            if event.took_s is not None and self.sizing is not None:
                self.sizing.note_claim(event.took_s)
            self.held += event.claimed + event.adopted
            seen = max(event.seen, event.claimed)
            if seen >= event.asked > 0:
                self.answer = Answer.MORE
            elif event.claimed > 0:
                self.answer = Answer.SHORT
            else:
                self.answer = Answer.NONE
        elif isinstance(event, ClaimFailed):
            # Retrying at once would hammer a failing database: the poll retries.
            self.in_flight = False
            self.answer = Answer.NONE
            self.news = False
        elif isinstance(event, _NEWS):
            self.news = True
        elif isinstance(event, Finished):
            self.held -= event.jobs
            if self.sizing is not None:
                self.sizing.note_runs(event.run_s, event.timed)
            if event.released:
                self.news = True
            elif self.eager and self.held <= 0:
                # The last held job is done: confirm with a claim that nothing
                # (a job its handler added, say) is left.
                self.news = True
        elif isinstance(event, Returned):
            # Given back because nobody started them: claiming them straight
            # back would defeat the point, so wait for news or the poll.
            self.held -= event.jobs
            self.answer = Answer.NONE
        elif isinstance(event, Shutdown):
            self.stopping = True
        return self.decide(buffered)

    def __post_init__(self) -> None:
        if self.max_held <= 0:
            self.max_held = 4 * self.capacity

    def decide(self, buffered: int) -> Action:
        """Whether to claim now, given the state and the buffer's length."""
        limit = self.limit
        if self.stopping or self.in_flight or buffered >= limit:
            return Action.WAIT
        if self.held >= self.max_held:
            return Action.WAIT  # a Finished report will decide again
        if self.answer is Answer.MORE:
            return Action.CLAIM if buffered <= self._low_level(limit) else Action.WAIT
        if self.news:
            return Action.WAIT if self._busy(limit, buffered) else Action.CLAIM
        if self.answer is Answer.SHORT and self.eager and buffered == 0:
            return Action.CLAIM
        return Action.WAIT

    def wake_level(self, buffered: int = 0) -> int:
        """The buffer length at or below which an executor must send :class:`BufferLow`.

        ``-1`` means "don't tell me": nothing an executor does can change
        the decision (the next claim waits for news, or one is in flight, or
        only a freed slot can). ``buffered`` is the buffer's length now.
        """
        if self.stopping or self.in_flight or self.held >= self.max_held:
            return -1
        limit = self.limit
        if self.answer is Answer.MORE:
            return self._low_level(limit)
        if self.news:
            # A busy pool's pops free no slot: the completer's Finished decides.
            return -1 if self._busy(limit, buffered) else limit - 1
        if self.answer is Answer.SHORT and self.eager:
            return 0
        return -1
