"""OpenTelemetry tracing for kongtask (the ``otel`` extra), off until :func:`instrument`.

Once instrumented, every ``add_job``/``add_jobs`` in the process (WorkerUtils,
the module functions, a handler's helpers; sync and async) and every minute a
cron scheduler writes is a producer span,
and each job a Runner runs is a consumer span in the same trace: the enqueuing
span's W3C ``traceparent`` travels with the job as one of its ``flags``
(``kongtask_trace=00-…``), so the payload a handler sees is untouched and a Node
graphile-worker sharing the queue ignores it (flags only matter to
``forbidden_flags``, and no one forbids this one). The run span is opened and
closed by the Runner's ``job:start`` and ``job:complete`` events, which no
Runner emits while nothing listens (before ``instrument`` and after
``uninstrument``); its times are those of the events' delivery, a little
after the handler's own. The claim wait (from the
job's ``run_at`` to its claim, on the database's clock) is the run span's
``kongtask.job.wait_s`` attribute, and on request a span of its own.
"""

from __future__ import annotations

import threading
from contextvars import Token
from dataclasses import replace
from types import TracebackType
from typing import Any, NamedTuple, Self

from blinker import ANY
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from kongtask import events
from kongtask._version import __version__
from kongtask.job import Job
from kongtask.job_spec import JobSpec
from kongtask.jobs import enqueue

__all__ = ["TRACE_FLAG_PREFIX", "Instrumentation", "instrument", "job_context"]

#: A job's flag holding the enqueuing span's W3C traceparent, after this prefix.
TRACE_FLAG_PREFIX = "kongtask_trace="

_PROPAGATOR = TraceContextTextMapPropagator()
_SYSTEM = "kongtask"


def job_context(job: Job) -> otel_context.Context:
    """The trace context a job was enqueued in (empty if none), for spans a handler opens.

    ``tracer.start_as_current_span("step", context=job_context(helpers.job))``
    puts a handler's own spans in the enqueuer's trace.
    """
    traceparent = _traceparent(job)
    if traceparent is None:
        return otel_context.Context()
    return _PROPAGATOR.extract({"traceparent": traceparent}, context=otel_context.Context())


def _traceparent(job: Job) -> str | None:
    for flag in job.flags or ():
        if flag.startswith(TRACE_FLAG_PREFIX):
            return flag[len(TRACE_FLAG_PREFIX) :]
    return None


class _Enqueue(NamedTuple):
    """One traced enqueue: its span and the context token to detach at its end."""

    span: Span
    attached: Token[otel_context.Context]


class _EnqueueTracing:
    """The enqueue observer: a producer span per call, its context carried in each job's flags."""

    def __init__(self, tracer: Tracer, propagate: bool) -> None:
        self._tracer = tracer
        self._propagate = propagate

    def start(self, operation: str, specs: list[JobSpec]) -> tuple[list[JobSpec], object]:
        identifiers = sorted({spec.identifier for spec in specs})
        span = self._tracer.start_span(
            f"kongtask.{operation} {', '.join(identifiers)}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": _SYSTEM,
                "messaging.operation": "publish",
                "kongtask.task_identifiers": identifiers,
                "kongtask.job.count": len(specs),
            },
        )
        current = trace.set_span_in_context(span)
        if self._propagate:
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier, context=current)
            flag = TRACE_FLAG_PREFIX + carrier["traceparent"]
            specs = [_with_flag(spec, flag) for spec in specs]
        return specs, _Enqueue(span, otel_context.attach(current))

    def end(self, token: object, jobs: list[Job] | None, error: BaseException | None) -> None:
        assert isinstance(token, _Enqueue)
        span = token.span
        otel_context.detach(token.attached)
        if jobs is not None:
            span.set_attribute("kongtask.job.ids", [job.id for job in jobs])
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()


def _with_flag(spec: JobSpec, flag: str) -> JobSpec:
    kept = [f for f in spec.flags or () if not f.startswith(TRACE_FLAG_PREFIX)]
    return replace(spec, flags=(*kept, flag))


class Instrumentation:
    """What :func:`instrument` switched on; :meth:`uninstrument` (or ``with``) switches it off."""

    def __init__(
        self, runner: Any, tracer: Tracer, propagate: bool, claim_wait_spans: bool
    ) -> None:
        self._runner = runner
        self._tracer = tracer
        self._claim_wait_spans = claim_wait_spans
        self._running: dict[tuple[int, int, int], Span] = {}
        self._lock = threading.Lock()
        observer = _EnqueueTracing(tracer, propagate)
        previous = enqueue.set_enqueue_observer(observer)
        # A second instrumentation (another Runner) leaves the first one's enqueue tracing.
        self._observer: _EnqueueTracing | None = observer
        if previous is not None:
            enqueue.set_enqueue_observer(previous)
            self._observer = None
        sender = runner if runner is not None else ANY
        events.job_start.connect(self._on_start, sender=sender, weak=False)
        events.job_complete.connect(self._on_complete, sender=sender, weak=False)

    def uninstrument(self) -> None:
        """Stop tracing; spans of jobs still running are ended as they are."""
        events.job_start.disconnect(self._on_start)
        events.job_complete.disconnect(self._on_complete)
        if self._observer is not None:
            enqueue.set_enqueue_observer(None)
            self._observer = None
        with self._lock:
            spans, self._running = list(self._running.values()), {}
        for span in spans:
            span.end()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.uninstrument()

    def _on_start(self, sender: Any, *, worker_id: str, job: Job, **_: Any) -> None:
        parent = job_context(job)
        attributes: dict[str, Any] = {
            "messaging.system": _SYSTEM,
            "messaging.operation": "process",
            "kongtask.task_identifier": job.task_identifier,
            "kongtask.job.id": job.id,
            "kongtask.job.attempts": job.attempts,
            "kongtask.job.max_attempts": job.max_attempts,
            "kongtask.worker_id": worker_id,
        }
        if job.locked_at is not None:
            waited = max(0.0, (job.locked_at - job.run_at).total_seconds())
            attributes["kongtask.job.wait_s"] = waited
        if self._claim_wait_spans and job.locked_at is not None:
            wait = self._tracer.start_span(
                f"kongtask.claim_wait {job.task_identifier}",
                context=parent,
                kind=SpanKind.INTERNAL,
                attributes={"kongtask.job.id": job.id},
                start_time=_ns(job.run_at.timestamp()),
            )
            wait.end(end_time=_ns(max(job.run_at, job.locked_at).timestamp()))
        span = self._tracer.start_span(
            f"kongtask.run {job.task_identifier}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        )
        with self._lock:
            self._running[(id(sender), job.id, job.attempts)] = span

    def _on_complete(
        self, sender: Any, *, job: Job, error: BaseException | str | None, **_: Any
    ) -> None:
        with self._lock:
            span = self._running.pop((id(sender), job.id, job.attempts), None)
        if span is None:
            return
        if error is None:
            span.set_status(Status(StatusCode.OK))
            span.add_event("kongtask.complete", {"kongtask.outcome": "success"})
        else:
            if isinstance(error, BaseException):
                span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, str(error)))
            span.add_event("kongtask.complete", {"kongtask.outcome": "failure"})
        span.end()


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def instrument(
    runner: Any = None,
    *,
    tracer_provider: TracerProvider | None = None,
    propagate: bool = True,
    claim_wait_spans: bool = False,
) -> Instrumentation:
    """Trace enqueues in this process and the jobs ``runner`` runs (every Runner if ``None``).

    ``tracer_provider`` defaults to OpenTelemetry's global one. With
    ``propagate=False`` jobs carry no trace flag and run spans start new traces.
    The claim wait is the run span's ``kongtask.job.wait_s`` attribute; with
    ``claim_wait_spans=True`` it is also a span of its own (one more per job).
    Enqueue tracing is process-wide and installed by the first instrumentation
    only; later ones (for other Runners) add run spans.
    """
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    tracer = provider.get_tracer("kongtask", __version__)
    return Instrumentation(runner, tracer, propagate, claim_wait_spans)
