"""Numbered schema migrations, applied in order at open time.

Each migration is plain DDL with a few type placeholders so that the same numbered steps run on
SQLite and PostgreSQL. A migration, once released, never changes: a later change is a new step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
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

MIGRATIONS: Sequence[tuple[int, str, Sequence[str]]] = (
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


def migrate(db: Any, upto: int | None = None) -> list[int]:
    """Apply every pending migration (up to `upto`), each in its own transaction."""
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
                for statement in statements:
                    db.execute_sql(statement.format(**types))
                p = db.param
                db.execute_sql(
                    "INSERT INTO schema_migration (version, description, applied_at) "
                    f"VALUES ({p}, {p}, {p})",
                    (version, description, time.time()),
                )
            done.append(version)
    return done
