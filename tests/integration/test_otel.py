"""OpenTelemetry tracing: a job enqueued inside a span runs in that span's trace.

Spans go to the SDK's in-memory exporter; the run span is ended by the
Runner's ``job:complete`` event, delivered on its publisher thread, so the
tests wait for it on a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import kongtask
from kongtask import WorkerUtils
from kongtask.contrib import otel
from kongtask.jobs import enqueue
from kongtask.testing import ManualClock
from kongtask.testing.plugin import KongtaskDatabase, WorkerFactory


class WaitingExporter(InMemorySpanExporter):
    """Keeps finished spans and lets a test wait until some have arrived."""

    def __init__(self) -> None:
        super().__init__()
        self._arrived = threading.Condition()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        with self._arrived:
            self._arrived.notify_all()
        return result

    def named(self, prefix: str) -> list[ReadableSpan]:
        return [span for span in self.get_finished_spans() if span.name.startswith(prefix)]

    def wait_for(self, prefix: str, count: int = 1, timeout_s: float = 10.0) -> list[ReadableSpan]:
        deadline = time.monotonic() + timeout_s
        with self._arrived:
            while len(self.named(prefix)) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"expected {count} span(s) named {prefix!r}")
                self._arrived.wait(remaining)
        return self.named(prefix)


@pytest.fixture
def exporter() -> WaitingExporter:
    return WaitingExporter()


@pytest.fixture
def provider(exporter: WaitingExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


PAYLOADS: list[Any] = []


def remember(payload: Any, helpers: Any) -> None:
    PAYLOADS.append(payload)


def refuse(payload: Any, helpers: Any) -> None:
    raise ValueError("no thanks")


@pytest.fixture
def instrumented(
    kongtask_worker: WorkerFactory, provider: TracerProvider
) -> Iterator[kongtask.Runner]:
    PAYLOADS.clear()
    worker = kongtask_worker({"remember": remember, "refuse": refuse})
    with otel.instrument(worker, tracer_provider=provider, claim_wait_spans=True):
        yield worker
    assert enqueue._observer is None


def test_a_job_enqueued_in_a_span_runs_in_its_trace(
    instrumented: kongtask.Runner,
    kongtask_utils: WorkerUtils,
    provider: TracerProvider,
    exporter: WaitingExporter,
) -> None:
    with provider.get_tracer("test").start_as_current_span("request") as request:
        job = kongtask_utils.add_job("remember", {"n": 1})
    instrumented.join()
    (run,) = exporter.wait_for("kongtask.run remember")
    (add,) = exporter.named("kongtask.add_job")
    (wait,) = exporter.named("kongtask.claim_wait")
    trace_id = request.get_span_context().trace_id
    assert {run.context.trace_id, add.context.trace_id, wait.context.trace_id} == {trace_id}
    assert add.parent is not None and add.parent.span_id == request.get_span_context().span_id
    assert run.parent is not None and run.parent.span_id == add.context.span_id
    assert (add.kind, run.kind) == (SpanKind.PRODUCER, SpanKind.CONSUMER)
    assert run.status.status_code is StatusCode.OK
    assert run.attributes is not None and run.attributes["kongtask.job.id"] == job.id
    assert float(run.attributes["kongtask.job.wait_s"]) >= 0  # type: ignore[arg-type]
    # The handler saw its payload untouched; the context rode in the job's flags.
    assert PAYLOADS == [{"n": 1}]
    assert job.flags is not None
    assert [flag for flag in job.flags if flag.startswith(otel.TRACE_FLAG_PREFIX)] == [
        f"{otel.TRACE_FLAG_PREFIX}00-{trace_id:032x}-{add.context.span_id:016x}-{add.context.trace_flags:02x}"
    ]
    carried = trace.get_current_span(otel.job_context(job)).get_span_context()
    assert (carried.trace_id, carried.span_id) == (trace_id, add.context.span_id)


def test_a_failing_job_has_an_error_span_in_the_same_trace(
    instrumented: kongtask.Runner,
    kongtask_utils: WorkerUtils,
    provider: TracerProvider,
    exporter: WaitingExporter,
) -> None:
    with provider.get_tracer("test").start_as_current_span("request") as request:
        kongtask_utils.add_job("refuse", flags=["mine"], max_attempts=1)
    instrumented.join()
    (run,) = exporter.wait_for("kongtask.run refuse")
    assert run.context.trace_id == request.get_span_context().trace_id
    assert run.status.status_code is StatusCode.ERROR
    assert [event.name for event in run.events] == ["exception", "kongtask.complete"]
    assert run.events[0].attributes is not None
    assert run.events[0].attributes["exception.message"] == "no thanks"


def test_batches_module_functions_and_async_enqueues_carry_the_trace(
    instrumented: kongtask.Runner,
    kongtask_db: KongtaskDatabase,
    kongtask_utils: WorkerUtils,
    provider: TracerProvider,
    exporter: WaitingExporter,
) -> None:
    async def add_async() -> None:
        async with await psycopg.AsyncConnection.connect(kongtask_db.url) as conn:
            await kongtask.add_job_async(
                "remember", {"via": "async"}, connection=conn, schema=kongtask_db.schema
            )

    with provider.get_tracer("test").start_as_current_span("request") as request:
        kongtask_utils.add_jobs([{"identifier": "remember", "payload": {"via": n}} for n in (1, 2)])
        with psycopg.connect(kongtask_db.url) as conn:
            kongtask.add_job(
                "remember", {"via": "connection"}, connection=conn, schema=kongtask_db.schema
            )
        asyncio.run(add_async())
    instrumented.join()
    runs = exporter.wait_for("kongtask.run remember", count=4)
    assert {span.context.trace_id for span in runs} == {request.get_span_context().trace_id}
    assert len(exporter.named("kongtask.add_jobs")) == 1
    assert len(exporter.named("kongtask.add_job ")) == 2
    assert sorted(map(str, PAYLOADS)) == sorted(
        map(str, [{"via": 1}, {"via": 2}, {"via": "connection"}, {"via": "async"}])
    )


def test_an_enqueue_that_fails_records_its_error(
    instrumented: kongtask.Runner,
    kongtask_db: KongtaskDatabase,
    kongtask_utils: WorkerUtils,
    exporter: WaitingExporter,
) -> None:
    with pytest.raises(kongtask.KongtaskError):
        kongtask_utils.add_jobs(
            [{"identifier": "remember", "run_at": "not a time"}]  # refused before the span
        )
    assert exporter.named("kongtask.") == []
    with psycopg.connect(kongtask_db.url) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("select 1/0")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            kongtask.add_job("remember", connection=conn, schema=kongtask_db.schema)
    (add,) = exporter.named("kongtask.add_job")
    assert add.status.status_code is StatusCode.ERROR


def test_a_cron_job_runs_in_the_trace_of_its_minute_s_write(
    kongtask_worker: WorkerFactory,
    kongtask_clock: ManualClock,
    provider: TracerProvider,
    exporter: WaitingExporter,
) -> None:
    PAYLOADS.clear()
    worker = kongtask_worker({"remember": remember}, crontab="* * * * * remember {n: 9}")
    with otel.instrument(worker, tracer_provider=provider):
        kongtask_clock.wait_for_timers(2)  # the lock sweep and the cron minute
        kongtask_clock.advance(60)
        (run,) = exporter.wait_for("kongtask.run remember")
        (write,) = exporter.named("kongtask.cron remember")
    assert write.parent is None and write.kind is SpanKind.PRODUCER
    assert run.context.trace_id == write.context.trace_id
    assert run.parent is not None and run.parent.span_id == write.context.span_id
    assert [payload["n"] for payload in PAYLOADS] == [9]


def test_without_instrumentation_jobs_carry_no_trace(
    kongtask_worker: WorkerFactory,
    kongtask_utils: WorkerUtils,
    provider: TracerProvider,
    exporter: WaitingExporter,
) -> None:
    assert enqueue._observer is None
    with provider.get_tracer("test").start_as_current_span("request"):
        job = kongtask_utils.add_job("remember", flags=["mine"])
    assert job.flags == {"mine": True}
    assert not trace.get_current_span(otel.job_context(job)).get_span_context().is_valid


def test_by_default_the_claim_wait_is_an_attribute_of_the_run_span_only(
    kongtask_worker: WorkerFactory,
    kongtask_utils: WorkerUtils,
    provider: TracerProvider,
    exporter: WaitingExporter,
) -> None:
    worker = kongtask_worker({"remember": remember})
    with otel.instrument(worker, tracer_provider=provider):
        kongtask_utils.add_job("remember")
        worker.join()
        (run,) = exporter.wait_for("kongtask.run remember")
    assert exporter.named("kongtask.claim_wait") == []
    assert run.attributes is not None and "kongtask.job.wait_s" in run.attributes
