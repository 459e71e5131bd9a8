"""The messages a Host's control loop reads: everything that can end or reload a run.

They are frozen dataclasses, dispatched with ``match`` on one thread, so what
ends a run is a value with a type rather than a string beside a payload.
"""

from __future__ import annotations

from dataclasses import dataclass

from kongtask.runtime.message import Fieldless

__all__ = [
    "ControlMessage",
    "Fatal",
    "Kill",
    "OsSignal",
    "Reload",
    "ShutdownRequested",
    "Stop",
    "WorkersStopped",
]


class Stop(Fieldless):
    """``stop()``: drain gracefully."""

    __slots__ = ()


class Kill(Fieldless):
    """``kill()``: stop now, or cut a graceful drain short."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class OsSignal:
    """An OS signal caught by the host's handlers (SIGHUP reloads, the others drain)."""

    signum: int


@dataclass(frozen=True, slots=True)
class Fatal:
    """A part failed beyond recovery; ``message`` is what the log says."""

    message: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class ShutdownRequested:
    """A part asks for a graceful end (run-once finished, a breaking migration)."""

    message: str


class Reload(Fieldless):
    """Reload what can be reloaded (the crontab), as SIGHUP does."""

    __slots__ = ()


class WorkersStopped(Fieldless):
    """Every executor thread has ended: wakes a drain that waits for them."""

    __slots__ = ()


ControlMessage = Stop | Kill | OsSignal | Fatal | ShutdownRequested | Reload | WorkersStopped
