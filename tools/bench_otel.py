"""What OpenTelemetry tracing costs: enqueue and drain no-op jobs with and without it, in turns.

Usage: ``python tools/bench_otel.py [-n JOBS] [--rounds R] [-j N] [--singles S]``.
Each round adds JOBS no-op jobs (``add_jobs`` in batches of 500) and drains them
with ``run_once``, once plain and once under ``kongtask.contrib.otel.instrument``
(an SDK TracerProvider whose exporter drops the spans, so the cost measured is
kongtask's and the SDK's, not an exporter's); then it times S single
``add_job`` calls each way. It prints the rates and their ratios; the medians
are the figures to quote.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import scratch_database, server_url

import kongtask
from kongtask.contrib import otel


class Dropping(SpanExporter):
    """Counts spans and keeps none."""

    def __init__(self) -> None:
        self.count = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.count += len(spans)
        return SpanExportResult.SUCCESS


def noop(payload: Any, helpers: Any) -> None:
    pass


def drain(url: str, jobs: int, concurrency: int, provider: TracerProvider | None) -> float:
    """Enqueue ``jobs`` jobs, drain them, return jobs per second of the drain."""
    instrumentation = otel.instrument(tracer_provider=provider) if provider else None
    try:
        with kongtask.WorkerUtils(url) as utils:
            for start in range(0, jobs, 500):
                utils.add_jobs([{"identifier": "noop"}] * min(500, jobs - start))
        runner = kongtask.Runner(
            tasks={"noop": noop},
            connection_string=url,
            concurrency=concurrency,
            once=True,
            install_signal_handlers=False,
        )
        started = time.perf_counter()
        runner.start()
        runner.wait()
        return jobs / (time.perf_counter() - started)
    finally:
        if instrumentation is not None:
            instrumentation.uninstrument()


def singles(url: str, count: int, provider: TracerProvider | None) -> float:
    """Add ``count`` jobs one ``add_job`` at a time; return calls per second."""
    instrumentation = otel.instrument(tracer_provider=provider) if provider else None
    try:
        with kongtask.WorkerUtils(url) as utils:
            started = time.perf_counter()
            ids = [utils.add_job("noop", {"n": n}).id for n in range(count)]
            elapsed = time.perf_counter() - started
            utils.complete_jobs(ids)  # out of the next drain's way
        return count / elapsed
    finally:
        if instrumentation is not None:
            instrumentation.uninstrument()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--jobs", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-j", "--concurrency", type=int, default=10)
    parser.add_argument("--singles", type=int, default=1_000)
    args = parser.parse_args(argv)
    print(
        f"jobs={args.jobs} rounds={args.rounds} concurrency={args.concurrency} "
        f"singles={args.singles}"
    )
    exporter = Dropping()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    drains: dict[str, list[float]] = {"plain": [], "traced": []}
    adds: dict[str, list[float]] = {"plain": [], "traced": []}
    with scratch_database(server_url()) as url:
        drain(url, 500, args.concurrency, None)  # warm-up
        for round_ in range(args.rounds):
            drains["plain"].append(drain(url, args.jobs, args.concurrency, None))
            drains["traced"].append(drain(url, args.jobs, args.concurrency, provider))
            adds["plain"].append(singles(url, args.singles, None))
            adds["traced"].append(singles(url, args.singles, provider))
            print(
                f"round {round_ + 1}: drain plain {drains['plain'][-1]:,.0f} jobs/s, traced "
                f"{drains['traced'][-1]:,.0f} jobs/s; add_job plain {adds['plain'][-1]:,.0f}/s, "
                f"traced {adds['traced'][-1]:,.0f}/s"
            )
    for name, rates in (("drain", drains), ("add_job", adds)):
        plain, traced = statistics.median(rates["plain"]), statistics.median(rates["traced"])
        print(
            f"median {name}: plain {plain:,.0f}/s, traced {traced:,.0f}/s, "
            f"ratio {traced / plain:.3f}"
        )
    print(f"spans exported: {exporter.count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
