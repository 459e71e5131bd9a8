"""OS signal handling for a Runner started from the main thread (opt-in).

The handler does nothing but put the signal (an ``OsSignal``) on the host's control queue (a
``queue.SimpleQueue``, safe in a signal handler) and chain to whatever handler
was there before, so a host's own handlers keep working. Handlers are put
back as they were when the Runner stops.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from kongtask.runtime.control import OsSignal

__all__ = ["SignalHandlers", "can_install"]

logger = logging.getLogger(__name__)

#: SIGINT/SIGTERM drain (a second one forces); SIGHUP asks for a crontab reload.
HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def can_install() -> bool:
    """Signal handlers can only be installed from the main thread of the main interpreter."""
    return threading.current_thread() is threading.main_thread()


class SignalHandlers:
    """Installs handlers that forward signals to ``control``; :meth:`remove` undoes it."""

    def __init__(self, control: queue.SimpleQueue[Any]) -> None:
        self._control = control
        self._previous: dict[int, _Handler] = {}
        self._active = False

    def install(self) -> None:
        """Install for SIGINT, SIGTERM and SIGHUP (call from the main thread)."""
        for signum in HANDLED:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)
        self._active = True

    def remove(self) -> None:
        """Put the previous handlers back (from the main thread); elsewhere just go inert."""
        self._active = False
        if not self._previous or not can_install():
            return
        for signum, previous in self._previous.items():
            if signal.getsignal(signum) == self._handle:
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._active:
            self._control.put(OsSignal(signum))
        previous = self._previous.get(signum)
        if (callable(previous) and previous is not signal.default_int_handler) or (
            not self._active and previous is signal.default_int_handler
        ):
            previous(signum, frame)
