"""A real pgbouncer in transaction pooling, started on a free port in front of the test server.

Debian's ``pgbouncer`` package provides the binary; without it the fixture
skips, saying so. It reaches the test server over TCP or its unix socket.
pgbouncer refuses to run as root, so as root it runs as the ``postgres``
system user, or as the owner of the server's socket folder (its files then
live in a folder that user can read).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from .ledger import wait_until

__all__ = ["Pgbouncer", "pgbouncer_fixture"]

_CONFIG = """\
[databases]
* = host={host} port={port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {auth_file}
pool_mode = transaction
max_client_conn = 500
default_pool_size = 2
reserve_pool_size = 0
ignore_startup_parameters = extra_float_digits
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Pgbouncer:
    """A running pgbouncer; :meth:`conninfo` points a test database through it."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def conninfo(self, direct: str) -> str:
        """``direct`` (a conninfo to the test server) rewritten to go through pgbouncer."""
        return make_conninfo(direct, host="127.0.0.1", hostaddr="127.0.0.1", port=str(self.port))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(name="pgbouncer")
def pgbouncer_fixture(server_conninfo: str) -> Iterator[Pgbouncer]:
    """Start pgbouncer (transaction pooling) in front of the test server; stop it afterwards."""
    binary = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None
    )
    if binary is None:
        pytest.skip("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
    params = conninfo_to_dict(server_conninfo)
    # A host starting with "/" is the folder of a unix socket (the embedded
    # server's); pgbouncer connects to it the same way.
    host = str(params.get("host") or "127.0.0.1")
    folder = Path(tempfile.mkdtemp(prefix="kongtask-pgbouncer-"))
    folder.chmod(0o755)
    auth_file = folder / "users.txt"
    auth_file.write_text(f'"{params.get("user") or "postgres"}" ""\n')
    port = _free_port()
    config = folder / "pgbouncer.ini"
    config.write_text(
        _CONFIG.format(
            host=host,
            port=params.get("port") or 5432,
            listen_port=port,
            auth_file=auth_file,
        )
    )
    for path in (auth_file, config):
        path.chmod(0o644)
    log_path = folder / "pgbouncer.log"
    user = None
    if os.geteuid() == 0:
        # Someone who can reach the server: a unix socket's folder may be private
        # to its owner (the embedded server's is), TCP is open to the postgres user.
        name = Path(host).owner() if host.startswith("/") else "postgres"
        try:
            user = pwd.getpwnam(name).pw_name
        except KeyError:
            pytest.skip(f"pgbouncer refuses to run as root and there is no {name} user")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [binary, str(config)], stdout=log, stderr=subprocess.STDOUT, user=user
        )
    bouncer = Pgbouncer(port, process, log_path)

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"pgbouncer exited with {process.returncode}:\n{bouncer.log()}")
        try:
            with psycopg.connect(bouncer.conninfo(server_conninfo), connect_timeout=2) as conn:
                conn.execute("select 1")
        except psycopg.OperationalError:
            return False
        return True

    try:
        wait_until(ready, timeout_s=20, what="pgbouncer to accept connections")
        yield bouncer
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(folder, ignore_errors=True)
