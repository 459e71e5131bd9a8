"""The EventPublisher: delivers events to blinker receivers, off the hot path.

Any thread may :meth:`EventBus.emit`; the event joins an ordered inbox and the
publisher actor is woken by one message only when it was idle, so a burst of
per-job events costs one actor message, not one each. Receivers are called one
by one, each guarded: a receiver that raises is logged and the rest still get
the event; a slow receiver only delays later events, never claiming or running
jobs. Events with no receivers connected are dropped at the source.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import pykka
from blinker import NamedSignal

from kongtask.runtime.actor import Actor, ErrorPolicy
from kongtask.runtime.message import Fieldless
from kongtask.runtime.parts import ActorPart, Part

__all__ = ["Drain", "EventBus", "EventPublisher"]

logger = logging.getLogger(__name__)


class Drain(Fieldless):
    """Deliver every queued event (an ``ask`` returns once they are delivered)."""

    __slots__ = ()


_DRAIN = Drain()


class EventPublisher(Actor):
    """Sends queued events to their receivers, in the order they were emitted."""

    # Each receiver is guarded in _deliver; nothing else here can fail.
    error_policy = ErrorPolicy.LOG_AND_CONTINUE

    def __init__(self, bus: EventBus) -> None:
        super().__init__()
        self._bus = bus

    def handle(self, message: Drain) -> Any:
        match message:
            case Drain():
                self._bus.deliver_all()
                return True
        return None

    def on_stop(self) -> None:
        self._bus.deliver_all()


class EventBus:
    """The emitting side: cheap to call from any thread; sender is the Runner."""

    def __init__(self, sender: Any) -> None:
        self._sender = sender
        self._inbox: deque[tuple[NamedSignal, dict[str, Any]]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._actor: pykka.ActorRef[EventPublisher] | None = None

    def start(self) -> None:
        """Start the publisher actor (events emitted before this wait in the inbox)."""
        self._actor = EventPublisher.start(self)
        with self._lock:
            if self._inbox and not self._scheduled:
                self._scheduled = True
                self._actor.tell(_DRAIN)

    def emit(self, signal: NamedSignal, /, **payload: Any) -> None:
        """Queue ``signal`` with ``payload`` for delivery (no-op without receivers)."""
        if not signal.receivers:
            return
        self._inbox.append((signal, payload))
        with self._lock:
            if self._scheduled or self._actor is None:
                return
            self._scheduled = True
        self._actor.tell(_DRAIN)

    def flush(self, timeout_s: float | None = 10.0) -> None:
        """Wait until everything emitted so far has been delivered."""
        actor = self._actor
        if actor is None or not actor.is_alive():
            self.deliver_all()
            return
        try:
            actor.ask(_DRAIN, timeout=timeout_s)
        except pykka.ActorDeadError:
            self.deliver_all()

    def parts(self) -> list[Part]:
        """The publisher actor as a part (none before start or after stop)."""
        actor = self._actor
        return [ActorPart("publisher", actor)] if actor is not None else []

    def stop(self) -> None:
        """Deliver what is queued, then stop the publisher actor."""
        actor, self._actor = self._actor, None
        if actor is not None:
            try:
                actor.stop(timeout=30.0)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        self.deliver_all()

    def deliver_all(self) -> None:
        """Deliver every queued event (runs on the publisher thread)."""
        inbox = self._inbox
        while True:
            with self._lock:
                if not inbox:
                    self._scheduled = False
                    return
            while inbox:
                try:
                    signal, payload = inbox.popleft()
                except IndexError:
                    break
                self._deliver(signal, payload)

    def _deliver(self, signal: NamedSignal, payload: dict[str, Any]) -> None:
        for receiver in list(signal.receivers_for(self._sender)):
            try:
                receiver(self._sender, **payload)
            except Exception:
                logger.exception(
                    "Emitting %s raised an error in receiver %r - this should never happen",
                    signal.name,
                    receiver,
                )
