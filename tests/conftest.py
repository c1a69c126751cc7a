"""Fixtures every test module may use: the real sshd + Nix test bed, a scratch state directory,
and a datastore on the engine under test.

The test bed needs root, sshd, Nix and the private /nix that ``bash scripts/test`` sets up. Run
any other way, tests that use it are skipped with the reason; under scripts/test (which sets
BUILDFARM_TESTBED=1) a missing piece fails them instead, so CI cannot go green by skipping.

Engines (tests/engines.py): ``--engine postgresql`` runs only the tests that touch a datastore
(those using the `database` fixture, or marked postgresql_only); the others do not depend on the
engine and ran in the SQLite pass. Tests marked sqlite_only never run on PostgreSQL.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import needs
import pytest
from engines import (
    ENGINES,
    ENV_ENGINE,
    PostgresServer,
    ScratchDatabase,
    server_from_environment,
    sqlite_url,
)
from hypothesis import settings
from testbed import (
    DEFAULT_HOSTS,
    Host,
    Testbed,
    TestbedError,
    private_nix_problem,
    testbed_problem,
)

_TESTBED_FIXTURES = {"testbed", "hosts", "private_nix"}

# Tests never assert a duration: Hypothesis's default deadline (200 ms per example) is one,
# and failed test_nar's tree round trip on a loaded machine.
settings.register_profile("buildfarm", deadline=None)
settings.load_profile("buildfarm")


def _unavailable(problem: str) -> NoReturn:
    needs.unavailable(f"the test bed: {problem}")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--engine",
        choices=ENGINES,
        default=os.environ.get(ENV_ENGINE) or "sqlite",
        help=f"datastore engine of the `database` fixture [env: {ENV_ENGINE}; default: sqlite]",
    )


def pytest_configure(config: pytest.Config) -> None:
    for marker in (
        "datastore: uses the `database` fixture, so runs on every engine (set automatically)",
        "sqlite_only: about SQLite itself (files, pragmas); never runs with --engine postgresql",
        "postgresql_only: about PostgreSQL itself; runs only with --engine postgresql",
    ):
        config.addinivalue_line("markers", marker)


def pytest_report_header(config: pytest.Config) -> str:
    return f"datastore engine: {config.getoption('--engine')}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests that use the test bed, so `-m "not testbed"` selects the quick ones; mark the
    ones with a datastore, and keep those the engine under test runs."""
    engine = config.getoption("--engine")
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if _TESTBED_FIXTURES & fixtures:
            item.add_marker(pytest.mark.testbed)
        if "database" in fixtures:
            item.add_marker(pytest.mark.datastore)
        if engine == "postgresql":
            wanted = "database" in fixtures or item.get_closest_marker("postgresql_only")
            wanted = wanted and not item.get_closest_marker("sqlite_only")
        else:
            wanted = not item.get_closest_marker("postgresql_only")
        (kept if wanted else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session")
def private_nix() -> Path:
    """The coordinator side's private /nix: request it before calling testbed.instantiate()."""
    problem = private_nix_problem()
    if problem is not None:
        _unavailable(problem)
    return Path("/nix")


@pytest.fixture(scope="session")
def testbed() -> Iterator[Testbed]:
    """The session's test bed, started on first use with DEFAULT_HOSTS hosts."""
    problem = testbed_problem()
    if problem is not None:
        _unavailable(problem)
    try:
        bed = Testbed()
    except TestbedError as error:
        _unavailable(str(error))
    try:
        bed.add_hosts(DEFAULT_HOSTS)
        yield bed
    finally:
        bed.close()


@pytest.fixture
def hosts(testbed: Testbed) -> list[Host]:
    """The session's default hosts, all running (restarted if an earlier test stopped one).

    Their stores persist across tests: use derivation names unique to the test, or
    ``testbed.add_host()`` for a machine with an empty store.
    """
    testbed.ensure_running()
    return testbed.hosts[:DEFAULT_HOSTS]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """An empty directory for a coordinator's state (datastore, logs, output store)."""
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def engine(request: pytest.FixtureRequest) -> str:
    """The datastore engine under test: 'sqlite' or 'postgresql'."""
    return str(request.config.getoption("--engine"))


@pytest.fixture(scope="session")
def pg_server() -> PostgresServer:
    """The run's throwaway PostgreSQL server (started by scripts/test)."""
    server = server_from_environment()
    if server is None:
        _unavailable("no PostgreSQL server: BUILDFARM_TEST_PG is unset (scripts/test sets it)")
    problem = server.problem()
    if problem is not None:
        _unavailable(problem)
    return server


@pytest.fixture
def pg_database(pg_server: PostgresServer) -> Iterator[ScratchDatabase]:
    """An empty PostgreSQL database of this test's own, whatever the engine under test."""
    database = pg_server.create()
    try:
        yield database
    finally:
        _close_bound_datastore()
        pg_server.drop(database)


@pytest.fixture
def database(
    engine: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[ScratchDatabase]:
    """An empty datastore on the engine under test. On SQLite it is STATE_DIR/buildfarm.db of
    the `state_dir` fixture (the default URL), so tests may also rely on that default."""
    if engine == "sqlite":
        yield ScratchDatabase("sqlite", sqlite_url(tmp_path / "state" / "buildfarm.db"))
        _close_bound_datastore()
        return
    yield request.getfixturevalue("pg_database")


def _close_bound_datastore() -> None:
    """Close this thread's connection of the datastore a test left open (psycopg warns about
    connections garbage-collected while open, and the test's database is about to go)."""
    from buildfarm.datastore.models import database_proxy

    bound = database_proxy.obj
    if bound is not None and not bound.is_closed():
        bound.close()
