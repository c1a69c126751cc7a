"""Numbered schema migrations, applied in order at open time.

Each migration is plain DDL with a few type placeholders so that the same numbered steps run on
SQLite and PostgreSQL. A migration, once released, never changes: a later change is a new step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .postgresql import MIGRATE_LOCK

# Placeholders: {pk} an auto-increment primary key, {real} a double, {blob} bytes, {big} 64-bit int.
_TYPES = {
    "sqlite": {
        "pk": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "real": "REAL",
        "blob": "BLOB",
        "big": "INTEGER",
    },
    "postgresql": {
        "pk": "BIGSERIAL PRIMARY KEY",
        "real": "DOUBLE PRECISION",
        "blob": "BYTEA",
        "big": "BIGINT",
    },
}

# Migration 3: a build's `waiting_on` counts the queued or running builds of its input
# derivations, kept by triggers in the transaction of every change (insert, state change,
# delete), so the scheduler reads the ready builds from a partial index instead of testing
# every queued build. A build entering the queue counts its own inputs; a build entering or
# leaving it adds or takes one from the builds that need it. SQLite fires row triggers one row
# at a time, so this holds for statements of many rows too; PostgreSQL's statement triggers
# recount from scratch instead (below).
_ACTIVE = "('queued', 'running')"
_WAITING_COUNT = (
    "(SELECT COUNT(*) FROM derivation_input AS wi"
    " JOIN derivation AS wd ON wd.path = wi.input_path"
    " JOIN build AS wb ON wb.derivation_id = wd.id"
    f" WHERE wi.derivation_id = build.derivation_id AND wb.state IN {_ACTIVE})"
)


def _sqlite_dependants(derivation_id: str, change: str) -> str:
    """SQL: add `change` to the count of the active builds that need derivation
    `derivation_id` (found by input path, then by derivation: `+state` keeps SQLite off the
    state index, which would scan the whole queue)."""
    return (
        f"UPDATE build SET waiting_on = waiting_on {change} "
        f"WHERE +build.state IN {_ACTIVE} AND build.derivation_id IN ("
        "SELECT di.derivation_id FROM derivation_input AS di"
        f" WHERE di.input_path = (SELECT path FROM derivation WHERE id = {derivation_id}))"
    )


_SQLITE_TRIGGERS = (
    f"""CREATE TRIGGER build_waiting_insert AFTER INSERT ON build
        WHEN NEW.state IN {_ACTIVE}
        BEGIN
            UPDATE build SET waiting_on = {_WAITING_COUNT} WHERE id = NEW.id;
            {_sqlite_dependants("NEW.derivation_id", "+ 1")};
        END""",
    f"""CREATE TRIGGER build_waiting_enter AFTER UPDATE OF state ON build
        WHEN OLD.state NOT IN {_ACTIVE} AND NEW.state IN {_ACTIVE}
        BEGIN
            UPDATE build SET waiting_on = {_WAITING_COUNT} WHERE id = NEW.id;
            {_sqlite_dependants("NEW.derivation_id", "+ 1")};
        END""",
    f"""CREATE TRIGGER build_waiting_leave AFTER UPDATE OF state ON build
        WHEN OLD.state IN {_ACTIVE} AND NEW.state NOT IN {_ACTIVE}
        BEGIN
            {_sqlite_dependants("NEW.derivation_id", "- 1")};
        END""",
    f"""CREATE TRIGGER build_waiting_delete AFTER DELETE ON build
        WHEN OLD.state IN {_ACTIVE}
        BEGIN
            {_sqlite_dependants("OLD.derivation_id", "- 1")};
        END""",
)


def _postgresql_recount(changed: str) -> str:
    """PL/pgSQL: recount the active builds among `changed` (a query of build rows) and the
    active builds whose derivation has one of theirs as an input."""
    return f"""
        UPDATE build SET waiting_on = {_WAITING_COUNT}
        WHERE build.state IN {_ACTIVE} AND (
            build.id IN (SELECT c.id FROM ({changed}) AS c)
            OR build.derivation_id IN (
                SELECT di.derivation_id FROM derivation_input AS di
                JOIN derivation AS dd ON dd.path = di.input_path
                WHERE dd.id IN (SELECT c.derivation_id FROM ({changed}) AS c)));"""


# PostgreSQL: statement-level triggers over transition tables (a column list is not allowed with
# them, so the update trigger itself keeps the rows whose state went in or out of the queue).
# The recount's own UPDATE fires the update trigger again: pg_trigger_depth() ends that at once.
_POSTGRESQL_TRIGGERS = (
    f"""CREATE FUNCTION build_waiting_rows() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            IF pg_trigger_depth() > 1 THEN RETURN NULL; END IF;
            {_postgresql_recount("SELECT id, derivation_id FROM changed_builds")}
            RETURN NULL;
        END $fn$""",
    f"""CREATE FUNCTION build_waiting_update() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            IF pg_trigger_depth() > 1 THEN RETURN NULL; END IF;
            PERFORM 1 FROM new_builds AS n JOIN old_builds AS o ON o.id = n.id
                WHERE (n.state IN {_ACTIVE}) <> (o.state IN {_ACTIVE}) LIMIT 1;
            IF NOT FOUND THEN RETURN NULL; END IF;
            {_postgresql_recount(
                "SELECT n.id, n.derivation_id FROM new_builds AS n JOIN old_builds AS o "
                f"ON o.id = n.id WHERE (n.state IN {_ACTIVE}) <> (o.state IN {_ACTIVE})")}
            RETURN NULL;
        END $fn$""",
    """CREATE TRIGGER build_waiting_insert AFTER INSERT ON build
        REFERENCING NEW TABLE AS changed_builds
        FOR EACH STATEMENT EXECUTE FUNCTION build_waiting_rows()""",
    """CREATE TRIGGER build_waiting_delete AFTER DELETE ON build
        REFERENCING OLD TABLE AS changed_builds
        FOR EACH STATEMENT EXECUTE FUNCTION build_waiting_rows()""",
    """CREATE TRIGGER build_waiting_state AFTER UPDATE ON build
        REFERENCING OLD TABLE AS old_builds NEW TABLE AS new_builds
        FOR EACH STATEMENT EXECUTE FUNCTION build_waiting_update()""",
)


# Migration 4, PostgreSQL: the recount above reads every queued build per change (its OR of two
# sets keeps the planner off the indexes), so a completion cost 0.2-0.3 s at 10,000 queued builds
# or more and a submission grew with the square of its size. Now, as SQLite's row triggers do,
# only the builds entering the queue are counted from scratch, and the builds that need a
# changed one get the difference: +1 per input build that entered, -1 per one that left. Both
# reach their rows through indexes. The count is nested subqueries, which fixes the order
# PostgreSQL reads them in (inputs, their derivation, its active builds): as a join, the planner
# may start from every active build when its statistics predate a big submission.
_POSTGRESQL_WAITING_COUNT = (
    "(SELECT COALESCE(SUM((SELECT COUNT(*) FROM build AS wb"
    " WHERE wb.derivation_id = (SELECT wd.id FROM derivation AS wd WHERE wd.path = wi.input_path)"
    f" AND wb.state IN {_ACTIVE})), 0)"
    " FROM derivation_input AS wi WHERE wi.derivation_id = build.derivation_id)"
)


def _postgresql_count_and_shift(changed: str) -> str:
    """PL/pgSQL: count from scratch the builds of `changed` (id, derivation_id, sign: +1 a
    build that entered the queue, -1 one that left it) that entered; add the signs to the
    other active builds whose derivation has theirs as an input."""
    return f"""
        UPDATE build SET waiting_on = {_POSTGRESQL_WAITING_COUNT}
        WHERE build.id IN (SELECT c.id FROM ({changed}) AS c WHERE c.sign = 1)
            AND build.state IN {_ACTIVE};
        UPDATE build SET waiting_on = build.waiting_on + shift.delta
        FROM (SELECT di.derivation_id, SUM(c.sign) AS delta
              FROM ({changed}) AS c
              JOIN derivation AS dd ON dd.id = c.derivation_id
              JOIN derivation_input AS di ON di.input_path = dd.path
              GROUP BY di.derivation_id) AS shift
        WHERE build.derivation_id = shift.derivation_id AND build.state IN {_ACTIVE}
            AND build.id NOT IN (SELECT c.id FROM ({changed}) AS c WHERE c.sign = 1);"""


_POSTGRESQL_SHIFTING = (
    f"""CREATE OR REPLACE FUNCTION build_waiting_rows() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            IF pg_trigger_depth() > 1 THEN RETURN NULL; END IF;
            {_postgresql_count_and_shift(
                "SELECT id, derivation_id, CASE TG_OP WHEN 'INSERT' THEN 1 ELSE -1 END AS sign "
                f"FROM changed_builds WHERE state IN {_ACTIVE}")}
            RETURN NULL;
        END $fn$""",
    f"""CREATE OR REPLACE FUNCTION build_waiting_update() RETURNS trigger LANGUAGE plpgsql AS $fn$
        BEGIN
            IF pg_trigger_depth() > 1 THEN RETURN NULL; END IF;
            PERFORM 1 FROM new_builds AS n JOIN old_builds AS o ON o.id = n.id
                WHERE (n.state IN {_ACTIVE}) <> (o.state IN {_ACTIVE}) LIMIT 1;
            IF NOT FOUND THEN RETURN NULL; END IF;
            {_postgresql_count_and_shift(
                f"SELECT n.id, n.derivation_id, CASE WHEN n.state IN {_ACTIVE} THEN 1 ELSE -1 "
                "END AS sign FROM new_builds AS n JOIN old_builds AS o ON o.id = n.id "
                f"WHERE (n.state IN {_ACTIVE}) <> (o.state IN {_ACTIVE})")}
            RETURN NULL;
        END $fn$""",
)


# A step is DDL text, or {engine: (DDL text, ...)} where the engines need different statements.
Step = str | Mapping[str, Sequence[str]]

MIGRATIONS: Sequence[tuple[int, str, Sequence[Step]]] = (
    (
        1,
        "builds, derivations, tags, attempts, setup failures, machine state, events",
        (
            """CREATE TABLE derivation (
                id {pk},
                path TEXT NOT NULL UNIQUE,
                system TEXT NOT NULL,
                required_features TEXT NOT NULL DEFAULT '',
                contents {blob} NOT NULL,
                created_at {real} NOT NULL)""",
            """CREATE TABLE derivation_output (
                id {pk},
                derivation_id {big} NOT NULL REFERENCES derivation (id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                path TEXT NOT NULL,
                hash_algo TEXT NOT NULL DEFAULT '',
                hash TEXT NOT NULL DEFAULT '')""",
            "CREATE UNIQUE INDEX derivation_output_name ON derivation_output (derivation_id, name)",
            "CREATE INDEX derivation_output_path ON derivation_output (path)",
            """CREATE TABLE derivation_input (
                id {pk},
                derivation_id {big} NOT NULL REFERENCES derivation (id) ON DELETE CASCADE,
                input_path TEXT NOT NULL,
                outputs TEXT NOT NULL)""",
            "CREATE UNIQUE INDEX derivation_input_path "
            "ON derivation_input (derivation_id, input_path)",
            "CREATE INDEX derivation_input_input ON derivation_input (input_path)",
            """CREATE TABLE build (
                id {pk},
                uuid TEXT NOT NULL UNIQUE,
                derivation_id {big} NOT NULL REFERENCES derivation (id),
                system TEXT NOT NULL,
                required_features TEXT NOT NULL DEFAULT '',
                state TEXT NOT NULL,
                priority INTEGER NOT NULL DEFAULT 0,
                created_at {real} NOT NULL,
                defer_until {real},
                ended_at {real},
                reason TEXT)""",
            "CREATE INDEX build_queue ON build (state, system, priority DESC, created_at, id)",
            "CREATE INDEX build_derivation ON build (derivation_id, state)",
            "CREATE INDEX build_created ON build (created_at)",
            """CREATE TABLE build_tag (
                id {pk},
                build_id {big} NOT NULL REFERENCES build (id) ON DELETE CASCADE,
                key TEXT NOT NULL,
                value TEXT NOT NULL)""",
            "CREATE UNIQUE INDEX build_tag_key ON build_tag (build_id, key)",
            "CREATE INDEX build_tag_kv ON build_tag (key, value)",
            """CREATE TABLE attempt (
                id {pk},
                build_id {big} NOT NULL REFERENCES build (id) ON DELETE CASCADE,
                machine TEXT NOT NULL,
                started_at {real} NOT NULL,
                ended_at {real},
                result TEXT,
                step TEXT NOT NULL DEFAULT '',
                exit_status INTEGER,
                detail TEXT,
                log_path TEXT)""",
            "CREATE INDEX attempt_build ON attempt (build_id)",
            "CREATE INDEX attempt_open ON attempt (result, machine)",
            """CREATE TABLE setup_failure (
                id {pk},
                attempt_id {big} NOT NULL REFERENCES attempt (id) ON DELETE CASCADE,
                kind TEXT NOT NULL)""",
            "CREATE INDEX setup_failure_attempt ON setup_failure (attempt_id)",
            """CREATE TABLE missing_input (
                id {pk},
                setup_failure_id {big} NOT NULL REFERENCES setup_failure (id) ON DELETE CASCADE,
                path TEXT NOT NULL)""",
            "CREATE INDEX missing_input_failure ON missing_input (setup_failure_id)",
            """CREATE TABLE machine_state (
                name TEXT PRIMARY KEY,
                failures INTEGER NOT NULL DEFAULT 0,
                backoff_until {real},
                last_error TEXT,
                updated_at {real} NOT NULL)""",
            """CREATE TABLE event (
                id {pk},
                name TEXT NOT NULL,
                build_id {big} REFERENCES build (id) ON DELETE CASCADE,
                payload TEXT NOT NULL,
                created_at {real} NOT NULL,
                delivered_at {real})""",
            "CREATE INDEX event_pending ON event (delivered_at, id)",
        ),
    ),
    (
        2,
        "attempt steps and the output store's records",
        (
            """CREATE TABLE attempt_step (
                id {pk},
                attempt_id {big} NOT NULL REFERENCES attempt (id) ON DELETE CASCADE,
                name TEXT NOT NULL,
                started_at {real} NOT NULL,
                ended_at {real},
                detail TEXT)""",
            "CREATE INDEX attempt_step_attempt ON attempt_step (attempt_id)",
            """CREATE TABLE stored_output (
                id {pk},
                path TEXT NOT NULL UNIQUE,
                deriver TEXT NOT NULL DEFAULT '',
                nar_hash TEXT NOT NULL,
                nar_size {big} NOT NULL,
                refs TEXT NOT NULL DEFAULT '',
                signature TEXT,
                file TEXT NOT NULL,
                created_at {real} NOT NULL,
                last_used_at {real} NOT NULL)""",
            "CREATE INDEX stored_output_used ON stored_output (last_used_at)",
            "ALTER TABLE build ADD COLUMN started_at {real}",
            # When a build may be tried again after a setup failure (defer_until is the user's).
            "ALTER TABLE build ADD COLUMN retry_after {real}",
        ),
    ),
    (
        3,
        "ready builds: waiting_on counts, its triggers and the scheduler's partial index; "
        "indexes for newest-first listings",
        (
            "ALTER TABLE build ADD COLUMN waiting_on INTEGER NOT NULL DEFAULT 0",
            f"UPDATE build SET waiting_on = {_WAITING_COUNT} WHERE state IN {_ACTIVE}",
            {"sqlite": _SQLITE_TRIGGERS, "postgresql": _POSTGRESQL_TRIGGERS},
            # What the scheduler reads: one ordered range per (system, required features).
            "CREATE INDEX build_ready ON build "
            "(system, required_features, priority DESC, created_at, id) "
            "WHERE state = 'queued' AND waiting_on = 0",
            # `builds list`, newest first, with or without a state or system filter.
            "DROP INDEX build_created",
            "CREATE INDEX build_newest ON build (created_at, id)",
            "CREATE INDEX build_state_newest ON build (state, created_at, id)",
        ),
    ),
    (
        4,
        "PostgreSQL: waiting_on kept by differences, through indexes, not recounted",
        ({"sqlite": (), "postgresql": _POSTGRESQL_SHIFTING},),
    ),
    (
        5,
        "failures remembered and retries bounded: a dependency-failed build's root cause, "
        "a build's attempts in a row that made no progress, a rebuild's comparison, "
        "undelivered events by build",
        (
            # The failed build at the bottom of the chain that made this one dependency-failed
            # (no REFERENCES: a cause may come after the build in id order, which a copy of
            # the table into SQLite, one row per statement, would refuse).
            "ALTER TABLE build ADD COLUMN cause_id {big}",
            "CREATE INDEX build_cause ON build (cause_id) WHERE cause_id IS NOT NULL",
            # Attempts in a row that ended without progress (setup failures, lost connections,
            # failed transfers): bounded, then the build ends failed.
            "ALTER TABLE build ADD COLUMN fruitless_attempts INTEGER NOT NULL DEFAULT 0",
            # A rebuild over outputs already on the machine (--check): identical or differs.
            "ALTER TABLE attempt ADD COLUMN check_result TEXT",
            # A build whose missing inputs the hooks have yet to hear of is not tried again:
            # the scheduler looks its undelivered events up here.
            "CREATE INDEX event_undelivered ON event (build_id) WHERE delivered_at IS NULL",
        ),
    ),
    (
        6,
        "where each input of an attempt came from: the machine, the coordinator, a server",
        (
            """CREATE TABLE attempt_input (
                id {pk},
                attempt_id {big} NOT NULL REFERENCES attempt (id) ON DELETE CASCADE,
                path TEXT NOT NULL,
                source TEXT NOT NULL)""",
            "CREATE INDEX attempt_input_attempt ON attempt_input (attempt_id)",
        ),
    ),
    (
        7,
        "operator controls: retries of builder failures and flaky builds, machine tags a "
        "build needs (in the scheduler's index), what the coordinator knows of each machine",
        (
            # How many times a builder failure is tried again (NULL: the inventory's
            # build_retries); how many builder failures the build has had.
            "ALTER TABLE build ADD COLUMN retries INTEGER",
            "ALTER TABLE build ADD COLUMN builder_failures INTEGER NOT NULL DEFAULT 0",
            # Flaky: succeeded after a builder failure (builds list --flaky, newest first).
            "CREATE INDEX build_flaky ON build (created_at, id) "
            "WHERE state = 'succeeded' AND builder_failures > 0",
            # The machine tags a build needs, sorted KEY=VALUE words joined by spaces (as
            # required_features): one more column of the ranges the scheduler reads.
            "ALTER TABLE build ADD COLUMN machine_tags TEXT NOT NULL DEFAULT ''",
            "DROP INDEX build_ready",
            "CREATE INDEX build_ready ON build "
            "(system, required_features, machine_tags, priority DESC, created_at, id) "
            "WHERE state = 'queued' AND waiting_on = 0",
            # `buildfarm queue` and a queued build's reason: the queue by system and reason.
            "CREATE INDEX build_waiting ON build "
            "(state, system, waiting_on, required_features, machine_tags, defer_until, "
            "retry_after, created_at)",
            # What run last knew of each machine (JSON: what it offers, its status and until
            # when), for the reason a queued build is not running.
            "ALTER TABLE machine_state ADD COLUMN report TEXT",
            "ALTER TABLE machine_state ADD COLUMN reported_at {real}",
        ),
    ),
)

LATEST = MIGRATIONS[-1][0]


def engine_of(db: Any) -> str:
    """'sqlite' or 'postgresql', from the peewee database class."""
    import peewee as pw

    return "postgresql" if isinstance(db, pw.PostgresqlDatabase) else "sqlite"


def applied_version(db: Any) -> int:
    """The highest migration number recorded in the datastore (0 for an empty one)."""
    if "schema_migration" not in db.get_tables():
        return 0
    row = db.execute_sql("SELECT MAX(version) FROM schema_migration").fetchone()
    return int(row[0] or 0)


@contextlib.contextmanager
def _one_migrator(db: Any) -> Iterator[None]:
    """On PostgreSQL, a session advisory lock: two processes opening a new datastore at once
    must not both create schema_migration (SQLite's IMMEDIATE transactions already queue)."""
    if engine_of(db) != "postgresql":
        yield
        return
    db.execute_sql("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
    try:
        yield
    finally:
        db.execute_sql("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))


def _statements(steps: Sequence[Step], engine: str) -> list[str]:
    """The DDL text of `steps` for `engine`, in order."""
    texts: list[str] = []
    for step in steps:
        texts.extend([step] if isinstance(step, str) else step[engine])
    return texts


def migrate(db: Any, upto: int | None = None) -> list[int]:
    """Apply every pending migration (up to `upto`), each in its own transaction."""
    if applied_version(db) >= (LATEST if upto is None else min(upto, LATEST)):
        return []  # the usual case: no lock, no transaction (every command opens the datastore)
    types = _TYPES[engine_of(db)]
    done: list[int] = []
    with _one_migrator(db):
        db.execute_sql(
            "CREATE TABLE IF NOT EXISTS schema_migration "
            f"(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at {types['real']})"
        )
        for version, description, statements in MIGRATIONS:
            if upto is not None and version > upto:
                break
            with db.atomic():
                # Re-read inside the transaction: another process may have migrated meanwhile.
                if applied_version(db) >= version:
                    continue
                for statement in _statements(statements, engine_of(db)):
                    db.execute_sql(statement.format(**types))
                p = db.param
                db.execute_sql(
                    "INSERT INTO schema_migration (version, description, applied_at) "
                    f"VALUES ({p}, {p}, {p})",
                    (version, description, time.time()),
                )
            done.append(version)
    return done
