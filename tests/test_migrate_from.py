"""`buildfarm db migrate-from`: an SQLite datastore copied into the engine under test (SQLite or
PostgreSQL) without loss: builds in every state, their attempts, steps, tags, setup failures,
events, stored outputs and machine state, ids included."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from engines import ScratchDatabase, sqlite_url

from buildfarm import submission
from buildfarm.coordinator import scheduler
from buildfarm.datastore import attempts as records
from buildfarm.datastore import builds, events, migrations, open_datastore
from buildfarm.datastore.copy import copy_datastore
from buildfarm.datastore.models import MISSING_INPUTS, Event, MachineState
from buildfarm.errors import DatastoreError, UsageError

DATA = Path(__file__).parent / "data"
NIX, GUIX = DATA / "nix", DATA / "guix"
TOP = NIX / "mh9rm5mn3ff418ks6pxd8ixg08wlnzqf-top.drv"
DEP = NIX / "pld6g8hnp87b9d7yvkidbf4zi7hvm33k-dep.drv"
HELLO = NIX / "76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv"
MULTI = NIX / "wvggxvb799fi9m2yy2dyhr04plggbrll-multi.drv"
DIROUT = NIX / "j2d1hgv9jnq4l1wiphdk7jls1c39d6q3-dirout.drv"
GREP = GUIX / "63j9givlcpv1rd53sw8jz38aysmjkhhr-grep-3.8.drv"
COREUTILS = GUIX / "hcw8s7rwl4gv4dk79p9h8xf6rzafavrm-coreutils-9.1-checkout.drv"
SLOT = scheduler.Slot("builder-1", ("x86_64-linux",), frozenset())
TAGS = (("job", "nightly"), ("note", "ünïcode, 'quotes' and \\ backslash"))


def _submit(path: Path, priority: int, **options: Any) -> str:
    opts = submission.SubmitOptions(priority=priority, tags=TAGS, **options)
    (result,) = submission.submit([str(path)], opts)
    return result.uuid


def _allocate(uuid: str, now: float | None = None) -> int:
    attempt = scheduler.allocate(SLOT, now)
    assert attempt is not None and attempt.build.uuid == uuid
    return int(attempt.id)


def populate(url: str) -> dict[str, str]:
    """A datastore with builds in every state and attempts of every result; name -> UUID."""
    uuids: dict[str, str] = {}
    with open_datastore(url):
        uuids["top"] = _submit(TOP, 0)
        uuids["dep"] = _submit(DEP, 10)
        attempt = _allocate(uuids["dep"])  # top waits for dep
        records.step(attempt, "build", "on builder-1", log_path="/logs/dep.gz")
        records.fail(attempt, 1, "builder failed with exit status 1", "/logs/dep.gz")

        uuids["hello"] = _submit(HELLO, 20)
        attempt = _allocate(uuids["hello"])
        records.step(attempt, "build", inputs=[
            ("/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-glibc", "http://farm:8080"),
            ("/nix/store/yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy-gcc", "pushed")])
        records.step(attempt, "fetch-outputs")
        output = records.OutputRecord(
            path="/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello",
            deriver="/nix/store/" + HELLO.name,
            nar_hash="sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            nar_size=2**40 + 7,  # needs 64 bits
            references=("/nix/store/mjs27ix6ig2bkbi3s3sm470vrv4lf7ic-hello",),
            signature=b"farm-1:c2lnbmF0dXJl",
            file="/state/outputs/nar/x",
        )
        records.succeed(attempt, [output], "/logs/hello.gz")

        uuids["grep"] = _submit(GREP, 30)
        attempt = _allocate(uuids["grep"])
        records.setup_failure(
            attempt, MISSING_INPUTS, ["/gnu/store/aaaa-dep0-1.0", "/gnu/store/bbbb-dep1-1.0"],
            "the machine lacks 2 inputs", 60.0,
        )
        # Its hooks ran (before that, the build is not tried again).
        (missing,) = [e for e in events.pending(100) if e.name == "build-missing-inputs"]
        events.mark_delivered(missing.id)
        later = time.time() + 120
        attempt = _allocate(uuids["grep"], later)
        records.interrupt(attempt, "connection lost: reset by peer")
        attempt = _allocate(uuids["grep"], later)
        records.step(attempt, "build")  # left running: an open attempt

        uuids["multi"] = _submit(MULTI, 5)
        builds.cancel_builds([uuids["multi"]])
        uuids["dirout"] = _submit(DIROUT, -1, defer_until=time.time() + 86_400)
        uuids["coreutils"] = _submit(COREUTILS, -2)
        MachineState.create(
            name="builder-1", failures=0, backoff_until=None, last_error=None, updated_at=1.5
        )
        MachineState.create(
            name="builder-2", failures=3, backoff_until=time.time() + 30,
            last_error="connect: refused", updated_at=time.time(),
        )
        for event in events.pending(3):
            events.mark_delivered(event.id)
        assert Event.select().count() > 3
    return uuids


def shown(url: str, uuids: dict[str, str]) -> dict[str, Any]:
    with open_datastore(url):
        return {name: builds.show_build(uuid) for name, uuid in uuids.items()}


DATA_TABLES = (
    "attempt", "attempt_input", "attempt_step", "build", "build_tag", "derivation",
    "derivation_input", "derivation_output", "event", "machine_state", "missing_input",
    "setup_failure", "stored_output",
)


def cli(*args: str) -> Result:
    from buildfarm.cli import cli as command

    return CliRunner().invoke(command, list(args), catch_exceptions=False)


def test_every_state_attempt_tag_and_setup_failure_survives_the_copy(
    database: ScratchDatabase, tmp_path: Path
) -> None:
    source = ScratchDatabase("sqlite", sqlite_url(tmp_path / "old" / "buildfarm.db"))
    uuids = populate(source.url)
    states = dict(source.rows("SELECT state, COUNT(*) FROM build GROUP BY state"))
    assert states == {"queued": 2, "running": 1, "succeeded": 1, "failed": 2, "canceled": 1}
    results = {r for (r,) in source.rows("SELECT result FROM attempt")}
    assert results == {"failure", "success", "setup-failure", "interrupted", None}
    before = source.dump(DATA_TABLES)

    done = cli("--db", database.url, "db", "migrate-from", source.url)
    assert done.exit_code == 0, done.stderr
    assert "counts equal" in done.stdout and f"{len(before)} rows" in done.stdout
    assert "  build: 7" in done.stderr

    assert database.dump(DATA_TABLES) == before
    assert source.dump(DATA_TABLES) == before  # the source is only read
    assert shown(database.url, uuids) == shown(source.url, uuids)
    grep = shown(database.url, {"grep": uuids["grep"]})["grep"]
    assert [a["result"] for a in grep["attempts"]] == ["setup-failure", "interrupted", None]
    assert grep["attempts"][0]["missing_inputs"] == [
        "/gnu/store/aaaa-dep0-1.0", "/gnu/store/bbbb-dep1-1.0"
    ]
    assert grep["tags"] == dict(TAGS)

    # New rows continue after the copied ids.
    copied_max = database.scalar("SELECT MAX(id) FROM build")
    new = cli("--db", database.url, "submit", str(GUIX / GREP.name))
    assert new.exit_code == 0, new.stderr
    assert database.scalar("SELECT id FROM build WHERE uuid = ?", new.stdout.strip()) > copied_max
    event_max = max(r[0] for r in source.rows("SELECT id FROM event"))
    assert database.scalar("SELECT MAX(id) FROM event") > event_max


def test_a_copy_copied_back_is_identical(database: ScratchDatabase, tmp_path: Path) -> None:
    source = ScratchDatabase("sqlite", sqlite_url(tmp_path / "a.db"))
    populate(source.url)
    report = copy_datastore(source.url, database.url, seed=1)
    assert report.source_version == report.target_version == migrations.LATEST
    assert {t.table for t in report.tables} == set(DATA_TABLES)
    assert all(0 < t.compared <= t.rows for t in report.tables)
    back = ScratchDatabase("sqlite", sqlite_url(tmp_path / "back.db"))
    copy_datastore(database.url, back.url)
    assert back.dump(DATA_TABLES) == source.dump(DATA_TABLES)
    # AUTOINCREMENT counters came along too.
    assert back.rows("SELECT * FROM sqlite_sequence ORDER BY name") == source.rows(
        "SELECT * FROM sqlite_sequence ORDER BY name"
    )


def test_an_older_source_is_copied_then_migrated(
    database: ScratchDatabase, tmp_path: Path
) -> None:
    source = ScratchDatabase("sqlite", sqlite_url(tmp_path / "v1.db"))
    with open_datastore(source.url, upto=1):
        pass
    source.execute(
        "INSERT INTO derivation (path, system, contents, created_at) VALUES (?, ?, ?, ?)",
        "/gnu/store/aaaa-x.drv", "x86_64-linux", b"\x00\xffDerive", 1.25,
    )
    source.execute(
        "INSERT INTO build (uuid, derivation_id, system, state, priority, created_at) "
        "VALUES ('11111111-1111-1111-1111-111111111111', 1, 'x86_64-linux', 'queued', 3, 2.5)"
    )
    report = copy_datastore(source.url, database.url)
    assert (report.source_version, report.target_version) == (1, migrations.LATEST)
    assert "stored_output" not in {t.table for t in report.tables}
    assert database.rows("SELECT path, contents FROM derivation") == [
        ("/gnu/store/aaaa-x.drv", b"\x00\xffDerive")
    ]
    assert database.rows("SELECT uuid, priority, created_at, started_at FROM build") == [
        ("11111111-1111-1111-1111-111111111111", 3, 2.5, None)
    ]
    versions = database.rows("SELECT version FROM schema_migration ORDER BY version")
    assert versions == [(n,) for n in range(1, migrations.LATEST + 1)]
    assert source.rows("SELECT MAX(version) FROM schema_migration") == [(1,)]


def test_a_target_with_records_is_refused_and_left_alone(
    database: ScratchDatabase, tmp_path: Path
) -> None:
    source = ScratchDatabase("sqlite", sqlite_url(tmp_path / "src.db"))
    populate(source.url)
    with open_datastore(database.url):
        submission.submit([str(HELLO)], submission.SubmitOptions())
    before = database.dump(DATA_TABLES)
    with pytest.raises(UsageError, match="already holds builds"):
        copy_datastore(source.url, database.url)
    assert database.dump(DATA_TABLES) == before
    line = cli("--db", database.url, "db", "migrate-from", source.url).stderr.strip().splitlines()
    assert line[-1].startswith("Error: ") and "empty datastore only" in line[-1]


def test_sources_that_cannot_be_copied(database: ScratchDatabase, tmp_path: Path) -> None:
    with pytest.raises(DatastoreError, match="no such datastore file"):
        copy_datastore(sqlite_url(tmp_path / "missing.db"), database.url)
    assert not (tmp_path / "missing.db").exists()
    blank = ScratchDatabase("sqlite", sqlite_url(tmp_path / "blank.db"))
    blank.execute("CREATE TABLE unrelated (x INTEGER)")
    with pytest.raises(DatastoreError, match="holds no buildfarm datastore"):
        copy_datastore(blank.url, database.url)
    with pytest.raises(UsageError, match="the same datastore"):
        copy_datastore(database.url, database.url)
    strange = ScratchDatabase("sqlite", sqlite_url(tmp_path / "strange.db"))
    populate(strange.url)
    strange.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    with pytest.raises(DatastoreError, match=r"does not know \(notes\)"):
        copy_datastore(strange.url, database.url)
    assert database.dump([t for t in database.tables() if t != "schema_migration"]) == []


def test_db_status_after_a_copy(database: ScratchDatabase, tmp_path: Path) -> None:
    source = ScratchDatabase("sqlite", sqlite_url(tmp_path / "s.db"))
    populate(source.url)
    assert cli("--db", database.url, "db", "migrate-from", source.url).exit_code == 0
    status = json.loads(cli("--db", database.url, "db", "status", "--json").stdout)
    assert status["engine"] == database.engine
    assert status["schema_version"] == migrations.LATEST


# What the target does to machine_state's row builder-2 once it has arrived: drop it (the counts
# differ) or change it (the row read back differs). On SQLite a trigger on each insert; on
# PostgreSQL, whose COPY runs with the table's triggers off, an event trigger on the ALTER TABLE
# that switches them back on, i.e. right after the COPY.
_SQLITE_CORRUPTIONS = {
    "count": "DELETE FROM machine_state WHERE name = NEW.name",
    "sample": "UPDATE machine_state SET last_error = 'changed' WHERE name = NEW.name",
}
_POSTGRESQL_CORRUPTIONS = {
    "count": "DELETE FROM machine_state WHERE name = 'builder-2'",
    "sample": "UPDATE machine_state SET last_error = 'changed' WHERE name = 'builder-2'",
}


def corrupt_what_arrives(database: ScratchDatabase, how: str) -> None:
    with open_datastore(database.url):
        pass  # the schema, so that the trigger has its table
    if database.engine == "sqlite":
        database.execute(
            "CREATE TRIGGER corrupt AFTER INSERT ON machine_state WHEN NEW.name = 'builder-2' "
            f"BEGIN {_SQLITE_CORRUPTIONS[how]}; END")
        return
    database.execute(
        "CREATE FUNCTION corrupt() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands() "
        "WHERE object_identity = 'public.machine_state') "
        f"THEN {_POSTGRESQL_CORRUPTIONS[how]}; END IF; END $$")
    database.execute("CREATE EVENT TRIGGER corrupt ON ddl_command_end WHEN TAG IN ('ALTER TABLE') "
                     "EXECUTE FUNCTION corrupt()")


@pytest.mark.parametrize(("how", "error"), [
    ("count", "copy of machine_state does not add up: source 2 rows, read 2, target 1; "
              "nothing was committed"),
    ("sample", "copy of machine_state row name='builder-2' differs in the target; "
               "nothing was committed"),
])
def test_a_copy_that_does_not_match_the_source_is_rolled_back(
    database: ScratchDatabase, tmp_path: Path, how: str, error: str
) -> None:
    """The counts and the sample read back are what catch a copy gone wrong in the target."""
    source = ScratchDatabase("sqlite", sqlite_url(tmp_path / "src.db"))
    populate(source.url)
    before = source.dump(DATA_TABLES)
    corrupt_what_arrives(database, how)
    with pytest.raises(DatastoreError) as caught:
        copy_datastore(source.url, database.url)
    assert str(caught.value) == error
    assert database.dump(DATA_TABLES) == []  # all of it rolled back
    assert source.dump(DATA_TABLES) == before
    done = cli("--db", database.url, "db", "migrate-from", source.url)
    assert (done.exit_code, done.stderr.splitlines()[-1]) == (1, f"Error: {error}")
    assert database.dump(DATA_TABLES) == []
