"""A real PostgreSQL server for tests: initdb + pg_ctl (as user ``postgres`` when run as root) in a temporary
folder, on a free loopback port with its socket in that folder; stopped by ``pg_ctl stop`` (its own pid file).

Absent (no initdb/pg_ctl, no ``postgres`` user under root): ``tests.components.missing`` (fails under CI=true).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.components import find_program, missing
from tests.deploy.helpers import free_port

PG_DIRS = ("/usr/lib/postgresql/*/bin",)


def _as_postgres() -> tuple[list[str], int | None, int | None]:
    """The command prefix running a program as ``postgres`` (root only), and that user's uid/gid."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        missing("PostgreSQL", "running as root and there is no 'postgres' user to run the server")
    runuser = shutil.which("runuser")
    if runuser is None:
        missing("PostgreSQL", "running as root and runuser (util-linux) is not installed")
    return [runuser, "-u", "postgres", "--"], user.pw_uid, user.pw_gid


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Starts a throw-away PostgreSQL and yields its SQLAlchemy URL (``postgresql://...``)."""
    initdb = find_program("initdb", *PG_DIRS)
    pg_ctl = find_program("pg_ctl", *PG_DIRS)
    if initdb is None or pg_ctl is None:
        missing("PostgreSQL", "initdb/pg_ctl not installed (Debian package 'postgresql')")
    prefix, uid, gid = _as_postgres()
    root = Path(tempfile.mkdtemp(prefix="medserve-pg-"))
    data = root / "data"
    data.mkdir()
    if uid is not None and gid is not None:
        for path in (root, data):
            os.chown(path, uid, gid)
    port = free_port()
    log = root / "server.log"
    try:
        subprocess.run(
            [*prefix, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
        started = subprocess.run(
            [*prefix, pg_ctl, "-D", str(data), "-o", options, "-l", str(log), "-w", "-t", "120", "start"],
            capture_output=True,
        )
        if started.returncode != 0:
            raise AssertionError(f"PostgreSQL did not start: {log.read_text(errors='replace')[-2000:]}")
        try:
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                [*prefix, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
