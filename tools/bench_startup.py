"""Start-up benchmark: how long a fresh worker process takes to start its first job.

Usage: ``python tools/bench_startup.py [--rounds 9] [--compare-graphile-worker]``.

A restarted worker is only as quick to help as its process is to start. For
each round (the order alternating between the sides) this starts the real CLI
with one job waiting (``kongtask --once -j 1``; graphile-worker's ``cli.js
--once --jobs 1``) and times its launch to the handler's first line, and it
times the floors under that: the bare interpreter, the interpreter with the
database driver loaded (``psycopg`` and ``psycopg_pool``; graphile-worker's
module, which loads ``pg``), and the interpreter with everything a kongtask
worker imports before it connects. Each floor is the launch to a line the
process prints, so the process's exit is not counted. Printed: min / median
per measure and side. kongtask runs as a user's ``pip install`` leaves it: a
wheel of this checkout installed into a scratch environment and compiled,
without the hook an editable development install runs at every interpreter
start (its dependencies come from the running interpreter's environment).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools._bench_common import (
    fresh_jobs_table,
    graphile_worker_dir,
    installed_python,
    load_average,
    scratch_database,
    server_url,
    summary,
    to_uri,
)

KT_TASKS = """
import os, time

def first(payload, helpers):
    with open(os.environ["KONGTASK_BENCH_MARK"], "w") as out:
        out.write(repr(time.time()))

tasks = {"first": first}
"""

GW_TASK = """
const fs = require("fs");
module.exports = async () => {
  const now = (performance.timeOrigin + performance.now()) / 1000;
  fs.writeFileSync(process.env.KONGTASK_BENCH_MARK, now.toFixed(6));
};
"""

#: Print the time, then leave without the interpreter's clean-up.
PY_MARK = (
    "import os, sys, time; sys.stdout.write(repr(time.time())); sys.stdout.flush(); os._exit(0)"
)
PY_FLOORS = {
    "interpreter alone": "",
    "interpreter + psycopg, psycopg_pool": "import psycopg, psycopg_pool; ",
    "interpreter + a worker's imports": (
        "import kongtask.ops.cli.main; from kongtask.runner import run; "
        "from kongtask.jobs.task_loader import load_worker_tasks; "
    ),
}
JS_MARK = "process.stdout.write(String((performance.timeOrigin + performance.now()) / 1000));"
JS_FLOORS = {
    "interpreter alone": "",
    "interpreter + graphile-worker (and pg)": "require('graphile-worker'); ",
}

FIRST_JOB = "first job, one waiting (the CLI, --once)"


def printed_time(argv: list[str], cwd: str | None = None) -> float:
    """Launch ``argv``; seconds from the launch to the epoch time it prints."""
    started = time.time()
    out = subprocess.run(argv, cwd=cwd, capture_output=True, check=True, text=True).stdout
    return float(out) - started


def first_job(argv: list[str], cwd: str | None, env: dict[str, str], url: str, mark: Path) -> float:
    """Launch a worker with one job waiting; seconds from the launch to its handler's start."""
    fresh_jobs_table(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("select graphile_worker.add_job('first', '{}'::json)")
    mark.unlink(missing_ok=True)
    started = time.time()
    subprocess.run(
        argv,
        cwd=cwd,
        env=dict(os.environ, **env, KONGTASK_BENCH_MARK=str(mark)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    return float(mark.read_text()) - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9, help="rounds per measure (9)")
    parser.add_argument("--compare-graphile-worker", action="store_true")
    args = parser.parse_args()
    load = load_average()
    print(
        f"settings: {args.rounds} rounds, the sides alternating; {sys.executable} "
        f"(Python {sys.version.split()[0]}); kongtask installed from a wheel of this checkout "
        "into a scratch environment (compiled, no editable-install hook), the other packages "
        "taken from this interpreter's; "
        f"one job waiting on a truncated, analyzed table for each first-job launch; "
        f"cores={os.cpu_count()}, load average at the start {load}"
    )
    with scratch_database(server_url()) as url, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        python = installed_python(folder / "install")
        mark = folder / "first.mark"
        (folder / "startup_tasks.py").write_text(KT_TASKS)
        measures: dict[str, dict[str, Callable[[], float]]] = {"kongtask": {}}
        for label, imports in PY_FLOORS.items():
            argv = [python, "-c", imports + PY_MARK]
            measures["kongtask"][label] = partial(printed_time, argv, tmp)
        kt_cli = [python, "-m", "kongtask", "-c", url, "--once", "-j", "1"]
        kt_cli += ["--tasks", str(folder / "startup_tasks.py")]
        measures["kongtask"][FIRST_JOB] = partial(first_job, kt_cli, tmp, {}, url, mark)
        if args.compare_graphile_worker:
            gw = graphile_worker_dir()
            cwd = folder / "gw"
            (cwd / "tasks").mkdir(parents=True)
            (cwd / "tasks" / "first.js").write_text(GW_TASK)
            os.symlink(gw / "node_modules", cwd / "node_modules")
            side = measures["graphile-worker 0.17.3"] = {}
            for label, requires in JS_FLOORS.items():
                argv = ["node", "-e", requires + JS_MARK]
                side[label] = partial(printed_time, argv, str(cwd))
            gw_cli = ["node", str(gw / "node_modules" / "graphile-worker" / "dist" / "cli.js")]
            gw_cli += ["--once", "--jobs", "1"]
            gw_env = {"DATABASE_URL": to_uri(url)}
            side[FIRST_JOB] = partial(first_job, gw_cli, str(cwd), gw_env, url, mark)
        figures: dict[tuple[str, str], list[float]] = {}
        names = list(measures)
        for index in range(args.rounds):
            for name in names if index % 2 == 0 else names[::-1]:
                for label, measure in measures[name].items():
                    figures.setdefault((name, label), []).append(measure() * 1000)
    print("launch to ..., min / median (ms):")
    for (name, label), values in figures.items():
        low, middle = summary(values)
        print(f"  {name}: {label}: {low:,.1f} / {middle:,.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
