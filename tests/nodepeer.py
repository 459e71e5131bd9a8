"""The Node.js peer for interop tests: graphile-worker 0.17.3, installed from npm on demand.

graphile-worker is never vendored. The first test that needs it installs the
exact release into a cache folder outside the repository (default
``~/.cache/kongtask-tests/graphile-worker-0.17.3``, or ``$KONGTASK_GRAPHILE_WORKER_DIR``);
an exclusive file lock makes parallel test processes wait for one installer
instead of racing. Tests then run its CLI with :func:`run_graphile_worker`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

import pytest

__all__ = [
    "GRAPHILE_WORKER_VERSION",
    "NodePeerError",
    "graphile_worker_cli",
    "graphile_worker_dir",
    "install_graphile_worker",
    "require_graphile_worker",
    "run_graphile_worker",
]

GRAPHILE_WORKER_VERSION = "0.17.3"

_INSTALL_TIMEOUT_S = 600.0


class NodePeerError(RuntimeError):
    """graphile-worker could not be installed or did not behave as asked."""


def graphile_worker_dir() -> Path:
    """The folder graphile-worker is (to be) installed in."""
    configured = os.environ.get("KONGTASK_GRAPHILE_WORKER_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.home() / ".cache" / "kongtask-tests" / f"graphile-worker-{GRAPHILE_WORKER_VERSION}"


def _installed_version(folder: Path) -> str | None:
    manifest = folder / "node_modules" / "graphile-worker" / "package.json"
    try:
        return str(json.loads(manifest.read_text(encoding="utf-8"))["version"])
    except (OSError, ValueError, KeyError):
        return None


def _cli_path(folder: Path) -> Path:
    return folder / "node_modules" / "graphile-worker" / "dist" / "cli.js"


@cache
def install_graphile_worker() -> Path:
    """Install graphile-worker (once per machine, under a lock); return its ``cli.js``.

    Raises :class:`NodePeerError` if ``node``/``npm`` are missing or npm fails.
    """
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        raise NodePeerError("node and npm must be on PATH to run graphile-worker")
    folder = graphile_worker_dir()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if _installed_version(folder) != GRAPHILE_WORKER_VERSION or not _cli_path(folder).exists():
            manifest = folder / "package.json"
            if not manifest.exists():
                manifest.write_text(
                    json.dumps({"name": "kongtask-interop-peer", "private": True}) + "\n",
                    encoding="utf-8",
                )
            completed = subprocess.run(
                [
                    npm,
                    "install",
                    "--no-audit",
                    "--no-fund",
                    "--save-exact",
                    f"graphile-worker@{GRAPHILE_WORKER_VERSION}",
                ],
                cwd=folder,
                capture_output=True,
                text=True,
                timeout=_INSTALL_TIMEOUT_S,
                check=False,
            )
            if completed.returncode != 0:
                raise NodePeerError(
                    f"npm install graphile-worker@{GRAPHILE_WORKER_VERSION} failed in {folder} "
                    f"(exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}"
                )
            found = _installed_version(folder)
            if found != GRAPHILE_WORKER_VERSION:
                raise NodePeerError(
                    f"expected graphile-worker {GRAPHILE_WORKER_VERSION} in {folder}, found {found}"
                )
    return _cli_path(folder)


def graphile_worker_cli() -> list[str]:
    """The argv prefix that runs graphile-worker's CLI: ``[node, .../cli.js]``."""
    cli = install_graphile_worker()
    node = shutil.which("node")
    assert node is not None  # checked by install_graphile_worker
    return [node, str(cli)]


def require_graphile_worker() -> list[str]:
    """Like :func:`graphile_worker_cli`, but skip the calling test when Node is not installed.

    An npm failure with Node present is an error, not a skip: it must be seen.
    """
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed; interop with graphile-worker cannot be tested")
    return graphile_worker_cli()


def run_graphile_worker(
    args: Sequence[str],
    *,
    database_url: str | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 120.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run ``graphile-worker ARGS`` to completion and return the finished process.

    ``env`` is added to a copy of this process's environment (``DATABASE_URL``
    is set from ``database_url`` when given). With ``check``, a non-zero exit
    raises :class:`NodePeerError` carrying the output.
    """
    full_env = dict(os.environ)
    full_env.pop("GRAPHILE_WORKER_SCHEMA", None)
    if database_url is not None:
        full_env["DATABASE_URL"] = database_url
    if env:
        full_env.update(env)
    argv = [*graphile_worker_cli(), *args]
    completed = subprocess.run(
        argv,
        env=full_env,
        # By default run where no graphile.config.* or crontab of a project can be picked up.
        cwd=cwd if cwd is not None else graphile_worker_dir(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and completed.returncode != 0:
        raise NodePeerError(
            f"{' '.join(argv)} exited with {completed.returncode}:\n"
            f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
        )
    return completed
