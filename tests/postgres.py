"""A real PostgreSQL server on 127.0.0.1 for the tests, from Debian's packages.

``.ci/run`` installs them (``apt-get install postgresql``) where they are missing; where the
binaries cannot be found the tests that need the server are skipped with the reason printed.
The server runs as the ``postgres`` user when the tests run as root (PostgreSQL refuses root),
with a data folder of its own under the session's temporary folder and trust authentication
on the loopback interface only; each test gets a fresh database.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest


def _binaries() -> Path | None:
    for candidate in (shutil.which("pg_ctl"), *sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), reverse=True)):
        if candidate and (Path(candidate).resolve().parent / "initdb").is_file():
            return Path(candidate).resolve().parent
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """``postgresql://postgres@127.0.0.1:<port>``: a server started for this test session."""
    binaries = _binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
    as_user: list[str] = []
    # a folder of its own under /tmp (world-traversable), not under pytest's private temporary folder
    folder = Path(tempfile.mkdtemp(prefix="wsss-postgres-"))
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as the postgres user")
        try:
            shutil.chown(folder, "postgres")
        except LookupError:
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    for attempt in range(3):  # the free port may be taken between the probe and the server's bind
        port = _free_port()
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"),
                                  "-w", "start"], capture_output=True, text=True)
        if started.returncode == 0:
            break
        if attempt == 2:
            raise RuntimeError(f"PostgreSQL did not start: {started.stdout}{started.stderr}{(folder / 'log').read_text()}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres_server: str) -> str:
    """A fresh database on the session's server: its SQLAlchemy URL."""
    import sqlalchemy

    name = f"wsss_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(f"{postgres_server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return f"{postgres_server}/{name}"
