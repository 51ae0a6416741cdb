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
def postgres_server(tmp_path_factory) -> str:
    """``postgresql://postgres@127.0.0.1:<port>``: a server started for this test session."""
    binaries = _binaries()
    if binaries is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
    as_user: list[str] = []
    folder = tmp_path_factory.mktemp("postgres")
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as the postgres user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
        os.chmod(folder, 0o700)
        for parent in folder.parents:  # the postgres user must reach its folder
            if parent == Path(parent.anchor):
                break
            os.chmod(parent, os.stat(parent).st_mode | 0o711)
    data, port = folder / "data", _free_port()
    subprocess.run([*as_user, str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)


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
