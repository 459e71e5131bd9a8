"""Measure the crontab parser and the bulk cron matcher on a large crontab.

Builds a 10,000-line crontab of random patterns (a fifth of them in one of four
time zones), then prints the parse time, the index build time and the CPU time per
minute tick of ``CronIndex.due`` over a simulated day (and over the Berlin DST day),
plus the per-item ``matches`` loop for comparison.

    .venv/bin/python tools/bench_matcher.py [--items 10000] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import time
from datetime import UTC, datetime, timedelta

from kongtask.cron import CronIndex, matches, parse_crontab

ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]


def random_field(rng: random.Random, low: int, high: int) -> str:
    kind = rng.random()
    if kind < 0.4:
        return "*"
    if kind < 0.6:
        return f"*/{rng.randint(2, 15)}"
    if kind < 0.8:
        start = rng.randint(low, high - 1)
        return f"{start}-{rng.randint(start + 1, high)}"
    return ",".join(str(v) for v in sorted(rng.sample(range(low, high + 1), rng.randint(1, 3))))


def build_crontab(count: int, rng: random.Random) -> str:
    lines = []
    for i in range(count):
        fields = [
            random_field(rng, lo, hi) for lo, hi in ((0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
        ]
        options = f"?id=job{i}"
        if rng.random() < 0.2:
            options += f"&tz={rng.choice(ZONES)}"
        # Half JSON5 (unquoted keys), half plain JSON: the parser has a fast path for JSON.
        payload = f"{{n: {i}}}" if i % 2 else f'{{"n": {i}}}'
        lines.append(f"{' '.join(fields)} task_{i % 50} {options} {payload}")
    return "\n".join(lines)


def per_tick_ms(index: CronIndex, start: datetime, ticks: int) -> tuple[float, float, int]:
    worst = 0.0
    due = 0
    began = time.process_time()
    for minute in range(ticks):
        tick = time.process_time()
        due += len(index.due(start + timedelta(minutes=minute)))
        worst = max(worst, time.process_time() - tick)
    return (time.process_time() - began) / ticks * 1000, worst * 1000, due


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    text = build_crontab(args.items, random.Random(args.seed))

    began = time.process_time()
    items = parse_crontab(text)
    print(f"parse_crontab: {len(items)} items in {(time.process_time() - began) * 1000:.0f} ms CPU")

    began = time.process_time()
    index = CronIndex(items)
    print(f"CronIndex build: {(time.process_time() - began) * 1000:.0f} ms CPU")

    day = datetime(2024, 6, 3, tzinfo=UTC)
    mean, worst, due = per_tick_ms(index, day, 1440)
    print(
        f"CronIndex.due, ordinary day: {mean:.3f} ms/tick mean, {worst:.3f} ms worst,"
        f" {due / 1440:.0f} items due per tick on average"
    )
    dst = datetime(2024, 3, 30, 12, tzinfo=UTC)
    mean, worst, _ = per_tick_ms(index, dst, 1440)
    print(f"CronIndex.due, Berlin DST day: {mean:.3f} ms/tick mean, {worst:.3f} ms worst")

    began = time.process_time()
    for minute in range(10):
        when = day + timedelta(minutes=minute)
        [item for item in items if matches(item, when)]
    print(f"per-item matches() loop: {(time.process_time() - began) * 100:.1f} ms/tick")


if __name__ == "__main__":
    main()
