"""PostgreSQL itself: its schema types, migrating and writing from many processes at once, the
run lock as an advisory lock, URLs and their errors, and a farm running on it under load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from engines import PostgresServer, ScratchDatabase
from testbed import (
    Host,
    Testbed,
    current_system,
    instantiate_all,
    inventory_yaml,
    nix_expr_trivial,
)

from buildfarm.cli import cli
from buildfarm.coordinator.runlock import RunLock
from buildfarm.datastore import connect, migrations, open_datastore, postgresql
from buildfarm.errors import AlreadyRunningError

pytestmark = pytest.mark.postgresql_only

DATA = Path(__file__).parent / "data"
HELLO = DATA / "nix" / "76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"
GREP = DATA / "guix" / "63j9givlcpv1rd53sw8jz38aysmjkhhr-grep-3.8.drv"
WAIT = 120.0  # seconds a test waits for other processes before it gives up


def start_together(
    scripts: list[list[str]], gate: Path, env: dict[str, str] | None = None
) -> list[subprocess.Popen[str]]:
    """Start processes that each wait for `gate` (GATE in their environment) once they have
    written GATE.<n>; open it when all are ready, so that they race for real."""
    procs = []
    for n, argv in enumerate(scripts):
        procs.append(
            subprocess.Popen(
                argv,
                env={**(env or os.environ), "GATE": str(gate), "WORKER": str(n)},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    deadline = time.monotonic() + WAIT
    while not all(Path(f"{gate}.{n}").exists() for n in range(len(procs))):
        assert time.monotonic() < deadline, "the workers never got ready"
        for proc in procs:
            assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    gate.touch()
    return procs


GATE_PRELUDE = """
import os, pathlib, sys, time
gate = pathlib.Path(os.environ["GATE"])
pathlib.Path(f"{gate}.{os.environ['WORKER']}").touch()
while not gate.exists():
    time.sleep(0.01)
"""


def finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
        assert err == "", err
        outputs.append(out)
    return outputs


def test_the_schema_uses_postgresql_types(pg_database: ScratchDatabase) -> None:
    with open_datastore(pg_database.url) as store:
        assert store.engine == "postgresql"
        assert migrations.applied_version(store.db) == migrations.LATEST
    types = dict(
        ((table, column), kind)
        for table, column, kind in pg_database.rows(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema()"
        )
    )
    assert types["derivation", "contents"] == "bytea"
    assert types["build", "id"] == "bigint"
    assert types["attempt", "build_id"] == "bigint"
    assert types["build", "created_at"] == "double precision"
    assert types["build", "started_at"] == "double precision"  # migration 2
    assert types["stored_output", "nar_size"] == "bigint"
    versions = pg_database.rows("SELECT version FROM schema_migration ORDER BY version")
    assert versions == [(n,) for n in range(1, migrations.LATEST + 1)]


def test_processes_opening_a_new_datastore_at_once_migrate_it_once(
    pg_database: ScratchDatabase, tmp_path: Path
) -> None:
    script = GATE_PRELUDE + textwrap.dedent(
        f"""
        from buildfarm.datastore import open_datastore
        open_datastore({pg_database.url!r}).close()
        """
    )
    procs = start_together([[sys.executable, "-c", script]] * 6, tmp_path / "gate")
    finish(procs)
    versions = pg_database.rows("SELECT version FROM schema_migration ORDER BY version")
    assert versions == [(n,) for n in range(1, migrations.LATEST + 1)]


def _waiting_for_write_lock(database: ScratchDatabase) -> int:
    classid, objid = postgresql.split_key(postgresql.WRITE_LOCK)
    return int(
        database.scalar(
            "SELECT COUNT(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
            "AND classid = ? AND objid = ? AND objsubid = 1",
            classid,
            objid,
        )
    )


def test_writing_transactions_queue_and_see_what_the_previous_one_committed(
    pg_database: ScratchDatabase,
) -> None:
    open_datastore(pg_database.url).close()
    first, second = connect(pg_database.url), connect(pg_database.url)
    seen: list[Any] = []
    try:
        with first.atomic():
            first.execute_sql(
                "INSERT INTO machine_state (name, failures, updated_at) VALUES ('m', 1, 0)"
            )

            def increment() -> None:
                with second.atomic():
                    row = second.execute_sql(
                        "SELECT failures FROM machine_state WHERE name = 'm'"
                    ).fetchone()
                    seen.append(row)
                    second.execute_sql(
                        "UPDATE machine_state SET failures = %s WHERE name = 'm'", (row[0] + 1,)
                    )
                second.close()

            thread = threading.Thread(target=increment)
            thread.start()
            deadline = time.monotonic() + WAIT
            while _waiting_for_write_lock(pg_database) == 0:
                assert time.monotonic() < deadline, "the second transaction never waited"
                assert thread.is_alive(), seen
                time.sleep(0.02)
            assert seen == []  # still waiting while the first is open
        thread.join(WAIT)
    finally:
        first.close()
        second.close()
    # The second transaction read the first one's row, which it could not see when it began.
    assert seen == [(1,)]
    assert pg_database.scalar("SELECT failures FROM machine_state WHERE name = 'm'") == 2


def test_many_submitters_at_once_lose_nothing_and_reuse_builds_correctly(
    pg_database: ScratchDatabase, tmp_path: Path
) -> None:
    """Eight processes submit at once: --ignore-if-built must still yield exactly one build
    (a read-check-write that only holds if transactions queue) and every plain one lands."""
    script = GATE_PRELUDE + textwrap.dedent(
        f"""
        from buildfarm.datastore import open_datastore
        from buildfarm.submission import SubmitOptions, submit
        open_datastore({pg_database.url!r})
        worker = os.environ["WORKER"]
        for i in range(5):
            (reused,) = submit([{str(HELLO)!r}], SubmitOptions(ignore_if_built=True))
            print(reused.uuid)
            submit([{str(GREP)!r}], SubmitOptions(tags=(("worker", worker),)))
        """
    )
    procs = start_together([[sys.executable, "-c", script]] * 8, tmp_path / "gate")
    outputs = finish(procs)
    reused = {line for out in outputs for line in out.split()}
    assert len(reused) == 1
    per_drv = pg_database.rows(
        "SELECT d.path, COUNT(*) FROM build b JOIN derivation d ON d.id = b.derivation_id "
        "GROUP BY d.path ORDER BY d.path"
    )
    assert per_drv == [("/gnu/store/" + GREP.name, 40), ("/nix/store/" + HELLO.name, 1)]
    hello = pg_database.scalar(
        "SELECT b.uuid FROM build b JOIN derivation d ON d.id = b.derivation_id WHERE d.path = ?",
        "/nix/store/" + HELLO.name,
    )
    assert reused == {hello}
    assert pg_database.scalar("SELECT COUNT(*) FROM event WHERE name = 'build-submitted'") == 41
    paths = pg_database.rows("SELECT path, COUNT(*) FROM derivation GROUP BY path")
    assert all(count == 1 for _, count in paths)
    tagged = pg_database.rows("SELECT value, COUNT(*) FROM build_tag GROUP BY value ORDER BY 1")
    assert tagged == [(str(n), 5) for n in range(8)]


def test_the_run_lock_is_an_advisory_lock_per_database(
    pg_database: ScratchDatabase, pg_server: PostgresServer, tmp_path: Path
) -> None:
    first = RunLock(pg_database.url, str(tmp_path))
    first.acquire()
    other_database = pg_server.create()
    try:
        second = RunLock(pg_database.url, str(tmp_path))
        with pytest.raises(AlreadyRunningError, match=f"pid {os.getpid()} on "):
            second.acquire()
        elsewhere = RunLock(other_database.url, str(tmp_path))
        elsewhere.acquire()  # another database: another farm
        elsewhere.release()
        first.release()
        second.acquire()
        second.release()
    finally:
        first.release()
        pg_server.drop(other_database)
    assert not (tmp_path / "datastore.run-lock").exists()  # no file on PostgreSQL


def test_the_run_lock_goes_with_its_process(pg_database: ScratchDatabase, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys, time
        from buildfarm.coordinator.runlock import RunLock
        lock = RunLock({pg_database.url!r}, {str(tmp_path)!r})
        lock.acquire()
        print("locked", flush=True)
        time.sleep(600)
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "locked\n", holder.stderr
        lock = RunLock(pg_database.url, str(tmp_path))
        try:
            lock.acquire()
        finally:
            lock.release()
    except AlreadyRunningError as e:
        assert f"pid {holder.pid} on " in str(e)
    else:
        pytest.fail("a second lock was granted")
    finally:
        holder.kill()
        holder.communicate(timeout=WAIT)
    deadline = time.monotonic() + WAIT
    while True:  # the server ends the session once it sees the connection closed
        try:
            lock.acquire()
            break
        except AlreadyRunningError:
            assert time.monotonic() < deadline, "the lock outlived its process"
            time.sleep(0.05)
    lock.release()


def run_cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_every_command_takes_a_postgresql_url(
    pg_database: ScratchDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUILDFARM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("BUILDFARM_DB", raising=False)
    done = run_cli("--db", pg_database.url, "submit", str(HELLO), "--tag", "via=option")
    assert done.exit_code == 0, done.stderr
    (uuid,) = done.stdout.split()
    monkeypatch.setenv("BUILDFARM_DB", pg_database.url)
    listed = json.loads(run_cli("builds", "list", "--json").stdout)
    assert [b["uuid"] for b in listed] == [uuid]
    assert json.loads(run_cli("builds", "show", uuid, "--json").stdout)["tags"] == {
        "via": "option"
    }
    status = json.loads(run_cli("db", "status", "--json").stdout)
    assert status["engine"] == "postgresql"
    assert status["schema_version"] == status["latest_version"] == migrations.LATEST
    assert run_cli("db", "migrate").stdout.strip() == (
        f"schema version {migrations.LATEST}: up to date"
    )
    assert not (tmp_path / "state" / "buildfarm.db").exists()
    assert pg_database.scalar("SELECT COUNT(*) FROM build") == 1


def test_postgresql_errors_are_one_line_without_the_password(
    pg_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BUILDFARM_DB", raising=False)
    missing = pg_server.url_of("no_such_database").replace(
        "postgresql://postgres@", "postgresql://postgres:hunter2@"
    )
    unreachable = "postgres://nobody@/x?host=/nonexistent-socket-dir"
    for url, needle in ((missing, "does not exist"), (unreachable, "nonexistent-socket-dir")):
        done = run_cli("--db", url, "builds", "list")
        assert done.exit_code == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("Error: cannot open datastore postgres")
        assert needle in lines[0]
        assert "hunter2" not in lines[0]
    assert "postgresql://postgres:***@" in run_cli("--db", missing, "db", "status").stderr


# --- a farm on PostgreSQL under load ------------------------------------------------------------

HOOK = """#!{python}
import json, os, subprocess, sys
event = json.load(sys.stdin)
uuid = os.environ["BUILDFARM_BUILD_UUID"]
shown = subprocess.run([{python!r}, "-m", "buildfarm", "builds", "show", uuid, "--json"],
                       capture_output=True, text=True, check=True)
state = json.loads(shown.stdout)["state"]
with open(os.path.join({seen!r}, event["event"] + "-" + uuid), "w") as f:
    f.write(state)
"""


@pytest.fixture
def farm_env(pg_database: ScratchDatabase, tmp_path: Path) -> Iterator[dict[str, str]]:
    seen = tmp_path / "seen"
    seen.mkdir()
    for event in ("build-submitted", "build-success"):
        hook = tmp_path / "hooks" / f"{event}.d" / "50-show"
        hook.parent.mkdir(parents=True)
        hook.write_text(HOOK.format(python=sys.executable, seen=str(seen)))
        hook.chmod(0o755)
    yield {
        **os.environ,
        "BUILDFARM_DB": pg_database.url,
        "BUILDFARM_STATE_DIR": str(tmp_path / "state"),
        "BUILDFARM_INVENTORY": str(tmp_path / "inventory.yaml"),
        "BUILDFARM_HOOKS_DIR": str(tmp_path / "hooks"),
    }


def test_a_farm_on_postgresql_with_submitters_hooks_and_run_at_once(
    farm_env: dict[str, str], hosts: list[Host], pg_database: ScratchDatabase, tmp_path: Path
) -> None:
    tag = os.urandom(6).hex()
    exprs = [nix_expr_trivial(f"pg{n}-{tag}", f"echo {n} > $out") for n in range(8)]
    drvs = instantiate_all("[ " + " ".join(f"({e})" for e in exprs) + " ]")
    assert len(drvs) == 8
    Path(farm_env["BUILDFARM_INVENTORY"]).write_text(inventory_yaml(hosts, "nix"))
    command = [sys.executable, "-m", "buildfarm"]
    coordinator = subprocess.Popen(
        [*command, "run", "--no-ui"], env=farm_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    try:
        submit = GATE_PRELUDE + textwrap.dedent(
            f"""
            drvs = {drvs!r}
            mine = drvs[int(os.environ["WORKER"])]
            import subprocess
            for args in (["--ignore-if-built", drvs[0]], ["--tag", "batch={tag}", mine]):
                subprocess.run([*{command!r}, "submit", *args], check=True)
            """
        )
        procs = start_together([[sys.executable, "-c", submit]] * 8, tmp_path / "gate", farm_env)
        finish(procs)
        second = subprocess.run(
            [*command, "run", "--no-ui", "--exit-when-idle"], env=farm_env, capture_output=True,
            text=True, timeout=WAIT,
        )
        assert second.returncode == 1
        assert "is already using this datastore" in second.stderr
        seen = tmp_path / "seen"
        deadline = time.monotonic() + WAIT * 2
        while (
            len(list(seen.iterdir())) < 18
            or pg_database.scalar("SELECT COUNT(*) FROM event WHERE delivered_at IS NULL") > 0
        ):
            assert time.monotonic() < deadline, sorted(p.name for p in seen.iterdir())
            assert coordinator.poll() is None, coordinator.communicate()
            time.sleep(0.2)
    finally:
        coordinator.send_signal(signal.SIGTERM)
        out, _ = coordinator.communicate(timeout=WAIT)
    assert coordinator.returncode == 0, out
    for word in ("Traceback", "internal error", "datastore error", "interrupted"):
        assert word not in out, out
    states = pg_database.rows("SELECT state, COUNT(*) FROM build GROUP BY state")
    assert states == [("succeeded", 9)]  # 8 own builds + the one --ignore-if-built shared
    assert {p.read_text() for p in (tmp_path / "seen").glob("build-success-*")} == {"succeeded"}
    assert len(list((tmp_path / "seen").glob("build-submitted-*"))) == 9
    events = pg_database.rows("SELECT name, COUNT(*) FROM event GROUP BY name ORDER BY name")
    # drvs[0] is built twice (--ignore-if-built shared one build; worker 0 asked for another):
    # the second attempt may find the outputs on its machine and move to the other one.
    moved = pg_database.scalar("SELECT COUNT(*) FROM setup_failure WHERE kind = 'outputs-present'")
    assert moved in (0, 1)
    assert events == [("build-started", 9 + moved), ("build-submitted", 9),
                      ("build-success", 9)], out
    assert pg_database.scalar("SELECT COUNT(*) FROM event WHERE delivered_at IS NULL") == 0
    assert {s for (s,) in pg_database.rows("SELECT system FROM build")} == {current_system()}


def test_run_rides_through_a_server_restart(
    farm_env: dict[str, str], hosts: list[Host], testbed: Testbed, pg_database: ScratchDatabase,
    pg_server: PostgresServer,
) -> None:
    """The operator restarts PostgreSQL under a running farm: `run` reconnects, the build
    running meanwhile (it runs until the restart is over) and one submitted after the restart
    both succeed, and the run lock is taken again (a second `run` still refuses)."""
    tag = os.urandom(6).hex()
    gate = testbed.directory / f"gate-{tag}"
    wait = f"while [ ! -e {gate} ]; do sleep 0.1; done; echo slow > $out"
    slow, later = instantiate_all(
        f"[ ({nix_expr_trivial(f'pgslow-{tag}', wait)}) "
        f"({nix_expr_trivial(f'pglater-{tag}', 'echo later > $out')}) ]"
    )
    Path(farm_env["BUILDFARM_INVENTORY"]).write_text(inventory_yaml(hosts[:1], "nix"))
    farm_env = {**farm_env, "BUILDFARM_HOOKS_DIR": farm_env["BUILDFARM_HOOKS_DIR"] + "-none"}
    command = [sys.executable, "-m", "buildfarm"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *args], env=farm_env, capture_output=True, text=True,
                              timeout=WAIT)

    first = cli("submit", slow)
    assert first.returncode == 0, first.stderr
    coordinator = subprocess.Popen(
        [*command, "run", "--no-ui"], env=farm_env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )
    held = (
        "SELECT COUNT(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
        "WHERE l.locktype = 'advisory' AND l.granted "
        "AND starts_with(a.application_name, 'buildfarm run ')"
    )
    try:
        deadline = time.monotonic() + WAIT
        while pg_database.scalar("SELECT COUNT(*) FROM build WHERE state = 'running'") == 0:
            assert time.monotonic() < deadline, "the build never started"
            assert coordinator.poll() is None, coordinator.communicate()
            time.sleep(0.1)
        pg_server.restart()
        second = cli("submit", later)
        assert second.returncode == 0, second.stderr
        gate.touch()
        deadline = time.monotonic() + WAIT
        while pg_database.scalar("SELECT COUNT(*) FROM build WHERE state = 'succeeded'") < 2:
            assert time.monotonic() < deadline, pg_database.rows("SELECT state FROM build")
            assert coordinator.poll() is None, coordinator.communicate()
            time.sleep(0.2)
        while pg_database.scalar(held) == 0:
            assert time.monotonic() < deadline, "the run lock was not taken again"
            time.sleep(0.2)
        again = cli("run", "--no-ui", "--exit-when-idle")
        assert again.returncode == 1 and "is already using this datastore" in again.stderr
    finally:
        gate.touch()
        coordinator.send_signal(signal.SIGTERM)
        out, _ = coordinator.communicate(timeout=WAIT)
    assert coordinator.returncode == 0, out
    assert "datastore connection lost" in out and "datastore connection back" in out, out
    assert "Traceback" not in out and "internal error" not in out, out
    attempts = pg_database.rows("SELECT result, COUNT(*) FROM attempt GROUP BY result")
    assert attempts == [("success", 2)], (attempts, out)
