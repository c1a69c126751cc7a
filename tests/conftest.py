"""Fixtures every test module may use: the real sshd + Nix test bed and a scratch state directory.

The test bed needs root, sshd, Nix and the private /nix that ``bash scripts/test`` sets up. Run
any other way, tests that use it are skipped with the reason; under scripts/test (which sets
BUILDFARM_TESTBED=1) a missing piece fails them instead, so CI cannot go green by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from testbed import (
    DEFAULT_HOSTS,
    ENV_REQUIRED,
    Host,
    Testbed,
    TestbedError,
    private_nix_problem,
    testbed_problem,
)

_TESTBED_FIXTURES = {"testbed", "hosts", "private_nix"}


def _unavailable(problem: str) -> NoReturn:
    if os.environ.get(ENV_REQUIRED) == "1":
        pytest.fail(f"the test bed is required under scripts/test: {problem}", pytrace=False)
    pytest.skip(f"test bed unavailable: {problem}; run `bash scripts/test` as root")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that use the test bed, so `-m "not testbed"` selects the quick ones."""
    for item in items:
        if _TESTBED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.testbed)


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
