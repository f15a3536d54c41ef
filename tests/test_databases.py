"""Multi-worker sweeps on real database servers on loopback (PostgreSQL, MariaDB).

`.ci/run` starts the servers and exports their URLs; without the variables the
usual local servers are tried. A test skips, saying why, only when no server answers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from tests._sweeps import two_workers_finish_the_budget

SERVERS = {
    "postgres": ("PET_SWEEP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    "mysql": ("PET_SWEEP_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
}


def server_url(kind: str) -> str:
    """The server's URL, or skip with the reason it cannot be used."""
    variable, default = SERVERS[kind]
    url = os.environ.get(variable) or default
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 15})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as err:  # driver missing, server down, auth: all mean "no server here"
        pytest.skip(f"no {kind} server at {url} ({variable}): {type(err).__name__}: {str(err).splitlines()[0][:120]}")
    return url


def with_password(url: str, password: str) -> str:
    """The same URL with a password (the loopback servers trust local users and ignore it)."""
    scheme, rest = url.split("://", 1)
    userinfo, host = rest.split("@", 1)
    return f"{scheme}://{userinfo.split(':')[0]}:{password}@{host}"


@pytest.mark.postgres
@pytest.mark.slow
def test_two_workers_on_postgresql(write_experiments: Callable[..., Path]) -> None:
    # a password in the URL: the loopback server trusts local users, and nothing may print it
    two_workers_finish_the_budget(write_experiments, with_password(server_url("postgres"), "s3cret"))


@pytest.mark.mysql
@pytest.mark.slow
def test_two_workers_on_mariadb(write_experiments: Callable[..., Path]) -> None:
    two_workers_finish_the_budget(write_experiments, server_url("mysql"))
